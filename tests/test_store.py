"""Run state on a real SQLite file: lifecycle, crash recovery, locking, disk trouble."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import unittest.mock
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

    err = st.database_error(sqlite3.OperationalError("database or disk is full"), tmp_path / "s.db")
    assert isinstance(err, StorageError) and err.exit_code == 3
    assert "free some disk space, then run the same command again to resume" in str(err)
    err = st.database_error(sqlite3.OperationalError("attempt to write a readonly database"),
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


def _spending_scanned(store: st.RunStore, *, whole: bool) -> dict:
    """What spending was before the totals: a scan of every row and attempt."""
    out: dict = {None: st.Spending()} if whole else {}
    for source in ("rows", "attempts_log"):
        store._spending_scan(out, source, whole)
    return out


def _same_spending(found: st.Spending, scanned: st.Spending) -> None:
    assert found.by_status.keys() == scanned.by_status.keys()
    for status, bucket in scanned.by_status.items():
        assert found.by_status[status] == pytest.approx(bucket, rel=1e-12, abs=1e-12), status
    for name in ("coins", "money", "third_party_money"):
        assert getattr(found, name) == pytest.approx(getattr(scanned, name), rel=1e-12, abs=1e-12)
    for name in ("unpriced", "unknown_attempts", "max_coins", "max_money"):
        assert getattr(found, name) == getattr(scanned, name), name


def _mixed_run(store: st.RunStore) -> None:
    """Rows of every end on three keys (one unrecorded), priced, half-priced and unpriced, retried,
    moved back to pending, in doubt, and changed by SQL behind the store's methods."""
    from pipeline.costs import Cost
    keys = [None, "a1b2c3d4e5f6", "0f0f0f0f0f0f"]
    for i in range(60):
        store.mark_submitting(i, key_fp=keys[i % 3])
        end = i % 6
        if end == 5:
            store.mark_unknown(i, "lost")
            continue
        store.mark_submitted(i, f"19{i:017d}", st.QUEUED, 1000.0 + i)
        if end == 0:
            store.mark_running(i, 1001.0 + i)
        elif end == 1:
            store.mark_success(i, [{"fileUrl": "http://x/a.png", "consumeCoins": 0.1 * i,
                                    "consumeMoney": 0.07 * i, "taskCostTime": 3.0}], 1010.0)
        elif end == 2:
            store.mark_success(i, [{"fileUrl": "http://x/b.png"}], 1010.0)  # never priced
        elif end == 3:
            store.mark_failed(i, code=805, error="boom", at=1010.0)
            store.set_cost(i, Cost(coins=float(i), third_party_money=0.013 * i))
        else:
            store.mark_failed(i, code=None, error="gone", at=1010.0, status=st.CANCELLED,
                              cost=Cost(money=0.3))
    store.mark_submitting(60)
    store.revert_pending(60)
    store.requeue([1, 3, 5, 7, 11])  # their attempts go to attempts_log, unknown ones too
    store.mark_submitting(1, key_fp=keys[2])
    store.mark_success(1, [{"fileUrl": "http://x/c.png", "consumeCoins": 250.0}], 1020.0)
    store.conn.execute("UPDATE rows SET coins = NULL, money = NULL WHERE idx = 13")
    store.conn.execute("UPDATE rows SET money = 99.5 WHERE idx = 19")


def test_spending_totals_are_the_scan_of_every_row(tmp_path):
    store = make_store(tmp_path, n=80)
    _mixed_run(store)
    _same_spending(store.spending(), _spending_scanned(store, whole=True)[None])
    by_key, scanned = store.spending_by_key(), _spending_scanned(store, whole=False)
    assert by_key.keys() == scanned.keys() == {None, "a1b2c3d4e5f6", "0f0f0f0f0f0f"}
    for key, spending in scanned.items():
        _same_spending(by_key[key], spending)
    scanned_counts = dict.fromkeys(st.STATES, 0)
    scanned_counts.update(store.conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status"))
    assert store.counts() == scanned_counts and sum(scanned_counts.values()) == 80
    per_key: dict = {}
    for key_fp, status, n in store.conn.execute(
            "SELECT key_fp, status, COUNT(*) FROM rows WHERE key_fp IS NOT NULL OR "
            "status != 'PENDING' GROUP BY key_fp, status"):
        per_key.setdefault(key_fp, {})[status] = n
    assert store.key_counts() == per_key and len(per_key) == 3
    whole = store.spending()
    assert whole.unknown_attempts == 2 and whole.unpriced > 0 and whole.max_coins == 250.0
    assert whole.max_money == 99.5 and whole.by_status[st.SUBMIT_UNKNOWN]["tasks"] == 10


def test_spending_totals_start_from_the_rows_of_an_older_run(tmp_path):
    """A run made before the totals (state version 4) is brought up to them on its next open;
    a read-only copy of one that cannot be upgraded is still counted, by a scan."""
    with unittest.mock.patch.object(st, "MIGRATIONS", st.MIGRATIONS[:4]):
        store = st.RunStore.open(tmp_path / "run", create=True)
        store.conn.executemany(  # as insert_rows did then
            "INSERT INTO rows (idx, number, row_id, workflow_id, node_info_list, inputs, options, "
            "updated_at) VALUES (?, ?, ?, 'w', '[]', '{}', '{}', 1.0)",
            [(i, i + 1, f"r{i}") for i in range(80)])
        _mixed_run(store)
        before = store.spending()
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 4
        store.close()
    # as RunStore.open(readonly=True) leaves a copy it may not write (root may write any file)
    conn = sqlite3.connect(f"file:{tmp_path / 'run' / 'state.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    frozen = st.RunStore(tmp_path / "run", conn)
    _same_spending(frozen.spending(), before)
    frozen.close()
    store = st.RunStore.open(tmp_path / "run")
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(st.MIGRATIONS)
    _same_spending(store.spending(), before)
    store.mark_success(79, [{"fileUrl": "http://x/d.png", "consumeCoins": 2.5}], 1030.0)
    _same_spending(store.spending(), _spending_scanned(store, whole=True)[None])
