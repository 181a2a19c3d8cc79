"""The long kill-and-resume harness: a 500-row run under faults, SIGKILLed at 20+ random instants
and resumed each time; prints kills, rows, duplicates, unknowns and elapsed time.

    python bench/kill_harness.py [--rows 500] [--kills 24] [--seed 1]

Faults: HTTP 5xx, dropped connections, lost create responses and task failures. Rows left
SUBMIT_UNKNOWN (a create whose answer was lost, or a kill between sending a create and recording
its task id) are resubmitted at the end with ``retry --unknown --accept-double-pay``, the only way
a row may be paid twice; every other row must be created exactly once.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import write_manifest  # noqa: E402
from kill_harness import run_with_kills  # noqa: E402

from pipeline.sim import AccountConfig, Faults, SimConfig, Simulator  # noqa: E402

FAULTS = Faults(http_5xx=0.03, drop_connection=0.03, lost_create=0.02, task_failure=0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    key = secrets.token_hex(16)
    config = SimConfig(
        seed=args.seed, time_scale=100.0, task_duration_s=(10.0, 30.0), queue_delay_s=(0.0, 2.0),
        accounts=[AccountConfig(key=key, concurrency=args.concurrency + 10)], faults=FAULTS,
    )
    with tempfile.TemporaryDirectory() as tmp, Simulator(config) as sim:
        work = Path(tmp)
        manifest = write_manifest(work / "manifest.csv", args.rows)
        result = run_with_kills(
            sim, key, manifest, work / "run", kills=args.kills, concurrency=args.concurrency,
            kill_after_s=(0.3, 2.0), seed=args.seed, deadline_s=900.0,
        )
        tasks = len(sim.audit.tasks())
    print(f"kills:                      {result.kills}")
    print(f"rows:                       {result.rows} (manifest {args.rows})")
    print(f"final states:               {result.final_counts}")
    print(f"unknown rows (resubmitted): {result.unknown_reported}")
    print(f"tasks created:              {tasks}")
    print(f"created twice:              {result.created_twice} "
          f"(not explained by an unknown row: {result.created_twice_not_unknown})")
    print(f"manifest/audit mismatches:  {len(result.mismatches)}")
    for line in result.mismatches[:10]:
        print(f"  {line}")
    print(f"exit codes:                 {result.exit_codes}")
    print(f"elapsed:                    {result.elapsed_s:.1f} s")
    ok = (result.rows == args.rows and not result.mismatches
          and result.created_twice_not_unknown == 0 and result.kills >= min(args.kills, 20))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
