"""A run directory never writes through a link it did not create (issue #12).

A symbolic link planted at ``DIR/.lock``, ``DIR/rhbatch.log`` or ``DIR/files`` would have rhbatch
truncate, append to or fill a file outside the run. Each is refused with exit 2, a message naming
the path and the fix, and nothing written outside; the results files, renamed over their name, replace a
planted link instead of following it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, read_results, write_manifest

from pipeline import store as st
from pipeline.cli import cli
from pipeline.errors import StateError

RUN_FLAGS = [*FAST_FLAGS, "-q", "--concurrency", "10"]


def invoke(args: list[str], sim, key: str):
    env = {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}
    return CliRunner().invoke(cli, args, env=env)


def link_refused(path: Path, target: Path) -> str:
    return (f"Error: {path} is a symbolic link (to {target}): rhbatch never writes through a link "
            f"in a run directory (the write would land outside it): remove the link (rm {path}) "
            "and run the same command again\n")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("keep me\n")
    return path


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(make_sim, api_key, tmp_path,
                                                                    victim):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert result.exit_code == 2, result.output
    assert result.stderr == link_refused(run_dir / ".lock", victim)
    assert victim.read_text() == "keep me\n"  # not truncated, no PID written into it
    assert sim.audit.requests() == [] and not (run_dir / "state.db").exists()
    (run_dir / ".lock").unlink()
    again = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert again.exit_code == 0, again.output
    assert not (run_dir / ".lock").is_symlink()


def test_a_dangling_lock_symlink_creates_nothing_at_its_target(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / "elsewhere" / "made-by-rhbatch"
    target.parent.mkdir()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(StateError) as info:
        st.RunLock(run_dir).acquire()
    assert info.value.exit_code == 2
    assert str(info.value) == link_refused(run_dir / ".lock", target)[len("Error: "):-1]
    assert not target.exists()


def test_something_else_at_lock_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".lock").mkdir(parents=True)
    with pytest.raises(StateError) as info:
        st.RunLock(run_dir).acquire()
    assert str(info.value) == (f"{run_dir / '.lock'} is not a regular file, where rhbatch keeps a "
                               "file of its own: move it away and run the same command again")
    if hasattr(os, "mkfifo"):
        fifo_dir = tmp_path / "fifo"
        fifo_dir.mkdir()
        os.mkfifo(fifo_dir / ".lock")
        with pytest.raises(StateError, match="is not a regular file"):
            st.RunLock(fifo_dir).acquire()  # refused at once, never blocks on the pipe


def test_a_planted_log_symlink_is_refused_before_any_create(make_sim, api_key, tmp_path, victim):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "rhbatch.log").symlink_to(victim)
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert result.exit_code == 2, result.output
    assert result.stderr.endswith(link_refused(run_dir / "rhbatch.log", victim))
    assert victim.read_text() == "keep me\n"  # nothing appended
    assert sim.audit.requests("create") == []
    (run_dir / "rhbatch.log").unlink()
    again = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert again.exit_code == 0, again.output
    assert "run ended" in (run_dir / "rhbatch.log").read_text()
    assert victim.read_text() == "keep me\n"


def test_a_planted_files_symlink_gets_no_download(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 3)
    run_dir = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    done = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert done.exit_code == 0, done.output
    (run_dir / "files").symlink_to(outside)
    result = invoke(["download", str(run_dir)], sim, api_key)
    assert result.exit_code == 2, result.output
    assert result.stderr == link_refused(run_dir / "files", outside)
    assert result.stdout == ""
    assert list(outside.iterdir()) == [] and sim.audit.requests("files") == []
    # `run --download` on the same directory: the run ends, no file lands outside, and it says why
    again = invoke(["run", str(manifest), "--out", str(run_dir), "--download", *RUN_FLAGS],
                   sim, api_key)
    assert again.exit_code == 0, again.output
    assert list(outside.iterdir()) == []
    refused = link_refused(run_dir / "files", outside)[len("Error: "):]
    assert f"Files: not downloaded: {refused}" in again.stderr
    assert f"download pass failed: {refused.rstrip()}" in (run_dir / "rhbatch.log").read_text()
    (run_dir / "files").unlink()
    fetched = invoke(["download", str(run_dir)], sim, api_key)
    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout.startswith("3 downloaded, 0 already verified, 0 failed")
    assert sorted(p.name for p in (run_dir / "files").iterdir()) == sorted(
        f"{r['row_id']}_9_0.png" for r in read_results(run_dir))


def test_planted_results_symlinks_are_replaced_never_written_through(make_sim, api_key, tmp_path,
                                                                     victim):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("results.jsonl", "results.csv"):
        (run_dir / name).symlink_to(victim)
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim, api_key)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep me\n"
    for name in ("results.jsonl", "results.csv"):
        assert not (run_dir / name).is_symlink()
    assert len(read_results(run_dir)) == 3


def test_a_planted_state_db_link_is_refused_before_sqlite_follows_it(tmp_path):
    from pipeline.errors import StateError
    from pipeline.store import RunStore

    outside = tmp_path / "outside.db"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.db").symlink_to(outside)
    with pytest.raises(StateError) as info:
        RunStore.open(run_dir, create=True)
    assert "state.db is a symbolic link" in str(info.value)
    assert not outside.exists()


def test_a_planted_workflows_link_is_refused_before_the_cache_writes_into_it(tmp_path):
    from pipeline.errors import StateError
    from pipeline.store import check_run_subdir

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "workflows").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StateError) as info:
        check_run_subdir(run_dir / "workflows")
    assert "workflows is a symbolic link" in str(info.value)
    check_run_subdir(run_dir / "files")  # absent is fine
