"""The loop of RunningHub's official examples: create a task, then poll its outputs every 5 s.

    RUNNINGHUB_API_KEY=... python bench/baseline_loop.py --base-url URL --tasks 200 --workers 1

RunningHub's documentation shows, per task: POST ``/task/openapi/create`` with the workflowId and
nodeInfoList, then POST ``/task/openapi/outputs`` with the taskId every 5 seconds until the code is
no longer 804 (running) or 813 (queued). ``--workers 1`` runs the tasks one after the other, as the
example does; ``--workers C`` runs C of those loops in a thread pool, which is what most users write
for a key with concurrency C. A 421 (concurrency limit) answer to a create is retried after the poll
interval. Every sleep is divided by ``--time-scale`` so it matches the simulator's clock. Bounded:
each task gives up after 1,200 simulated seconds of polling, as the examples do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

TEXT2IMG = "1904136902449209346"
POLL_INTERVAL_S = 5.0
MAX_POLL_S = 1200.0
CAPACITY_CODES = (421, 415)


def run_task(http: httpx.Client, key: str, i: int, scale: float) -> str:
    body = {
        "apiKey": key,
        "workflowId": TEXT2IMG,
        "nodeInfoList": [
            {"nodeId": "6", "fieldName": "text", "fieldValue": f"a photo of subject {i // 100}"},
            {"nodeId": "3", "fieldName": "seed", "fieldValue": i},
        ],
    }
    deadline = time.monotonic() + MAX_POLL_S / scale
    while True:  # create (retry a refused create after the poll interval)
        answer = http.post("/task/openapi/create", json=body).json()
        if answer.get("code") == 0:
            task_id = answer["data"]["taskId"]
            break
        if answer.get("code") not in CAPACITY_CODES or time.monotonic() > deadline:
            return f"create failed: {answer.get('code')}"
        time.sleep(POLL_INTERVAL_S / scale)
    while time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S / scale)
        answer = http.post("/task/openapi/outputs", json={"apiKey": key, "taskId": task_id}).json()
        if answer.get("code") in (804, 813):
            continue
        return "SUCCESS" if answer.get("code") == 0 else f"FAILED {answer.get('code')}"
    return "timeout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--workdir", help="unused (same flags as the other clients)")
    args = parser.parse_args()
    key = os.environ["RUNNINGHUB_API_KEY"]
    limits = httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers)
    with httpx.Client(base_url=args.base_url, timeout=30.0, limits=limits) as http:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(lambda i: run_task(http, key, i, args.time_scale),
                                    range(args.tasks)))
    ok = sum(1 for r in results if r == "SUCCESS")
    print(f"{ok}/{len(results)} succeeded", file=sys.stderr)
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
