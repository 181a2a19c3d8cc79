"""Run state on a real SQLite file: lifecycle, crash recovery, locking, disk trouble."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import export
from pipeline import store as st
from pipeline.errors import RunLockedError, StateError, StorageError


@dataclass
class FakeRow:
    index: int
    row_id: str
    number: int = 0
    workflow_id: str = "1904136902449209346"
    node_info_list: tuple = ({"nodeId": "3", "fieldName": "seed", "fieldValue": 1},)
    inputs: dict = field(default_factory=lambda: {"3.seed": 1})
    options: dict = field(default_factory=dict)


def make_store(tmp_path: Path, n: int = 5) -> st.RunStore:
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows(FakeRow(i, f"r{i}", i + 1) for i in range(n))
    return store


def test_rows_flow_through_the_lifecycle(tmp_path):
    store = make_store(tmp_path)
    assert store.counts()[st.PENDING] == 5
    store.mark_submitting(0)
    store.mark_submitted(0, "1900000000000000001", st.QUEUED, 1000.0)
    store.mark_running(0, 1001.0)
    store.mark_success(0, [{"fileUrl": "http://x/1.png", "consumeCoins": 6.0,
                            "taskCostTime": 28.0}], 1030.0)
    record = export.row_record(next(store.iter_rows()))
    assert record["status"] == "SUCCESS"
    assert record["taskId"] == "1900000000000000001"
    assert record["fileUrls"] == ["http://x/1.png"]
    assert record["coins"] == 6.0 and record["attempts"] == 1
    assert record["submitted_at"].startswith("1970-01-01T00:16:40")
    assert store.spending().coins == 6.0


def test_capacity_refusal_is_not_an_attempt(tmp_path):
    store = make_store(tmp_path)
    store.mark_submitting(1)
    store.revert_pending(1)
    row = [r for r in store.iter_rows() if r["idx"] == 1][0]
    assert row["status"] == st.PENDING and row["attempts"] == 0


def test_recover_turns_in_flight_creates_into_submit_unknown(tmp_path):
    store = make_store(tmp_path)
    store.mark_submitting(2)
    store.close()
    reopened = st.RunStore.open(tmp_path / "run")
    assert reopened.recover() == 1
    counts = reopened.counts()
    assert counts[st.SUBMIT_UNKNOWN] == 1 and counts[st.SUBMITTING] == 0
    assert reopened.pending()[0]["idx"] == 0
    assert [r["idx"] for r in reopened.pending()] == [0, 1, 3, 4]


def test_requeue_keeps_history(tmp_path):
    store = make_store(tmp_path)
    store.mark_submitting(0)
    store.mark_submitted(0, "111", st.RUNNING, 1.0)
    store.mark_failed(0, code=805, error="OOM")
    store.requeue([0])
    history = store.conn.execute("SELECT * FROM attempts_log").fetchall()
    assert [(h["task_id"], h["status"], h["error_code"]) for h in history] == [("111", "FAILED", 805)]
    row = next(store.iter_rows())
    assert row["status"] == st.PENDING and row["task_id"] is None and row["attempts"] == 1


def test_a_second_process_cannot_take_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with st.RunLock(run_dir):
        code = (
            "import sys; from pathlib import Path; from pipeline.store import RunLock\n"
            "from pipeline.errors import RunLockedError\n"
            "try:\n    RunLock(Path(sys.argv[1])).acquire()\nexcept RunLockedError as e:\n"
            "    print(e); sys.exit(7)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True,
                             text=True)
        assert out.returncode == 7
        assert f"is being run by process {os.getpid()}" in out.stdout
    with pytest.raises(RunLockedError):
        with st.RunLock(run_dir):
            st.RunLock(run_dir).acquire()


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from pathlib import Path; from pipeline.store import RunLock\n"
         "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
         str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    proc.stdout.close()
    with st.RunLock(run_dir) as lock:
        assert lock.path.read_text() == str(os.getpid())


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(StateError, match=r"holds no rhbatch run .*rhbatch run MANIFEST --out"):
        st.RunStore.open(tmp_path / "nowhere")


def test_read_only_state_is_a_storage_error_naming_the_fix(tmp_path):
    store = make_store(tmp_path)
    store.close()
    reopened = st.RunStore.open(tmp_path / "run", readonly=True)
    with pytest.raises(StorageError, match="make the run directory writable again"):
        reopened.mark_submitting(0)
    reopened.close()


def test_sqlite_errors_are_translated_with_the_fix(tmp_path):
    import sqlite3

    err = st._translate(sqlite3.OperationalError("database or disk is full"), tmp_path / "s.db")
    assert isinstance(err, StorageError) and err.exit_code == 3
    assert "free some disk space, then run the same command again to resume" in str(err)
    err = st._translate(sqlite3.OperationalError("attempt to write a readonly database"),
                        tmp_path / "s.db")
    assert "make the run directory writable again" in str(err)


def test_full_disk_leaves_the_state_resumable(tmp_path):
    """A database capped by max_page_count behaves like a full disk: the write fails cleanly."""
    store = make_store(tmp_path, n=3)
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match="full"):
        store.insert_rows(FakeRow(100 + i, f"big{i}", 0, inputs={"x": "y" * 5000})
                          for i in range(50))
    store.close()
    reopened = st.RunStore.open(tmp_path / "run")
    assert reopened.counts()[st.PENDING] == 3
