"""Bounded and truthful under hostile answers and stuck services, over real HTTP: every request
has a deadline, every answer a size cap, parsing never crashes, stuck tasks and outages end."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import closed_port, fast_settings, read_results, write_manifest
from kill_harness import subprocess_env
from test_faults import fast_policy

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.client import RetryPolicy, RunningHubClient
from pipeline.errors import TASK_TIMEOUT_CODE, ApiConnectionError, StorageError, SubmitUnknownError
from pipeline.sim import Faults

ROOT = Path(__file__).resolve().parent.parent


def _client(sim, api_key, **settings):
    return RunningHubClient(fast_settings(sim, api_key, **settings),
                            policy=RetryPolicy(max_attempts=1))


def test_a_trickled_create_ends_submit_unknown_at_the_request_deadline(make_sim, api_key):
    sim = make_sim(faults=Faults(after_work=1.0, after_work_modes=("trickle",),
                                 trickle_interval_s=0.5))

    async def go():
        async with _client(sim, api_key, request_deadline_s=1.5) as client:
            started = time.monotonic()
            with pytest.raises(SubmitUnknownError) as info:
                await client.create({"workflowId": "1904136902449209346", "nodeInfoList": []})
            return time.monotonic() - started, info.value

    took, error = asyncio.run(go())
    assert 1.5 <= took < 2.5, took  # within the deadline + 1 s, not one read timeout per byte
    assert "no complete answer within the 1.5 s request deadline" in str(error)
    assert len(sim.audit.tasks()) == 1  # the task was made: that is why it is never resent


_RSS_PROBE = textwrap.dedent('''
    import asyncio, json, sys
    from pipeline.client import RetryPolicy, RunningHubClient
    from pipeline.config import resolve_settings
    settings = resolve_settings(api_key=sys.argv[2], base_url=sys.argv[1], env={})
    def hwm():  # this process's peak RSS in KiB (ru_maxrss would include the parent's, pre-exec)
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    before = hwm()
    async def go():
        async with RunningHubClient(settings, policy=RetryPolicy(max_attempts=1)) as client:
            try:
                await client.account_status()
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return "no error"
    said = asyncio.run(go())
    after = hwm()
    print(json.dumps({"said": said, "peak_mb": after / 1024, "growth_mb": (after - before) / 1024}))
''')


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault,size", [("oversized", 200 * 2**20), ("gzip_bomb", 2**30)])
def test_a_huge_or_bombed_answer_is_refused_within_a_stated_memory_bound(fault, size, make_sim,
                                                                         api_key):
    sim = make_sim(faults=Faults(**{fault: 1.0, f"{fault}_bytes": size},
                                 routes=("account_status",)))
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, sim.base_url, api_key],
                           capture_output=True, text=True, timeout=100,
                           env=subprocess_env(sim.base_url, api_key))
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["said"].startswith("ApiConnectionError: /uc/openapi/accountStatus: the answer ")
    assert ("is larger than 8 MiB" in result["said"]) == (fault == "oversized")
    assert ("inflates past 8 MiB" in result["said"]) == (fault == "gzip_bomb")
    assert result["peak_mb"] < 200, result  # the bound the issue states, for the whole process
    assert result["growth_mb"] < 64, result


@pytest.mark.parametrize("faults", [Faults(deep_json=1.0, routes=("account_status",)),
                                    Faults(nan_counts=1.0, nan_counts_style="string"),
                                    Faults(nan_counts=1.0, nan_counts_style="token")])
def test_rhbatch_account_says_what_is_wrong_with_a_broken_answer_and_never_crashes(
        faults, make_sim, api_key):
    sim = make_sim(faults=faults)
    done = subprocess.run([sys.executable, "-m", "pipeline", "account"], capture_output=True,
                          text=True, timeout=60, env=subprocess_env(sim.base_url, api_key))
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: ")
    assert ("not a whole number" in done.stderr) or ("was not JSON" in done.stderr)


def test_a_run_survives_nan_counts_deep_json_and_oversized_polls_and_writes_strict_json(
        make_sim, api_key, tmp_path):
    sim = make_sim(seed=9, faults=Faults(nan_counts=0.5, deep_json=0.1, oversized=0.05,
                                         oversized_bytes=9 * 2**20,
                                         routes=("account_status", "outputs", "v2_query")))
    manifest = write_manifest(tmp_path / "m.csv", 30)
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
                        fast_settings(sim, api_key, concurrency=10), policy=fast_policy(),
                        handle_signals=False)
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 30
    injected = {f for r in sim.audit.faults() for f in r["fault"].split("+")}
    assert {"nan_counts", "deep_json"} <= injected

    def no_constants(name):
        raise AssertionError(f"{name} in a results file")

    for line in (tmp_path / "run" / "results.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line, parse_constant=no_constants)


@pytest.mark.timeout(60)
def test_a_task_that_never_ends_is_cancelled_at_the_task_timeout_and_fails_with_its_own_code(
        make_sim, api_key, tmp_path):
    sim = make_sim(time_scale=1.0, task_duration_s=10**6, queue_delay_s=0.0,
                   coins_per_second=1.0)
    manifest = write_manifest(tmp_path / "m.csv", 3)
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
                        fast_settings(sim, api_key, concurrency=3, task_timeout_s=1.5),
                        policy=fast_policy(), handle_signals=False)
    records = read_results(tmp_path / "run")
    assert summary.exit_code == 1
    assert [r["status"] for r in records] == ["FAILED"] * 3
    assert {r["error_code"] for r in records} == {TASK_TIMEOUT_CODE}
    assert all("cancelled on RunningHub" in r["error"] for r in records)
    assert all(f"rhbatch retry DIR --code {TASK_TIMEOUT_CODE}" in r["error"] for r in records)
    assert {t["status"] for t in sim.audit.tasks()} == {"CANCEL"}
    # what the cancelled tasks ran is billed, and counted
    ledger = sim.audit.ledger()
    assert all(r["coins"] == ledger[r["taskId"]] and r["coins"] > 0 for r in records)


def _run_in_thread(target):
    outcome: dict = {}

    def body():
        try:
            outcome["summary"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.timeout(60)
def test_an_outage_says_so_once_a_minute_and_gives_up_after_the_limit(make_sim, api_key,
                                                                      tmp_path):
    sim = make_sim(time_scale=1.0, task_duration_s=60.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 6)
    settings = fast_settings(sim, api_key, concurrency=3, give_up_after_s=3.0,
                             connect_timeout_s=0.5)
    thread, outcome = _run_in_thread(lambda: run_batch(
        ManifestArgs(manifest, preflight=False), tmp_path / "run", settings,
        policy=RetryPolicy(max_attempts=2, max_total_s=1.0, initial_wait_s=0.01, max_wait_s=0.02),
        handle_signals=False))
    deadline = time.monotonic() + 20
    while len(sim.audit.tasks()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sim.close()  # RunningHub goes away: every request is refused from now on
    thread.join(30)
    assert not thread.is_alive()
    summary = outcome["summary"]
    assert summary.exit_code == 3
    assert summary.stopped.startswith("RunningHub has been unreachable since ")
    assert "(--give-up-after 3 s)" in summary.stopped
    log = (tmp_path / "run" / "rhbatch.log").read_text(encoding="utf-8")
    assert log.count("RunningHub unreachable since") == 1, log
    assert "failed (attempt" not in log  # no line per retried request
    counts = summary.counts
    assert counts[st.RUNNING] + counts[st.QUEUED] == 3 and counts[st.PENDING] == 3


@pytest.mark.timeout(60)
def test_a_run_whose_directory_is_deleted_stops_at_once_with_exit_3(make_sim, api_key, tmp_path):
    sim = make_sim(time_scale=1.0, task_duration_s=60.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 6)
    run_dir = tmp_path / "run"
    thread, outcome = _run_in_thread(lambda: run_batch(
        ManifestArgs(manifest, preflight=False), run_dir,
        fast_settings(sim, api_key, concurrency=2), policy=fast_policy(), handle_signals=False))
    deadline = time.monotonic() + 20
    while len(sim.audit.tasks()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    shutil.rmtree(run_dir)
    started = time.monotonic()
    thread.join(20)
    assert not thread.is_alive()
    assert time.monotonic() - started < 6
    error = outcome.get("error")
    assert isinstance(error, StorageError), outcome
    assert error.exit_code == 3 and "was deleted or replaced while the run was going" in str(error)
    assert len(sim.audit.tasks()) == 2  # nothing more was submitted into the void


def test_an_unreachable_service_is_never_sent_so_a_create_is_retried(api_key):
    from pipeline.config import resolve_settings

    settings = resolve_settings(api_key=api_key, base_url=f"http://127.0.0.1:{closed_port()}",
                                env={})
    policy = RetryPolicy(max_attempts=3, initial_wait_s=0.0, max_wait_s=0.0)

    async def go():
        async with RunningHubClient(settings, policy=policy) as client:
            with pytest.raises(ApiConnectionError) as info:
                await client.create({"workflowId": "1"})
            return client.requests_sent, info.value

    sent, error = asyncio.run(go())
    assert sent == 3 and not error.sent  # every attempt of the policy: none could have landed
    assert api_key not in str(error)


def test_a_huge_failed_reason_is_stored_bounded_with_a_marker():
    from pipeline.client import MAX_STORED_TEXT, MAX_TRACEBACK_FRAMES, normalize_failed_reason

    reason = normalize_failed_reason({
        "exception_message": "x" * 1_000_000,
        "traceback": json.dumps([f"frame {i}" for i in range(10_000)]),
        "current_inputs": {f"k{i}": "v" * 100 for i in range(1000)},
        "node_id": "3",
    })
    assert len(reason["exception_message"]) <= MAX_STORED_TEXT
    assert reason["exception_message"].endswith("more characters cut by rhbatch]")
    assert len(reason["traceback"]) == MAX_TRACEBACK_FRAMES + 1
    assert reason["traceback"][0] == "[9950 earlier entries cut by rhbatch]"
    assert reason["traceback"][-1] == "frame 9999"
    assert isinstance(reason["current_inputs"], str)
    assert len(reason["current_inputs"]) <= MAX_STORED_TEXT
    assert reason["node_id"] == "3"


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/zero and mkfifo")
@pytest.mark.timeout(30)
def test_run_refuses_a_device_or_a_fifo_at_once_and_leaves_no_run_directory(api_key, tmp_path):
    import os

    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    for path, said in (("/dev/zero", "is a device, not a manifest file"),
                       (str(fifo), "is a named pipe (FIFO), not a manifest file")):
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", path, "--out",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=20,
                              env=subprocess_env("http://127.0.0.1:9", api_key))
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert not (tmp_path / "run").exists()


def test_a_seed_past_int64_exports_to_parquet_exactly(make_sim, api_key, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.export import export
    from pipeline.store import RunStore

    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text("workflowId,3.seed\n1904136902449209346,18446744073709551615\n"
                        "1904136902449209346,7\n", encoding="utf-8")
    run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
              fast_settings(sim, api_key), handle_signals=False)
    store = RunStore.open(tmp_path / "run", readonly=True)
    try:
        assert export(store, "parquet", tmp_path / "out.parquet") == 2
    finally:
        store.close()
    seeds = pq.read_table(tmp_path / "out.parquet").column("inputs.3.seed").to_pylist()
    assert seeds == [2**64 - 1, 7]


def test_run_verbose_leaves_no_log_handler_behind(make_sim, api_key, tmp_path):
    import logging

    from click.testing import CliRunner

    from pipeline.cli import cli

    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 2)
    before = list(logging.getLogger("rhbatch").handlers)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--out", str(tmp_path / "run"), "-v",
                                      "--no-preflight"],
                                env={"RUNNINGHUB_API_KEY": api_key,
                                     "RUNNINGHUB_BASE_URL": sim.base_url})
    assert result.exit_code == 0, result.output
    assert "INFO rhbatch" in result.stderr  # -v did log to stderr during the run
    assert logging.getLogger("rhbatch").handlers == before
