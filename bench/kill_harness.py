"""The long kill-and-resume harness: a 500-row run under faults, SIGKILLed 20+ times and resumed
each time; prints kills (per instant), rows, duplicates, unknowns and elapsed time.

Each kill lands on an instant of ``tests/kill_harness.py`` ``INSTANTS`` in turn (before the first
request, the first request, a create accepted with its answer in flight, just after a create was
answered, a poll, a random instant mid-run, and once the run's end), recognised from what the
simulator, in this process, has seen.

    python bench/kill_harness.py [--rows 500] [--kills 24] [--seed 1]
    python bench/kill_harness.py --keys 3       # the same with a pool of 3 keys

Faults: HTTP 5xx, dropped connections, lost create responses and task failures. Rows left
SUBMIT_UNKNOWN (a create whose answer was lost, or a kill between sending a create and recording
its task id) are resubmitted at the end with ``retry --unknown --accept-double-pay``, the only way
a row may be paid twice; every other row must be created exactly once.

With ``--keys N`` the run gets N keys in ``RUNNINGHUB_API_KEYS`` (accounts of 1, 5 and 20 slots,
in turn) and more checks: every task was named only with the key that created it (the
simulator's ``Audit.task_key_fps``: polls, cancels and cost queries after every resume went through
the creating key), each row's recorded key (``state.db`` ``key_fp``) is its task's creator, every
key created tasks, and the retry of the unknown rows ran (exit 0 or 1) with the pool.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import write_manifest  # noqa: E402
from kill_harness import run_with_kills  # noqa: E402

from pipeline.config import key_fingerprint  # noqa: E402
from pipeline.keys import ENV_API_KEYS  # noqa: E402
from pipeline.sim import AccountConfig, Faults, SimConfig, Simulator  # noqa: E402
from pipeline.sim import key_fingerprint as sim_fingerprint  # noqa: E402

FAULTS = Faults(http_5xx=0.03, drop_connection=0.03, lost_create=0.02, task_failure=0.05)
KEY_LIMITS = (1, 5, 20)  # the accounts of --keys N, in turn


def key_checks(sim: Simulator, keys: list[str], run_dir: Path) -> tuple[dict[str, int], int, int, int]:
    """(tasks created per key label, tasks named by another key than their creator's, rows whose
    recorded key is not their task's creator, rows with a task)."""
    tasks = sim.audit.tasks()
    creator = {t["taskId"]: t["key_fp"] for t in tasks}
    labels = {sim_fingerprint(k): f"key-{i}" for i, k in enumerate(keys, 1)}
    created = {label: 0 for label in labels.values()}
    for fp in creator.values():
        created[labels.get(fp, "other")] = created.get(labels.get(fp, "other"), 0) + 1
    crossed = sum(1 for task, fps in sim.audit.task_key_fps().items()
                  if task in creator and fps != {creator[task]})  # not ids no task has
    ours = {sim_fingerprint(k): key_fingerprint(k) for k in keys}
    conn = sqlite3.connect(run_dir / "state.db")
    try:
        rows = conn.execute("SELECT task_id, key_fp FROM rows WHERE task_id IS NOT NULL").fetchall()
    finally:
        conn.close()
    wrong = sum(1 for task, fp in rows if fp is None or ours.get(creator.get(task, "")) != fp)
    return created, crossed, wrong, len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--keys", type=int, default=0,
                        help="run with this many keys (RUNNINGHUB_API_KEYS), 1, 5 and 20 slots in turn")
    args = parser.parse_args()
    key = secrets.token_hex(16)
    accounts = [AccountConfig(key=key, concurrency=args.concurrency + 10)]
    keys = [key]
    if args.keys:
        keys = [secrets.token_hex(16) for _ in range(args.keys)]
        accounts = [AccountConfig(key=k, concurrency=KEY_LIMITS[i % len(KEY_LIMITS)])
                    for i, k in enumerate(keys)]
        os.environ[ENV_API_KEYS] = ",".join(keys)  # every child the harness starts reads it
        key = keys[0]
    config = SimConfig(
        seed=args.seed, time_scale=100.0, task_duration_s=(10.0, 30.0), queue_delay_s=(0.0, 2.0),
        accounts=accounts, faults=FAULTS,
    )
    with tempfile.TemporaryDirectory() as tmp, Simulator(config) as sim:
        work = Path(tmp)
        manifest = write_manifest(work / "manifest.csv", args.rows)
        result = run_with_kills(
            sim, key, manifest, work / "run", kills=args.kills, concurrency=args.concurrency,
            kill_after_s=(0.3, 2.0), seed=args.seed, deadline_s=900.0,
        )
        tasks = len(sim.audit.tasks())
        checked = key_checks(sim, keys, work / "run") if args.keys else None
    print(f"kills:                      {result.kills} {dict(result.instants)}")
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
    if checked is not None:
        created, crossed, wrong, with_task = checked
        print(f"tasks created per key:      {created}")
        print(f"cross-key calls:            {crossed} tasks named by another key than their creator's")
        print(f"recorded key not creator:   {wrong} of {with_task} rows with a task")
        # the retry of the unknown rows is the last exit code; 2 means it sent nothing
        retried = not result.unknown_reported or result.exit_codes[-1] in (0, 1)
        print(f"retry --unknown ran:        {'yes' if retried else 'NO'} "
              f"(exit {result.exit_codes[-1] if result.unknown_reported else '-'})")
        ok = (ok and crossed == 0 and wrong == 0 and created.get("other", 0) == 0 and retried
              and all(created[f"key-{i}"] for i in range(1, len(keys) + 1)))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
