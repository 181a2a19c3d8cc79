"""The run loop: keep every paid slot busy, learn of each task's end quickly, lose nothing.

One asyncio process drives three cooperating loops over the :class:`~pipeline.store.RunStore`:

- **submitter**: creates tasks one at a time (so a kill can leave at most one create in doubt),
  while the in-flight count is below the *window*. The window starts at ``--concurrency``; a
  capacity answer (421, 415, 814, 1520, 1003, 1010–1012) shrinks it to what the account holds now
  and pauses submissions with jittered, growing backoff; after the pause it probes one slot higher.
- **account watcher**: reads ``accountStatus.currentTaskCounts`` every ``account_poll_interval_s``.
  When the account holds fewer tasks than we believe are live, that many of ours have ended: the
  likeliest ones (oldest first) are polled at once and their slots are handed to the submitter
  before the poll even answers. One cheap request serves every task of the run.
- **poller**: asks ``outputs`` about suspected-finished tasks at once and about every live task at
  least every ``max_poll_interval_s`` (``poll_interval_s`` when the account signal is unavailable),
  so a missed or shared-key signal only delays detection, never loses a task.

Failures of one row never stall the others; a run-fatal answer (bad key, no balance) stops
submissions, finishes what can be finished, and exits with code 3 so the user can fix and resume.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import store as st
from pipeline.client import RunningHubClient, build_payload
from pipeline.config import Settings, redact
from pipeline.errors import (
    ApiError,
    CapacityError,
    RowFatalError,
    RunFatalError,
    SubmitUnknownError,
    TaskGoneError,
    TransientApiError,
    code_name,
)

log = logging.getLogger("rhbatch.runner")

PENDING_BATCH = 500
# Below the client's connection pool (HTTP_MAX_CONNECTIONS), so a create and the account read
# never queue behind polls for a connection.
MAX_CONCURRENT_POLLS = 12
DURATION_EWMA_WEIGHT = 0.2
UNKNOWN_STREAK_PAUSE = 2  # creates in doubt in a row before submissions slow down
UNKNOWN_STREAK_STOP = 10  # ... and before the run stops (exit 3) to let the user look
# The shared accountStatus read is spent at about this many calls per finished task: with many
# short tasks in flight it is read more often than --account-poll-interval, down to a quarter of it.
ACCOUNT_CALLS_PER_TASK = 0.5
ACCOUNT_POLL_MIN_FRACTION = 0.25


def account_poll_interval(base_s: float, typical_task_s: float | None, live: int) -> float:
    """Seconds until the next accountStatus read.

    ``live`` tasks of ``typical_task_s`` end about ``live / typical_task_s`` times a second; reading
    the count every ``typical / (ACCOUNT_CALLS_PER_TASK x live)`` seconds costs that many calls per
    task and halves the wait for the next read when ends come often. Never slower than ``base_s``
    (the configured interval) nor faster than a quarter of it.
    """
    if not typical_task_s or live <= 0:
        return base_s
    paced = typical_task_s / (ACCOUNT_CALLS_PER_TASK * live)
    return min(base_s, max(base_s * ACCOUNT_POLL_MIN_FRACTION, paced))


@dataclass
class Event:
    kind: str  # submitted, started, success, failed, unknown, capacity, stopping, account
    row_idx: int | None = None
    detail: str = ""


@dataclass
class RunSummary:
    counts: dict[str, int]
    total: int
    elapsed_s: float
    stopped: str | None = None  # why the run stopped early (run-fatal, interrupt, budget)
    exit_code: int = 0
    coins: float = 0.0
    requests: int = 0


@dataclass(order=True)
class _Poll:
    at: float
    idx: int = field(compare=False)
    generation: int = field(compare=False)


@dataclass
class _Live:
    idx: int
    task_id: str
    status: str
    submitted_at: float  # wall clock, stored
    seen_at: float  # monotonic time the create answered (or the run resumed it)
    generation: int = 0
    suspected: bool = False
    polling: bool = False
    last_negative: float = 0.0


class Runner:
    def __init__(
        self,
        store: st.RunStore,
        client: RunningHubClient,
        settings: Settings,
        *,
        on_event: Callable[[Event], None] | None = None,
        max_coins: float | None = None,
        expected_task_coins: float | None = None,
    ):
        self.store = store
        self.client = client
        self.settings = settings
        self.on_event = on_event or (lambda event: None)
        self.max_coins = max_coins
        self.expected_task_coins = expected_task_coins
        self.window = settings.concurrency
        self.live: dict[int, _Live] = {}
        self._heap: list[_Poll] = []
        self._wake = asyncio.Event()
        self._poll_wake = asyncio.Event()
        self._stop_submitting = False
        self._stopped: str | None = None
        self._interrupted = False
        self._forced = False
        self._submitter_task: asyncio.Task[None] | None = None
        self._crash: BaseException | None = None
        self._exit_code = 0
        self._backoff_until = 0.0
        self._capacity_strikes = 0
        self._unknown_streak = 0
        self._account_ok = True
        self._duration_s: float | None = None
        self._pending_exhausted = False
        self._pending: list[Any] = []
        self._pending_cursor = -1
        self._poll_slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        self._poll_tasks: set[asyncio.Task[None]] = set()
        self._spent = 0.0
        self._priced = 0
        self._unsynced = False  # task ids committed without fsync since the last store.sync()

    # -- public -----------------------------------------------------------------------------

    def hint_finished(self, task_id: str) -> bool:
        """A webhook said ``task_id`` ended: poll it now. Unknown or repeated hints change nothing;
        the outputs answer, not the webhook, decides the row's state."""
        for live in self.live.values():
            if live.task_id == task_id:
                if not live.suspected:
                    live.suspected = True
                    self._schedule(live, 0.0)
                    self._wake.set()
                return True
        return False

    def stop(self, reason: str = "interrupted", *, interrupt: bool = True) -> None:
        """Stop submitting (Ctrl-C): creates already sent are awaited, state is kept.

        ``interrupt`` also stops polling at once; otherwise live tasks are followed to their end.
        """
        if interrupt and self._interrupted and self._submitter_task and not self._submitter_task.done():
            # A second Ctrl-C: do not wait for the create in flight; its row becomes SUBMIT_UNKNOWN.
            self._forced = True
            self._submitter_task.cancel()
        self._interrupted = self._interrupted or interrupt
        if not self._stopped:
            self._stopped = reason
            self._exit_code = 3
        self._stop_submitting = True
        self.on_event(Event("stopping", detail=reason))
        self._wake.set()
        self._poll_wake.set()

    async def run(self) -> RunSummary:
        started = time.monotonic()
        now_mono = time.monotonic()
        self._spent = self.store.spent_coins()
        self._priced = self.store.priced_rows()
        for known in self.store.active():
            live = _Live(known.idx, known.task_id, known.status, known.submitted_at, now_mono)
            self.live[known.idx] = live
            self._schedule(live, 0.0)
        submitter = asyncio.create_task(self._submitter(), name="submitter")
        self._submitter_task = submitter
        watcher = asyncio.create_task(self._account_watcher(), name="account")
        poller = asyncio.create_task(self._poller(), name="poller")
        try:
            try:
                await submitter
            except asyncio.CancelledError:
                if not self._forced:
                    raise
            await poller
        finally:
            pending = [submitter, poller, watcher, *self._poll_tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._crash is not None:
            raise self._crash
        counts = self.store.counts()
        exit_code = self._exit_code
        if not exit_code:
            unfinished = counts[st.FAILED] + counts[st.SUBMIT_UNKNOWN] + counts[st.CANCELLED]
            exit_code = 1 if unfinished else 0
        return RunSummary(
            counts=counts,
            total=sum(counts.values()),
            elapsed_s=time.monotonic() - started,
            stopped=self._stopped,
            exit_code=exit_code,
            coins=self.store.spent_coins(),
            requests=self.client.requests_sent,
        )

    # -- submitter --------------------------------------------------------------------------

    def _in_flight(self) -> int:
        return sum(1 for t in self.live.values() if not t.suspected)

    def _next_pending(self) -> Any | None:
        if not self._pending and not self._pending_exhausted:
            self._pending = self.store.pending(self._pending_cursor, PENDING_BATCH)
            if self._pending:
                self._pending_cursor = self._pending[-1]["idx"]
                self._pending.reverse()
            else:
                self._pending_exhausted = True
        return self._pending.pop() if self._pending else None

    def _push_back(self, row: Any) -> None:
        self._pending.append(row)

    async def _submitter(self) -> None:
        while not self._stop_submitting:
            wait = self._backoff_until - time.monotonic()
            if wait > 0:
                await self._sleep_or_wake(wait)
                continue
            if self._in_flight() >= self.window:
                await self._sync()  # idle: make the task ids just recorded durable, off the path
                await self._sleep_or_wake(None)
                continue
            budget = self._budget()
            if budget == "wait":  # tasks in flight will tell what the next one may cost
                await self._sleep_or_wake(None)
                continue
            if budget == "stop":
                self.stop(
                    f"budget reached: {self._spent:g} coins spent of --max-coins "
                    f"{self.max_coins:g}, and the next task would pass it; raise --max-coins and "
                    "run the same command to resume",
                    interrupt=False,
                )
                break
            row = self._next_pending()
            if row is None:
                break
            await self._submit(row)
        self._poll_wake.set()
        await self._sync()

    async def _sync(self) -> None:
        if self._unsynced:
            self._unsynced = False
            await asyncio.to_thread(self.store.sync)

    def _budget(self) -> str:
        """"ok" to submit, "wait" for tasks in flight, or "stop": spent coins plus the expected
        cost of every task in flight and the next one must stay within --max-coins."""
        if self.max_coins is None:
            return "ok"
        expected = self._spent / self._priced if self._priced else self.expected_task_coins
        if expected is None:  # no price known yet: one task at a time until one is measured
            if self.live:
                return "wait"
            return "ok" if self._spent < self.max_coins else "stop"
        if self._spent + expected * (len(self.live) + 1) <= self.max_coins:
            return "ok"
        return "wait" if self.live else "stop"

    async def _sleep_or_wake(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _submit(self, row: Any) -> None:
        idx = row["idx"]
        body = build_payload(
            row["workflow_id"],
            json.loads(row["node_info_list"]),
            {**self.settings.task_options, **json.loads(row["options"])},
        )
        self.store.mark_submitting(idx)
        try:
            answer = await self.client.create(body)
        except asyncio.CancelledError:
            self.store.mark_unknown(
                idx,
                "rhbatch was stopped while this row's create request was in flight; check "
                "RunningHub's call records before resubmitting",
            )
            raise
        except CapacityError as exc:
            self.store.revert_pending(idx)
            self._push_back(row)
            self._on_capacity(exc)
            return
        except RunFatalError as exc:
            self.store.revert_pending(idx)
            self._push_back(row)
            self._run_fatal(exc)
            return
        except SubmitUnknownError as exc:
            self.store.mark_unknown(idx, redact(exc))
            self.on_event(Event("unknown", idx, redact(exc)))
            log.warning("row %s: %s", row["row_id"], redact(exc))
            self._on_unknown()
            return
        except TransientApiError as exc:
            # Proven not created (no connection, 429, 503) but retries ran out: the service is
            # unreachable. Keep the row pending and stop; the same command resumes.
            self.store.revert_pending(idx)
            self._push_back(row)
            self._run_fatal(exc, prefix="RunningHub is unreachable")
            return
        except (RowFatalError, TaskGoneError, ApiError) as exc:
            code = getattr(exc, "code", None)
            self.store.mark_failed(idx, code=code, error=redact(exc))
            self.on_event(Event("failed", idx, redact(exc)))
            return
        now = time.time()
        self._capacity_strikes = 0
        self._unknown_streak = 0
        if self.window < self.settings.concurrency and self._in_flight() + 1 >= self.window:
            self.window += 1  # additive increase after a capacity shrink
        if answer.status == "FAILED":
            tips = answer.prompt_tips
            self.store.mark_submitted(idx, answer.task_id, st.QUEUED, now)
            self.store.mark_failed(
                idx,
                code=433,
                error=f"ComfyUI rejected the prompt: {json.dumps(tips, ensure_ascii=False)[:500]}",
                failed_reason=tips if isinstance(tips, dict) else None,
            )
            self.on_event(Event("failed", idx, "prompt rejected"))
            return
        status = st.RUNNING if answer.status == "RUNNING" else st.QUEUED
        self.store.mark_submitted(idx, answer.task_id, status, now)
        self._unsynced = True
        live = _Live(idx, answer.task_id, status, now, time.monotonic())
        self.live[idx] = live
        self._schedule(live, self._first_poll_delay())
        self.on_event(Event("submitted", idx))

    def _on_unknown(self) -> None:
        """Creates that end in doubt in a row mean the service is failing: each one may have been
        billed and needs the user's decision, so slow down, then stop rather than pile them up."""
        self._unknown_streak += 1
        if self._unknown_streak >= UNKNOWN_STREAK_STOP:
            self._run_fatal(
                SubmitUnknownError(
                    f"{self._unknown_streak} creates in a row got no usable answer from RunningHub"
                ),
                prefix="RunningHub is failing",
            )
        elif self._unknown_streak >= UNKNOWN_STREAK_PAUSE:
            wait = min(self.settings.max_capacity_backoff_s,
                       self.settings.capacity_backoff_s * 2 ** (self._unknown_streak - 2))
            self._backoff_until = time.monotonic() + wait * random.uniform(0.5, 1.0)

    def _on_capacity(self, exc: CapacityError) -> None:
        self._capacity_strikes += 1
        self.window = max(1, self._in_flight())
        base = self.settings.capacity_backoff_s * 2 ** min(self._capacity_strikes - 1, 5)
        wait = min(self.settings.max_capacity_backoff_s, base) * random.uniform(0.5, 1.0)
        self._backoff_until = time.monotonic() + wait
        log.info("capacity (%s): window %d, next submission in %.1fs", exc.code, self.window, wait)
        self.on_event(Event("capacity", detail=f"{exc.code} {code_name(exc.code or 0)}"))

    def _run_fatal(self, exc: ApiError, prefix: str = "") -> None:
        message = redact(exc)
        if prefix:
            message = f"{prefix}: {message}; run the same command again to resume"
        log.error("stopping: %s", message)
        if not self._stopped:
            self._stopped = message
        self._exit_code = 3
        self._stop_submitting = True
        self.on_event(Event("stopping", detail=message))
        self._poll_wake.set()

    # -- polling ----------------------------------------------------------------------------

    def _first_poll_delay(self) -> float:
        if self._account_ok:
            return self.settings.max_poll_interval_s
        if self._duration_s is not None:
            return max(self.settings.poll_interval_s, self._duration_s)
        return self.settings.poll_interval_s

    def _schedule(self, live: _Live, delay: float) -> None:
        live.generation += 1
        heapq.heappush(self._heap, _Poll(time.monotonic() + delay, live.idx, live.generation))
        self._poll_wake.set()

    async def _poller(self) -> None:
        while True:
            if not self.live and (self._stop_submitting or self._submitter_done()):
                return
            if self._interrupted:
                return
            now = time.monotonic()
            while self._heap and self._heap[0].at <= now:
                item = heapq.heappop(self._heap)
                live = self.live.get(item.idx)
                if live is None or live.generation != item.generation or live.polling:
                    continue
                live.polling = True
                await self._poll_slots.acquire()
                task = asyncio.create_task(self._poll_one(live))
                self._poll_tasks.add(task)
                task.add_done_callback(self._poll_done)
            timeout = (self._heap[0].at - time.monotonic()) if self._heap else 1.0
            self._poll_wake.clear()
            try:
                await asyncio.wait_for(self._poll_wake.wait(), max(0.0, min(timeout, 1.0)))
            except TimeoutError:
                pass

    def _poll_done(self, task: asyncio.Task[None]) -> None:
        self._poll_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # e.g. the disk filled up while recording a result: stop, the state still resumes
            self._crash = self._crash or task.exception()
            self.stop(f"internal error: {task.exception()}")

    def _submitter_done(self) -> bool:
        return self._pending_exhausted and not self._pending

    async def _poll_one(self, live: _Live) -> None:
        try:
            result = await self.client.outputs(live.task_id)
        except RunFatalError as exc:
            live.polling = False
            self._run_fatal(exc)
            self._forget(live)
            return
        except TaskGoneError as exc:
            self._finish(live)
            self.store.mark_failed(
                live.idx,
                code=exc.code,
                error=f"{redact(exc)}: the task record is gone; `rhbatch retry` can run it again",
            )
            self.on_event(Event("failed", live.idx, "task gone"))
            return
        except ApiError as exc:
            live.polling = False
            log.warning("poll of task %s failed, will ask again: %s", live.task_id, redact(exc))
            self._schedule(live, self.settings.poll_interval_s)
            return
        finally:
            self._poll_slots.release()
        live.polling = False
        if result.state in ("QUEUED", "RUNNING"):
            if result.state == "RUNNING" and live.status == st.QUEUED:
                live.status = st.RUNNING
                self.store.mark_running(live.idx, time.time())
                self.on_event(Event("started", live.idx))
            if live.suspected:
                live.suspected = False
                live.last_negative = time.monotonic()
            delay = (
                self.settings.max_poll_interval_s
                if self._account_ok
                else self.settings.poll_interval_s
            )
            self._schedule(live, delay * random.uniform(0.8, 1.0))
            return
        self._finish(live)
        now = time.time()
        if result.state == "SUCCESS":
            self.store.mark_success(live.idx, result.outputs, now)
            coins = [o["consumeCoins"] for o in result.outputs if o.get("consumeCoins") is not None]
            if coins:
                self._spent += max(coins)
                self._priced += 1
            self.on_event(Event("success", live.idx))
        else:
            reason = result.failed_reason
            summary = _failure_summary(reason) or result.msg or "task failed"
            self.store.mark_failed(
                live.idx, code=result.code, error=summary, failed_reason=reason, at=now
            )
            self.on_event(Event("failed", live.idx, summary))

    def _finish(self, live: _Live) -> None:
        duration = time.monotonic() - live.seen_at
        if self._duration_s is None:
            self._duration_s = duration
        else:
            w = DURATION_EWMA_WEIGHT
            self._duration_s = (1 - w) * self._duration_s + w * duration
        self._forget(live)

    def _forget(self, live: _Live) -> None:
        self.live.pop(live.idx, None)
        live.generation += 1
        self._wake.set()
        self._poll_wake.set()

    # -- the shared account signal ------------------------------------------------------------

    async def _account_watcher(self) -> None:
        interval = self.settings.account_poll_interval_s
        failures = 0
        while True:
            await asyncio.sleep(interval)
            if not self.live:
                continue
            before = [t for t in self.live.values()]
            asked_at = time.monotonic()
            try:
                status = await self.client.account_status()
            except RunFatalError as exc:
                self._run_fatal(exc)
                return
            except ApiError as exc:
                failures += 1
                if failures >= 3 and self._account_ok:
                    log.info("accountStatus unavailable, polling each task instead: %s",
                             redact(exc))
                    self._account_ok = False
                    for live in self.live.values():
                        self._schedule(live, self.settings.poll_interval_s)
                interval = min(interval * 2, self.settings.max_poll_interval_s)
                continue
            failures = 0
            if not self._account_ok:
                self._account_ok = True
            interval = account_poll_interval(
                self.settings.account_poll_interval_s, self._duration_s, len(self.live)
            )
            self._on_account_count(status.current_task_counts, before, asked_at)

    def _on_account_count(self, count: int, before: list[_Live], asked_at: float) -> None:
        """``count`` tasks are live on the account; ``before`` were ours when we asked."""
        ours = [t for t in before if t.idx in self.live and t.seen_at <= asked_at]
        gap = len(ours) - count - sum(1 for t in ours if t.suspected)
        if gap <= 0:
            return
        # A task seen running after we asked cannot be one that had ended; of the rest, the one
        # expected to end first is the likeliest. A task that was still running when its typical
        # duration had passed is a straggler: expect it one typical duration after that answer.
        typical = self._duration_s or 0.0

        def expected_end(t: _Live) -> float:
            if t.last_negative - t.seen_at < typical:
                return t.seen_at + typical
            return t.last_negative + typical

        candidates = sorted(
            (t for t in ours if not t.suspected and t.last_negative < asked_at),
            key=expected_end,
        )
        for live in candidates[:gap]:
            live.suspected = True
            self._schedule(live, 0.0)
        self._wake.set()


def _failure_summary(reason: Any) -> str:
    if not isinstance(reason, dict):
        return str(reason)[:300] if reason else ""
    parts = []
    if reason.get("exception_type"):
        parts.append(str(reason["exception_type"]))
    if reason.get("node_name") or reason.get("node_id"):
        parts.append(f"at node {reason.get('node_id', '?')} ({reason.get('node_name', '?')})")
    message = str(reason.get("exception_message") or "").strip()
    if message:
        parts.append(f": {message[:300]}")
    return " ".join(parts).replace(" :", ":")
