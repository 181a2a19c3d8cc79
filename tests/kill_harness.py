"""Kill-and-resume harness: run ``rhbatch run`` in a subprocess, SIGKILL it at chosen instants
(see INSTANTS), resume each time, and check the simulator's audit against the output manifest.

Used by ``tests/test_kill_resume.py`` (a few kills) and ``bench/kill_harness.py`` (20 or more).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
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
    instants: Counter[str] = field(default_factory=Counter)  # kills per INSTANTS class


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


# The instants a kill lands at, each recognised from what the simulator (in this process) has seen
# of the child so far, so that every kill falls where it is meant to instead of where a timer
# happens to land (on a loaded machine a timer started at spawn often fires before the first
# request):
#   starting         before the child's first request: imports, manifest, state.db, the run lock
#   first_request    its first request just received by the simulator (preflight or resume reads)
#   timed            a random instant ``kill_after_s`` after the child's first request
#   create_sent      a create just accepted: the task exists and is billed, the answer in flight
#   create_answered  a few ms after a create was accepted: the answer read, the task id being recorded
#   ambiguous        a create answered in one of the shapes of ``Faults.after_work`` (task made and
#                    billed, the answer an error, a stall, a trickle, ...) just received, the answer in
#                    flight (only where the simulator injects that fault)
#   polling          a status/outputs query of a live task just received
#   finishing        every row submitted (none PENDING in state.db): the run is waiting for its
#                    last tasks, recording their ends, writing results.jsonl and the summary
INSTANTS = ("starting", "first_request", "timed", "create_sent", "create_answered", "ambiguous",
            "polling", "finishing")
POLL_ROUTES = frozenset({"status", "outputs", "v2_query"})
EVENT_TIMEOUT_S = 60.0  # an instant that never comes: the child is killed then anyway


def kill_schedule(kills: int, *, ambiguous: bool) -> list[str]:
    """The instant of each kill: the classes in turn (``ambiguous`` only if ``ambiguous``),
    ``finishing`` (which lets the run get to its end) once, last, when there are kills enough for
    every class."""
    cycle = tuple(i for i in INSTANTS[:-1] if ambiguous or i != "ambiguous")
    if kills <= len(cycle):
        return [cycle[i % len(cycle)] for i in range(kills)]
    return [cycle[i % len(cycle)] for i in range(kills - 1)] + ["finishing"]


def _every_row_submitted(run_dir: Path) -> bool:
    """No row of the run in ``run_dir`` waits to be submitted (read-only, beside the writer)."""
    try:
        conn = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True, timeout=0.1)
    except sqlite3.Error:
        return False
    try:
        waiting = conn.execute(
            "SELECT COUNT(*) FROM rows WHERE status IN ('PENDING', 'SUBMITTING')").fetchone()[0]
    except sqlite3.Error:  # not made yet, or busy
        return False
    finally:
        conn.close()
    return waiting == 0


def _wait_for_instant(proc: subprocess.Popen, sim: Any, instant: str, run_dir: Path,
                      kill_after_s: tuple[float, float], rng: random.Random) -> bool:
    """Wait until ``instant`` of ``proc``'s run (see INSTANTS); False if the child ended first."""
    requests, tasks = sim._requests, sim.service.task_list  # appended to by the simulator's thread
    r0, t0 = len(requests), len(tasks)
    skip_creates = rng.randrange(0, 8)  # which create: not always the first after a resume
    skip_polls = rng.randrange(0, 20)
    started = time.monotonic()
    until = started + EVENT_TIMEOUT_S
    delay = {"starting": rng.uniform(0.0, 0.15), "create_answered": rng.uniform(0.002, 0.05),
             "ambiguous": rng.uniform(0.0, 0.02),
             "timed": rng.uniform(*kill_after_s), "finishing": rng.uniform(0.0, 0.05)}.get(instant, 0.0)
    seen_at: float | None = None  # when the instant's event was seen (the kill follows ``delay`` later)
    scanned, next_look = r0, started
    while time.monotonic() < until:
        if proc.poll() is not None:
            return False
        now = time.monotonic()
        if seen_at is None:
            if instant == "starting":
                seen_at = started
            elif instant in ("first_request", "timed"):
                seen_at = now if len(requests) > r0 else None
            elif instant in ("create_sent", "create_answered"):
                seen_at = now if len(tasks) > t0 + skip_creates else None
            elif instant in ("polling", "ambiguous"):
                end = len(requests)
                for row in requests[scanned:end]:
                    if instant == "ambiguous" and "after_work:" in (row[8] or ""):
                        seen_at = now
                        break
                    if instant == "polling" and row[3] in POLL_ROUTES:
                        skip_polls -= 1
                        if skip_polls < 0:
                            seen_at = now
                            break
                scanned = end
            elif instant == "finishing" and len(requests) > r0 and now >= next_look:
                next_look = now + 0.01
                seen_at = now if _every_row_submitted(run_dir) else None
        if seen_at is not None and now >= seen_at + delay:
            return True
        time.sleep(0.001)
    return True


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
    """Kill ``kills`` times at the instants of ``kill_schedule``, then run to the end; resubmit
    unknown rows with explicit consent. ``sim`` must run in this process (its records are watched)."""
    rng = random.Random(seed)
    result = HarnessResult()
    started = time.monotonic()
    flags = [
        "--concurrency", str(concurrency), "--poll-interval", "0.05",
        "--account-poll-interval", "0.01", "-q", *extra_flags,
    ]
    run_args = ["run", str(manifest), "--out", str(run_dir), *flags]
    env = subprocess_env(sim.base_url, key)
    schedule = kill_schedule(kills, ambiguous=sim.faults.after_work > 0)
    while result.kills < kills and time.monotonic() - started < deadline_s:
        instant = schedule[result.kills]
        proc = subprocess.Popen(_command(run_args), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        requests_before = len(sim._requests)
        if not _wait_for_instant(proc, sim, instant, run_dir, kill_after_s, rng):
            proc.wait()
            result.exit_codes.append(proc.returncode)
            if proc.returncode in (0, 1):
                break  # finished before the kill landed
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:  # it ended on its own just before the kill
            result.exit_codes.append(proc.returncode)
            if proc.returncode in (0, 1):
                break
            continue
        result.kills += 1
        if instant != "starting" or len(sim._requests) == requests_before:
            result.instants[instant] += 1
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
