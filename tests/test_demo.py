"""``rhbatch demo``: runs the shipped sweep against the simulator, deletes only its own directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.demo import DEMO_MARKER, prepare_out_dir
from pipeline.errors import StateError

REFUSED = "was not made by rhbatch demo"
FIX = "pass --out with a new or empty directory"


def _demo(out: Path, *extra: str):
    return CliRunner().invoke(cli, ["demo", "--out", str(out), *extra])


def _result_rows(out: Path) -> list[dict]:
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_demo_runs_the_shipped_sweep_into_a_new_directory_and_marks_it(tmp_path):
    out = tmp_path / "nested" / "demo"
    result = _demo(out)
    assert result.exit_code == 0, result.output
    assert (out / DEMO_MARKER).is_file()
    assert (out / "state.db").is_file()
    rows = _result_rows(out)
    assert len(rows) == 16 and {r["status"] for r in rows} <= {"SUCCESS", "DOWNLOADED"}
    assert "Demo finished: 16 rows" in result.stderr

    # A second demo replaces the first one's directory, with whatever was left in it.
    (out / "left-over.txt").write_text("from the first demo", encoding="utf-8")
    again = _demo(out)
    assert again.exit_code == 0, again.output
    assert not (out / "left-over.txt").exists()
    assert (out / DEMO_MARKER).is_file() and len(_result_rows(out)) == 16


def test_demo_never_deletes_a_run_directory_it_did_not_make(tmp_path):
    real_run = tmp_path / "paid-run"
    real_run.mkdir()
    (real_run / "state.db").write_bytes(b"SQLite format 3\x00 a real, paid run")
    (real_run / "results.jsonl").write_text("{}\n", encoding="utf-8")

    result = _demo(real_run)

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: --out {real_run} is not empty and was not made by rhbatch demo, which replaces only "
        f"its own directories (they hold a {DEMO_MARKER} file): {FIX}\n"
    )
    assert sorted(p.name for p in real_run.iterdir()) == ["results.jsonl", "state.db"]
    assert (real_run / "state.db").read_bytes().endswith(b"a real, paid run")


def test_demo_refuses_any_other_non_empty_directory(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"\x89PNG")
    result = _demo(mine)
    assert result.exit_code == 2
    assert REFUSED in result.stderr and FIX in result.stderr
    assert (mine / "holiday.png").read_bytes() == b"\x89PNG"
    assert not (mine / DEMO_MARKER).exists()


def test_demo_refuses_a_file_and_a_symbolic_link(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me", encoding="utf-8")
    result = _demo(a_file)
    assert result.exit_code == 2
    assert "is a file" in result.stderr  # click's own check of --out
    with pytest.raises(StateError, match=f"--out {a_file} is not a directory: {FIX}"):
        prepare_out_dir(a_file)
    assert a_file.read_text(encoding="utf-8") == "keep me"

    # Even a link to a demo's own directory: deleting through it is not the demo's call to make.
    target = tmp_path / "old-demo"
    target.mkdir()
    (target / DEMO_MARKER).write_text("", encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(StateError, match="is not a directory"):
        prepare_out_dir(link)
    assert (target / DEMO_MARKER).is_file()


def test_an_empty_directory_becomes_a_demo_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_out_dir(empty)
    assert [p.name for p in empty.iterdir()] == [DEMO_MARKER]

    (empty / "state.db").write_bytes(b"from the demo")
    prepare_out_dir(empty)  # marked: emptied again
    assert [p.name for p in empty.iterdir()] == [DEMO_MARKER]


def test_demo_with_a_missing_manifest_is_bad_input(tmp_path):
    result = _demo(tmp_path / "out", "--manifest", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()
