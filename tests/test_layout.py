"""Where things live (the module map in the README's Development section), pinned: every storage
statement in store.py, every exception class in errors.py, every atomic replace in _files.py, every
run-directory name in store.RunPaths, and no module or function past its size limit."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pipeline import errors, store

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
# The simulator is a separate program speaking RunningHub's side; it keeps its own plumbing.
MODULES = sorted(p for p in PIPELINE.rglob("*.py") if "sim" not in p.relative_to(PIPELINE).parts)
SQL = re.compile(r"""["'](?:SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|PRAGMA)\s""")
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100
# Functions allowed past the limit, each with the reason (also in a comment at the function).
LONG_FUNCTIONS: dict[str, str] = {}
# Modules allowed past the limit, each with the reason; the next step of the redesign splits them.
LONG_MODULES: dict[str, str] = {
    "pipeline/sweep.py": "a 230-line specification (its docstring, the sweep format's reference) "
                         "over one compiler whose private parts share one context; its _compile "
                         "is split, the module not yet",
    "pipeline/runner.py": "the scheduler grew this step (expected-end pacing, concurrent creates, "
                          "capacity wake-ups, issue #18) faster than it could be split; its "
                          "decisions are the next module to come out (tests/test_scheduler.py)",
    "pipeline/client.py": "both API generations and the aiohttp fast path of issue #18; the "
                          "create-outcome rules are the part to move out next",
}


def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(PIPELINE.parent))


def test_file_states_agree_between_the_store_and_the_download_errors() -> None:
    assert errors.FileDownloadError.file_state == store.FILE_FAILED
    assert errors.TransientDownloadError.file_state == store.FILE_FAILED
    assert errors.ExpiredUrlError.file_state == store.FILE_EXPIRED
    assert errors.RefusedDownloadError.file_state == store.FILE_REFUSED
    assert set(store.FILE_STATES) == {store.FILE_PENDING, store.FILE_DOWNLOADED, store.FILE_FAILED,
                                      store.FILE_EXPIRED, store.FILE_REFUSED}


def test_run_paths_name_every_file_of_a_run_directory(tmp_path: Path) -> None:
    paths = store.RunPaths(tmp_path)
    assert paths.state_db == tmp_path / "state.db"
    assert paths.lock == tmp_path / ".lock"
    assert paths.results() == tmp_path / "results.jsonl"
    assert paths.results("csv") == tmp_path / "results.csv"
    assert tuple(p.name for p in map(paths.results, ("jsonl", "csv"))) == paths.RESULT_FILES
    assert paths.files == tmp_path / "files"
    assert paths.report == tmp_path / "report.html"
    assert paths.log == tmp_path / "rhbatch.log"
    assert paths.workflows == tmp_path / "workflows"
    assert paths.uploads == tmp_path / "uploads.json"


def test_sql_is_only_in_the_store() -> None:
    found = [f"{_rel(p)}:{n}" for p in MODULES if p.name != "store.py"
             for n, line in enumerate(_source(p).splitlines(), 1) if SQL.search(line)]
    assert not found, f"SQL outside pipeline/store.py: {found}"


def test_exception_classes_are_only_in_errors() -> None:
    found = []
    for path in MODULES:
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(_source(path))):
            if isinstance(node, ast.ClassDef) and any(
                    (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in (
                        "RhbatchError", "ApiError", "InputError", "StateError")))
                    or (isinstance(b, ast.Attribute) and b.attr.endswith(("Error", "Exception")))
                    for b in node.bases):
                found.append(f"{_rel(path)}:{node.lineno} {node.name}")
    assert not found, f"exception classes outside pipeline/errors.py: {found}"


def test_atomic_replacement_is_only_in_files() -> None:
    found = [f"{_rel(p)}:{n}" for p in MODULES if p.name != "_files.py"
             for n, line in enumerate(_source(p).splitlines(), 1)
             if re.search(r"\bos\.replace\(|\.replace\(tmp|mkstemp\(", line)]
    # download.py renames a verified .part file over its name inside an open directory descriptor
    # (dir_fd), which _files cannot do for it without taking its descriptor-relative safety.
    found = [f for f in found if not f.startswith("pipeline/download.py")]
    assert not found, f"atomic writes outside pipeline/_files.py: {found}"


RUN_NAMES = re.compile(r"""["'](?:state\.db|\.lock|results\.(?:jsonl|csv)|report\.html|rhbatch\.log|"""
                       r"""uploads\.json)["']""")


def test_run_directory_names_are_spelled_only_in_run_paths() -> None:
    found = [f"{_rel(p)}:{n}" for p in MODULES if p.name != "store.py"
             for n, line in enumerate(_source(p).splitlines(), 1)
             if RUN_NAMES.search(line) and not line.lstrip().startswith("#")]
    assert not found, f"run-directory names outside store.RunPaths: {found}"


@pytest.mark.parametrize("path", MODULES + sorted((PIPELINE / "sim").glob("*.py")),
                         ids=lambda p: _rel(p))
def test_no_module_is_too_long(path: Path) -> None:
    if _rel(path) in LONG_MODULES:
        return
    assert len(_source(path).splitlines()) <= MAX_MODULE_LINES


def test_no_function_is_too_long() -> None:
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(_source(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{_rel(path)}:{node.name}"
                if length > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    found.append(f"{name} ({length} lines)")
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"
