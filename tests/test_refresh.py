"""results.jsonl / results.csv are refreshed during a run by a child process that dies with rhbatch,
never sees the key, and leaves the files exactly as the final in-process write would."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fast_settings, read_results, write_manifest

from pipeline.errors import StorageError
from pipeline.refresh import refresh_in_child, remove_stale_temporaries
from pipeline.runs import ManifestArgs, run_batch

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
    with pytest.raises(StorageError):
        asyncio.run(refresh_in_child(blocked))  # no state.db here


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
