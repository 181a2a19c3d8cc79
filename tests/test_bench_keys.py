"""The benchmark's ``keys`` section at smoke sizes: three keys of 1, 5 and 20 slots share the rows
over real HTTP, every row succeeds, every key creates tasks, and the simulator's audit shows no
task named with another key than the one that created it (no timing checks)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 120


def test_bench_keys_smoke_keeps_each_task_on_its_key(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_bench.py"), "--only", "keys", "--smoke",
         "--json", str(out)],
        capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    assert {r["section"] for r in rows.values()} == {"keys"}

    def row(needle: str) -> dict[str, object]:
        found = [r for m, r in rows.items() if needle in m]
        assert len(found) == 1, (needle, list(rows))
        return found[0]

    assert row(": succeeded")["ok"] is True, row(": succeeded")
    assert row("cross-key calls")["value"] == "0 (tasks: 0)"
    assert row("cross-key calls")["ok"] is True
    recorded = row("recorded key is the task's creator")
    assert recorded["ok"] is True, recorded
    assert not str(recorded["value"]).startswith("0/"), recorded
    per_key = str(row("tasks per key")["value"])
    created = {label: int(n) for label, n in re.findall(r"(key-\d): (\d+) tasks", per_key)}
    assert set(created) == {"key-1", "key-2", "key-3"}, per_key
    assert all(created.values()), per_key  # the 1-slot key takes rows too
    assert sum(created.values()) >= 60, per_key
    assert row("1 key of 26 slots")["value"]
