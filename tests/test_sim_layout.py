"""The simulator's shape, pinned: module and function sizes, and its independence from the client
side it judges (it imports nothing of rhbatch's but ConfigError and the bundled resources)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parent.parent / "pipeline" / "sim"
MODULES = sorted(SIM.glob("*.py"))
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100
# What the simulator may import from rhbatch outside pipeline.sim: (module, name).
ALLOWED = {("pipeline", "resources"), ("pipeline.errors", "ConfigError")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_simulator_module_is_past_its_size(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions past {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_the_simulator_shares_no_logic_with_the_client(path: Path) -> None:
    """A helper both sides used would let a bug agree with itself (see ``pipeline.sim``)."""
    borrowed = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            borrowed += [(a.name, "") for a in node.names
                         if a.name.startswith("pipeline") and not a.name.startswith("pipeline.sim")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("pipeline") and not node.module.startswith("pipeline.sim"):
                borrowed += [(node.module, a.name) for a in node.names
                             if (node.module, a.name) not in ALLOWED]
    assert not borrowed, f"{path.name} imports {borrowed}"
