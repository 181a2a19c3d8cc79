"""``rhbatch demo``: a complete run against the built-in simulator, no account needed.

The simulator runs in this process on a free loopback port with a throw-away key made for this
demo alone; simulated tasks take 10–30 s of simulated time, compressed 200x.

Each demo is a fresh run (its key and task ids are new), so it empties ``--out`` first, but only
a directory that a demo made: the demo writes :data:`DEMO_MARKER` into it, and refuses any other
directory that is not empty, so that a real run's directory (which it cannot tell from a demo's by
its state.db) is never deleted.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline import resources
from pipeline.batch import ManifestArgs, run_batch
from pipeline.config import resolve_settings
from pipeline.errors import InputError, ResourceMissing, StateError
from pipeline.report import build_report
from pipeline.safetext import amount
from pipeline.sim import AccountConfig, SimConfig, Simulator
from pipeline.store import RunPaths

DEMO_MANIFEST_NAME = "demo_sweep.csv"  # shipped with rhbatch, see pipeline/resources.py
DEMO_TIME_SCALE = 200.0
DEMO_MARKER = ".rhbatch-demo"  # in a directory that a demo made, and may therefore delete
_MARKER_TEXT = "Made by `rhbatch demo`: the next demo with this --out deletes this directory.\n"


def prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` an empty demo directory, deleting it first only if a demo made it.

    Raises StateError (exit 2) for a path that is a file or a symbolic link, or a directory that
    is not empty and holds no :data:`DEMO_MARKER`.
    """
    fix = "pass --out with a new or empty directory"
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise StateError(f"--out {out_dir} is not a directory: {fix}")
    if out_dir.is_dir() and not (out_dir / DEMO_MARKER).is_file() and any(out_dir.iterdir()):
        raise StateError(
            f"--out {out_dir} is not empty and was not made by rhbatch demo, which replaces "
            f"only its own directories (they hold a {DEMO_MARKER} file): {fix}"
        )
    try:
        if (out_dir / DEMO_MARKER).is_file():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / DEMO_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
    except OSError as exc:
        raise StateError(f"Cannot prepare --out {out_dir}: {exc.strerror or exc}: {fix}") from None


def run_demo(
    out_dir: Path,
    manifest: Path | None = None,
    *,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Run ``manifest`` (default: the shipped demo sweep) against a simulator started here, into
    ``out_dir`` (see :func:`prepare_out_dir`); returns the run's exit code."""
    if manifest is None:
        try:
            manifest = resources.example_manifest_path(DEMO_MANIFEST_NAME)
        except ResourceMissing as exc:
            raise InputError(f"{exc}, or pass --manifest FILE") from None
    if not manifest.is_file():
        raise InputError(f"Demo manifest {manifest} not found: pass --manifest FILE")
    key = secrets.token_hex(16)
    config = SimConfig(
        seed=7,
        time_scale=DEMO_TIME_SCALE,
        accounts=[AccountConfig(key=key, api_type="SHARED", concurrency=4, coins=5000)],
        task_duration_s=(10.0, 30.0),
        queue_delay_s=(0.0, 2.0),
    )
    prepare_out_dir(out_dir)
    with Simulator(config) as sim:
        echo(f"Simulator running at {sim.base_url}")
        settings = resolve_settings(
            api_key=key,
            base_url=sim.base_url,
            env={},
            concurrency=4,
            poll_interval_s=0.1,
            account_poll_interval_s=0.05,
            max_poll_interval_s=1.0,
            capacity_backoff_s=0.2,
            max_capacity_backoff_s=1.0,
            results_flush_interval_s=1.0,
        )
        summary = run_batch(
            ManifestArgs(manifest), out_dir, settings, handle_signals=True, download=True,
            on_account=lambda a: echo(
                f"Account: {a.api_type}, {amount(a.remain_coins)} coins, {a.current_task_counts} live"
            ),
        )
        report = build_report(out_dir)
    counts = ", ".join(f"{n} {s}" for s, n in summary.counts.items() if n)
    echo(f"Demo finished: {summary.total} rows ({counts}) in {summary.elapsed_s:.1f}s, "
         f"{amount(summary.coins)} simulated coins, {summary.requests} API requests")
    paths = RunPaths(out_dir)
    echo(f"Output manifest: {paths.results('jsonl')} (and {paths.results('csv').name})")
    echo(f"Images: {paths.files}   Report: {report}")
    echo(f"Next: rhbatch status {out_dir}   |   rhbatch export {out_dir} --format parquet")
    return summary.exit_code
