"""rhbatch benchmarks against the simulator: one table, every figure measured in this run.

    python bench/run_bench.py                  # everything (several minutes)
    python bench/run_bench.py --smoke          # every row, tiny sizes (< 20 s); checks the wiring
    python bench/run_bench.py --only slots,calls --tasks 20000

Sections (see bench/README.md for what each measures and the targets):

- ``slots``   slot utilisation: makespan over the ideal ceil(N/C) x D
- ``calls``   API requests per task and detection latency (same run as ``slots``)
- ``client``  rhbatch's own CPU per task and peak RSS, ``rhbatch run`` in a child process
- ``manifest`` validating a 1,000,000-row CSV: rows/s and peak RSS
- ``resume``  a half-done 1,000,000-row run: ``rhbatch run`` start to the first new create
- ``compare`` the same workload driven by the official examples' loop, its thread-pool variant,
  runninghub-cli 0.1.0 and rhbatch

The simulator always runs in its own process (``bench/simproc.py``); rhbatch runs in this process
(``slots``/``calls``/``compare``, so intervals can be scaled) or as ``rhbatch`` in a child process
(``client``, ``resume``), so CPU and memory figures are rhbatch's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402
    SimProcess,
    api_key,
    run_child,
    sim_config,
    write_manifest,
)

SECTIONS = ("slots", "calls", "client", "manifest", "resume", "compare")
RUN_TIMEOUT_S = 1800.0

# rhbatch's defaults in real seconds (pipeline/config.py); benchmarks divide them by the time scale
# so the simulated run sees the schedule a real run would.
REAL_INTERVALS_S = {
    "poll_interval_s": 5.0,
    "account_poll_interval_s": 2.0,
    "max_poll_interval_s": 30.0,
    "capacity_backoff_s": 20.0,
    "max_capacity_backoff_s": 120.0,
}


@dataclass
class Row:
    section: str
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:,.{digits}f}"


# -- 1 + 2: slot utilisation and calls per task ----------------------------------------------------


def rhbatch_in_process(sim: SimProcess, workdir: Path, tasks: int, concurrency: int,
                       name: str) -> dict[str, Any]:
    """``run_batch`` in this process, intervals scaled by the simulator's time scale."""
    from pipeline.config import resolve_settings
    from pipeline.runs import ManifestArgs, run_batch

    scale = sim.time_scale
    manifest = write_manifest(workdir / f"{name}.csv", tasks)
    settings = resolve_settings(
        api_key=api_key(), base_url=sim.base_url, env={}, concurrency=concurrency,
        **{k: v / scale for k, v in REAL_INTERVALS_S.items()},
    )
    run_dir = workdir / name
    wall0, mono0 = time.time(), time.monotonic()
    started = time.monotonic()
    summary = run_batch(ManifestArgs(manifest), run_dir, settings, handle_signals=False)
    elapsed = time.monotonic() - started
    audit = sim.ask("summary tasks")
    conn = sqlite3.connect(run_dir / "state.db")
    finished = dict(conn.execute("SELECT task_id, finished_at FROM rows WHERE status = 'SUCCESS'"))
    conn.close()
    latencies = []  # simulated seconds from the task's end to rhbatch recording it
    for task_id, ended in audit["ended_at"].items():
        at = finished.get(task_id)
        if at is None or ended is None:
            continue
        recorded_mono = at - wall0 + mono0
        latencies.append((recorded_mono - sim.mono(ended)) * scale)
    return {
        "summary": summary,
        "elapsed_s": elapsed,
        "audit": audit,
        "latencies": latencies,
        "settings": settings,
    }


def bench_slots(workdir: Path, *, tasks: int, concurrency: int, duration_s: float,
                time_scale: float) -> tuple[list[Row], dict[str, Any]]:
    config = sim_config(concurrency=concurrency, duration_s=duration_s, time_scale=time_scale)
    with SimProcess(workdir, config) as sim:
        result = rhbatch_in_process(sim, workdir, tasks, concurrency, "slots")
    audit = result["audit"]
    ideal = math.ceil(tasks / concurrency) * duration_s
    makespan = audit["last_end_t"] - audit["first_create_t"]
    recorded = max(result["latencies"]) if result["latencies"] else float("nan")
    done = result["summary"].counts["SUCCESS"]
    ratio = makespan / ideal
    rows = [
        Row("slots", f"{tasks} tasks, C={concurrency}, D={duration_s:g}s, time scale "
            f"{time_scale:g}: succeeded", f"{done}/{tasks}", f"{tasks}", done == tasks),
        Row("slots", "makespan (first create -> last task end) / ceil(N/C)xD",
            f"{_fmt(ratio)} ({makespan:,.0f}s / {ideal:,.0f}s sim)", "<= 1.05", ratio <= 1.05),
        Row("slots", "run wall time x time scale / ideal",
            _fmt(result["elapsed_s"] * time_scale / ideal), "", None),
    ]
    del recorded
    return rows, {"result": result, "audit": audit}


def calls_rows(slots: dict[str, Any], *, tasks: int) -> list[Row]:
    audit = slots["audit"]
    result = slots["result"]
    by_route = audit["by_route"]
    done = max(1, audit["finished"])
    per_task = audit["requests"] / done
    lat = sorted(result["latencies"])
    account_poll = REAL_INTERVALS_S["account_poll_interval_s"]
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
    rows = [
        Row("calls", "API requests / task (all routes, simulator audit)", _fmt(per_task, 2),
            "<= 3.0", per_task <= 3.0),
    ]
    for route in ("create", "outputs", "account_status"):
        rows.append(Row("calls", f"  {route} / task", _fmt(by_route.get(route, 0) / done, 2)))
    others = sum(v for k, v in by_route.items() if k not in ("create", "outputs", "account_status"))
    if others:
        rows.append(Row("calls", "  other routes / task", _fmt(others / done, 2)))
    refused = sum(v for k, v in audit["create_codes"].items() if k != "0")
    rows.append(Row("calls", "  creates refused (421 etc.), count", str(refused)))
    rows += [
        Row("calls", "detection latency p50 (task end -> recorded), sim s",
            f"{p50:.2f}", f"<= {account_poll:g} (account poll)", p50 <= account_poll),
        Row("calls", "detection latency p95, sim s", f"{p95:.2f}", f"<= {account_poll:g}",
            p95 <= account_poll),
        Row("calls", "detection latency max, sim s", f"{lat[-1]:.2f}" if lat else "nan"),
    ]
    return rows


# -- table -----------------------------------------------------------------------------------------


def print_table(rows: list[Row], header: str) -> str:
    widths = [max(len(r.section) for r in rows), max(len(r.metric) for r in rows),
              max(len(r.value) for r in rows), max(len(r.target) for r in rows)]
    widths = [max(w, len(h)) for w, h in zip(widths, ("section", "metric", "value", "target"),
                                             strict=True)]
    lines = [header, ""]
    cols = ("section", "metric", "value", "target", "met")
    lines.append(" | ".join(c.ljust(w) for c, w in zip(cols, [*widths, 3], strict=True)))
    lines.append("-+-".join("-" * w for w in [*widths, 3]))
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "NO")
        lines.append(" | ".join(v.ljust(w) for v, w in zip(
            (r.section, r.metric, r.value, r.target, met), [*widths, 3], strict=True)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every row (< 20 s)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--tasks", type=int, help="tasks for the client-cost run (100000)")
    parser.add_argument("--slot-tasks", type=int, help="tasks for slots/calls (2000)")
    parser.add_argument("--time-scale", type=float, help="time scale for slots/calls (50)")
    parser.add_argument("--manifest-rows", type=int, help="rows for manifest/resume (1000000)")
    parser.add_argument("--compare-tasks", type=int, help="tasks for compare (200)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    smoke = args.smoke
    slot_tasks = args.slot_tasks or (100 if smoke else 2000)
    concurrency = 10 if smoke else 50
    time_scale = args.time_scale or (200.0 if smoke else 50.0)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rhbench-") as tmp:
        workdir = Path(tmp)
        if only & {"slots", "calls"}:
            slot_rows, slots = bench_slots(workdir, tasks=slot_tasks, concurrency=concurrency,
                                           duration_s=30.0, time_scale=time_scale)
            if "slots" in only:
                rows += slot_rows
            if "calls" in only:
                rows += calls_rows(slots, tasks=slot_tasks)
    header = (f"rhbatch bench{' (smoke)' if smoke else ''}: {os.cpu_count()} cores (nproc), "
              f"Python {sys.version.split()[0]}, {time.monotonic() - started:.0f}s")
    print_table(rows, header)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
