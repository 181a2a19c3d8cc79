"""Reliability figures: what a hostile answer costs rhbatch's client, measured, not asserted.

- peak RSS of a fresh client process that is answered a 200 MB body, and a 1 GiB gzip bomb
  (goal: under 200 MB for both; the client refuses past API_MAX_BYTES = 8 MiB);
- the time a create whose answer trickles in one byte a second takes to end (goal: within the
  request deadline + 1 s; it ends SUBMIT_UNKNOWN, never resent).

The simulator runs in this process on loopback; each probe runs in a child so its RSS is its own.

    python bench/reliability.py            # full sizes (the bomb takes ~1 s to build once)
    python bench/reliability.py --smoke    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.sim import AccountConfig, Faults, SimConfig, Simulator  # noqa: E402

PROBE = textwrap.dedent('''
    import asyncio, json, sys, time
    from pipeline.client import RetryPolicy, RunningHubClient
    from pipeline.config import resolve_settings
    base, key, what, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    settings = resolve_settings(api_key=key, base_url=base, env={}, request_deadline_s=deadline)
    async def go():
        async with RunningHubClient(settings, policy=RetryPolicy(max_attempts=1)) as client:
            started = time.monotonic()
            try:
                if what == "create":
                    await client.create({"workflowId": "1904136902449209346", "nodeInfoList": []})
                else:
                    await client.account_status()
                said = "no error"
            except Exception as exc:
                said = f"{type(exc).__name__}: {exc}"
            return said, time.monotonic() - started
    said, took = asyncio.run(go())
    with open("/proc/self/status") as fh:  # VmHWM: this process's own peak, not the parent's
        peak = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024
    print(json.dumps({"said": said, "took_s": took, "peak_rss_mb": peak}))
''')


def probe(sim: Simulator, key: str, what: str, deadline_s: float) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PROBE, sim.base_url, key, what, str(deadline_s)],
                          capture_output=True, text=True, timeout=600, env=env)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    key = secrets.token_hex(16)
    big = 20 * 2**20 if args.smoke else 200 * 2**20
    bomb = 64 * 2**20 if args.smoke else 2**30
    deadline = 3.0 if args.smoke else 10.0
    rows = []
    for name, faults, what in (
        (f"answer of {big >> 20} MB", Faults(oversized=1.0, oversized_bytes=big,
                                             routes=("account_status",)), "account"),
        (f"gzip bomb of {bomb >> 20} MB", Faults(gzip_bomb=1.0, gzip_bomb_bytes=bomb,
                                                 routes=("account_status",)), "account"),
        (f"create trickled 1 B/s, deadline {deadline:g} s",
         Faults(after_work=1.0, after_work_modes=("trickle",), trickle_interval_s=1.0), "create"),
    ):
        config = SimConfig(accounts=[AccountConfig(key=key)], faults=faults, time_scale=1.0)
        with Simulator(config) as sim:
            started = time.monotonic()
            result = probe(sim, key, what, deadline)
            result["wall_s"] = time.monotonic() - started
        rows.append((name, result))
    print(f"{'case':<36} {'peak RSS MB':>12} {'ended after s':>14}  outcome")
    for name, r in rows:
        print(f"{name:<36} {r['peak_rss_mb']:>12.1f} {r['took_s']:>14.2f}  {r['said'][:90]}")
    print(f"goals: peak RSS < 200 MB for both bodies; the trickled create ends within "
          f"{deadline + 1:g} s (deadline + 1 s)")


if __name__ == "__main__":
    main()
