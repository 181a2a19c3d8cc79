"""Ctrl-C, once or twice, at any moment: a summary, a current results file, exit 3."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import read_results, write_manifest
from kill_harness import subprocess_env

from pipeline import store as st


@pytest.mark.skipif(sys.platform != "linux", reason="signals")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("gap_s", [0.0, 0.2])
def test_a_second_ctrl_c_still_writes_the_summary_and_current_results_then_exits_3(
        gap_s, make_sim, api_key, tmp_path):
    from pipeline.sim import Faults

    # every create's answer takes 3 s after the task is made: the first Ctrl-C waits for the
    # create in flight, the second one (or the same two signals at once) lands during that wait
    sim = make_sim(time_scale=1.0, task_duration_s=60.0, queue_delay_s=0.0,
                   faults=Faults(slow_answer=1.0, slow_answer_s=3.0, routes=("create",)))
    manifest = write_manifest(tmp_path / "m.csv", 40)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
         "--concurrency", "4", "--poll-interval", "0.05", "--account-poll-interval", "0.05"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(sim.audit.tasks()) < 2:  # the first create answered, the second one in flight
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "Aborted" not in err and "Traceback" not in err
    assert "Resume with the same command: rhbatch run" in err
    records = read_results(run_dir)
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        stored = {r["row_id"]: (r["status"], r["task_id"]) for r in store.iter_rows()}
    finally:
        store.close()
    assert len(records) == 40
    assert {r["row_id"]: (r["status"], r["taskId"]) for r in records} == stored
    created = {t["taskId"] for t in sim.audit.tasks()}
    known = {task_id for _, task_id in stored.values() if task_id}
    assert known <= created and len(created - known) <= 1  # at most the create in flight


@pytest.mark.skipif(sys.platform != "linux", reason="signals")
@pytest.mark.timeout(60)
def test_without_a_terminal_progress_is_a_plain_line_every_interval_on_stderr_and_in_the_log(
        make_sim, api_key, tmp_path):
    sim = make_sim(time_scale=1.0, task_duration_s=60.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 10)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
         "--concurrency", "2", "--progress-interval", "0.4"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3, err
    assert lines[-1].startswith("progress: 0/10 rows final (0 succeeded, 0 failed, 0 unknown this "
                                "session), 2 submitted, 0.0 rows/min, 0 coins, ETA n/a")
    log = (run_dir / "rhbatch.log").read_text(encoding="utf-8")
    assert log.count("rhbatch.progress: progress: ") >= 3
    quiet = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(tmp_path / "q"),
         "--concurrency", "2", "--progress-interval", "0.4", "--quiet"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    quiet.send_signal(signal.SIGINT)
    _, err = quiet.communicate(timeout=30)
    assert "progress: " not in err and quiet.returncode == 3
