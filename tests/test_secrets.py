"""The API key never leaves the process: not in the run directory (any file, state.db bytes and the
log included), not on stdout or stderr, not in an exception message, not in the simulator's audit.

Every run here uses ``--verbose`` (or ``verbose=True``) and the simulator's faults, so error and
retry paths are logged too. The key is made at run time (the ``api_key`` fixture).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, closed_port, fast_settings, write_manifest
from kill_harness import subprocess_env

from pipeline.batch import ManifestArgs, run_batch
from pipeline.cli import cli
from pipeline.client import RetryPolicy
from pipeline.sim import Faults

ROOT = Path(__file__).resolve().parent.parent

# Every fault at once, with rates high enough to hit every error path in a 20-row run.
EVERY_FAULT = Faults(http_5xx=0.1, drop_connection=0.1, garbage_body=0.1, slow_answer=0.05,
                     slow_answer_s=0.02, task_failure=0.1, lost_create=0.1, create_813=0.1,
                     status_outputs_lag_s=100, poll_rate_limit_per_s=20)
# In a subprocess the CLI's own (production) poll intervals apply: a task whose end the account
# signal misses (lost creates keep the account's count up; outputs lagging behind status; 1003
# answers waiting ~10 s) is only asked about every 30 s. Those three run in process instead.
# An account signal delayed by retries has the same effect.
# The production retry policy's backoff (up to 20 s) also applies, so the rates are lower there.
SUBPROCESS_FAULTS = Faults(http_5xx=0.04, drop_connection=0.04, garbage_body=0.04, slow_answer=0.05,
                           slow_answer_s=0.02, task_failure=0.1, create_813=0.1)


def assert_nowhere(key: str, *, texts: tuple[str, ...] = (), dirs: tuple[Path, ...] = ()) -> int:
    """Fail if ``key`` (or its bytes) is in any text or any file under ``dirs``; count files seen."""
    for text in texts:
        assert key not in text
    needle = key.encode()
    seen = 0
    for root in dirs:
        for path in root.rglob("*"):
            if path.is_file():
                seen += 1
                assert needle not in path.read_bytes(), f"the key is in {path}"
    return seen


def _fast_policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=6, max_total_s=20.0, initial_wait_s=0.01, max_wait_s=0.05,
                       retry_after_cap_s=0.05)


def _rhbatch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.timeout(120)
def test_cli_subprocess_under_every_fault_never_shows_the_key(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=10, seed=21, faults=SUBPROCESS_FAULTS, task_duration_s=(5.0, 20.0))
    manifest = write_manifest(tmp_path / "m.csv", 20)
    run_dir = tmp_path / "run"
    env = subprocess_env(sim.base_url, api_key)
    done = _rhbatch(["run", str(manifest), "--out", str(run_dir), "--verbose", "--concurrency",
                     "10", *FAST_FLAGS], env)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert "WARNING" in done.stderr or "INFO" in done.stderr  # --verbose did log the faults
    outputs = [done.stdout, done.stderr]
    for args in (["status", str(run_dir)], ["export", str(run_dir), "--format", "csv", "-o",
                                            str(run_dir / "x.csv")],
                 ["export", str(run_dir), "--format", "parquet", "-o", str(run_dir / "x.parquet")],
                 ["report", str(run_dir)]):
        extra = _rhbatch(args, env)
        assert extra.returncode == 0, extra.stderr
        outputs += [extra.stdout, extra.stderr]
    unknown = _rhbatch(["retry", str(run_dir), "--unknown", "--accept-double-pay", *FAST_FLAGS],
                       env)
    outputs += [unknown.stdout, unknown.stderr]
    assert (run_dir / "rhbatch.log").stat().st_size > 0
    seen = assert_nowhere(api_key, texts=tuple(outputs), dirs=(run_dir,))
    assert seen >= 6  # state.db (+ wal), rhbatch.log, results.jsonl/csv, exports, report
    dump = sim.audit.dump_jsonl(tmp_path / "audit.jsonl")
    assert dump.stat().st_size > 0
    assert_nowhere(api_key, dirs=(tmp_path,))


@pytest.mark.timeout(120)
def test_the_key_given_as_a_flag_stays_out_of_files_and_messages(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=5, faults=Faults(http_5xx=0.2, drop_connection=0.1))
    manifest = write_manifest(tmp_path / "m.csv", 8)
    env = dict(os.environ)
    env.pop("RUNNINGHUB_API_KEY", None)
    env["PYTHONPATH"] = str(ROOT)
    done = _rhbatch(["run", str(manifest), "--out", str(tmp_path / "run"), "--api-key", api_key,
                     "--base-url", sim.base_url, "-v", *FAST_FLAGS], env)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert_nowhere(api_key, texts=(done.stdout, done.stderr), dirs=(tmp_path,))


@pytest.mark.timeout(60)
def test_in_process_run_under_every_fault_logs_no_key(make_sim, api_key, tmp_path, caplog, capfd):
    sim = make_sim(concurrency=10, seed=22, faults=EVERY_FAULT, task_duration_s=(5.0, 20.0))
    manifest = write_manifest(tmp_path / "m.csv", 20)
    caplog.set_level(logging.DEBUG, logger="rhbatch")
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
                        fast_settings(sim, api_key, concurrency=10), policy=_fast_policy(),
                        verbose=True, handle_signals=False)
    assert summary.exit_code in (0, 1)
    assert caplog.records  # the faults were logged
    # the records as logged, before any handler's redaction: the messages themselves are clean
    texts = [r.getMessage() for r in caplog.records]
    texts += [repr(summary), *(str(v) for v in summary.__dict__.values())]
    captured = capfd.readouterr()
    assert_nowhere(api_key, texts=(*texts, captured.out, captured.err), dirs=(tmp_path,))


@pytest.mark.timeout(60)
def test_error_messages_never_hold_the_key(make_sim, api_key, tmp_path, caplog):
    from pipeline.config import resolve_settings
    from pipeline.errors import RhbatchError

    caplog.set_level(logging.DEBUG, logger="rhbatch")
    manifest = write_manifest(tmp_path / "m.csv", 3)
    sim = make_sim()
    runner = CliRunner()
    env = {"RUNNINGHUB_API_KEY": api_key}
    texts: list[str] = []
    for url in ("ftp://example.com", "not a url", "https://"):
        res = runner.invoke(cli, ["run", str(manifest), "--out", str(tmp_path / "a"), "--base-url",
                                  url], env=env)
        assert res.exit_code == 2, res.output
        assert "is not an http(s) URL: set RUNNINGHUB_BASE_URL or --base-url" in res.stderr
        texts += [res.stdout, res.stderr]
    # 412: the simulator does not know this key (and both keys stay hidden)
    other_key = "f" * 32
    res = runner.invoke(cli, ["run", str(manifest), "--out", str(tmp_path / "c"), "-v",
                              "--base-url", sim.base_url, "--api-key", other_key, *FAST_FLAGS],
                        env=env)
    assert res.exit_code == 3, res.output
    assert "412" in res.stderr and "check RUNNINGHUB_API_KEY" in res.stderr
    assert_nowhere(other_key, texts=(res.stdout, res.stderr), dirs=(tmp_path / "c",))
    texts += [res.stdout, res.stderr]
    # the exceptions themselves, in process
    errors = []
    for kwargs in ({"api_key": api_key + " with spaces"},
                   {"api_key": api_key, "concurrency": -1},
                   {"api_key": api_key, "base_url": "ftp://h"}):
        with pytest.raises(RhbatchError) as info:
            resolve_settings(env={}, **kwargs)
        errors.append(info.value)
    # connection refused: nothing listens there
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "d",
                        resolve_settings(api_key=api_key,
                                         base_url=f"http://127.0.0.1:{closed_port()}", env={}),
                        policy=_fast_policy(), handle_signals=False, verbose=True)
    assert summary.exit_code == 3 and "unreachable" in (summary.stopped or "")
    texts += [repr(summary)] + [str(e) for e in errors] + [repr(e.args) for e in errors]
    texts += [r.getMessage() for r in caplog.records]
    assert_nowhere(api_key, texts=tuple(texts), dirs=(tmp_path,))


def test_a_base_url_holding_the_key_is_never_echoed(api_key):
    from pipeline.config import resolve_settings
    from pipeline.errors import ConfigError

    for url in (f"htp://user:{api_key}@example.com", f"http://user:{api_key}@[::1"):
        with pytest.raises(ConfigError) as info:
            resolve_settings(api_key=None, base_url=url, env={})
        assert api_key not in str(info.value)
