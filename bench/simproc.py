"""The simulator in its own process, driven over stdin/stdout, so a benchmark's figures are its own.

    python bench/simproc.py CONFIG.json

Prints one JSON line ``{"base_url", "t0_mono", "time_scale"}`` once it listens on loopback, then
answers one JSON line per command read from stdin:

- ``summary``: request counts by route, accepted tasks, the simulated times of the first create
  and the last task end, and each finished task's ``{taskId: ended_at}`` (simulated seconds) when
  asked with ``summary tasks``; ``summary keys`` adds each task's creating key fingerprint
  (``creator``), the fingerprints of every key that named it (``key_fps``, from
  ``Audit.task_key_fps``) and ``cross_key_calls``, the requests naming a task with another key;
  ``summary polls`` adds ``polls``, ``{taskId: [simulated time of each request naming it, not its
  create]}`` (where a run's calls per task go);
- ``account KEY CONCURRENCY``: an account for ``KEY`` with that limit (the key comes over the pipe,
  never on disk); answers its audit fingerprint;
- ``first_create``: the simulated time of the first create or ai-app/run request (null if none);
- ``quit``: stop serving and exit.

Simulated time ``t`` maps to this machine's ``time.monotonic()`` as ``t0_mono + t / time_scale``
(the simulator's clock is ``monotonic()`` scaled, and CLOCK_MONOTONIC is shared by every process),
so a benchmark can compare the simulator's timestamps with its own.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CREATE_ROUTES = ("create", "ai_app_run")


def _summary(sim, with_tasks: bool, with_keys: bool = False, with_polls: bool = False) -> dict:
    requests = sim.audit.requests()
    routes = Counter(r["route"] for r in requests)
    creates = [r["t"] for r in requests if r["route"] in CREATE_ROUTES]
    tasks = sim.audit.tasks()
    ends = [t["ended_at"] for t in tasks if t["status"] in ("SUCCESS", "FAILED")]
    out = {
        "requests": len(requests),
        "by_route": dict(routes),
        "tasks": len(tasks),
        "finished": len(ends),
        "create_codes": {str(k): v for k, v in Counter(
            r["code"] for r in requests if r["route"] in CREATE_ROUTES).items()},
        "first_create_t": min(creates) if creates else None,
        "last_end_t": max(ends) if ends else None,
        "now": sim.now(),
    }
    if with_keys:
        creator = {t["taskId"]: t["key_fp"] for t in tasks}
        out["creator"] = creator
        out["key_fps"] = {t: sorted(fps) for t, fps in sim.audit.task_key_fps().items()}
        out["cross_key_calls"] = sum(
            1 for r in requests if r["task_id"] in creator and r["key_fp"] is not None
            and r["key_fp"] != creator[r["task_id"]])
    if with_polls:
        polls: dict[str, list[float]] = {}
        for r in requests:
            if r["task_id"] is not None and r["route"] not in CREATE_ROUTES:
                polls.setdefault(r["task_id"], []).append(r["t"])
        out["polls"] = polls
    if with_tasks:
        out["ended_at"] = {t["taskId"]: t["ended_at"] for t in tasks}
        out["created_at"] = {t["taskId"]: t["created_at"] for t in tasks}
    return out


def main() -> int:
    from pipeline.sim import SimConfig, Simulator

    config = SimConfig.from_file(sys.argv[1])
    sim = Simulator(config)
    sim.start()
    print(json.dumps({"base_url": sim.base_url, "t0_mono": sim.clock._t0,
                      "time_scale": config.time_scale}), flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            if command[0] == "summary":
                answer = _summary(sim, "tasks" in command[1:], "keys" in command[1:],
                                  "polls" in command[1:])
            elif command[0] == "account" and len(command) == 3:
                from pipeline.sim import AccountConfig, key_fingerprint

                sim.add_account(AccountConfig(key=command[1], concurrency=int(command[2])))
                answer = {"key_fp": key_fingerprint(command[1])}
            elif command[0] == "first_create":
                with sim.lock:
                    first = next((row for row in sim._requests if row[3] in CREATE_ROUTES), None)
                answer = {"t": None if first is None else first[0]}
            else:
                answer = {"error": f"unknown command {command[0]!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        sim.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
