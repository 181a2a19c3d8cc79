"""Service text never reaches a terminal or a log raw (issue #12).

The simulator's ``control_chars`` fault puts an OSC window title, a clear-screen, a bare carriage
return and a newline with a forged log line into every text it answers; ``newline_task_id`` puts a
newline and a forged log line into task ids. Over real HTTP, nothing rhbatch prints or writes may
then hold a raw ESC, BEL or CR, or a line that starts with the forged one: every control character
is shown as an escape (``\\x1b``, ``\\n``); JSON escapes are fine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, read_results, write_manifest

from pipeline.cli import cli
from pipeline.config import RedactingFilter
from pipeline.sim import CONTROL_INJECTION, FORGED_LOG_LINE, Faults

RUN_FLAGS = [*FAST_FLAGS, "--concurrency", "10"]
RAW = ("\x1b", "\x07", "\r", "\x9b")


def invoke(args: list[str], sim, key: str):
    env = {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}
    return CliRunner().invoke(cli, args, env=env)


def assert_safe(name: str, text: str, *, lines: bool = True) -> None:
    """No raw control character a terminal acts on, and (``lines``) no line that is the forged
    one. An HTML page may break service text into lines (a <pre>): no log reads it."""
    for char in RAW:
        assert char not in text, f"{name} holds a raw {char!r}: {text[:2000]!r}"
    forged = [line for line in text.split("\n") if line.startswith(FORGED_LOG_LINE)]
    assert not (lines and forged), f"{name} holds a forged line: {text[:2000]!r}"


def run_dir_texts(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / name).read_text(encoding="utf-8")
            for name in ("rhbatch.log", "results.jsonl", "results.csv", "report.html")
            if (run_dir / name).exists()}


@pytest.mark.parametrize("fault", ["control_chars", "newline_task_id"])
def test_hostile_service_text_is_escaped_everywhere(fault, make_sim, api_key, tmp_path):
    sim = make_sim(failure_rate=0.5, seed=7)  # failed tasks bring failedReason text too
    sim.set_faults(Faults(**{fault: 1.0}))
    manifest = write_manifest(tmp_path / "m.csv", 6)
    run_dir = tmp_path / "run"
    result = invoke(["run", str(manifest), "--out", str(run_dir), "--download", "-v", *RUN_FLAGS],
                    sim, api_key)
    assert result.exit_code == 1, result.output  # some rows failed, as the simulator was told
    records = read_results(run_dir)
    assert {r["status"] for r in records} == {"SUCCESS", "FAILED"}
    if fault == "newline_task_id":  # the exact id is kept where it is data (and JSON-escaped)
        assert all("\n" + FORGED_LOG_LINE in r["taskId"] for r in records)
        assert "\\n" + FORGED_LOG_LINE in (run_dir / "results.csv").read_text()
    else:
        failed = [r for r in records if r["status"] == "FAILED"]
        assert all("\\x1b]0;pwned\\x07" in r["error"] for r in failed)  # shown, escaped
    report = invoke(["report", str(run_dir)], sim, api_key)
    status = invoke(["status", str(run_dir)], sim, api_key)
    account = invoke(["account"], sim, api_key)
    for name, res in (("run", result), ("report", report), ("status", status),
                      ("account", account)):
        assert res.exit_code in (0, 1), res.output
        assert_safe(f"{name} stdout", res.stdout)
        assert_safe(f"{name} stderr", res.stderr)
    for name, text in run_dir_texts(run_dir).items():
        assert_safe(name, text, lines=name != "report.html")
    assert len(run_dir_texts(run_dir)) == 4
    log_lines = (run_dir / "rhbatch.log").read_text().splitlines()
    assert all(line[:4].isdigit() for line in log_lines), log_lines  # every line is a record
    files = sorted(p.name for p in (run_dir / "files").iterdir())
    assert files and all(name.endswith(".png") for name in files)  # fileType cleaned to an ext


def test_a_run_stopped_by_hostile_text_shows_it_escaped(make_sim, api_key, tmp_path):
    sim = make_sim()
    sim.account(api_key).coins = 0  # 414 at the first create, its msg carrying the injection
    sim.set_faults(Faults(control_chars=1.0))
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), *RUN_FLAGS], sim,
                    api_key)
    assert result.exit_code == 3, result.output
    assert_safe("stderr", result.stderr)
    stopping = [line for line in result.stderr.splitlines() if line.startswith("Stopping: ")]
    assert stopping and "\\x1b]0;pwned\\x07\\x1b[2J\\rOK\\n" + FORGED_LOG_LINE in stopping[0]
    assert_safe("log", (tmp_path / "run" / "rhbatch.log").read_text())


def test_an_account_error_with_hostile_text_is_escaped(make_sim, api_key):
    from pipeline.sim import AccountConfig

    sim = make_sim(accounts=[AccountConfig(key=api_key, revoked=True)])
    sim.set_faults(Faults(control_chars=1.0))
    result = invoke(["account"], sim, api_key)
    assert result.exit_code == 3
    assert_safe("stderr", result.stderr)
    assert result.stderr.startswith("Error: RunningHub accountStatus answered 802 "
                                    "APIKEY_UNAUTHORIZED (")
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rOK\\n" + FORGED_LOG_LINE in result.stderr


def test_inspect_escapes_names_from_the_workflow(tmp_path):
    import json

    workflow = {"3": {"class_type": "KSampler\x1b]0;t\x07", "_meta": {"title": "a\r\nforged"},
                      "inputs": {"seed\x1b[2J": 5, "model": ["4\n" + FORGED_LOG_LINE, 0]}}}
    path = tmp_path / "w.json"
    path.write_text(json.dumps(workflow))
    result = CliRunner().invoke(cli, ["inspect", "--workflow-json", str(path)])
    assert result.exit_code == 0, result.output
    assert_safe("inspect", result.stdout)
    assert "KSampler\\x1b]0;t\\x07" in result.stdout and "a\\r\\nforged" in result.stdout


def test_every_log_record_stays_one_line(tmp_path):
    handler = logging.FileHandler(tmp_path / "x.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("rhbatch.test_injection")
    log.addHandler(handler)
    try:
        log.warning("task %s: %s", "123\n" + FORGED_LOG_LINE, CONTROL_INJECTION)
        try:
            raise ValueError("boom\r" + CONTROL_INJECTION)
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = (tmp_path / "x.log").read_text()
    assert_safe("log", text)
    first = text.splitlines()[0]
    assert first == ("WARNING rhbatch.test_injection: task 123\\n" + FORGED_LOG_LINE + ": "
                     "\\x1b]0;pwned\\x07\\x1b[2J\\rOK\\n" + FORGED_LOG_LINE)
    assert "Traceback (most recent call last):" in text  # a traceback keeps its own lines
    assert text.splitlines()[-1] == ("ValueError: boom\\r\\x1b]0;pwned\\x07\\x1b[2J\\rOK\\n"
                                     + FORGED_LOG_LINE)
