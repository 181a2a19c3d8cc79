"""The ``rhbatch`` command line: parse, call one core function, turn errors into exit codes.

Exit codes: 0 every row succeeded; 1 some rows failed or are unknown; 2 bad input or usage;
3 the run was stopped (account, credentials, interrupt, budget). Data goes to stdout, progress and
messages to stderr. An error that is not rhbatch's own (a bug) is one line too, naming the log
that holds its traceback, or the way to see it: ``RHBATCH_DEBUG=1`` lets it through, traceback and
all.

Each command imports the core module it calls when it runs, not at the top of this file: all of
them (the client, runner, manifest and their libraries) take several times as long to import as
this file and click do (bench/README.md has the figures), and ``rhbatch --help``, ``validate`` or
``status`` need few of them or none. ``sim`` (aiohttp's server) is loaded only when it is asked
for or listed (``_Commands``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import (
    ENV_API_KEY,
    PROGRESS_INTERVAL_S,
    TRACEBACK_NOTE,
    redact,
    resolve_settings,
)
from pipeline.errors import RhbatchError
from pipeline.safetext import amount, escape_controls

F = TypeVar("F", bound=Callable[..., Any])

ENV_DEBUG = "RHBATCH_DEBUG"  # set (to anything but "" or "0"): unexpected errors show their traceback


def safe_lines(text: Any) -> str:
    """``text`` fit for a terminal: the key redacted, every control character but the line breaks
    rhbatch itself writes shown as an escape (``\\x1b``, ``\\r``), so text that came from the
    service cannot retitle, clear or overwrite the terminal. Service text inside a message is
    escaped where it is read, newlines included (:mod:`pipeline.safetext`)."""
    return "\n".join(escape_controls(line) for line in redact(text).split("\n"))


def echo_err(message: str) -> None:
    click.echo(safe_lines(message), err=True)


def _debugging() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


def unexpected_message(exc: BaseException) -> str:
    """The one line an error that is not rhbatch's own gets: what it is, and where its traceback
    is (the run's log, when the run wrote it there) or how to see it."""
    logs = [note[len(TRACEBACK_NOTE):] for note in getattr(exc, "__notes__", ())
            if isinstance(note, str) and note.startswith(TRACEBACK_NOTE)]
    said = str(exc).splitlines()[0] if str(exc) else ""
    what = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    where = (f"the traceback is in {logs[0]}" if logs
             else f"run with {ENV_DEBUG}=1 for the traceback")
    return f"Error: unexpected {what} ({where}); this is a bug in rhbatch, please report it"


def handle_errors(func: F) -> F:
    """Turn rhbatch errors into a one-line message on stderr and their exit code; any other
    exception into one line naming where its traceback is (exit 1), unless RHBATCH_DEBUG is set."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RhbatchError as exc:
            echo_err(f"Error: {exc}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            # a Ctrl-C outside the run loop (loading, preflight, the account check): the state
            # on disk is whole, since every write commits before it returns
            echo_err("Interrupted: nothing was lost; run the same command again to resume")
            sys.exit(3)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if _debugging():
                raise
            echo_err(unexpected_message(exc))
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def manifest_options(func: F) -> F:
    """--bind / --workflow-id / --schema / --allow-duplicates / preflight, for validate and run."""
    func = click.option(
        "--strict",
        is_flag=True,
        help="Refuse columns that feed no node (default: they are kept as metadata, not sent, "
             "and named in a warning).",
    )(func)
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
        help="The workflow in API format, for preflight without fetching it (repeatable; "
             "default: the run's cache, else getJsonApiFormat with the key, else no preflight).",
    )(func)
    func = click.option(
        "--object-info",
        type=click.Path(exists=True, dir_okay=False),
        metavar="FILE",
        help="Your ComfyUI's node definitions (a saved GET /object_info, e.g. from `rhbatch "
             "catalogue export`), merged over the core nodes rhbatch knows, so preflight checks "
             "your custom nodes and models too (default: the core nodes only).",
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
    func = click.option("--workflow-id", help="Workflow id for rows without a workflowId "
                                              "(default: none: each row or the JSON manifest "
                                              "gives it).")(func)
    func = click.option(
        "--bind",
        "binds",
        multiple=True,
        metavar="COLUMN=NODE.FIELD",
        help="Send COLUMN as the value of NODE.FIELD (repeatable; default: only columns named "
             "NODE.FIELD, and a JSON manifest's bindings, are sent).",
    )(func)
    return func


def connection_options(func: F) -> F:
    func = click.option(
        "--base-url", help="RunningHub base URL (default: $RUNNINGHUB_BASE_URL, else "
                           "https://www.runninghub.ai; a .cn key needs https://www.runninghub.cn)."
    )(func)
    func = click.option(
        "--api-key", help="RunningHub API key (default: $RUNNINGHUB_API_KEY; prefer the "
                          "environment: a flag shows in the process list)."
    )(func)
    return func


def keys_option(func: F) -> F:
    """--keys-file: several keys in one run (pipeline.keys); RUNNINGHUB_API_KEYS is the same
    from the environment."""
    return click.option(
        "--keys-file", type=click.Path(dir_okay=False, path_type=Path),
        help="Several API keys, one a line: KEY [label=NAME] [max=N] [max_coins=N] [max_money=N] "
             "(chmod 600; default: $RUNNINGHUB_API_KEYS, comma-separated, else the one key).")(func)


def _pool_keys(keys_file: Path | None, api_key: str | None) -> tuple[Any, ...]:
    """The keys of a run with several (or a keys file); () for the usual single key."""
    from pipeline.keys import ENV_API_KEYS, resolve_keys

    if keys_file is None and (api_key or not os.environ.get(ENV_API_KEYS, "").strip()):
        return ()  # the one key: checked (and named in messages) by the settings as ever
    return tuple(resolve_keys(keys_file=keys_file, api_key=api_key))


def _env_without_key() -> dict[str, str]:
    """The environment for settings when the keys come from a pool (each key is its own)."""
    return {k: v for k, v in os.environ.items() if k != ENV_API_KEY}


def _manifest_args(manifest: Path, binds: tuple[str, ...], workflow_id: str | None,
                   schema: Path | None, allow_duplicates: bool,
                   workflow_files: tuple[str, ...] = (), no_preflight: bool = False,
                   strict: bool = False, object_info: str | None = None) -> Any:
    from pipeline.batch import ManifestArgs

    return ManifestArgs(Path(manifest), tuple(binds), workflow_id, schema, allow_duplicates,
                        tuple(workflow_files), not no_preflight, strict, object_info)


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
    """Run large, resumable batches of ComfyUI workflows on RunningHub.

    \b
    Exit codes:
      0  every row succeeded
      1  some rows failed or are unknown
      2  bad input or usage
      3  stopped: credentials, balance, budget, interrupt, outage; resumable
    """


# -- validate ------------------------------------------------------------------------------


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@manifest_options
@handle_errors
@connection_options
def validate(manifest: Path, binds: tuple[str, ...], workflow_id: str | None,
             schema: Path | None, allow_duplicates: bool, workflow_files: tuple[str, ...],
             object_info: str | None, no_preflight: bool, strict: bool, api_key: str | None,
             base_url: str | None) -> None:
    """Check MANIFEST; with the workflow's API JSON (--workflow-json, or fetched with a key), also
    check every node id, field and value type. Every problem is reported at once (exit 2);
    nothing is submitted."""
    from pipeline.manifest import workflow_ids
    from pipeline.prepare import load_and_prepare

    args = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates)
    settings = resolve_settings(api_key=api_key, base_url=base_url)
    loaded, prepared = load_and_prepare(args.load, settings=settings, workflow_files=workflow_files,
                                        preflight=not no_preflight, upload=False, strict=strict,
                                        object_info=object_info)
    workflows = workflow_ids(loaded.rows)
    click.echo(f"{escape_controls(manifest)}: {len(loaded.rows)} rows OK, workflow "
               f"{', '.join(workflows)}")
    if prepared.checked:
        click.echo("  preflight: every node id, field and value type matches the workflow")
        if prepared.coverage:
            click.echo(f"  catalogue: {escape_controls(prepared.coverage)}")
    elif prepared.skipped:
        click.echo(f"  preflight skipped: {prepared.skipped}")
    for column, target in loaded.bound.items():
        click.echo(f"  {column} -> {target}")
    if loaded.from_results and loaded.unbound:
        click.echo(f"  {', '.join(loaded.unbound)}: the earlier run's inputs, kept as metadata "
                   "(each row sends the exact nodeInfoList it recorded)")
    for warning in prepared.warnings:
        click.echo(f"  warning: {escape_controls(warning)}")
    if loaded.duplicates:
        click.echo(f"  {len(loaded.duplicates)} duplicate row(s) kept on purpose")


# -- run -------------------------------------------------------------------------------------


def print_summary(run_dir: Path, summary: Any) -> None:
    from pipeline.progress import key_summary_lines, spending_lines
    from pipeline.status import key_breakdown_of, top_failures
    from pipeline.store import RunPaths, refuse_entry

    paths = RunPaths(run_dir)

    counts = {k: v for k, v in summary.counts.items() if v}
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    echo_err(
        f"{summary.total} rows: {parts}. {amount(summary.coins)} coins, {summary.elapsed_s:.1f}s, "
        f"{summary.requests} requests."
    )
    for line in spending_lines(getattr(summary, "spending", None)):
        echo_err(line)
    keys = getattr(summary, "keys", None) or []
    for line in key_summary_lines(keys, key_breakdown_of(run_dir)) if len(keys) > 1 else ():
        echo_err(line)  # (the breakdown reads every row: only for a run of several keys)
    for how, n in (getattr(summary, "reconciled", None) or {}).items():
        echo_err(f"Reconciled: {n} unknown create(s) proven to be a task by {how}, never resent")
    failures = top_failures(run_dir)
    if failures:
        echo_err("Top failure causes:")
        for count, cause in failures:
            echo_err(f"  {count} x {escape_controls(cause)}")
    echo_err(f"Results: {paths.results('jsonl')} and {paths.results('csv')}")
    files = paths.files
    if files.is_symlink():  # downloads were refused: say so here, not only in the log
        link = f"a symbolic link (to {escape_controls(files.readlink())})"
        echo_err(f"Files: not downloaded: {refuse_entry(files, link)}")
    elif files.is_dir():
        echo_err(f"Files: {files}")
    report = paths.report
    echo_err(f"Report: {report}" if report.exists() else f"Report: rhbatch report {run_dir}")
    if summary.counts.get("SUBMIT_UNKNOWN"):
        echo_err(
            f"{summary.counts['SUBMIT_UNKNOWN']} row(s) are SUBMIT_UNKNOWN: their create was sent "
            "but no answer came back, so they may have run (and been billed). Check RunningHub's "
            f"call records, then `rhbatch retry {run_dir} --unknown --accept-double-pay` to "
            "submit them again."
        )
    if summary.stopped:
        echo_err(f"Stopped: {escape_controls(summary.stopped)}")
        from pipeline.progress import resume_command

        again, key_dropped = resume_command(sys.argv[1:])
        if key_dropped:
            echo_err(f"Resume with {ENV_API_KEY} set to the key (a key given as --api-key is "
                     f"never printed): {again}")
        else:
            echo_err(f"Resume with the same command: {again}")


def base_url_moved_option(func: F) -> F:
    """--base-url-moved, for run and retry: a run keeps the base URL it was started against."""
    return click.option(
        "--base-url-moved", is_flag=True,
        help="The service this run was started against has really moved: continue the run at "
             "the base URL given now, and record it (default: another base URL is refused).")(func)


def budget_options(func: F) -> F:
    """--max-coins, --max-money, --expected-coins: kept with the run, so a resume or a retry
    without them holds the limits the run had; a new value replaces the old one."""
    func = click.option(
        "--expected-coins", type=float,
        help="Expected coins per task for --max-coins until the run has measured its own "
             "(default: one task runs alone until its price is known).")(func)
    func = click.option(
        "--max-money", type=float,
        help="Stop submitting before money billed (consumeMoney plus third-party money) could "
             "pass this (default: no limit; kept with the run).")(func)
    func = click.option(
        "--max-coins", type=float,
        help="Stop submitting before coins billed (failed and cancelled tasks included) could "
             "pass this (default: no limit; kept with the run).")(func)
    return func


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (state, results, log). An existing run there is resumed.")
@base_url_moved_option
@manifest_options
@connection_options
@keys_option
@click.option("--concurrency", type=int, help="Tasks in flight at most: the account's limit "
                                               "(default: 1; 50 for enterprise shared keys).")
@click.option("--poll-interval", type=float, help="Seconds between polls of one task (default: 5).")
@click.option("--account-poll-interval", type=float,
              help="Longest wait in seconds between reads of the account's live task count "
                   "(default: 2; read up to 4x as often while many tasks end often).")
@click.option("--request-deadline", type=float,
              help="Seconds one request may take in all: connect, send and the whole answer "
                   "(default: 60). A create past it is SUBMIT_UNKNOWN, never resent.")
@click.option("--api", type=click.Choice(["auto", "v1", "v2"]),
              help="RunningHub API generation (default: auto: creates on v1, reads with v2 "
                   "query, all on v2 for a key whose v1 task routes are gone; kept with the run).")
@click.option("--task-timeout", type=float, metavar="HOURS",
              help="Cancel a task that has not ended this many hours after its create; its row "
                   "is FAILED with code 9100 (default: 6).")
@click.option("--give-up-after", type=float, metavar="SECONDS",
              help="Stop (exit 3, resumable) once RunningHub has been unreachable this long "
                   "(default: never; one status line a minute says since when).")
@budget_options
@click.option("--webapp-id", help="Run this AI app (ai-app/run) instead of a workflow "
                                   "(default: none: the manifest's workflows run).")
@click.option("--instance-type", type=click.Choice(["default", "plus", "ultra"]),
              help="RunningHub machine class for every task: default 24 GB, plus 48 GB, ultra "
                   "(default: not sent, so RunningHub's default; an instanceType column wins).")
@click.option("--use-personal-queue", is_flag=True, default=None,
              help="Dedicated keys: queue tasks while every owned machine is busy instead of "
                   "415 (sent as usePersonalQueue; default: not sent).")
@click.option("--webhook-url", help="Passed to RunningHub as webhookUrl (with --webhook-listen: "
              "the public base URL that forwards to the listener; default: none).")
@click.option("--webhook-listen", metavar="HOST:PORT",
              help="Receive TASK_END webhooks here to learn of finished tasks early (polling stays "
              "the authority; default: none: polling alone).")
@click.option("--dry-run", is_flag=True, help="Print the exact request bodies; send nothing.")
@click.option("--download", is_flag=True, help="Download output files as tasks finish.")
@click.option("--progress-interval", type=float, default=PROGRESS_INTERVAL_S, show_default=True,
              help="Without a terminal, seconds between plain progress lines on stderr and in "
                   "the log (0: none).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no progress lines.")
@click.option("--verbose", "-v", is_flag=True, help="Log details to stderr (key redacted).")
@handle_errors
def run(manifest: Path, out_dir: Path, binds: tuple[str, ...], workflow_id: str | None,
        base_url_moved: bool,
        schema: Path | None, allow_duplicates: bool, workflow_files: tuple[str, ...],
        object_info: str | None, no_preflight: bool, strict: bool, api_key: str | None,
        base_url: str | None, concurrency: int | None, poll_interval: float | None,
        account_poll_interval: float | None, request_deadline: float | None, api: str | None,
        task_timeout: float | None, give_up_after: float | None, max_coins: float | None,
        max_money: float | None, expected_coins: float | None, webapp_id: str | None,
        instance_type: str | None,
        use_personal_queue: bool | None, webhook_url: str | None, webhook_listen: str | None,
        dry_run: bool, download: bool, progress_interval: float, quiet: bool,
        verbose: bool, keys_file: Path | None) -> None:
    """Submit every row of MANIFEST, collect results into OUT; resume if OUT holds this run."""
    from pipeline import batch
    from pipeline.progress import Progress, verbose_log

    args = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates, workflow_files,
                          no_preflight, strict, object_info)
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
        planned = batch.dry_run(args, resolve_settings(api_key=None, base_url=base_url, env={},
                                                       task_options=task_options))
        for warning in planned.prepared.warnings:
            echo_err(f"Warning: {warning}")
        for payload in planned.payloads():
            click.echo(json.dumps(payload, ensure_ascii=False))
        echo_err(f"Dry run: {len(planned.manifest.rows)} request bodies printed, nothing sent.")
        return
    keys = _pool_keys(keys_file, api_key)
    settings = resolve_settings(
        api_key=None if keys else api_key,
        env=_env_without_key() if keys else None,
        base_url=base_url,
        concurrency=concurrency,
        poll_interval_s=poll_interval,
        account_poll_interval_s=account_poll_interval,
        request_deadline_s=request_deadline,
        api=api,
        task_timeout_s=None if task_timeout is None else task_timeout * 3600,
        give_up_after_s=give_up_after,
        task_options=task_options,
    )
    progress: Any = None  # a pipeline.progress.Progress once the run is open

    def on_open(store: Any, created: bool) -> None:
        nonlocal progress
        counts = store.counts()
        total = sum(counts.values())
        done = counts["SUCCESS"] + counts["FAILED"] + counts["CANCELLED"]
        verb = "Starting" if created else "Resuming"
        echo_err(f"{verb} {total} rows in {out_dir} ({done} already final)")
        progress = Progress(total, done, quiet, progress_interval, echo=echo_err)
        progress.coins = store.spending().coins

    def on_event(event: Any) -> None:
        if progress:
            progress(event)

    def on_account(account: Any) -> None:
        coins = "?" if account.remain_coins is None else amount(account.remain_coins)
        echo_err(
            f"Account: {account.api_type or 'unknown type'}, {coins} coins, "
            f"{account.current_task_counts} task(s) running or queued"
        )

    try:
        with verbose_log(verbose):
            summary = batch.run_batch(
                args, out_dir, settings, on_event=on_event, on_account=on_account,
                on_open=on_open, on_warning=lambda w: echo_err(f"Warning: {w}"),
                max_coins=max_coins, max_money=max_money, expected_task_coins=expected_coins,
                verbose=verbose, download=download, webhook_listen=webhook_listen,
                on_notice=echo_err, base_url_moved=base_url_moved, keys=keys,
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
@click.option("--code", "codes", multiple=True, type=int,
              help="Rows that failed with this code (repeatable; default: any code).")
@click.option("--class", "classes", multiple=True,
              help="Failure class: task_failed, row_fatal, task_gone, oom, cancelled, unknown "
                   "(repeatable; default: any class).")
@click.option("--where", help="Expression over columns, e.g. \"`3.cfg` >= 7 and status == "
                               "'FAILED'\" (default: no condition).")
@click.option("--unknown", is_flag=True, help="Also SUBMIT_UNKNOWN rows (needs --accept-double-pay).")
@click.option("--accept-double-pay", is_flag=True,
              help="I checked RunningHub's call records: resubmitting unknown rows may bill twice.")
@click.option("--dry-run", is_flag=True,
              help="Print the rows and exact request bodies a retry would send, and their "
                   "expected coins; send nothing.")
@budget_options
@connection_options
@keys_option
@base_url_moved_option
@click.option("--concurrency", type=int, help="Tasks in flight at most (default: 1).")
@click.option("--poll-interval", type=float, help="Seconds between polls of one task (default: 5).")
@click.option("--account-poll-interval", type=float,
              help="Longest wait in seconds between reads of the account's task count (default: 2).")
@click.option("--request-deadline", type=float,
              help="Seconds one request may take in all (default: 60).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def retry(run_dir: Path, statuses: tuple[str, ...], codes: tuple[int, ...], classes: tuple[str, ...],
          where: str | None, unknown: bool, accept_double_pay: bool, dry_run: bool,
          max_coins: float | None, max_money: float | None, expected_coins: float | None,
          api_key: str | None, base_url: str | None, base_url_moved: bool,
          concurrency: int | None,
          poll_interval: float | None, account_poll_interval: float | None,
          request_deadline: float | None, quiet: bool, keys_file: Path | None) -> None:
    """Submit the chosen rows of RUN_DIR again, keeping each row's history and attempt count.

    Only the rows the selection names are sent; rows still PENDING are `rhbatch run`'s business.
    The run's budget holds here too.
    """
    from pipeline.retry import Selection, retry_rows

    selection = Selection(
        statuses=statuses or (() if unknown else ("FAILED",)), codes=codes, classes=classes,
        where=where, unknown=unknown, accept_double_pay=accept_double_pay,
    )
    keys = () if dry_run else _pool_keys(keys_file, api_key)
    settings = resolve_settings(
        api_key=None if keys else api_key, base_url=base_url,
        env={} if dry_run else _env_without_key() if keys else None,
        concurrency=concurrency, poll_interval_s=poll_interval,
        account_poll_interval_s=account_poll_interval, request_deadline_s=request_deadline,
    )
    plan, summary = retry_rows(run_dir, settings, selection, dry_run=dry_run,
                               max_coins=max_coins, max_money=max_money,
                               expected_task_coins=expected_coins, on_notice=echo_err,
                               base_url_moved=base_url_moved, keys=keys)
    if summary is None:
        for row in plan.rows:
            click.echo(json.dumps({"row": row["row"], "row_id": row["row_id"],
                                   "status": row["status"], "body": row["body"]},
                                  ensure_ascii=False))
        cost = ("" if plan.expected_coins is None
                else f", expected about {amount(plan.expected_coins)} coins at this run's "
                     f"{amount(plan.expected_coins_per_task)} per task")
        echo_err(f"Dry run: {len(plan.rows)} row(s) would be retried{cost}; nothing sent.")
        if plan.pending_left:
            echo_err(f"{plan.pending_left} row(s) still PENDING are not part of a retry: "
                     f"`rhbatch run MANIFEST --out {run_dir}` submits them.")
        return
    echo_err(f"Retried {len(plan.rows)} row(s)")
    print_summary(run_dir, summary)
    sys.exit(summary.exit_code)


# -- status / export ---------------------------------------------------------------------


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--by", multiple=True,
              help="Group counts by an input column (repeatable; default: no grouping).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def status(run_dir: Path, by: tuple[str, ...], as_json: bool) -> None:
    """Counts per state of the run in RUN_DIR (safe while it runs)."""
    from pipeline.status import run_status, status_json, status_lines

    report = run_status(run_dir, by, failures=5)
    if as_json:
        click.echo(json.dumps(status_json(report, run_dir), ensure_ascii=False))
        return
    for line in status_lines(report, run_dir, by):
        click.echo(line)


@cli.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default="jsonl",
              help="Format of the output manifest (default: jsonl).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default: RUN_DIR/results.FORMAT).")
@handle_errors
def export_cmd(run_dir: Path, fmt: str, output: Path | None) -> None:
    """Write the output manifest of RUN_DIR (works while the run is going)."""
    from pipeline.export import export_run

    target, count = export_run(run_dir, fmt, output)
    echo_err(f"Wrote {count} rows to {target}")


# -- account, inspect, download, report ----------------------------------------------------


@cli.command()
@connection_options
@handle_errors
def account(api_key: str | None, base_url: str | None) -> None:
    """Show the account's balance and live task count."""
    from pipeline.prepare import read_account

    status = read_account(resolve_settings(api_key=api_key, base_url=base_url))
    click.echo(f"type:          {escape_controls(status.api_type or 'unknown')}")
    click.echo(f"coins:         {amount(status.remain_coins)}")
    if status.remain_money is not None:
        currency = escape_controls(status.currency or "")
        click.echo(f"money:         {amount(status.remain_money)} {currency}".rstrip())
    click.echo(f"running/queued: {status.current_task_counts}")


@cli.command()
@click.argument("workflow_id", required=False)
@click.option("--workflow-json", "workflow_file", type=click.Path(exists=True, dir_okay=False),
              help="Read the API-format JSON from a file instead of RunningHub (default: "
                   "fetched with getJsonApiFormat, which needs the key).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--object-info", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Your ComfyUI's saved GET /object_info, merged over the core nodes rhbatch "
                   "knows, for the ALLOWED column (default: the core nodes only).")
@connection_options
@handle_errors
def inspect(workflow_id: str | None, workflow_file: str | None, as_json: bool,
            object_info: str | None, api_key: str | None, base_url: str | None) -> None:
    """List what a workflow lets you bind: node id, class, title, field, value, kind, and what the
    node catalogue allows (range, step, default, options) where it knows the node."""
    from pipeline import preflight
    from pipeline.catalogue import load_catalogue
    from pipeline.prepare import load_workflow
    from pipeline.workflows import workflow_hash

    fetched = workflow_id is not None and not workflow_file  # only a fetch needs the settings
    api_json = load_workflow(workflow_id, workflow_file, resolve_settings(
        api_key=api_key, base_url=base_url) if fetched else None)
    fields = preflight.describe_workflow(api_json, load_catalogue(object_info))
    if as_json:
        click.echo(json.dumps(preflight.fields_to_json(fields), ensure_ascii=False))
    else:
        click.echo(f"workflow sha256 {workflow_hash(api_json)}")
        # names and titles come from the workflow JSON (the service's): one escaped line each
        click.echo(preflight.format_fields([_shown_field(f) for f in fields]))


def _shown_field(field: Any) -> Any:
    """A workflow field with its texts' control characters escaped, for the inspect table."""
    from pipeline.preflight import is_link

    value = field.value  # shown as JSON, which escapes control characters itself
    if is_link(value):  # shown as "-> node ID.N": the id is raw text
        value = [escape_controls(v) if isinstance(v, str) else v for v in value]
    return dataclasses.replace(
        field, node_id=escape_controls(field.node_id), class_type=escape_controls(field.class_type),
        title=None if field.title is None else escape_controls(field.title),
        name=escape_controls(field.name), value=value,
        allowed=None if field.allowed is None else escape_controls(field.allowed))


@cli.group()
def catalogue() -> None:
    """The node catalogue preflight checks values against (ranges, options, required inputs)."""


@catalogue.command("export")
@click.argument("url")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to save the definitions (JSON), for --object-info.")
@handle_errors
def catalogue_export(url: str, output: Path) -> None:
    """Save the node definitions (GET /object_info) of the ComfyUI server at URL, for --object-info."""
    from pipeline.catalogue import export_object_info

    r = export_object_info(url, output)
    click.echo(f"{escape_controls(r.path)}: {r.classes} node classes from {escape_controls(r.url)} "
               f"({r.bytes:,} bytes, sha256 {r.sha256[:12]})")


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
@click.option("--x", "x", help="Input column laid out across the contact sheet (default: of the "
                                "two bound columns with the most values, the one with fewer).")
@click.option("--y", "y", help="Input column laid out down the contact sheet (default: the bound "
                                "column with the most values that --x is not).")
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
              help="An earlier run directory: print the expected coins from its cost per task "
                   "(default: none, no estimate).")
@handle_errors
def sweep(spec: Path, output: Path, max_rows: int, yes: bool, cost_from: Path | None) -> None:
    """Expand a sweep SPEC (YAML or JSON) into a manifest, streaming."""
    from pipeline.status import cost_per_task
    from pipeline.sweep import count_rows, expand_sweep, load_spec

    rows = count_rows(load_spec(spec))
    echo_err(f"{spec}: {rows:,} rows")
    if cost_from is not None:
        per_task = cost_per_task(cost_from)
        if per_task is None:
            echo_err(f"  {cost_from} has no finished task with a known cost yet")
        else:
            echo_err(f"  expected about {amount(round(rows * per_task))} coins "
                     f"({amount(per_task)} per task, measured in {cost_from})")
    if rows > max_rows and not yes and sys.stdin.isatty():
        yes = click.confirm(f"Write {rows:,} rows, more than --max-rows {max_rows:,}?", err=True)
    result = expand_sweep(spec, output, max_rows=max_rows, force=yes)
    click.echo(f"Wrote {result.rows} rows to {result.path}")


# -- simulator and demo --------------------------------------------------------------------


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("outputs/demo"), show_default=True,
              help="Run directory; one an earlier demo made is replaced, any other must be new "
                   "or empty.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Manifest to run (default: the demo_sweep.csv shipped with rhbatch).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def demo(out_dir: Path, manifest: Path | None, quiet: bool) -> None:
    """Start the simulator in-process and run an example sweep against it."""
    from pipeline.demo import run_demo

    code = run_demo(out_dir, manifest, quiet=quiet, echo=echo_err)
    sys.exit(code)


def main() -> None:
    cli(prog_name="rhbatch")
