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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import ENV_API_KEY, RedactingFilter, redact, resolve_settings
from pipeline.errors import RhbatchError
from pipeline.safetext import amount, escape_controls

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def safe_lines(text: Any) -> str:
    """``text`` fit for a terminal: the key redacted, every control character but the line breaks
    rhbatch itself writes shown as an escape (``\\x1b``, ``\\r``), so text that came from the
    service cannot retitle, clear or overwrite the terminal. Service text inside a message is
    escaped where it is read, newlines included (:mod:`pipeline.safetext`)."""
    return "\n".join(escape_controls(line) for line in redact(text).split("\n"))


def echo_err(message: str) -> None:
    click.echo(safe_lines(message), err=True)


def handle_errors(func: F) -> F:
    """Turn rhbatch errors into a one-line message on stderr and their exit code."""

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


def _manifest_args(manifest: Path, binds: tuple[str, ...], workflow_id: str | None,
                   schema: Path | None, allow_duplicates: bool,
                   workflow_files: tuple[str, ...] = (), no_preflight: bool = False,
                   strict: bool = False) -> Any:
    import dataclasses

    from pipeline.runs import ManifestArgs

    args = ManifestArgs(Path(manifest), tuple(binds), workflow_id, schema, allow_duplicates,
                        tuple(workflow_files), not no_preflight)
    return dataclasses.replace(args, strict=True) if strict else args


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
             no_preflight: bool, strict: bool, api_key: str | None, base_url: str | None) -> None:
    """Check MANIFEST; with the workflow's API JSON (--workflow-json, or fetched with a key), also
    check every node id, field and value type. Every problem is reported at once (exit 2);
    nothing is submitted."""
    from pipeline.prepare import load_and_prepare

    args = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates)
    settings = resolve_settings(api_key=api_key, base_url=base_url)
    loaded, prepared = load_and_prepare(args.load, settings=settings, workflow_files=workflow_files,
                                        preflight=not no_preflight, upload=False, strict=strict)
    workflows = sorted({r.workflow_id for r in loaded.rows})
    click.echo(f"{escape_controls(manifest)}: {len(loaded.rows)} rows OK, workflow "
               f"{', '.join(workflows)}")
    if prepared.checked:
        click.echo("  preflight: every node id, field and value type matches the workflow")
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


# The runner stops with this detail when a task crashed (a full disk, ...); it then raises that
# error, which handle_errors prints once with its fix, so the "Stopping:" line would repeat it.
CRASH_PREFIX = "internal error: "


PROGRESS_INTERVAL_S = 30.0


class Progress:
    """tqdm on stderr on a terminal; without one (nohup, CI, a pipe), a plain line every
    ``interval_s`` on stderr and in the run's log: counts, rate, coins, ETA. --quiet: neither."""

    def __init__(self, total: int, done: int, quiet: bool,
                 interval_s: float = PROGRESS_INTERVAL_S):
        import threading

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
        self.total, self.done_before, self.coins = total, done, 0.0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lines: threading.Thread | None = None
        if not quiet and not sys.stderr.isatty() and interval_s > 0:
            self._lines = threading.Thread(target=self._plain_lines, args=(interval_s,),
                                           name="progress", daemon=True)
            self._lines.start()

    def line(self) -> str:
        """One plain progress line: what a person reading a log wants to know."""
        done = self.counts["success"] + self.counts["failed"]
        elapsed = time.monotonic() - self.started
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        left = self.total - self.done_before - done - self.counts["unknown"]
        eta = f"{left / rate:,.0f} min" if rate > 0 and left > 0 else "n/a"
        return (f"progress: {self.done_before + done:,}/{self.total:,} rows final "
                f"({self.counts['success']:,} succeeded, {self.counts['failed']:,} failed, "
                f"{self.counts['unknown']:,} unknown this session), {self.counts['submitted']:,} "
                f"submitted, {rate:,.1f} rows/min, {amount(self.coins)} coins, ETA {eta}")

    def _plain_lines(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            text = self.line()
            echo_err(text)
            logging.getLogger("rhbatch.progress").info("%s", text)

    def __call__(self, event: Any) -> None:
        if event.kind == "cost":
            self.coins = float(event.detail)
        if event.kind in self.counts:
            self.counts[event.kind] += 1
        if event.kind in ("success", "failed"):
            self.bar.update(1)
        if event.kind in ("outage", "reconciling"):
            self.bar.write(f"{'Waiting for webhooks: ' if event.kind == 'reconciling' else ''}"
                           f"{escape_controls(redact(event.detail))}", file=sys.stderr)
        if event.kind == "stopping" and not str(event.detail).startswith(CRASH_PREFIX):
            detail = escape_controls(redact(event.detail))
            if detail == "interrupted":
                detail = ("interrupted: finishing the create in flight and saving state; press "
                          "Ctrl-C again to stop at once (that row then becomes SUBMIT_UNKNOWN)")
            self.bar.write(f"Stopping: {detail}", file=sys.stderr)
        self.bar.set_postfix(
            sub=self.counts["submitted"], ok=self.counts["success"], fail=self.counts["failed"],
            unk=self.counts["unknown"], refresh=False,
        )

    def close(self) -> None:
        self._stop.set()
        self.bar.close()


def spending_lines(spending: Any) -> list[str]:
    """Coins (and money, when any) billed, split by how the tasks ended; unpriced tasks named."""
    if spending is None:
        return []
    lines = []
    parts = []
    for status in ("SUCCESS", "FAILED", "CANCELLED"):
        bucket = spending.by_status.get(status)
        if bucket and (bucket["coins"] or bucket["money"] or bucket["third_party_money"]):
            parts.append(f"{amount(bucket['coins'])} {status.lower()}")
    line = f"Billed: {amount(spending.coins)} coins"
    if parts:
        line += f" ({', '.join(parts)}; every attempt counted)"
    lines.append(line)
    if spending.money or spending.third_party_money:
        lines.append(f"Money: {amount(spending.money)} consumeMoney, "
                     f"{amount(spending.third_party_money)} third-party")
    if spending.unpriced:
        lines.append(f"Cost unknown for {spending.unpriced} task(s): the service did not report it "
                     "(not counted as 0)")
    return lines


def print_summary(run_dir: Path, summary: Any) -> None:
    from pipeline.runs import top_failures

    counts = {k: v for k, v in summary.counts.items() if v}
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    echo_err(
        f"{summary.total} rows: {parts}. {amount(summary.coins)} coins, {summary.elapsed_s:.1f}s, "
        f"{summary.requests} requests."
    )
    for line in spending_lines(getattr(summary, "spending", None)):
        echo_err(line)
    for how, n in (getattr(summary, "reconciled", None) or {}).items():
        echo_err(f"Reconciled: {n} unknown create(s) proven to be a task by {how}, never resent")
    failures = top_failures(run_dir)
    if failures:
        echo_err("Top failure causes:")
        for count, cause in failures:
            echo_err(f"  {count} x {escape_controls(cause)}")
    echo_err(f"Results: {run_dir / 'results.jsonl'} and {run_dir / 'results.csv'}")
    files = run_dir / "files"
    if files.is_symlink():  # downloads were refused: say so here, not only in the log
        from pipeline.store import refuse_entry

        link = f"a symbolic link (to {escape_controls(files.readlink())})"
        echo_err(f"Files: not downloaded: {refuse_entry(files, link)}")
    elif files.is_dir():
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
        echo_err(f"Stopped: {escape_controls(summary.stopped)}")
        again, key_dropped = resume_command(sys.argv[1:])
        if key_dropped:
            echo_err(f"Resume with {ENV_API_KEY} set to the key (a key given as --api-key is "
                     f"never printed): {again}")
        else:
            echo_err(f"Resume with the same command: {again}")


def resume_command(argv: list[str]) -> tuple[str, bool]:
    """The command that resumes this one, and whether ``--api-key`` was dropped from it: the key
    is never printed, and ``--api-key ***`` would not work (the key then comes from the
    environment)."""
    import shlex

    kept: list[str] = []
    dropped = skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--":
            kept.extend(argv[i:])
            break
        elif arg == "--api-key":
            dropped = skip = True
        elif arg.startswith("--api-key="):
            dropped = True
        else:
            kept.append(arg)
    return " ".join(shlex.quote(escape_controls(a)) for a in ["rhbatch", *kept]), dropped


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
        no_preflight: bool, strict: bool, api_key: str | None, base_url: str | None,
        concurrency: int | None, poll_interval: float | None,
        account_poll_interval: float | None, request_deadline: float | None, api: str | None,
        task_timeout: float | None, give_up_after: float | None, max_coins: float | None,
        max_money: float | None, expected_coins: float | None, webapp_id: str | None,
        instance_type: str | None,
        use_personal_queue: bool | None, webhook_url: str | None, webhook_listen: str | None,
        dry_run: bool, download: bool, progress_interval: float, quiet: bool,
        verbose: bool) -> None:
    """Submit every row of MANIFEST, collect results into OUT; resume if OUT holds this run."""
    from pipeline import runs

    if webapp_id:  # AI apps have no workflow JSON to preflight against
        workflow_id = workflow_id or webapp_id
        no_preflight = True
    args = _manifest_args(manifest, binds, workflow_id, schema, allow_duplicates, workflow_files,
                          no_preflight, strict)
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
        from pipeline.prepare import load_and_prepare

        loaded, prepared = load_and_prepare(
            args.load, settings=None, workflow_files=workflow_files, preflight=not no_preflight,
            upload=False, strict=strict)
        for warning in prepared.warnings:
            echo_err(f"Warning: {warning}")
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
        request_deadline_s=request_deadline,
        api=api,
        task_timeout_s=None if task_timeout is None else task_timeout * 3600,
        give_up_after_s=give_up_after,
        task_options=task_options,
    )
    verbose_handler: logging.Handler | None = None
    if verbose:
        verbose_handler = logging.StreamHandler(sys.stderr)
        verbose_handler.addFilter(RedactingFilter())
        verbose_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("rhbatch").addHandler(verbose_handler)

    progress: Progress | None = None

    def on_open(store: Any, created: bool) -> None:
        nonlocal progress
        counts = store.counts()
        total = sum(counts.values())
        done = counts["SUCCESS"] + counts["FAILED"] + counts["CANCELLED"]
        verb = "Starting" if created else "Resuming"
        echo_err(f"{verb} {total} rows in {out_dir} ({done} already final)")
        progress = Progress(total, done, quiet, progress_interval)
        progress.coins = store.spent_coins()

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
        summary = runs.run_batch(
            args, out_dir, settings, on_event=on_event, on_account=on_account, on_open=on_open,
            on_warning=lambda w: echo_err(f"Warning: {w}"), max_coins=max_coins,
            max_money=max_money, expected_task_coins=expected_coins, verbose=verbose,
            download=download, webhook_listen=webhook_listen, on_notice=echo_err,
            base_url_moved=base_url_moved,
        )
    finally:
        if progress:
            progress.close()
        if verbose_handler is not None:  # in-process callers (tests, a notebook) run again
            logging.getLogger("rhbatch").removeHandler(verbose_handler)
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
          request_deadline: float | None, quiet: bool) -> None:
    """Submit the chosen rows of RUN_DIR again, keeping each row's history and attempt count.

    Only the rows the selection names are sent; rows still PENDING are `rhbatch run`'s business.
    The run's budget holds here too.
    """
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
        account_poll_interval_s=account_poll_interval, request_deadline_s=request_deadline,
    )
    plan, summary = runs.retry_rows(run_dir, settings, selection, dry_run=dry_run,
                                    max_coins=max_coins, max_money=max_money,
                                    expected_task_coins=expected_coins, on_notice=echo_err,
                                    base_url_moved=base_url_moved)
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
    from pipeline.runs import run_status, top_failures

    report = run_status(run_dir, by)
    if as_json:
        spending = report.spending
        data = {"run_dir": str(run_dir), "total": report.total, "counts": report.counts,
                "coins": report.coins, "reconciled": report.reconciled}
        if spending is not None:
            data.update(money=spending.money, third_party_money=spending.third_party_money,
                        unpriced_tasks=spending.unpriced,
                        billed_by_status={k: v for k, v in spending.by_status.items()
                                          if k in ("SUCCESS", "FAILED", "CANCELLED")})
        if report.groups is not None:
            data["groups"] = [
                {"key": list(k) if isinstance(k, tuple) else k, "counts": v}
                for k, v in report.groups.items()
            ]
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    click.echo(f"{escape_controls(run_dir)}: {report.total} rows from "
               f"{escape_controls(report.source)}, {amount(report.coins)} coins")
    for state, n in report.counts.items():
        if n:
            click.echo(f"  {state:<15} {n}")
    for line in spending_lines(report.spending):
        click.echo(f"  {line}")
    for how, n in report.reconciled.items():
        click.echo(f"  reconciled by {how}: {n} unknown create(s) proven to be a task")
    failures = top_failures(run_dir, limit=5)
    if failures:
        click.echo("  top failure causes:")
        for count, cause in failures:
            click.echo(f"    {count} x {escape_controls(cause)}")
    for number, row_id, why in report.unknown:
        click.echo(f"  unknown: row {number} ({escape_controls(row_id)}): {escape_controls(why)}")
    more = report.counts.get("SUBMIT_UNKNOWN", 0) - len(report.unknown)
    if more > 0:
        click.echo(f"  ... and {more} more unknown row(s): `rhbatch export {run_dir}` lists them all")
    if report.groups is not None:
        states = [s for s in report.counts if any(g[s] for g in report.groups.values())]
        click.echo("  " + " | ".join([escape_controls(", ".join(by))] + states))
        for key, counts in report.groups.items():
            click.echo("  " + " | ".join([escape_controls(key)] + [str(counts[s]) for s in states]))


@cli.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default="jsonl",
              help="Format of the output manifest (default: jsonl).")
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
        # names and titles come from the workflow JSON (the service's): one escaped line each
        click.echo(preflight.format_fields([_shown_field(f) for f in fields]))


def _shown_field(field: Any) -> Any:
    """A workflow field with its texts' control characters escaped, for the inspect table."""
    import dataclasses

    from pipeline.preflight import is_link

    value = field.value  # shown as JSON, which escapes control characters itself
    if is_link(value):  # shown as "-> node ID.N": the id is raw text
        value = [escape_controls(v) if isinstance(v, str) else v for v in value]
    return dataclasses.replace(
        field, node_id=escape_controls(field.node_id), class_type=escape_controls(field.class_type),
        title=None if field.title is None else escape_controls(field.title),
        name=escape_controls(field.name), value=value)


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
    from pipeline.runs import cost_per_task
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
