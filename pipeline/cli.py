"""The ``rhbatch`` command line: parse, call one core function, turn errors into exit codes.

Exit codes: 0 every row succeeded; 1 some rows failed or are unknown; 2 bad input or usage;
3 the run was stopped (account, credentials, interrupt, budget). Data goes to stdout, progress and
messages to stderr.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import RedactingFilter, redact, resolve_settings
from pipeline.errors import RhbatchError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def echo_err(message: str) -> None:
    click.echo(redact(message), err=True)


def handle_errors(func: F) -> F:
    """Turn rhbatch errors into a one-line message on stderr and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RhbatchError as exc:
            echo_err(f"Error: {exc}")
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def manifest_options(func: F) -> F:
    """--bind / --workflow-id / --schema / --allow-duplicates / preflight, for validate and run."""
    func = click.option(
        "--no-preflight",
        is_flag=True,
        help="Do not check rows against the workflow's API JSON before sending.",
    )(func)
    func = click.option(
        "--workflow-json",
        "workflow_files",
        multiple=True,
        metavar="[ID=]FILE",
        help="The workflow in API format, for preflight without fetching it (repeatable).",
    )(func)
    func = click.option(
        "--allow-duplicates",
        is_flag=True,
        help="Keep rows whose nodeInfoList is identical (an identical graph may be a cached no-op).",
    )(func)
    func = click.option(
        "--schema",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A JSON Schema each row must satisfy (default: schemas/manifest.schema.json).",
    )(func)
    func = click.option("--workflow-id", help="Workflow id for rows without a workflowId.")(func)
    func = click.option(
        "--bind",
        "binds",
        multiple=True,
        metavar="COLUMN=NODE.FIELD",
        help="Send COLUMN as the value of NODE.FIELD (repeatable).",
    )(func)
    return func


def connection_options(func: F) -> F:
    func = click.option(
        "--base-url", help="RunningHub base URL [env RUNNINGHUB_BASE_URL; https://www.runninghub.ai]"
    )(func)
    func = click.option(
        "--api-key", help="RunningHub API key [env RUNNINGHUB_API_KEY; prefer the environment]"
    )(func)
    return func


def _manifest_args(manifest: Path, binds: tuple[str, ...], workflow_id: str | None,
                   schema: Path | None, allow_duplicates: bool,
                   workflow_files: tuple[str, ...] = (), no_preflight: bool = False) -> Any:
    from pipeline.runs import ManifestArgs

    return ManifestArgs(Path(manifest), tuple(binds), workflow_id, schema, allow_duplicates,
                        tuple(workflow_files), not no_preflight)


class _Commands(click.Group):
    """rhbatch's commands; ``sim`` (aiohttp's server, a third of a second to import) is loaded only
    when it is asked for or listed."""

    lazy = {"sim": ("pipeline.sim.cli", "sim_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, name = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), name), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rhbatch")
def cli() -> None:
    """Run large, resumable batches of ComfyUI workflows on RunningHub."""


# -- validate ------------------------------------------------------------------------------


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@manifest_options
@handle_errors
@connection_options
def validate(manifest: Path, binds: tuple[str, ...], workflow_id: str | None,
             schema: Path | None, allow_duplicates: bool, workflow_files: tuple[str, ...],
             no_preflight: bool, api_key: str | None, base_url: str | None) -> None:
    """Check MANIFEST; with the workflow's API JSON (--workflow-json, or fetched with a key), also
    check every node id, field and value type. Nothing is submitted."""
    from pipeline.prepare import prepare_rows

    loaded = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates).load()
    settings = resolve_settings(api_key=api_key, base_url=base_url)
    prepared = prepare_rows(loaded, settings=settings, workflow_files=workflow_files,
                            preflight=not no_preflight, upload=False)
    workflows = sorted({r.workflow_id for r in loaded.rows})
    click.echo(f"{manifest}: {len(loaded.rows)} rows OK, workflow {', '.join(workflows)}")
    if prepared.checked:
        click.echo("  preflight: every node id, field and value type matches the workflow")
    elif prepared.skipped:
        click.echo(f"  preflight skipped: {prepared.skipped}")
    for warning in prepared.warnings:
        click.echo(f"  warning: {warning}")
    for column, target in loaded.bound.items():
        click.echo(f"  {column} -> {target}")
    if loaded.unbound:
        click.echo(f"  not sent (no binding): {', '.join(loaded.unbound)}")
    if loaded.duplicates:
        click.echo(f"  {len(loaded.duplicates)} duplicate row(s) kept on purpose")


# -- run -------------------------------------------------------------------------------------


class Progress:
    """tqdm on stderr, quiet when stderr is not a terminal or with --quiet."""

    def __init__(self, total: int, done: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=done,
            unit="row",
            file=sys.stderr,
            disable=quiet or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        self.counts = {"submitted": 0, "success": 0, "failed": 0, "unknown": 0}

    def __call__(self, event: Any) -> None:
        if event.kind in self.counts:
            self.counts[event.kind] += 1
        if event.kind in ("success", "failed"):
            self.bar.update(1)
        if event.kind == "stopping":
            detail = redact(event.detail)
            if detail == "interrupted":
                detail = ("interrupted: finishing the create in flight and saving state; press "
                          "Ctrl-C again to stop at once (that row then becomes SUBMIT_UNKNOWN)")
            self.bar.write(f"Stopping: {detail}", file=sys.stderr)
        self.bar.set_postfix(
            sub=self.counts["submitted"], ok=self.counts["success"], fail=self.counts["failed"],
            unk=self.counts["unknown"], refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


def print_summary(run_dir: Path, summary: Any) -> None:
    from pipeline.runs import top_failures

    counts = {k: v for k, v in summary.counts.items() if v}
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    echo_err(
        f"{summary.total} rows: {parts}. {summary.coins:g} coins, {summary.elapsed_s:.1f}s, "
        f"{summary.requests} requests."
    )
    failures = top_failures(run_dir)
    if failures:
        echo_err("Top failure causes:")
        for count, cause in failures:
            echo_err(f"  {count} x {cause}")
    echo_err(f"Results: {run_dir / 'results.jsonl'} and {run_dir / 'results.csv'}")
    files = run_dir / "files"
    if files.is_dir():
        echo_err(f"Files: {files}")
    report = run_dir / "report.html"
    echo_err(f"Report: {report}" if report.exists() else f"Report: rhbatch report {run_dir}")
    if summary.counts.get("SUBMIT_UNKNOWN"):
        echo_err(
            f"{summary.counts['SUBMIT_UNKNOWN']} row(s) are SUBMIT_UNKNOWN: their create was sent "
            "but no answer came back, so they may have run (and been billed). Check RunningHub's "
            f"call records, then `rhbatch retry {run_dir} --unknown --accept-double-pay` to "
            "submit them again."
        )
    if summary.stopped:
        echo_err(f"Stopped: {summary.stopped}")
        import shlex

        again = " ".join(shlex.quote(a) for a in ["rhbatch", *sys.argv[1:]])
        echo_err(f"Resume with the same command: {again}")


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (state, results, log). An existing run there is resumed.")
@manifest_options
@connection_options
@click.option("--concurrency", type=int, help="Tasks in flight at most (the account's limit).")
@click.option("--poll-interval", type=float, help="Seconds between polls of one task.")
@click.option("--account-poll-interval", type=float,
              help="Longest wait in seconds between reads of the account's live task count "
                   "(read up to 4x as often while many tasks end often).")
@click.option("--max-coins", type=float, help="Stop submitting before spending more coins.")
@click.option("--expected-coins", type=float,
              help="Expected coins per task for --max-coins until the run has measured its own.")
@click.option("--webapp-id", help="Run this AI app (ai-app/run) instead of a workflow.")
@click.option("--instance-type", type=click.Choice(["default", "plus", "ultra"]))
@click.option("--use-personal-queue", is_flag=True, default=None)
@click.option("--webhook-url", help="Passed to RunningHub as webhookUrl (with --webhook-listen: "
              "the public base URL that forwards to the listener).")
@click.option("--webhook-listen", metavar="HOST:PORT",
              help="Receive TASK_END webhooks here to learn of finished tasks early (polling stays "
              "the authority).")
@click.option("--dry-run", is_flag=True, help="Print the exact request bodies; send nothing.")
@click.option("--download", is_flag=True, help="Download output files as tasks finish.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Log details to stderr (key redacted).")
@handle_errors
def run(manifest: Path, out_dir: Path, binds: tuple[str, ...], workflow_id: str | None,
        schema: Path | None, allow_duplicates: bool, workflow_files: tuple[str, ...],
        no_preflight: bool, api_key: str | None, base_url: str | None,
        concurrency: int | None, poll_interval: float | None,
        account_poll_interval: float | None, max_coins: float | None,
        expected_coins: float | None, webapp_id: str | None, instance_type: str | None,
        use_personal_queue: bool | None, webhook_url: str | None, webhook_listen: str | None,
        dry_run: bool, download: bool, quiet: bool, verbose: bool) -> None:
    """Submit every row of MANIFEST, collect results into OUT; resume if OUT holds this run."""
    from pipeline import runs

    if webapp_id:  # AI apps have no workflow JSON to preflight against
        workflow_id = workflow_id or webapp_id
        no_preflight = True
    args = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates, workflow_files,
                          no_preflight)
    task_options = {
        k: v
        for k, v in {
            "instanceType": instance_type,
            "usePersonalQueue": use_personal_queue,
            "webhookUrl": webhook_url,
            "webappId": webapp_id,
        }.items()
        if v is not None
    }
    if dry_run:
        settings = resolve_settings(api_key=None, base_url=base_url, env={},
                                    task_options=task_options)
        loaded = args.load()
        for payload in runs.dry_run_payloads(loaded, settings):
            click.echo(json.dumps(payload, ensure_ascii=False))
        echo_err(f"Dry run: {len(loaded.rows)} request bodies printed, nothing sent.")
        return
    settings = resolve_settings(
        api_key=api_key,
        base_url=base_url,
        concurrency=concurrency,
        poll_interval_s=poll_interval,
        account_poll_interval_s=account_poll_interval,
        task_options=task_options,
    )
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(RedactingFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("rhbatch").addHandler(handler)

    progress: Progress | None = None

    def on_open(store: Any, created: bool) -> None:
        nonlocal progress
        counts = store.counts()
        total = sum(counts.values())
        done = counts["SUCCESS"] + counts["FAILED"] + counts["CANCELLED"]
        verb = "Starting" if created else "Resuming"
        echo_err(f"{verb} {total} rows in {out_dir} ({done} already final)")
        progress = Progress(total, done, quiet)

    def on_event(event: Any) -> None:
        if progress:
            progress(event)

    def on_account(account: Any) -> None:
        coins = "?" if account.remain_coins is None else f"{account.remain_coins:g}"
        echo_err(
            f"Account: {account.api_type or 'unknown type'}, {coins} coins, "
            f"{account.current_task_counts} task(s) running or queued"
        )

    try:
        summary = runs.run_batch(
            args, out_dir, settings, on_event=on_event, on_account=on_account, on_open=on_open,
            on_warning=lambda w: echo_err(f"Warning: {w}"), max_coins=max_coins,
            expected_task_coins=expected_coins, verbose=verbose, download=download,
            webhook_listen=webhook_listen,
        )
    finally:
        if progress:
            progress.close()
    print_summary(out_dir, summary)
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["FAILED", "CANCELLED", "SUCCESS"]),
              help="Rows in this state (repeatable; default FAILED, or none with --unknown).")
@click.option("--code", "codes", multiple=True, type=int, help="Rows that failed with this code.")
@click.option("--class", "classes", multiple=True,
              help="Failure class: task_failed, row_fatal, task_gone, oom, cancelled.")
@click.option("--where", help="Expression over columns, e.g. \"`3.cfg` >= 7 and status == 'FAILED'\".")
@click.option("--unknown", is_flag=True, help="Also SUBMIT_UNKNOWN rows (needs --accept-double-pay).")
@click.option("--accept-double-pay", is_flag=True,
              help="I checked RunningHub's call records: resubmitting unknown rows may bill twice.")
@click.option("--dry-run", is_flag=True, help="Only count the rows that would be retried.")
@connection_options
@click.option("--concurrency", type=int)
@click.option("--poll-interval", type=float)
@click.option("--account-poll-interval", type=float)
@click.option("--quiet", "-q", is_flag=True)
@handle_errors
def retry(run_dir: Path, statuses: tuple[str, ...], codes: tuple[int, ...], classes: tuple[str, ...],
          where: str | None, unknown: bool, accept_double_pay: bool, dry_run: bool,
          api_key: str | None, base_url: str | None, concurrency: int | None,
          poll_interval: float | None, account_poll_interval: float | None, quiet: bool) -> None:
    """Submit chosen rows of RUN_DIR again, keeping each row's history and attempt count."""
    from pipeline import runs
    from pipeline.errors import UsageError

    if unknown and not accept_double_pay:
        raise UsageError(
            "SUBMIT_UNKNOWN rows may already have run and been billed: check RunningHub's call "
            "records, then add --accept-double-pay to resubmit them"
        )
    selection = runs.Selection(
        statuses=statuses or (() if unknown else ("FAILED",)), codes=codes, classes=classes, where=where,
        unknown=unknown,
    )
    settings = resolve_settings(
        api_key=api_key, base_url=base_url, env=None if not dry_run else {},
        concurrency=concurrency, poll_interval_s=poll_interval,
        account_poll_interval_s=account_poll_interval,
    )
    count, summary = runs.retry_rows(run_dir, settings, selection, dry_run=dry_run)
    if summary is None:
        click.echo(f"{count} row(s) would be retried")
        return
    echo_err(f"Retried {count} row(s)")
    print_summary(run_dir, summary)
    sys.exit(summary.exit_code)


# -- status / export ---------------------------------------------------------------------


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--by", multiple=True, help="Group counts by an input column (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def status(run_dir: Path, by: tuple[str, ...], as_json: bool) -> None:
    """Counts per state of the run in RUN_DIR (safe while it runs)."""
    from pipeline.runs import run_status

    report = run_status(run_dir, by)
    if as_json:
        data = {"run_dir": str(run_dir), "total": report.total, "counts": report.counts,
                "coins": report.coins}
        if report.groups is not None:
            data["groups"] = [
                {"key": list(k) if isinstance(k, tuple) else k, "counts": v}
                for k, v in report.groups.items()
            ]
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    click.echo(f"{run_dir}: {report.total} rows from {report.source}, {report.coins:g} coins")
    for state, n in report.counts.items():
        if n:
            click.echo(f"  {state:<15} {n}")
    for number, row_id, why in report.unknown:
        click.echo(f"  unknown: row {number} ({row_id}): {why}")
    if report.groups is not None:
        states = [s for s in report.counts if any(g[s] for g in report.groups.values())]
        click.echo("  " + " | ".join([", ".join(by)] + states))
        for key, counts in report.groups.items():
            click.echo("  " + " | ".join([str(key)] + [str(counts[s]) for s in states]))


@cli.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default="jsonl")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default: RUN_DIR/results.FORMAT).")
@handle_errors
def export_cmd(run_dir: Path, fmt: str, output: Path | None) -> None:
    """Write the output manifest of RUN_DIR (works while the run is going)."""
    from pipeline import export
    from pipeline.store import RunStore

    target = output or run_dir / f"results.{fmt}"
    store = RunStore.open(run_dir, readonly=True)
    try:
        count = export.export(store, fmt, target)
    finally:
        store.close()
    echo_err(f"Wrote {count} rows to {target}")


# -- account, inspect, download, report ----------------------------------------------------


@cli.command()
@connection_options
@handle_errors
def account(api_key: str | None, base_url: str | None) -> None:
    """Show the account's balance and live task count."""
    import asyncio

    from pipeline.client import RunningHubClient

    settings = resolve_settings(api_key=api_key, base_url=base_url)

    async def read() -> Any:
        async with RunningHubClient(settings) as client:
            return await client.account_status()

    status = asyncio.run(read())
    click.echo(f"type:          {status.api_type or 'unknown'}")
    click.echo(f"coins:         {'unknown' if status.remain_coins is None else f'{status.remain_coins:g}'}")
    if status.remain_money is not None:
        click.echo(f"money:         {status.remain_money:g} {status.currency or ''}".rstrip())
    click.echo(f"running/queued: {status.current_task_counts}")


@cli.command()
@click.argument("workflow_id", required=False)
@click.option("--workflow-json", "workflow_file", type=click.Path(exists=True, dir_okay=False),
              help="Read the API-format JSON from a file instead of RunningHub.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@handle_errors
def inspect(workflow_id: str | None, workflow_file: str | None, as_json: bool,
            api_key: str | None, base_url: str | None) -> None:
    """List what a workflow lets you bind: node id, class, title, field, value, kind."""
    import asyncio

    from pipeline import preflight
    from pipeline.errors import UsageError

    if workflow_file:
        api_json = preflight.load_workflow_file(workflow_file)
    elif workflow_id:
        settings = resolve_settings(api_key=api_key, base_url=base_url)
        from pipeline.client import RunningHubClient

        async def fetch() -> Any:
            async with RunningHubClient(settings) as client:
                return await client.workflow_json(workflow_id)

        api_json = asyncio.run(fetch())
    else:
        raise UsageError("Name a WORKFLOW_ID, or pass --workflow-json FILE")
    fields = preflight.describe_workflow(api_json)
    if as_json:
        click.echo(json.dumps(preflight.fields_to_json(fields), ensure_ascii=False))
    else:
        click.echo(f"workflow sha256 {preflight.workflow_hash(api_json)}")
        click.echo(preflight.format_fields(fields))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--jobs", type=int, default=4, show_default=True, help="Downloads at once.")
@click.option("--max-mb", type=float, default=512, show_default=True, help="Largest file accepted.")
@handle_errors
def download(run_dir: Path, jobs: int, max_mb: float) -> None:
    """Download every output file of RUN_DIR into RUN_DIR/files, verified by sha256."""
    from pipeline.download import download_run

    summary = download_run(run_dir, jobs=jobs, max_bytes=int(max_mb * 2**20))
    for error in summary.errors:
        echo_err(error)
    click.echo(
        f"{summary.downloaded} downloaded, {summary.skipped} already verified, "
        f"{summary.failed} failed, {summary.bytes} bytes"
    )
    sys.exit(1 if summary.failed else 0)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--x", "x", help="Input column laid out across the contact sheet.")
@click.option("--y", "y", help="Input column laid out down the contact sheet.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file (default RUN_DIR/report.html).")
@handle_errors
def report(run_dir: Path, x: str | None, y: str | None, output: Path | None) -> None:
    """Write a self-contained HTML report: summary, contact sheet, failure triage."""
    from pipeline.report import build_report

    click.echo(str(build_report(run_dir, x=x, y=y, out=output)))


# -- sweep -------------------------------------------------------------------------------------


@cli.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest to write: .csv, .jsonl or .parquet.")
@click.option("--max-rows", type=int, default=100_000, show_default=True,
              help="Refuse larger sweeps unless --yes.")
@click.option("--yes", is_flag=True, help="Write even past --max-rows.")
@click.option("--cost-from", "cost_from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An earlier run directory: print the expected coins from its cost per task.")
@handle_errors
def sweep(spec: Path, output: Path, max_rows: int, yes: bool, cost_from: Path | None) -> None:
    """Expand a sweep SPEC (YAML or JSON) into a manifest, streaming."""
    from pipeline.runs import cost_per_task
    from pipeline.sweep import count_rows, expand_sweep, load_spec

    rows = count_rows(load_spec(spec))
    echo_err(f"{spec}: {rows:,} rows")
    if cost_from is not None:
        per_task = cost_per_task(cost_from)
        if per_task is None:
            echo_err(f"  {cost_from} has no finished task with a known cost yet")
        else:
            echo_err(f"  expected about {rows * per_task:,.0f} coins "
                     f"({per_task:g} per task, measured in {cost_from})")
    if rows > max_rows and not yes and sys.stdin.isatty():
        yes = click.confirm(f"Write {rows:,} rows, more than --max-rows {max_rows:,}?", err=True)
    result = expand_sweep(spec, output, max_rows=max_rows, force=yes)
    click.echo(f"Wrote {result.rows} rows to {result.path}")


# -- simulator and demo --------------------------------------------------------------------


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("outputs/demo"), show_default=True)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Manifest to run (default: manifests/demo_sweep.csv).")
@click.option("--quiet", "-q", is_flag=True)
@handle_errors
def demo(out_dir: Path, manifest: Path | None, quiet: bool) -> None:
    """Start the simulator in-process and run an example sweep against it."""
    from pipeline.demo import run_demo

    code = run_demo(out_dir, manifest, quiet=quiet, echo=echo_err)
    sys.exit(code)


def main() -> None:
    cli(prog_name="rhbatch")
