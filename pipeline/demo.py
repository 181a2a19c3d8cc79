"""``rhbatch demo``: a complete run against the built-in simulator, no account needed.

The simulator runs in this process on a free loopback port with a throw-away key made for this
demo alone; simulated tasks take 10–30 s of simulated time, compressed 200x.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.config import resolve_settings
from pipeline.report import build_report
from pipeline.runs import ManifestArgs, run_batch

DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "demo_sweep.csv"
DEMO_TIME_SCALE = 200.0


def run_demo(
    out_dir: Path,
    manifest: Path | None = None,
    *,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    from pipeline.sim import AccountConfig, SimConfig, Simulator

    manifest = manifest or DEMO_MANIFEST
    if not manifest.is_file():
        echo(f"Demo manifest {manifest} not found: pass --manifest FILE")
        return 2
    key = secrets.token_hex(16)
    config = SimConfig(
        seed=7,
        time_scale=DEMO_TIME_SCALE,
        accounts=[AccountConfig(key=key, api_type="SHARED", concurrency=4, coins=5000)],
        task_duration_s=(10.0, 30.0),
        queue_delay_s=(0.0, 2.0),
    )
    if out_dir.exists() and (out_dir / "state.db").exists():
        shutil.rmtree(out_dir)  # each demo is a fresh run (its key and task ids are new)
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
                f"Account: {a.api_type}, {a.remain_coins:g} coins, {a.current_task_counts} live"
            ),
        )
        report = build_report(out_dir)
    counts = ", ".join(f"{n} {s}" for s, n in summary.counts.items() if n)
    echo(f"Demo finished: {summary.total} rows ({counts}) in {summary.elapsed_s:.1f}s, "
         f"{summary.coins:g} simulated coins, {summary.requests} API requests")
    echo(f"Output manifest: {out_dir / 'results.jsonl'} (and results.csv)")
    echo(f"Images: {out_dir / 'files'}   Report: {report}")
    echo(f"Next: rhbatch status {out_dir}   |   rhbatch export {out_dir} --format parquet")
    return summary.exit_code
