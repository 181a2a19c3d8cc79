"""Refresh a live run's ``results.jsonl`` and ``results.csv`` in a child process.

Rewriting the output manifest is plain Python per row. Done in a thread of the running process it
held the GIL against the event loop: every socket read or SQLite commit of the loop then waited up
to a switch interval (5 ms) to get the GIL back, and slots sat idle while a rewrite ran: in
``bench/run_bench.py``'s 2,000-task run the makespan ratio was 1.076 with the thread, 1.053 with no
refresh at all and 1.051 with this child. A child process reads the run's SQLite database (WAL:
readers never block the writer) on another core and writes the files atomically, so the loop never
waits for it.

The child is made to die with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed run cannot leave
one behind that renames an old snapshot over the results of a later resume; it runs in its own
session, so a Ctrl-C at the terminal stops only rhbatch, which then waits for it and writes the final
results itself. It never sees the API key.

    python -m pipeline.refresh RUN_DIR PARENT_PID     (internal)
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from pathlib import Path

from pipeline.config import ENV_API_KEY
from pipeline.errors import StorageError
from pipeline.export import RESULT_FILES, temporary_prefix, write_results
from pipeline.store import RunStore

PR_SET_PDEATHSIG = 1
TMP_PREFIXES = tuple(temporary_prefix(name) for name in RESULT_FILES)


async def refresh_in_child(run_dir: Path) -> None:
    """Rewrite the results of ``run_dir`` in a child process; raises StorageError if it fails."""
    env = {k: v for k, v in os.environ.items() if k != ENV_API_KEY}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.refresh", str(run_dir), str(os.getpid()),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        said = err.decode("utf-8", "replace").strip().splitlines()
        raise StorageError(said[-1] if said else f"results refresh exited with {proc.returncode}")


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete half-written results left by a refresh that was killed; the caller holds the run lock."""
    removed = 0
    for path in run_dir.glob(".results.*"):
        if path.name.startswith(TMP_PREFIXES):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    run_dir, parent = argv if argv is not None else sys.argv[1:]
    _die_with_parent(int(parent))
    try:
        store = RunStore.open(run_dir, readonly=True)
        try:
            write_results(store)
        finally:
            store.close()
    except StorageError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
