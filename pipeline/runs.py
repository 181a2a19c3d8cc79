"""Run directories: start a run from a manifest, resume it, report on it.

``run_batch`` is the one core function behind ``rhbatch run``:

1. lock the directory (one process per run; a killed holder's lock vanishes with it);
2. new directory: load and validate the manifest (nothing is sent while any row is invalid), store
   every row as PENDING; existing directory: check it holds the same manifest, then turn rows left
   in SUBMITTING by a crash into SUBMIT_UNKNOWN;
3. read the account once (a bad key or empty balance stops here, before any create);
4. drive the :class:`~pipeline.runner.Runner` until every row is final or the run is stopped,
   refreshing ``results.jsonl`` / ``results.csv`` in the background and once more at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import export
from pipeline import store as st
from pipeline.client import AccountStatus, RetryPolicy, RunningHubClient, build_payload
from pipeline.config import RedactingFilter, Settings, _show_url
from pipeline.errors import ManifestChangedError, RunFatalError, StateError, StorageError
from pipeline.manifest import Manifest, ProblemGroup, check_manifest_path, load_manifest
from pipeline.prepare import load_checked, prepare_rows
from pipeline.refresh import refresh_in_child, remove_stale_temporaries
from pipeline.report import cut_words
from pipeline.runner import Event, Runner, RunSummary
from pipeline.safetext import number

log = logging.getLogger("rhbatch")
LOG_FILE = "rhbatch.log"


@dataclass(frozen=True)
class ManifestArgs:
    path: Path
    binds: tuple[str, ...] = ()
    workflow_id: str | None = None
    schema: Path | None = None
    allow_duplicates: bool = False
    workflow_files: tuple[str, ...] = ()
    preflight: bool = True
    strict: bool = False  # refuse columns that feed no node (does not shape rows: not in identity)

    def load(self) -> Manifest:
        return load_manifest(
            self.path,
            binds=self.binds,
            workflow_id=self.workflow_id,
            schema_path=self.schema,
            allow_duplicates=self.allow_duplicates,
        )

    def identity(self) -> str:
        """Hash of the manifest file's bytes and of every option that shapes its rows."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(repr((sorted(self.binds), self.workflow_id, self.allow_duplicates)).encode())
        if self.schema:
            digest.update(Path(self.schema).read_bytes())
        return digest.hexdigest()


def dry_run_payloads(manifest: Manifest, settings: Settings) -> Iterator[dict[str, Any]]:
    """The exact bodies ``run`` would send (without the key), one per row."""
    for row in manifest.rows:
        yield {
            "row": row.number,
            "row_id": row.row_id,
            "body": build_payload(
                row.workflow_id, row.node_info_list, {**settings.task_options, **row.options}
            ),
        }


class _RunLogHandler(logging.FileHandler):
    """``DIR/rhbatch.log``, opened without following a link (a planted symlink is refused, never
    appended to). A write that fails (disk full, read-only) is dropped quietly: the same trouble
    reaches the user once, with its fix, from the write that matters (the run state, results)."""

    def _open(self) -> Any:
        fd = st.open_in_run_dir(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def attach_log(run_dir: Path, verbose: bool = False) -> logging.Handler:
    handler = _RunLogHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("rhbatch")
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    return handler


def open_run(
    args: ManifestArgs,
    run_dir: Path,
    settings: Settings | None = None,
    warnings: list[str] | None = None,
    manifest: Manifest | None = None,
    earlier: Sequence[ProblemGroup] = (),
) -> tuple[st.RunStore, bool]:
    """Open (resume) or create the run in ``run_dir`` for this manifest. Caller holds the lock.

    A new run is preflighted and its input files uploaded before any row is stored;
    ``manifest`` is the manifest already loaded for it, if the caller has it.
    """
    identity = args.identity()
    if st.RunStore.exists(run_dir):
        store = st.RunStore.open(run_dir)
        if store.get_meta("manifest_identity") == identity:
            return store, False
        manifest = args.load()
        if store.get_meta("manifest_fingerprint") != manifest.fingerprint:
            source = store.get_meta("manifest_source", "another manifest")
            rows = store.total()
            store.close()
            raise ManifestChangedError(
                f"{run_dir} already holds a run of {source} ({rows} rows) and {args.path} "
                "describes different rows: use a new --out directory for this manifest, or "
                "run the original manifest to resume"
            )
        store.set_meta(manifest_identity=identity)
        return store, False
    manifest = manifest if manifest is not None else args.load()
    prepared = prepare_rows(
        manifest, settings=settings, workflow_files=args.workflow_files, run_dir=run_dir,
        preflight=args.preflight, strict=args.strict, earlier=earlier,
    )
    for warning in prepared.warnings:
        log.warning("%s", warning)
    if warnings is not None:
        warnings.extend(prepared.warnings)
        if prepared.skipped:
            warnings.append(f"preflight skipped: {prepared.skipped}")
    store = st.RunStore.open(run_dir, create=True)
    store.insert_rows(prepared.rows)
    store.set_meta(
        workflow_hashes=prepared.hashes,
        preflight_checked=prepared.checked,
        manifest_fingerprint=manifest.fingerprint,
        manifest_identity=identity,
        manifest_source=str(args.path),
        columns=manifest.columns,
        bound=manifest.bound,
        created_at=time.time(),
    )
    return store, True


class _ResultsFlusher:
    """Rewrites results.* in a child process (``pipeline.refresh``), no more often than the last
    rewrite took (x5); in a thread if a process cannot be started."""

    def __init__(self, run_dir: Path, interval_s: float):
        self.run_dir = run_dir
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        delay = self.interval_s
        while True:
            await asyncio.sleep(delay)
            started = time.monotonic()
            # Shielded: a refresh (child or thread) always completes before stop() returns, so an
            # older snapshot can never be renamed over the final results written after the run.
            self._flushing = asyncio.ensure_future(self.refresh())
            try:
                await asyncio.shield(self._flushing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed refresh is retried; the database stays the truth
                log.warning("could not refresh results: %s", exc)
            delay = max(self.interval_s, 5 * (time.monotonic() - started))

    async def refresh(self) -> None:
        try:
            await refresh_in_child(self.run_dir)
        except OSError as exc:  # no process to be had (limits, memory): share this one's GIL
            log.info("results refresh in this process: %s", exc)
            await asyncio.to_thread(self.flush)

    def flush(self) -> None:
        reader = st.RunStore.open(self.run_dir, readonly=True)
        try:
            export.write_results(reader)
        finally:
            reader.close()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)


DOWNLOAD_PASS_INTERVAL_S = 5.0


async def _download_pass(run_dir: Path) -> None:
    """One download pass on its own connection; a failure is logged, never fatal to the run."""
    from pipeline.download import download_run_async

    dl_store = st.RunStore.open(run_dir)
    try:
        result = await download_run_async(dl_store)
        for error in result.errors:
            log.warning("download: %s", error)
    except Exception as exc:  # downloads are retried by the next pass or `rhbatch download`
        log.warning("download pass failed: %s", exc)
    finally:
        dl_store.close()


async def _download_loop(run_dir: Path) -> None:
    """``run --download``: fetch output files as tasks finish, while their URLs are fresh."""
    while True:
        await asyncio.sleep(DOWNLOAD_PASS_INTERVAL_S)
        await _download_pass(run_dir)


@dataclass(frozen=True)
class RunOptions:
    """How one invocation drives a run: callbacks for the CLI, budget, extras."""

    on_event: Callable[[Event], None] = lambda event: None
    on_account: Callable[[AccountStatus], None] = lambda account: None
    on_open: Callable[[st.RunStore, bool], None] = lambda store, created: None
    on_warning: Callable[[str], None] = lambda warning: None
    policy: RetryPolicy | None = None
    max_coins: float | None = None
    max_money: float | None = None
    expected_task_coins: float | None = None
    on_notice: Callable[[str], None] = lambda notice: None
    submit_only: frozenset[int] | None = None  # retry: only these rows are submitted
    verbose: bool = False
    handle_signals: bool = True
    download: bool = False
    webhook_listen: str | None = None
    base_url_moved: bool = False  # --base-url-moved: accept (and record) a new base URL


async def _drive(store: st.RunStore, settings: Settings, options: RunOptions) -> RunSummary:
    """Run the loop, with the webhook receiver around it when asked for."""
    if not options.webhook_listen:
        return await _drive_loop(store, settings, options, None)
    from pipeline.webhooks import WebhookReceiver, parse_listen

    runners: list[Runner] = []
    host, port = parse_listen(options.webhook_listen)
    receiver = WebhookReceiver(
        host, port,
        lambda task_id, token=None: runners[0].hint_finished(task_id, token) if runners else False,
    )
    await receiver.start()
    public = settings.task_options.get("webhookUrl")
    settings = dataclasses.replace(
        settings, task_options={**settings.task_options, "webhookUrl": receiver.url(public)}
    )
    log.info("webhook receiver listening on %s:%d", receiver.host, receiver.port)
    try:
        return await _drive_loop(store, settings, options, runners.append)
    finally:
        await receiver.stop()


async def _drive_loop(
    store: st.RunStore,
    settings: Settings,
    options: RunOptions,
    register: Callable[[Runner], None] | None,
) -> RunSummary:
    async with RunningHubClient(settings, policy=options.policy) as client:
        runner = Runner(
            store,
            client,
            settings,
            on_event=options.on_event,
            max_coins=options.max_coins,
            max_money=options.max_money,
            expected_task_coins=options.expected_task_coins,
            submit_only=None if options.submit_only is None else set(options.submit_only),
            webhook_tokens=register is not None,
        )
        if register is not None:
            register(runner)
        try:
            account = await client.account_status()
        except RunFatalError as exc:
            log.error("stopping before any submission: %s", exc)
            return RunSummary(
                counts=store.counts(), total=store.total(), elapsed_s=0.0, stopped=str(exc),
                exit_code=3, coins=store.spent_coins(), requests=client.requests_sent,
            )
        except Exception as exc:  # the pre-check is informative; the run decides by itself
            log.warning("could not read the account before the run: %s", exc)
        else:
            runner.service_reachable()
            options.on_account(account)
            said = await client.detect()
            log.info("%s", said)
            options.on_notice(said)
            limit = await client.queue_limit() if client.read_api == "v2" else None
            if limit is not None:
                runner.set_ceiling(limit)
                log.info("the key's concurrentLimit is %d: the window starts at %d", limit,
                         runner.window)
        loop = asyncio.get_running_loop()
        installed = []
        if options.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, runner.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        flusher = _ResultsFlusher(store.run_dir, settings.results_flush_interval_s)
        flusher.start()
        downloader = asyncio.create_task(_download_loop(store.run_dir)) if options.download else None
        try:
            summary = await runner.run()
            if downloader is not None and summary.stopped != "interrupted":
                downloader.cancel()
                await asyncio.gather(downloader, return_exceptions=True)
                await _download_pass(store.run_dir)
            return summary
        finally:
            await flusher.stop()
            if downloader is not None:
                downloader.cancel()
                await asyncio.gather(downloader, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
                # the results are still to be written: a signal now is noted, not obeyed (the
                # _signals_held around the whole run puts the caller's handlers back after)
                signal.signal(sig, _note_signal)


def key_fingerprint(key: str) -> str:
    """A short one-way digest of the API key: tells keys apart, never reveals one."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def check_key(store: st.RunStore, settings: Settings) -> None:
    """A run's tasks belong to the key that created them: refuse to poll them with another."""
    current = key_fingerprint(settings.require_key())
    recorded = store.get_meta("key_fingerprint")
    if recorded is None:
        store.set_meta(key_fingerprint=current)
    elif recorded != current:
        raise StateError(
            f"{store.run_dir} was run with another API key (fingerprint {recorded}, this one is "
            f"{current}); its tasks belong to that key and would look lost to this one: set "
            "RUNNINGHUB_API_KEY to the original key, or start a new --out directory"
        )


BASE_URL_META = "base_url"


def _same_service(a: str, b: str) -> bool:
    """Whether two base URLs name the same service (scheme and host case, a final / ignored)."""
    from urllib.parse import urlsplit

    def norm(url: str) -> tuple[str, str, str]:
        parts = urlsplit(url.strip())
        return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")

    return norm(a) == norm(b)


def check_base_url(store: st.RunStore, settings: Settings, moved: bool = False, *,
                   record: bool = True) -> str | None:
    """A run's tasks live on the service that created them: refuse to follow them elsewhere.

    The first run records its base URL (credentials masked; there are none, ``resolve_settings``
    refuses them). Another base URL later is a StateError unless ``moved`` (``--base-url-moved``):
    then the new one is recorded and the line saying so is returned for the log and the user.
    ``record=False`` only checks (``retry`` checks before it requeues anything).
    """
    current = _show_url(settings.base_url)
    recorded = store.get_meta(BASE_URL_META)
    if recorded is not None and _same_service(recorded, current):
        return None
    if recorded is not None and not moved:
        raise StateError(
            f"{store.run_dir} was run against {recorded} and this command uses {current}; the "
            "run's tasks live on that service and would look lost to this one: set "
            f"RUNNINGHUB_BASE_URL (or --base-url) back to {recorded}, or, if the service really "
            f"moved, pass --base-url-moved to continue the run at {current}"
        )
    if record:
        store.set_meta(**{BASE_URL_META: current})
    if recorded is None:
        return None
    return (f"base URL moved (--base-url-moved): {recorded} -> {current}; the run continues "
            f"at {current}")


def _note_signal(signum: int, frame: Any) -> None:
    log.warning("still writing the results file; it is current in a moment")


@contextlib.contextmanager
def _signals_held(active: bool) -> Iterator[None]:
    """Around the run and its final results write: once the loop ends, its signal handlers give
    way to :func:`_note_signal` (see ``_drive_loop``), so a Ctrl-C or SIGTERM during the write is
    noted, not obeyed: the write takes seconds on a large run, and a results file cut short is
    worse than a short wait. The handlers in force before the run come back after the write; a
    Ctrl-C before the loop starts (loading, the account check) still interrupts at once."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


BUDGET_META = "budget"


def resolve_budget(store: st.RunStore, options: RunOptions) -> RunOptions:
    """The run's limits: a limit given now replaces the stored one (with a notice); one not given
    keeps what the run was started or last resumed with, so a resume or a retry never forgets it."""
    stored = store.get_meta(BUDGET_META) or {}
    given = {"max_coins": options.max_coins, "max_money": options.max_money,
             "expected_task_coins": options.expected_task_coins}
    flags = {"max_coins": "--max-coins", "max_money": "--max-money",
             "expected_task_coins": "--expected-coins"}
    merged = dict(stored)
    for name, value in given.items():
        if value is None:
            continue
        before = stored.get(name)
        if before is not None and before != value:
            options.on_notice(f"{flags[name]} is now {number(value)} (this run had "
                              f"{number(before)})")
        merged[name] = value
    for name, value in merged.items():
        if given.get(name) is None and value is not None and name != "expected_task_coins":
            options.on_notice(f"{flags[name]} {number(value)} kept from the run's earlier start")
    if merged != stored:
        store.set_meta(**{BUDGET_META: merged})
    return dataclasses.replace(options, max_coins=merged.get("max_coins"),
                               max_money=merged.get("max_money"),
                               expected_task_coins=merged.get("expected_task_coins"))


def resolve_api(store: st.RunStore, settings: Settings, options: RunOptions) -> Settings:
    """``--api`` is a setting of the run: given, it replaces the stored one (with a notice); not
    given (auto), a resume keeps what the run was started with."""
    stored = store.get_meta("api")
    if settings.api == "auto" and stored and stored != "auto":
        options.on_notice(f"--api {stored} kept from the run's earlier start")
        return dataclasses.replace(settings, api=stored)
    if stored != settings.api:
        if stored:
            options.on_notice(f"--api is now {settings.api} (this run had {stored})")
        store.set_meta(api=settings.api)
    return settings


def _execute(store: st.RunStore, settings: Settings, created: bool, options: RunOptions
             ) -> RunSummary:
    """Recover, drive and write the results of an open run (caller holds the lock)."""
    check_key(store, settings)
    options = resolve_budget(store, options)
    settings = resolve_api(store, settings, options)
    handler = attach_log(store.run_dir, options.verbose)
    try:
        moved = check_base_url(store, settings, options.base_url_moved)
        if moved:
            log.warning("%s", moved)
            options.on_notice(moved)
        remove_stale_temporaries(store.run_dir)
        recovered = store.recover()
        if recovered:
            log.warning(
                "%d row(s) were being submitted when rhbatch last stopped: marked "
                "SUBMIT_UNKNOWN, not resubmitted", recovered
            )
        log.info("%s run in %s: %s", "new" if created else "resuming", store.run_dir,
                 store.counts())
        options.on_open(store, created)
        with _signals_held(options.handle_signals):
            summary = asyncio.run(_drive(store, settings, options))
            export.write_results(store)  # a Ctrl-C now waits for it: results stay whole
        log.info("run ended: %s exit %d", summary.counts, summary.exit_code)
        return summary
    finally:
        logging.getLogger("rhbatch").removeHandler(handler)
        handler.close()


def run_batch(
    args: ManifestArgs,
    run_dir: str | Path,
    settings: Settings,
    options: RunOptions | None = None,
    **option_values: Any,
) -> RunSummary:
    """Start or resume the run of ``args`` in ``run_dir``; returns when it ends or stops.

    ``option_values`` are :class:`RunOptions` fields, for callers that set only a few.
    """
    options = dataclasses.replace(options or RunOptions(), **option_values)
    run_dir = Path(run_dir)
    settings.require_key()
    check_manifest_path(args.path)  # a directory, a device or a FIFO: refused before any read
    # A new run's manifest is checked before its directory exists: a refused one leaves nothing.
    manifest, earlier = (None, ()) if st.RunStore.exists(run_dir) else load_checked(args.load)
    made_dir = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"Cannot create run directory {run_dir}: {exc.strerror}") from None
    try:
        with st.RunLock(run_dir):
            warnings: list[str] = []
            store, created = open_run(args, run_dir, settings, warnings, manifest, earlier)
            for warning in warnings:
                options.on_warning(warning)
            try:
                return _execute(store, settings, created, options)
            finally:
                store.close()
    except BaseException:
        if made_dir and not st.RunStore.exists(run_dir):
            # refused before its first row was stored (preflight, uploads): nothing to resume
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Selection:
    """Which rows ``rhbatch retry`` starts again."""

    statuses: tuple[str, ...] = (st.FAILED,)
    codes: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    where: str | None = None
    unknown: bool = False  # SUBMIT_UNKNOWN rows: may pay twice, only on explicit request


FAILURE_CLASSES = ("task_failed", "row_fatal", "task_gone", "oom", "cancelled", "unknown")


def failure_class(status: str, code: int | None, failed_reason: Any) -> str | None:
    """A coarse label for why a row did not succeed (``retry --class``, the report's triage)."""
    from pipeline.errors import Kind, classify

    if status == st.SUBMIT_UNKNOWN:
        return "unknown"
    if status == st.CANCELLED:
        return "cancelled"
    if status != st.FAILED:
        return None
    if isinstance(failed_reason, dict):
        text = f"{failed_reason.get('exception_type', '')} {failed_reason.get('exception_message', '')}"
        if "OutOfMemory" in text or "out of memory" in text.lower():
            return "oom"
    if code is None:
        return "row_fatal"
    kind = classify(code)
    return {Kind.TASK_FAILED: "task_failed", Kind.TASK_GONE: "task_gone"}.get(kind, "row_fatal")


def select_rows(store: st.RunStore, selection: Selection) -> list[int]:
    """Indexes of the rows ``selection`` names (final or unknown rows only; live rows never)."""
    import json

    import pandas as pd

    from pipeline.errors import UsageError

    for name in selection.classes:
        if name not in FAILURE_CLASSES:
            raise UsageError(f"--class {name!r} is not a failure class: use one of "
                             f"{', '.join(FAILURE_CLASSES)}")
    statuses = set(selection.statuses)
    if selection.unknown:
        statuses.add(st.SUBMIT_UNKNOWN)
    elif st.SUBMIT_UNKNOWN in statuses:
        raise UsageError(
            "SUBMIT_UNKNOWN rows may already have run and been billed: select them with "
            "--unknown --accept-double-pay"
        )
    allowed = statuses & {st.FAILED, st.CANCELLED, st.SUCCESS, st.SUBMIT_UNKNOWN}
    records: list[dict[str, Any]] = []
    for row in store.iter_rows():
        if row["status"] not in allowed:
            continue
        reason = json.loads(row["failed_reason"]) if row["failed_reason"] else None
        if selection.codes and row["error_code"] not in selection.codes:
            continue
        cls = failure_class(row["status"], row["error_code"], reason)
        if selection.classes and cls not in selection.classes:
            continue
        record = dict(json.loads(row["inputs"]))
        record.update(idx=row["idx"], row_id=row["row_id"], status=row["status"],
                      error_code=row["error_code"], failure_class=cls,
                      workflowId=row["workflow_id"])
        records.append(record)
    if not selection.where or not records:
        return [r["idx"] for r in records]
    frame = pd.DataFrame.from_records(records)
    try:
        chosen = frame.query(selection.where, engine="python")
    except Exception as exc:
        columns = ", ".join(f"`{c}`" if not str(c).isidentifier() else str(c)
                            for c in frame.columns if c != "idx")
        raise UsageError(
            f"--where {selection.where!r} could not be evaluated ({type(exc).__name__}: {exc}); "
            f"columns are {columns} (put names like `3.cfg` in backticks)"
        ) from None
    return [int(i) for i in chosen["idx"]]


@dataclass
class RetryPlan:
    """What ``rhbatch retry`` would send: the rows, their bodies, and what they may cost."""

    rows: list[dict[str, Any]]
    expected_coins_per_task: float | None
    pending_left: int  # rows still PENDING that the selection does not name (``run``'s business)

    @property
    def expected_coins(self) -> float | None:
        per = self.expected_coins_per_task
        return None if per is None else per * len(self.rows)


def plan_retry(store: st.RunStore, settings: Settings, selection: Selection) -> RetryPlan:
    """The rows ``selection`` names with the exact bodies a retry would send (no key)."""
    import json

    chosen = set(select_rows(store, selection))
    rows = []
    for row in store.iter_rows():
        if row["idx"] in chosen:
            body = build_payload(row["workflow_id"], json.loads(row["node_info_list"]),
                                 {**settings.task_options, **json.loads(row["options"])})
            rows.append({"row": row["number"], "row_id": row["row_id"], "status": row["status"],
                         "idx": row["idx"], "body": body})
    priced = store.priced_rows()
    spent = store.spending().coins
    return RetryPlan(rows, spent / priced if priced else None, store.counts()[st.PENDING])


def retry_rows(
    run_dir: str | Path,
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool = False,
    options: RunOptions | None = None,
    **option_values: Any,
) -> tuple[RetryPlan, RunSummary | None]:
    """Start the selected rows again inside the same run (history kept), then drive the run.

    Only the selected rows are submitted: rows still PENDING are left for ``rhbatch run``. The
    run's budget holds (a limit given here replaces the stored one). ``dry_run`` reads the run
    without the lock and changes nothing.
    """
    options = dataclasses.replace(options or RunOptions(), **option_values)
    run_dir = Path(run_dir)
    if dry_run:
        reader = st.RunStore.open(run_dir, readonly=True)
        try:
            return plan_retry(reader, settings, selection), None
        finally:
            reader.close()
    settings.require_key()
    with st.RunLock(run_dir):
        store = st.RunStore.open(run_dir)
        try:
            check_key(store, settings)  # before anything is requeued: a refused retry changes nothing
            check_base_url(store, settings, options.base_url_moved, record=False)
            store.recover()
            plan = plan_retry(store, settings, selection)
            chosen = [r["idx"] for r in plan.rows]
            if plan.pending_left:
                options.on_notice(
                    f"{plan.pending_left} row(s) are still PENDING and are not part of this retry: "
                    f"`rhbatch run MANIFEST --out {run_dir}` submits them"
                )
            store.requeue(chosen)
            log.info("retry: %d row(s) requeued", len(chosen))
            options = dataclasses.replace(options, submit_only=frozenset(chosen))
            return plan, _execute(store, settings, False, options)
        finally:
            store.close()


def cost_per_task(run_dir: str | Path) -> float | None:
    """Average coins of the run's finished tasks whose cost is known, or None."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        priced = store.priced_rows()
        return store.spending().coins / priced if priced else None
    finally:
        store.close()


def top_failures(run_dir: str | Path, limit: int = 3) -> list[tuple[int, str]]:
    """The most common failure causes of a run: (count, "code: error"), most frequent first."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        rows = store.conn.execute(
            "SELECT COUNT(*) AS n, error_code, error FROM rows WHERE status IN "
            "('FAILED', 'CANCELLED', 'SUBMIT_UNKNOWN') GROUP BY error_code, error "
            "ORDER BY n DESC LIMIT ?",
            (limit,),
        ).fetchall()
    finally:
        store.close()
    return [(r["n"], f"{r['error_code'] if r['error_code'] is not None else '-'}: "
             f"{cut_words(r['error'] or 'no message', 160)}") for r in rows]


@dataclass
class RunStatus:
    run_dir: Path
    counts: dict[str, int]
    total: int
    coins: float
    source: str | None
    unknown: list[tuple[int, str, str]]  # (row number, row_id, why), the first STATUS_UNKNOWN_SHOWN
    groups: dict[Any, dict[str, int]] | None = None
    spending: st.Spending | None = None
    reconciled: dict[str, int] = dataclasses.field(default_factory=dict)  # how -> rows


STATUS_UNKNOWN_SHOWN = 20


def run_status(run_dir: str | Path, by: Sequence[str] = ()) -> RunStatus:
    """Counts per state (optionally grouped by input columns), read without taking the lock."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        unknown = [
            (r["number"], r["row_id"], r["error"] or "")
            for r in store.conn.execute(
                "SELECT number, row_id, error FROM rows WHERE status = 'SUBMIT_UNKNOWN' "
                "ORDER BY idx LIMIT ?", (STATUS_UNKNOWN_SHOWN,)
            )
        ]
        reconciled = store.reconciled_counts()
        groups = _group_counts(store, list(by)) if by else None
        counts = store.counts()
        return RunStatus(
            run_dir=Path(run_dir),
            counts=counts,
            total=sum(counts.values()),
            coins=store.spent_coins(),
            source=store.get_meta("manifest_source"),
            unknown=unknown,
            groups=groups,
            spending=store.spending(),
            reconciled=reconciled,
        )
    finally:
        store.close()


def _group_counts(store: st.RunStore, by: list[str]) -> dict[Any, dict[str, int]]:
    import json

    columns = set(store.get_meta("columns") or [])
    extra = {"status", "error_code", "workflowId"}
    for column in by:
        if column not in columns and column not in extra:
            raise StateError(
                f"--by {column!r} is not a column of this run: choose from "
                f"{', '.join(sorted(columns | extra))}"
            )
    groups: dict[Any, dict[str, int]] = {}
    for row in store.iter_rows():
        inputs = json.loads(row["inputs"])
        key_parts = []
        for column in by:
            if column == "workflowId":
                key_parts.append(row["workflow_id"])
            elif column in ("status", "error_code"):
                key_parts.append(row[column])
            else:
                key_parts.append(inputs.get(column))
        key = tuple(key_parts) if len(key_parts) > 1 else key_parts[0]
        bucket = groups.setdefault(key, dict.fromkeys(st.STATES, 0))
        bucket[row["status"]] += 1
    return groups
