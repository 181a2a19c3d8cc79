"""Ctrl-C, once or twice, at any moment, or SIGTERM: a summary, current results files, exit 3."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_results, write_manifest
from kill_harness import subprocess_env

from pipeline import refresh
from pipeline import store as st
from pipeline.batch import ManifestArgs, open_run


def _wait_for(predicate, timeout_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, "rhbatch exited early"
        time.sleep(0.02)


def _progress_lines(log: Path) -> int:
    try:
        return log.read_text(encoding="utf-8").count("rhbatch.progress: progress: ")
    except FileNotFoundError:
        return 0


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
    _wait_for(lambda: _progress_lines(run_dir / "rhbatch.log") >= 3, proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3, err
    assert lines[-1].startswith("progress: 0/10 rows final (0 succeeded, 0 failed, 0 unknown this "
                                "session), 2 submitted, 0.0 rows/min, 0 coins, ETA n/a")
    log = (run_dir / "rhbatch.log").read_text(encoding="utf-8")
    assert log.count("rhbatch.progress: progress: ") >= 3
    # --quiet: while the run goes for three intervals and more (its 2 creates, then requests of
    # its own seen by the simulator 1.2 s later), not one progress line
    before = len(sim.audit.tasks())
    quiet = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(tmp_path / "q"),
         "--concurrency", "2", "--progress-interval", "0.4", "--quiet"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(sim.audit.tasks()) >= before + 2, proc=quiet)
    created = max(t["created_at"] for t in sim.audit.tasks())
    _wait_for(lambda: sim.audit.requests()[-1]["t"] >= created + 3 * 0.4, proc=quiet)
    quiet.send_signal(signal.SIGINT)
    _, err = quiet.communicate(timeout=30)
    assert "progress: " not in err and quiet.returncode == 3
    assert "Resume with the same command" in err  # it did run, and stopped on the signal


def _half_done(manifest: Path, run_dir: Path) -> None:
    """The run of ``manifest``, every other row SUCCESS, with the results files and index its
    last session left (the way bench/sigterm_bench.py builds its 1,000,000-row run)."""
    run_dir.mkdir()
    with st.RunLock(run_dir):
        store, _ = open_run(ManifestArgs(manifest), run_dir)
        try:
            with store.transaction() as conn:
                conn.execute(
                    "UPDATE rows SET status = 'SUCCESS', task_id = 'done-' || idx, outputs = '[]', "
                    "submitted_at = ?, finished_at = ? WHERE idx % 2 = 0", (time.time(), time.time()))
            refresh.write_results(store)
        finally:
            store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="signals")
@pytest.mark.timeout(120)
def test_sigterm_on_a_half_done_run_leaves_both_results_files_complete_and_current_by_splicing(
        make_sim, api_key, tmp_path):
    sim = make_sim(time_scale=1.0, task_duration_s=600.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 4000)
    run_dir = tmp_path / "run"
    _half_done(manifest, run_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
         "--concurrency", "8", "--poll-interval", "0.05", "--account-poll-interval", "0.05", "-q"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    _wait_for(lambda: len(sim.audit.tasks()) >= 8, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "Resume with the same command: rhbatch run" in err
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        stored = [(r["row_id"], r["status"], r["task_id"]) for r in store.iter_rows()]
    finally:
        store.close()
    live = {task["taskId"] for task in sim.audit.tasks()}
    assert sum(task_id in live for _, _, task_id in stored) == len(live)  # every create recorded
    records = read_results(run_dir)
    assert [(r["row_id"], r["status"], r["taskId"]) for r in records] == stored
    with (run_dir / "results.csv").open(encoding="utf-8", newline="") as fh:
        assert [(r["row_id"], r["status"], r["taskId"] or None)
                for r in csv.DictReader(fh)] == stored
    # only the rows this session changed were rendered, not the 4,000 of the run
    said = re.findall(r"results current: (\d+) row\(s\) rendered, (\w+)",
                      (run_dir / "rhbatch.log").read_text(encoding="utf-8"))
    assert said and said[-1][1] == "spliced" and int(said[-1][0]) <= len(live), said


def _stored(run_dir: Path) -> list[tuple[str, str, str | None]]:
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        return [(r["row_id"], r["status"], r["task_id"]) for r in store.iter_rows()]
    finally:
        store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="signals")
@pytest.mark.timeout(180)
def test_two_sessions_stopped_by_sigterm_each_leave_the_results_current(make_sim, api_key, tmp_path):
    """The index the first session leaves on its way out is settled (its writes were over), so the
    second session's splices read only the rows changed since; none of its changes is missed."""
    sim = make_sim(time_scale=1.0, task_duration_s=600.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 2000)
    run_dir = tmp_path / "run"
    _half_done(manifest, run_dir)
    argv = [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
            "--concurrency", "30", "--poll-interval", "0.05", "--account-poll-interval", "0.05",
            "-q"]
    for session in range(2):
        wanted = len(sim.audit.tasks()) + 4
        proc = subprocess.Popen(argv, env=subprocess_env(sim.base_url, api_key),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda n=wanted: len(sim.audit.tasks()) >= n, proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        stored = _stored(run_dir)
        live = {task["taskId"] for task in sim.audit.tasks()}
        assert {t for _, s, t in stored if s in st.LIVE} == live  # every create recorded
        records = read_results(run_dir)
        assert [(r["row_id"], r["status"], r["taskId"]) for r in records] == stored, session
        with (run_dir / "results.csv").open(encoding="utf-8", newline="") as fh:
            assert [(r["row_id"], r["status"], r["taskId"] or None)
                    for r in csv.DictReader(fh)] == stored, session
        store = st.RunStore.open(run_dir, readonly=True)
        try:
            index = refresh.ResultsIndex.load(store)
            assert index is not None and index.settled_at is not None
            newest = max(r["updated_at"] for r in store.iter_rows())
        finally:
            store.close()
        assert newest < index.read_at  # every write of the session was over when it was read
