"""Kill-and-resume harness: run ``rhbatch run`` in a subprocess, SIGKILL it at random instants,
resume each time, and check the simulator's audit against the output manifest.

Used by ``tests/test_kill_resume.py`` (a few kills) and ``bench/kill_harness.py`` (20 or more).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class HarnessResult:
    kills: int = 0
    rows: int = 0
    unknown_reported: int = 0
    created_twice: int = 0
    created_twice_not_unknown: int = 0
    final_counts: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    exit_codes: list[int] = field(default_factory=list)


def _canonical(node_info_list: Any) -> str:
    items = sorted(
        (str(i["nodeId"]), str(i["fieldName"]), json.dumps(i["fieldValue"])) for i in node_info_list
    )
    return json.dumps(items)


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def subprocess_env(base_url: str, key: str) -> dict[str, str]:
    """This environment, pointed at ``base_url`` with ``key``, importing this checkout's rhbatch."""
    env = dict(os.environ)
    env["RUNNINGHUB_API_KEY"] = key
    env["RUNNINGHUB_BASE_URL"] = base_url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_with_kills(
    sim: Any,
    key: str,
    manifest: Path,
    run_dir: Path,
    *,
    kills: int,
    concurrency: int = 20,
    kill_after_s: tuple[float, float] = (0.4, 1.5),
    seed: int = 0,
    extra_flags: tuple[str, ...] = (),
    deadline_s: float = 240.0,
) -> HarnessResult:
    """Kill ``kills`` times, then run to the end; resubmit unknown rows with explicit consent."""
    rng = random.Random(seed)
    result = HarnessResult()
    started = time.monotonic()
    flags = [
        "--concurrency", str(concurrency), "--poll-interval", "0.05",
        "--account-poll-interval", "0.01", "-q", *extra_flags,
    ]
    run_args = ["run", str(manifest), "--out", str(run_dir), *flags]
    env = subprocess_env(sim.base_url, key)
    while result.kills < kills and time.monotonic() - started < deadline_s:
        proc = subprocess.Popen(_command(run_args), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(*kill_after_s))
            result.exit_codes.append(proc.returncode)
            if proc.returncode in (0, 1):
                break  # finished before the kill landed
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            result.kills += 1
    final = subprocess.run(_command(run_args), env=env, capture_output=True, text=True,
                           timeout=deadline_s)
    result.exit_codes.append(final.returncode)
    unknown = _unknown_rows(run_dir)
    result.unknown_reported = len(unknown)
    if unknown:
        retry = subprocess.run(
            _command(["retry", str(run_dir), "--unknown", "--accept-double-pay",
                      *[f for f in flags if f != "-q"]]),
            env=env, capture_output=True, text=True, timeout=deadline_s,
        )
        result.exit_codes.append(retry.returncode)
    assert (run_dir / "results.jsonl").exists(), (
        f"the final run (exit {final.returncode}) left no results.jsonl: {final.stderr[-3000:]}")
    with (run_dir / "results.jsonl").open(encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    result.rows = len(records)
    result.final_counts = dict(Counter(r["status"] for r in records))
    created = Counter(_canonical(t["nodeInfoList"]) for t in sim.audit.tasks())
    unknown_keys = {_canonical(r["nodeInfoList"]) for r in records if r["row_id"] in unknown}
    result.created_twice = sum(1 for n in created.values() if n > 1)
    result.created_twice_not_unknown = sum(
        1 for k, n in created.items() if n > 1 and k not in unknown_keys
    )
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    for record in records:
        if record["taskId"] is None:
            if record["status"] not in ("SUBMIT_UNKNOWN", "FAILED"):
                result.mismatches.append(f"{record['row_id']}: {record['status']} without a task")
            continue
        task = tasks.get(record["taskId"])
        if task is None:
            result.mismatches.append(f"{record['row_id']}: task {record['taskId']} not in audit")
        elif _canonical(task["nodeInfoList"]) != _canonical(record["nodeInfoList"]):
            result.mismatches.append(f"{record['row_id']}: audit has other inputs")
        elif record["status"] != task["status"]:
            result.mismatches.append(
                f"{record['row_id']}: manifest says {record['status']}, audit {task['status']}"
            )
    result.elapsed_s = time.monotonic() - started
    return result


def _unknown_rows(run_dir: Path) -> set[str]:
    path = run_dir / "results.jsonl"
    if not path.exists():
        return set()
    with path.open(encoding="utf-8") as fh:
        return {r["row_id"] for r in map(json.loads, fh) if r["status"] == "SUBMIT_UNKNOWN"}
