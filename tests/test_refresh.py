"""results.jsonl / results.csv are kept current during a run: a splice renders only the rows that
changed and leaves the files byte for byte as a whole rewrite would; a whole rewrite runs in a child
process that dies with rhbatch and never sees the key; a kill at any instant leaves both files
complete."""

from __future__ import annotations

import asyncio
import csv
import os
import random
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fast_settings, read_results, write_manifest

from pipeline import export, refresh
from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.errors import SpliceAbandoned, StorageError
from pipeline.refresh import refresh_in_child, remove_stale_temporaries

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def finished_run(make_sim, api_key, tmp_path) -> Path:
    sim = make_sim(concurrency=10)
    manifest = write_manifest(tmp_path / "m.csv", 30)
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", fast_settings(sim, api_key),
                        handle_signals=False)
    assert summary.exit_code == 0
    return tmp_path / "run"


def _bytes(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("results.jsonl", "results.csv")}


def test_the_child_writes_what_the_final_write_writes(finished_run):
    final = _bytes(finished_run)
    for name in final:
        (finished_run / name).unlink()
    asyncio.run(refresh_in_child(finished_run))
    assert _bytes(finished_run) == final
    assert [r["status"] for r in read_results(finished_run)] == ["SUCCESS"] * 30


def test_results_are_refreshed_while_the_run_is_still_going(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=2, time_scale=100.0, task_duration_s=60.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 10)  # 5 waves of 0.6 s
    run_dir = tmp_path / "run"
    seen: list[list[str]] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            try:
                seen.append([r["status"] for r in read_results(run_dir)])
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = run_batch(ManifestArgs(manifest), run_dir,
                            fast_settings(sim, api_key, concurrency=2, results_flush_interval_s=0.2),
                            handle_signals=False)
    finally:
        finished.set()
        watcher.join()
    assert summary.exit_code == 0
    partial = [statuses for statuses in seen if "SUCCESS" in statuses and "PENDING" in statuses]
    assert partial, f"no snapshot taken mid-run among {len(seen)} reads"
    assert len(partial[0]) == 10  # a refresh is a whole snapshot, every row in input order
    assert [r["status"] for r in read_results(run_dir)] == ["SUCCESS"] * 10


def test_the_child_never_sees_the_key_and_finds_this_checkout(tmp_path, monkeypatch):
    dump = tmp_path / "env.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nenv > {dump}\necho \"$@\" >> {dump}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    secret = "k" + "3" * 31
    monkeypatch.setenv("RUNNINGHUB_API_KEY", secret)
    monkeypatch.setattr(sys, "executable", str(fake))
    asyncio.run(refresh_in_child(tmp_path))
    said = dump.read_text()
    assert secret not in said and "RUNNINGHUB_API_KEY" not in said
    assert f"PYTHONPATH={ROOT}" in said
    assert f"-m pipeline.refresh {tmp_path} {os.getpid()}" in said


def test_a_failing_child_says_why(tmp_path):
    blocked = tmp_path / "run"
    blocked.mkdir()
    with pytest.raises(StorageError) as info:
        asyncio.run(refresh_in_child(blocked))  # no state.db here
    assert str(info.value) == (
        f"{blocked} holds no rhbatch run (no state.db): check the path, or start one with "
        f"`rhbatch run MANIFEST --out {blocked}`")


def test_an_orphaned_child_writes_nothing(finished_run):
    for name in ("results.jsonl", "results.csv"):
        (finished_run / name).unlink()
    env = {k: v for k, v in os.environ.items() if k != "RUNNINGHUB_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    # its parent is this test, not pid 1: it must see that the run which asked for it is gone
    done = subprocess.run([sys.executable, "-m", "pipeline.refresh", str(finished_run), "1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (finished_run / "results.jsonl").exists()
    assert not (finished_run / "results.csv").exists()


def test_a_killed_refresh_leaves_no_half_written_file_behind(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=10)
    manifest = write_manifest(tmp_path / "m.csv", 5)
    run_dir = tmp_path / "run"

    def run() -> int:
        return run_batch(ManifestArgs(manifest), run_dir, fast_settings(sim, api_key),
                         handle_signals=False).exit_code

    assert run() == 0
    leftovers = [run_dir / ".results.jsonl.x1y2", run_dir / ".results.csv.a9b8"]
    kept = [run_dir / ".results.notes", run_dir / "results.jsonl"]
    for path in leftovers:
        path.write_text("{half")
    kept[0].write_text("mine")
    assert remove_stale_temporaries(run_dir) == 2
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in kept)
    for path in leftovers:
        path.write_text("{half")
    assert run() == 0  # a resume clears them before anything else
    assert not any(path.exists() for path in leftovers) and kept[0].read_text() == "mine"


# -- splices --------------------------------------------------------------------------------


def _whole_rewrite(run_dir: Path, into: Path) -> dict[str, bytes]:
    """What a whole rewrite of ``run_dir``'s results gives, written into ``into`` (a copy)."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        export.write_jsonl(store, into / "results.jsonl")
        export.write_csv(store, into / "results.csv")
    finally:
        store.close()
    return _bytes(into)


def _change_some_rows(run_dir: Path) -> set[int]:
    """Rows changed the ways a run and a retry change them; returns their idx."""
    store = st.RunStore.open(run_dir)
    try:
        store.requeue([3])
        store.mark_failed(7, code=805, error="line one\nline two \u2028 =cmd", failed_reason={
            "exception_type": "OutOfMemoryError", "exception_message": "é" * 300})
        store.mark_success(12, [{"fileUrl": "https://cdn.example/x.png", "fileType": "png",
                                 "consumeCoins": 3}], 5.0)
        store.mark_unknown(29, "no answer")
        store.plan_files([(0, 0, "https://cdn.example/0.png", "9", 1.0)])
        store.update_file(0, 0, "https://cdn.example/0.png", path="files/r0_9_0.png",
                          sha256="ab" * 32, size=1234, status=st.FILE_DOWNLOADED)
    finally:
        store.close()
    return {3, 7, 12, 29, 0}


def test_a_splice_renders_only_changed_rows_and_writes_what_a_whole_rewrite_writes(
        finished_run, tmp_path):
    store = st.RunStore.open(finished_run)
    try:
        index = refresh.write_results(store)
        assert index.rendered == 30 and index.describes(finished_run)
        changed = _change_some_rows(finished_run)
        spliced = refresh.splice(store, index, also={0})  # row 0: its file record changed
    finally:
        store.close()
    assert spliced is not None and spliced.rendered == len(changed)
    assert spliced.describes(finished_run) and not index.describes(finished_run)
    expected = _whole_rewrite(finished_run, tmp_path)
    assert _bytes(finished_run) == expected
    records = read_results(finished_run)
    assert [r["status"] for r in records][:13:3] == ["SUCCESS", "PENDING", "SUCCESS", "SUCCESS",
                                                     "SUCCESS"]
    assert records[0]["files"][0]["status"] == st.FILE_DOWNLOADED
    assert records[7]["error"] == "line one\nline two \u2028 =cmd"
    # the index on disk is the one returned: the next run splices from it
    reader = st.RunStore.open(finished_run, readonly=True)
    try:
        loaded = refresh.ResultsIndex.load(reader)
        assert loaded is not None and loaded.identities == spliced.identities
        again = refresh.splice(reader, loaded)
    finally:
        reader.close()
    assert again is not None and again.rendered == 0  # nothing changed since: nothing written


def test_an_abandoned_splice_changes_nothing_and_leaves_no_temporary(finished_run):
    store = st.RunStore.open(finished_run)
    try:
        index = refresh.write_results(store)
        before = _bytes(finished_run)
        _change_some_rows(finished_run)
        stop = threading.Event()
        stop.set()
        with pytest.raises(SpliceAbandoned):
            refresh.splice(store, index, abandon=stop)
    finally:
        store.close()
    assert _bytes(finished_run) == before and index.describes(finished_run)
    assert not [p for p in finished_run.iterdir() if p.name.startswith(refresh.TMP_PREFIXES)]


def test_results_another_writer_replaced_are_rewritten_whole(finished_run, tmp_path):
    store = st.RunStore.open(finished_run)
    try:
        index = refresh.write_results(store)
        export.write_results(store)  # what `rhbatch download` does: no index of its own
        _change_some_rows(finished_run)
        assert refresh.splice(store, index) is None  # the files are not the ones it describes
        flusher = refresh.ResultsFlusher(store, 10.0)
        assert flusher.index is None  # the index on disk does not describe them either
        flusher.finish(store)
    finally:
        store.close()
    assert flusher.index is not None and flusher.index.rendered == 30
    assert _bytes(finished_run) == _whole_rewrite(finished_run, tmp_path)


_SPLICE_FOREVER = """
import random, sys
from pipeline import refresh, store as st
run_dir = sys.argv[1]
store = st.RunStore.open(run_dir)
index = refresh.ResultsIndex.load(store) or refresh.write_results(store)
rng = random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    for _ in range(3):
        store.mark_failed(rng.randrange(30), code=805, error="x" * rng.randrange(1, 4000))
    index = refresh.splice(store, index) or refresh.write_results(store)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL")
@pytest.mark.timeout(120)
def test_a_kill_at_any_instant_leaves_both_files_complete_and_the_index_sound(finished_run,
                                                                             tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RUNNINGHUB_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    rng = random.Random(5)
    for kill in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _SPLICE_FOREVER, str(finished_run),
                                 str(kill)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.3))  # a random instant of the splicing loop
        finally:
            proc.kill()
            proc.communicate()
        records = read_results(finished_run)  # every line parses
        assert [r["row"] for r in records] == list(range(1, 31))
        with (finished_run / "results.csv").open(encoding="utf-8", newline="") as fh:
            assert [int(r["row"]) for r in csv.DictReader(fh)] == list(range(1, 31))
        store = st.RunStore.open(finished_run)
        try:
            refresh.remove_stale_temporaries(finished_run)
            index = refresh.ResultsIndex.load(store)
            if index is not None:  # an index that survived describes the files exactly
                assert refresh.splice(store, index) is not None
                assert _bytes(finished_run) == _whole_rewrite(finished_run, tmp_path)
        finally:
            store.close()


def test_the_last_refresh_of_a_run_is_settled_so_the_next_run_reads_only_what_changed_since(
        finished_run, tmp_path, monkeypatch):
    """The run's own last refresh (no write can be in flight then) leaves an index whose next
    splice reads only the rows updated since it, less a step of the clock; one made while a run
    may be writing keeps the whole margin, and both still catch every change."""
    store = st.RunStore.open(finished_run)
    try:
        store.conn.execute("UPDATE rows SET updated_at = updated_at - 40")  # the run ended 40 s ago
        assert refresh.write_results(store).settled_at is None  # as the child's, during a run
        flusher = refresh.ResultsFlusher(store, 10.0)
        flusher.finish(store)  # nothing changed: the index is made settled all the same
        loaded = refresh.ResultsIndex.load(store)
        assert loaded is not None and loaded.settled_at is not None
        assert loaded.read_at - refresh.SETTLED_MARGIN_S == pytest.approx(loaded.settled_at)
        read: list[int] = []
        updated_since = store.updated_since

        def counted(since: float):
            for idx, at in updated_since(since):
                read.append(idx)
                yield idx, at

        monkeypatch.setattr(store, "updated_since", counted)
        store.mark_failed(3, code=805, error="after the run")
        spliced = refresh.splice(store, loaded)
        assert spliced is not None and spliced.rendered == 1 and read == [3]
        assert spliced.settled_at is None  # a splice of a run still going is not settled
        read.clear()
        store.mark_failed(4, code=805, error="still going")
        again = refresh.splice(store, spliced)
        # the whole margin: every row (all updated within it), though only row 4 is rendered
        assert again is not None and again.rendered == 1 and len(read) == 30
    finally:
        store.close()
    assert _bytes(finished_run) == _whole_rewrite(finished_run, tmp_path)
    records = read_results(finished_run)
    assert (records[3]["error"], records[4]["error"]) == ("after the run", "still going")
