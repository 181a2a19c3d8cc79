"""The benchmark's smoke mode runs end to end and prints every row of its table (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 180


def test_bench_smoke_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_bench.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text(encoding="utf-8"))
    sections = {r["section"] for r in rows}
    assert sections == {"slots", "calls", "grid", "wide", "faults", "api", "window", "client",
                        "manifest", "resume", "compare", "keys"}
    metrics = [r["metric"] for r in rows]
    for needle in ("makespan (first create -> last task end)", "API requests / task",
                   "detection latency p95", "round trip 200 ms", "slots busy",
                   "20 % create faults", "time waiting for a free slot",
                   "CPU (user+sys) per task", "peak RSS, MB",
                   "rows / s", "floor: pandas.read_csv", "first new create",
                   "SIGTERM after", "results.jsonl, results.csv after it",
                   "official example loop", "official loop x",
                   "runninghub-cli 0.1.0", "rhbatch"):
        assert any(needle in m for m in metrics), needle
    assert done.stdout.splitlines()[2].split("|")[1].strip() == "metric"
    for row in rows:
        assert row["value"], row
