"""Start or resume a batch: the run directory from a manifest, driven until every row is final.

``run_batch`` is the one core function behind ``rhbatch run``:

1. lock the directory (one process per run; a killed holder's lock vanishes with it);
2. new directory: load and validate the manifest (nothing is sent while any row is invalid), store
   every row as PENDING; existing directory: check it holds the same manifest, then turn rows left
   in SUBMITTING by a crash into SUBMIT_UNKNOWN;
3. read the account once (a bad key or empty balance stops here, before any create);
4. drive the :class:`~pipeline.runner.Runner` until every row is final or the run is stopped,
   keeping ``results.jsonl`` / ``results.csv`` current as it goes (:mod:`pipeline.refresh`) and
   once more at the end.

An AI app (``webappId`` in the settings' task options) has no workflow JSON: its rows are never
preflighted, and a row without a workflowId runs the app itself. ``rhbatch retry``'s selection of
rows is :mod:`pipeline.retry`'s; what a run holds and cost is :mod:`pipeline.status`'s.
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
from urllib.parse import urlsplit

from pipeline import store as st
from pipeline.client import AccountStatus, RetryPolicy, RunningHubClient, build_payload
from pipeline.config import TRACEBACK_NOTE, RedactingFilter, Settings, show_url
from pipeline.download import download_loop, download_pass
from pipeline.errors import (
    ManifestChangedError,
    RhbatchError,
    RunFatalError,
    StateError,
    StorageError,
)
from pipeline.keys import PoolKey
from pipeline.manifest import Manifest, ProblemGroup, check_manifest_path, load_manifest
from pipeline.pool import (
    LEGACY_KEY_META,
    Pool,
    check_keys,
    merge,
    record_keys,
    record_outcomes,
    run_all,
)
from pipeline.prepare import Prepared, load_and_prepare, load_checked, prepare_rows
from pipeline.refresh import ResultsFlusher, remove_stale_temporaries
from pipeline.runner import Event, Runner, RunSummary
from pipeline.safetext import number
from pipeline.transport import run_async
from pipeline.webhooks import WebhookReceiver, parse_listen

log = logging.getLogger("rhbatch")
LOG_FILE = st.RunPaths.LOG
WEBAPP_OPTION = "webappId"


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
    object_info: str | None = None  # a saved GET /object_info, merged over the packaged catalogue

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

    def for_settings(self, settings: Settings) -> ManifestArgs:
        """These arguments as ``settings`` run them: an AI app's rows (``webappId``) default to the
        app as their workflow and are not preflighted (an app has no workflow JSON)."""
        app = settings.task_options.get(WEBAPP_OPTION)
        if not app:
            return self
        return dataclasses.replace(self, workflow_id=self.workflow_id or str(app), preflight=False)


@dataclass
class DryRun:
    """What ``run --dry-run`` found: the manifest, its checks' warnings, and the bodies to send."""

    manifest: Manifest
    prepared: Prepared
    settings: Settings

    def payloads(self) -> Iterator[dict[str, Any]]:
        return dry_run_payloads(self.manifest, self.settings)


def dry_run(args: ManifestArgs, settings: Settings) -> DryRun:
    """Load and check the manifest as ``run`` would (no key is used, nothing is stored or sent)."""
    args = args.for_settings(settings)
    manifest, prepared = load_and_prepare(
        args.load, settings=None, workflow_files=args.workflow_files, preflight=args.preflight,
        upload=False, strict=args.strict, object_info=args.object_info)
    return DryRun(manifest, prepared, settings)


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


@contextlib.contextmanager
def attach_log(run_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """Log to ``DIR/rhbatch.log`` (DEBUG with ``verbose``, else INFO) while the block runs; the
    ``rhbatch`` logger's level and handlers are as they were after it."""
    handler = _RunLogHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("rhbatch")
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield run_dir / LOG_FILE
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def open_run(
    args: ManifestArgs,
    run_dir: Path,
    settings: Settings | None = None,
    *,
    manifest: Manifest | None = None,
    earlier: Sequence[ProblemGroup] = (),
    on_warning: Callable[[str], None] = lambda warning: None,
) -> tuple[st.RunStore, bool]:
    """Open (resume) or create the run in ``run_dir`` for this manifest. Caller holds the lock.

    A new run is preflighted and its input files uploaded before any row is stored, and the
    warnings of those checks go to the log and to ``on_warning``; ``manifest`` is the manifest
    already loaded for it, if the caller has it. Returns the store and whether the run is new.
    """
    identity = args.identity()
    if st.RunStore.exists(run_dir):
        store = st.RunStore.open(run_dir)
        if store.get_meta("manifest_fingerprint") is None and store.counts()[st.PENDING] == store.total():
            # A creation killed before its rows and facts were recorded: no row of it was ever sent,
            # so it is started again from the manifest instead of being taken for another run.
            store.close()
            for suffix in ("", "-wal", "-shm"):
                (run_dir / f"{st.RunPaths.STATE_DB}{suffix}").unlink(missing_ok=True)
            return open_run(args, run_dir, settings, manifest=manifest, earlier=earlier,
                            on_warning=on_warning)
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
        preflight=args.preflight, strict=args.strict, earlier=earlier, object_info=args.object_info,
    )
    for warning in prepared.warnings:
        log.warning("%s", warning)
        on_warning(warning)
    if prepared.skipped:
        on_warning(f"preflight skipped: {prepared.skipped}")
    store = st.RunStore.open(run_dir, create=True)
    store.insert_rows(prepared.rows)
    store.set_meta(
        workflow_hashes=prepared.hashes,
        catalogue=prepared.catalogue,
        preflight_checked=prepared.checked,
        manifest_fingerprint=manifest.fingerprint,
        manifest_identity=identity,
        manifest_source=str(args.path),
        columns=manifest.columns,
        bound=manifest.bound,
        created_at=time.time(),
    )
    return store, True


# -- driving the run -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """How one invocation drives a run: callbacks for the CLI, budget, extras. ``run_batch`` and
    ``retry_rows`` take these as keyword arguments."""

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
    keys: tuple[PoolKey, ...] = ()  # several keys (pipeline.keys); empty: the settings' one key


async def _drive(store: st.RunStore, settings: Settings, options: RunOptions,
                 flusher: ResultsFlusher) -> RunSummary:
    """Run the loop, with the webhook receiver around it when asked for."""
    if not options.webhook_listen:
        return await _drive_loop(store, settings, options, flusher, None)
    pools: list[Pool] = []
    host, port = parse_listen(options.webhook_listen)
    receiver = WebhookReceiver(
        host, port,
        lambda task_id, token=None: pools[0].hint_finished(task_id, token) if pools else False,
    )
    await receiver.start()
    public = settings.task_options.get("webhookUrl")
    settings = dataclasses.replace(
        settings, task_options={**settings.task_options, "webhookUrl": receiver.url(public)}
    )
    log.info("webhook receiver listening on %s:%d", receiver.host, receiver.port)
    try:
        return await _drive_loop(store, settings, options, flusher, pools.append)
    finally:
        await receiver.stop()


async def _read_account_first(client: RunningHubClient, runner: Runner, store: st.RunStore,
                              options: RunOptions) -> RunSummary | None:
    """The account, read once before any create: a summary when the run must stop here."""
    try:
        account = await client.account_status()
    except RunFatalError as exc:
        if runner.pool.solo:
            log.error("stopping before any submission: %s", exc)
        return RunSummary(
            counts=store.counts(), total=store.total(), elapsed_s=0.0, stopped=str(exc),
            exit_code=3, coins=store.spending().coins, requests=client.requests_sent,
        )
    except Exception as exc:  # the pre-check is informative; the run decides by itself
        log.warning("could not read the account before the run: %s", exc)
        return None
    runner.service_reachable()
    named = "" if runner.pool.solo else f"key {runner.label}: "
    if runner.pool.solo:
        options.on_account(account)
    else:
        coins = "?" if account.remain_coins is None else number(account.remain_coins)
        options.on_notice(f"{named}{account.api_type or 'unknown type'}, {coins} coins, "
                          f"{account.current_task_counts} task(s) running or queued")
    said = await client.detect()
    log.info("%s%s", named, said)
    options.on_notice(f"{named}{said}")
    limit = None
    if client.read_api == "v2":
        # the round trip of a read on a connection already open (the first read's carries its
        # setup: a loopback service would look far): the first creates in flight are sized by it
        sent = time.monotonic()
        limit = await client.queue_limit()
        if limit is not None:  # an answer (a refused connection's "None" says nothing)
            runner.observe_round_trip(time.monotonic() - sent)
    if limit is not None:
        runner.set_ceiling(limit)
        log.info("%sthe key's concurrentLimit is %d: the window starts at %d", named, limit,
                 runner.window)
    return None


def run_keys(settings: Settings, options: RunOptions) -> list[PoolKey]:
    """The keys this invocation creates and polls with."""
    if options.keys:
        return list(options.keys)
    settings.require_key()
    assert settings.api_key is not None
    return [PoolKey(settings.api_key, "key")]


def _key_settings(settings: Settings, key: PoolKey) -> Settings:
    """One key's settings: its secret, and its ``max=`` as a cap over the key's stated limit."""
    if key.max_in_flight is None:
        return dataclasses.replace(settings, api_key=key.secret)
    cap = min(key.max_in_flight, settings.concurrency if settings.concurrency_given
              else key.max_in_flight)
    return dataclasses.replace(settings, api_key=key.secret, concurrency=cap,
                               concurrency_given=True)


async def _drive_loop(
    store: st.RunStore,
    settings: Settings,
    options: RunOptions,
    flusher: ResultsFlusher,
    register: Callable[[Pool], None] | None,
) -> RunSummary:
    keys = run_keys(settings, options)
    legacy = store.get_meta(LEGACY_KEY_META)
    async with contextlib.AsyncExitStack() as stack:
        pool = Pool(store, submit_only=options.submit_only, max_coins=options.max_coins,
                    max_money=options.max_money, expected_task_coins=options.expected_task_coins,
                    size=len(keys))
        runners = []
        for n, key in enumerate(keys):
            key_settings = _key_settings(settings, key)
            client = await stack.enter_async_context(
                RunningHubClient(key_settings, policy=options.policy))
            runners.append(Runner(
                store, client, key_settings, on_event=options.on_event, pool=pool,
                key_fp=key.fingerprint, label=key.label, key_limits=(key.max_coins, key.max_money),
                owns_unrecorded=key.fingerprint == legacy if legacy else n == 0,
                webhook_tokens=register is not None,
            ))
        if register is not None:
            register(pool)
        for runner in runners:
            stopped = await _read_account_first(runner.client, runner, store, options)
            if stopped is not None and pool.solo:
                return stopped
            if stopped is not None:
                runner._retire(f"refused before any create: {stopped.stopped}")
        if not pool.solo and all(r.retired for r in runners):
            pool.stop("no key of the run can create: " + "; ".join(
                f"{r.label}: {r.retired}" for r in runners), interrupt=False)
        loop = asyncio.get_running_loop()
        installed = []
        if options.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, pool.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        flusher.start()
        downloader = (asyncio.create_task(download_loop(store.run_dir, flusher.files_changed))
                      if options.download else None)
        try:
            summary = merge(await run_all(runners), store)
            record_outcomes(store, runners)
            if downloader is not None and summary.stopped != "interrupted":
                downloader.cancel()
                await asyncio.gather(downloader, return_exceptions=True)
                await download_pass(store.run_dir, flusher.files_changed)
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


BASE_URL_META = "base_url"


def _service(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url.strip())
    return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")


def _same_service(a: str, b: str) -> bool:
    """Whether two base URLs name the same service (scheme and host case, a final / ignored)."""
    return _service(a) == _service(b)


def check_base_url(store: st.RunStore, settings: Settings, moved: bool = False, *,
                   record: bool = True) -> str | None:
    """A run's tasks live on the service that created them: refuse to follow them elsewhere.

    The first run records its base URL (credentials masked; there are none, ``resolve_settings``
    refuses them). Another base URL later is a StateError unless ``moved`` (``--base-url-moved``):
    then the new one is recorded and the line saying so is returned for the log and the user.
    ``record=False`` only checks (``retry`` checks before it requeues anything).
    """
    current = show_url(settings.base_url)
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
    noted, not obeyed: a results file cut short is worse than a short wait. The handlers in force
    before the run come back after the write; a Ctrl-C before the loop starts (loading, the
    account check) still interrupts at once."""
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


def execute(store: st.RunStore, settings: Settings, created: bool, options: RunOptions
            ) -> RunSummary:
    """Recover, drive and write the results of an open run (caller holds the lock).

    An unexpected exception (a bug, not an :class:`RhbatchError`) is logged with its traceback to
    the run's log, and a note naming that log is added to it."""
    keys = run_keys(settings, options)
    check_keys(store, keys)
    record_keys(store, keys)
    options = resolve_budget(store, options)
    settings = resolve_api(store, settings, options)
    with attach_log(store.run_dir, options.verbose) as log_path:
        try:
            return _execute(store, settings, created, options)
        except RhbatchError:
            raise
        except Exception as exc:
            log.exception("rhbatch stopped on an unexpected error: %s", exc)
            exc.add_note(f"{TRACEBACK_NOTE}{log_path}")
            raise


def _execute(store: st.RunStore, settings: Settings, created: bool, options: RunOptions
             ) -> RunSummary:
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
    log.info("%s run in %s: %s", "new" if created else "resuming", store.run_dir, store.counts())
    options.on_open(store, created)
    flusher = ResultsFlusher(store, settings.results_flush_interval_s)
    with _signals_held(options.handle_signals):
        summary = run_async(_drive(store, settings, options, flusher))
        flusher.finish(store)  # a Ctrl-C now waits for it: results stay whole
    log.info("run ended: %s exit %d", summary.counts, summary.exit_code)
    return summary


def run_batch(args: ManifestArgs, run_dir: str | Path, settings: Settings,
              **options: Any) -> RunSummary:
    """Start or resume the run of ``args`` in ``run_dir``; returns when it ends or stops.

    ``options`` are :class:`RunOptions` fields (``on_event=``, ``max_coins=``, ``policy=``, ...).
    """
    run_options = RunOptions(**options)
    args = args.for_settings(settings)
    run_dir = Path(run_dir)
    if not run_options.keys:
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
            store, created = open_run(args, run_dir, settings, manifest=manifest, earlier=earlier,
                                      on_warning=run_options.on_warning)
            try:
                return execute(store, settings, created, run_options)
            finally:
                store.close()
    except BaseException:
        if made_dir and not st.RunStore.exists(run_dir):
            # refused before its first row was stored (preflight, uploads): nothing to resume
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
