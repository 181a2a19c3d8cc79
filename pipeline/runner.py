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
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import store as st
from pipeline.client import MAX_STORED_TEXT, RunningHubClient, build_payload, parse_prompt_tips
from pipeline.config import Settings, redact
from pipeline.errors import (
    TASK_TIMEOUT_CODE,
    ApiError,
    CapacityError,
    RowFatalError,
    RunFatalError,
    StorageError,
    SubmitUnknownError,
    TaskGoneError,
    TransientApiError,
    code_name,
)
from pipeline.safetext import amount, clean_text, number

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
# Under a budget, every task not yet priced (in flight, in doubt, ended without a reported cost, and
# the next one) is counted at a multiple of the dearest task seen so far: task costs follow their
# run time, which varies, and an estimate that is too low is what lets a run spend past its limit.
# Twice the dearest while fewer than BUDGET_FEW_PRICED tasks are priced, then one and a half times.
BUDGET_ESTIMATE_FACTOR_FEW = 2.0
BUDGET_ESTIMATE_FACTOR = 1.5
BUDGET_FEW_PRICED = 3
# With a webhook receiver, how long a run waits at its end for deliveries that can reconcile
# creates that ended in doubt: three typical task durations, within these bounds.
RECONCILE_WAIT_MIN_S = 30.0
RECONCILE_WAIT_MAX_S = 600.0
# How often the run checks that its directory is still there and writable: a deleted run
# directory keeps accepting writes to its unlinked database, which no resume could ever read.
RUN_DIR_CHECK_S = 2.0
# Between creates that could not reach RunningHub at all (the retry policy ran out), during an
# outage: the row stays pending and is sent again after this pause.
OUTAGE_RETRY_S = 30.0
# Above a learnt limit the window probes one slot higher after this many creates at the limit.
LIMIT_PROBE_EVERY = 50


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
    spending: st.Spending | None = None  # coins and money billed, by outcome, every attempt
    capacity_answers: int = 0  # creates refused for capacity in this invocation
    reconciled: dict[str, int] = field(default_factory=dict)  # unknown creates resolved, by how


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
        max_money: float | None = None,
        submit_only: set[int] | None = None,
        webhook_tokens: bool = False,
    ):
        self.store = store
        self.client = client
        self.settings = settings
        self.on_event = on_event or (lambda event: None)
        self.max_coins = max_coins
        self.max_money = max_money
        self.expected_task_coins = expected_task_coins
        # retry: only these rows are submitted; other pending rows are left for `rhbatch run`
        self.submit_only = submit_only
        # each create's webhookUrl carries a token of its own (see hint_finished)
        self.webhook_tokens = webhook_tokens
        # a limit learnt from capacity answers (this run or an earlier start) caps the window
        self._learnt_limit: int | None = store.get_meta("learnt_limit")
        self.window = min(settings.concurrency, self._learnt_limit or settings.concurrency)
        self._creates_at_limit = 0
        self._ceiling: int | None = None  # the key's slots as the service states them (v2)
        self.capacity_answers = 0
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
        self._spent = 0.0  # coins billed, every attempt of the run
        self._spent_money = 0.0  # money and third-party money billed
        self._priced = 0  # tasks whose cost is known
        self._max_coins = 0.0  # the dearest task seen, in coins and in money
        self._max_money = 0.0
        self._doubtful = 0  # rows in SUBMIT_UNKNOWN and ended tasks with no reported cost
        self._reconciled: dict[str, int] = {}
        self._unknown_tokens: dict[str, int] = {}
        self._reconciling: set[int] = set()
        self._reconcile_deadline: float | None = None
        self._outage_since: float | None = None  # wall clock of the first failure in a row
        self._outage_reported = 0.0  # monotonic time of the last outage line
        self._outage_failures = 0
        self._ever_answered = False  # set by the first answer of this run (or the account read)
        self._unsynced = False  # task ids committed without fsync since the last store.sync()

    # -- public -----------------------------------------------------------------------------

    def hint_finished(self, task_id: str, token: str | None = None) -> bool:
        """A webhook said ``task_id`` ended: poll it now. Unknown or repeated hints change nothing;
        the outputs answer, not the webhook, decides the row's state.

        ``token`` is the per-attempt token the delivery's URL carried. When it names an attempt
        whose create ended in doubt, the delivery is the service saying which task that create
        made: the task is polled under this run's key, and if it exists the row becomes it
        (reconciled "webhook") instead of waiting for a person, and is never resent.
        """
        for live in self.live.values():
            if live.task_id == task_id:
                if not live.suspected:
                    live.suspected = True
                    self._schedule(live, 0.0)
                    self._wake.set()
                return True
        idx = self._unknown_tokens.get(token) if token else None
        if idx is not None and idx not in self._reconciling:
            self._reconciling.add(idx)
            self._spawn(self._reconcile(idx, task_id, token))
            return True
        return False

    async def _reconcile(self, idx: int, task_id: str, token: str | None) -> None:
        try:
            result = await self.client.poll(task_id)
        except ApiError as exc:  # 807: not a task of this key; anything else: ask next delivery
            log.info("webhook named task %s for an unknown create; not confirmed: %s",
                     clean_text(task_id, 40), redact(exc))
            self._reconciling.discard(idx)
            return
        self._unknown_tokens.pop(token or "", None)
        self._reconciling.discard(idx)
        self._doubtful = max(0, self._doubtful - 1)
        now = time.time()
        self.store.mark_reconciled(idx, task_id, st.RUNNING if result.state != "QUEUED"
                                   else st.QUEUED, "webhook", now)
        self._reconciled["webhook"] = self._reconciled.get("webhook", 0) + 1
        log.info("row %d: the unknown create is task %s (webhook, confirmed by polling)", idx,
                 clean_text(task_id, 40))
        live = _Live(idx, task_id, st.RUNNING if result.state != "QUEUED" else st.QUEUED, now,
                     time.monotonic())
        self.live[idx] = live
        self.on_event(Event("reconciled", idx, "webhook"))
        if result.state in ("QUEUED", "RUNNING"):
            self._schedule(live, self._first_poll_delay())
        else:
            await self._record_end(live, result)

    def set_ceiling(self, limit: int) -> None:
        """The key's own slot count (v2 queue/status concurrentLimit): the window starts there,
        capped by --concurrency when it was given."""
        cap = self.settings.concurrency if self.settings.concurrency_given else limit
        self._learnt_limit = min(limit, cap)
        self.window = self._learnt_limit
        self._ceiling = limit

    def service_reachable(self) -> None:
        """RunningHub answered before the loop started (the account check): a later failure to
        connect is an outage to wait out, not a wrong URL to stop on."""
        self._ever_answered = True

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
        spending = self.store.spending()
        self._spent = spending.coins
        self._spent_money = spending.all_money
        self._priced = self.store.priced_rows()
        self._max_coins = spending.max_coins or 0.0
        self._max_money = spending.max_money or 0.0
        # counted at their expected cost by budgets: unknown creates (now, and earlier attempts
        # resubmitted on consent) and ended tasks whose cost was never reported
        self._doubtful = (self.store.counts()[st.SUBMIT_UNKNOWN] + spending.unpriced
                          + spending.unknown_attempts)
        if self.webhook_tokens:
            self._unknown_tokens = self.store.unknown_tokens()
        for known in self.store.active():
            live = _Live(known.idx, known.task_id, known.status, known.submitted_at, now_mono)
            self.live[known.idx] = live
            self._schedule(live, 0.0)
        submitter = asyncio.create_task(self._submitter(), name="submitter")
        self._submitter_task = submitter
        watcher = asyncio.create_task(self._account_watcher(), name="account")
        poller = asyncio.create_task(self._poller(), name="poller")
        guard = asyncio.create_task(self._guard_run_dir(), name="run-dir")
        try:
            try:
                await submitter
            except asyncio.CancelledError:
                if not self._forced:
                    raise
            await poller
            if self._poll_tasks and not self._interrupted:
                # costs being learnt and unknown creates being confirmed finish first (bounded)
                await asyncio.wait(list(self._poll_tasks),
                                   timeout=2 * self.settings.request_deadline_s)
        finally:
            pending = [submitter, poller, watcher, guard, *self._poll_tasks]
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
            spending=self.store.spending(),
            reconciled=dict(self._reconciled),
            capacity_answers=self.capacity_answers,
        )

    # -- submitter --------------------------------------------------------------------------

    def _in_flight(self) -> int:
        return sum(1 for t in self.live.values() if not t.suspected)

    def _next_pending(self) -> Any | None:
        while not self._pending and not self._pending_exhausted:
            batch = self.store.pending(self._pending_cursor, PENDING_BATCH)
            if not batch:
                self._pending_exhausted = True
                break
            self._pending_cursor = batch[-1]["idx"]
            if self.submit_only is not None:
                batch = [r for r in batch if r["idx"] in self.submit_only]
            self._pending = batch[::-1]
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
                self.stop(self._budget_message(), interrupt=False)
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

    def _high_estimate(self, limit: str) -> float | None:
        """A deliberately high cost for a task not yet priced, in coins or money; None if unknown."""
        if limit == "coins":
            seen, given = self._max_coins, self.expected_task_coins
        else:
            seen, given = self._max_money, None
        if not self._priced:
            return given
        factor = (BUDGET_ESTIMATE_FACTOR_FEW if self._priced < BUDGET_FEW_PRICED
                  else BUDGET_ESTIMATE_FACTOR)
        return max(seen * factor, given or 0.0)

    def _budget(self) -> str:
        """"ok" to submit, "wait" for tasks in flight, or "stop".

        Admit a task only while what is spent, plus a deliberately high estimate for every task
        not yet priced (in flight, created in doubt, ended without a reported cost) and for the
        next one, stays within each limit (--max-coins, --max-money). The spent figures count
        every attempt, failed and cancelled tasks included.
        """
        verdicts = []
        for limit, cap, spent in (("coins", self.max_coins, self._spent),
                                  ("money", self.max_money, self._spent_money)):
            if cap is None:
                continue
            unpriced = len(self.live) + self._doubtful
            estimate = self._high_estimate(limit)
            if estimate is None:  # no price known yet: one task at a time until one is measured
                if self.live:
                    verdicts.append("wait")
                elif self._doubtful or spent >= cap:
                    verdicts.append("stop")
                else:
                    verdicts.append("ok")
                continue
            if spent + estimate * (unpriced + 1) <= cap:
                verdicts.append("ok")
            else:
                verdicts.append("wait" if self.live else "stop")
        if "stop" in verdicts:
            return "stop"
        return "wait" if "wait" in verdicts else "ok"

    def _budget_message(self) -> str:
        parts = []
        if self.max_coins is not None:
            parts.append(f"{amount(self._spent)} coins spent of --max-coins "
                         f"{number(self.max_coins)}")
        if self.max_money is not None:
            parts.append(f"{amount(self._spent_money)} money spent of --max-money "
                         f"{number(self.max_money)}")
        doubt = (f"; {self._doubtful} task(s) in doubt or unpriced count at their expected cost"
                 if self._doubtful else "")
        return (f"budget reached: {', '.join(parts)}, and the next task could pass it{doubt}; "
                "raise the limit and run the same command to resume")

    async def _sleep_or_wake(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _submit(self, row: Any) -> None:
        idx = row["idx"]
        options = {**self.settings.task_options, **json.loads(row["options"])}
        token = None
        if self.webhook_tokens and options.get("webhookUrl"):
            # this attempt's own token: a delivery to it names the task this create made
            token = f"{idx}-{row['attempts'] + 1}-{secrets.token_hex(6)}"
            options["webhookUrl"] = f"{options['webhookUrl']}/{token}"
        body = build_payload(row["workflow_id"], json.loads(row["node_info_list"]), options)
        self.store.mark_submitting(idx, token)
        try:
            answer = await self.client.create(body)
        except asyncio.CancelledError:
            self.store.mark_unknown(
                idx,
                "rhbatch was stopped while this row's create request was in flight; check "
                "RunningHub's call records before resubmitting",
            )
            self._remember_unknown(idx, token)
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
            message = clean_text(redact(exc), MAX_STORED_TEXT)
            self.store.mark_unknown(idx, message)
            self._remember_unknown(idx, token)
            self.on_event(Event("unknown", idx, message))
            log.warning("row %s: %s", clean_text(row["row_id"], 200), message)
            if exc.stop_run:
                self._run_fatal(RunFatalError(exc.stop_run))
            else:
                self._on_unknown()
            return
        except TransientApiError as exc:
            # Proven never sent (no connection could be made) and retries ran out: the service is
            # unreachable. The row stays pending and is sent again after a pause, until the
            # outage has lasted --give-up-after (then the run stops; the same command resumes).
            self.store.revert_pending(idx)
            self._push_back(row)
            if self._note_outage(exc, "the next create"):
                self._give_up(exc)
            else:
                self._backoff_until = time.monotonic() + OUTAGE_RETRY_S * random.uniform(0.8, 1.0)
            return
        except (RowFatalError, TaskGoneError, ApiError) as exc:
            code = getattr(exc, "code", None)
            reason = prompt_failure(getattr(exc, "data", None)) if code == 433 else None
            error = clean_text(redact(exc), MAX_STORED_TEXT)
            if reason is not None:
                error = f"433 VALIDATE_PROMPT_FAILED: {reason['summary']}"
            self.store.mark_failed(idx, code=code, error=error, failed_reason=reason)
            self.on_event(Event("failed", idx, error))
            return
        now = time.time()
        self._service_answered()
        self._capacity_strikes = 0
        self._unknown_streak = 0
        status = st.RUNNING if answer.status == "RUNNING" else st.QUEUED
        self.store.mark_submitted(idx, answer.task_id, status, now)
        self._unsynced = True
        live = _Live(idx, answer.task_id, status, now, time.monotonic())
        if answer.status == "FAILED":
            # ComfyUI rejected the prompt but a task exists: record why, then learn its cost
            reason = prompt_failure({"promptTips": answer.prompt_tips})
            summary = reason["summary"] if reason else "prompt rejected"
            self.store.mark_failed(idx, code=433, error=f"433 VALIDATE_PROMPT_FAILED: {summary}",
                                   failed_reason=reason)
            self.on_event(Event("failed", idx, summary))
            self._doubtful += 1  # until its cost is known
            self._spawn(self._learn_cost(live, counted=True))
            return
        self.live[idx] = live
        self._schedule(live, self._first_poll_delay())
        self._after_create_ok()
        self.on_event(Event("submitted", idx))

    def _remember_unknown(self, idx: int, token: str | None) -> None:
        self._doubtful += 1
        if token:
            self._unknown_tokens[token] = idx

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._poll_tasks.add(task)
        task.add_done_callback(self._poll_done)

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
        """A create was refused for capacity. When tasks of ours are live, the account holds
        what we hold: that is the key's limit, learnt (and kept with the run), and the next
        create waits for one of ours to end, not for a timer. A refusal with none of ours live,
        or a second one in a row, means others (or tasks in doubt) hold slots: back off."""
        self._capacity_strikes += 1
        held = self._in_flight()
        if held >= 1 and self._capacity_strikes == 1:
            self._set_learnt_limit(held)
            self.window = held
            wait = 0.0
        else:
            self.window = max(1, held)
            base = self.settings.capacity_backoff_s * 2 ** min(self._capacity_strikes - 1, 5)
            wait = min(self.settings.max_capacity_backoff_s, base) * random.uniform(0.5, 1.0)
            self._backoff_until = time.monotonic() + wait
        self.capacity_answers += 1
        log.info("capacity (%s): window %d, next submission %s", exc.code, self.window,
                 f"in {wait:.1f}s" if wait else "when a task of this run ends")
        self.on_event(Event("capacity", detail=f"{exc.code} {code_name(exc.code or 0)}"))

    def _set_learnt_limit(self, limit: int) -> None:
        if limit != self._learnt_limit:
            self._learnt_limit = limit
            self.store.set_meta(learnt_limit=limit)
            log.info("the key holds %d task(s) at a time: the window stays there (probing one "
                     "higher every %d creates)", limit, LIMIT_PROBE_EVERY)

    def _after_create_ok(self) -> None:
        """Grow the window back towards --concurrency: one slot at a time while the key's limit
        is unknown; above a learnt limit only as a rare probe, which, if accepted, raises it."""
        top = self._ceiling if self._ceiling is not None else self.settings.concurrency
        if self.settings.concurrency_given:
            top = min(top, self.settings.concurrency)
        if self.window >= top:
            return
        held = self._in_flight()
        learnt = self._learnt_limit
        if learnt is None:
            if held >= self.window:
                self.window += 1
            return
        if held > learnt:  # a probe above the learnt limit was accepted
            self._set_learnt_limit(held)
            self.window = min(top, held)
            return
        if held >= self.window:
            self._creates_at_limit += 1
            if self._creates_at_limit >= LIMIT_PROBE_EVERY:
                self._creates_at_limit = 0
                self.window = learnt + 1

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
            if (not self.live and (self._stop_submitting or self._submitter_done())
                    and not self._awaiting_webhooks()):
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

    def _awaiting_webhooks(self) -> bool:
        """After the last submission, wait a while for the webhooks that can still reconcile
        creates that ended in doubt (their tasks may still be running)."""
        if not self.webhook_tokens or not self._unknown_tokens or self._interrupted:
            return False
        now = time.monotonic()
        if self._reconcile_deadline is None:
            wait = min(RECONCILE_WAIT_MAX_S, max(RECONCILE_WAIT_MIN_S, 3 * (self._duration_s or 0)))
            self._reconcile_deadline = now + wait
            log.info("waiting up to %.0fs for the webhooks of %d create(s) that ended in doubt",
                     wait, len(self._unknown_tokens))
            self.on_event(Event("reconciling", detail=f"{len(self._unknown_tokens)} unknown "
                                f"create(s), up to {wait:.0f}s"))
        return now < self._reconcile_deadline

    def _submitter_done(self) -> bool:
        return self._pending_exhausted and not self._pending

    async def _poll_one(self, live: _Live) -> None:
        try:
            result = await self.client.poll(live.task_id)
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
            if isinstance(exc, TransientApiError):
                if self._note_outage(exc, f"polls of {len(self.live)} task(s)"):
                    self._give_up(exc)
            else:
                log.warning("poll of task %s failed, will ask again: %s",
                            clean_text(live.task_id, 60), clean_text(redact(exc), 500))
            self._schedule(live, self.settings.poll_interval_s)
            return
        finally:
            self._poll_slots.release()
        live.polling = False
        self._service_answered()
        if result.state in ("QUEUED", "RUNNING") and self._timed_out(live):
            await self._cancel_timed_out(live)
            return
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
        await self._record_end(live, result)

    async def _record_end(self, live: _Live, result: Any) -> None:
        """A task ended: record its outcome at once, then its cost (asked of v2 ``query`` when
        the outputs answer gives none, as for every failed or cancelled task on v1)."""
        now = time.time()
        cost = result.cost or (st.Cost.of_outputs(result.outputs) if result.state == "SUCCESS"
                               else st.Cost())
        if result.state == "SUCCESS":
            self.store.mark_success(live.idx, result.outputs, now, cost)
            self.on_event(Event("success", live.idx))
        else:
            reason = result.failed_reason
            summary = clean_text(_failure_summary(reason) or result.msg or "task failed", 500)
            self.store.mark_failed(
                live.idx, code=result.code, error=summary, failed_reason=reason, at=now,
                cost=cost,
            )
            self.on_event(Event("failed", live.idx, summary))
        if cost.known:
            self._count_cost(cost)
        else:
            self._doubtful += 1  # counted at its expected cost until the service says
            await self._learn_cost(live, counted=True)

    async def _learn_cost(self, live: _Live, *, counted: bool) -> None:
        cost = await self.client.task_cost(live.task_id)
        if cost is None:
            return  # stays unpriced: shown as unknown, counted at the expected cost by budgets
        self.store.set_cost(live.idx, cost)
        if counted:
            self._doubtful = max(0, self._doubtful - 1)
        self._count_cost(cost)
        self._wake.set()

    def _count_cost(self, cost: st.Cost) -> None:
        self._spent += cost.coins or 0.0
        money = (cost.money or 0.0) + (cost.third_party_money or 0.0)
        self._spent_money += money
        self._priced += 1
        self._max_coins = max(self._max_coins, cost.coins or 0.0)
        self._max_money = max(self._max_money, money)
        self.on_event(Event("cost", detail=repr(self._spent)))

    # -- stuck tasks, outages, the run directory -----------------------------------------------

    def _timed_out(self, live: _Live) -> bool:
        return time.time() - live.submitted_at > self.settings.task_timeout_s

    async def _cancel_timed_out(self, live: _Live) -> None:
        """Past --task-timeout: cancel the task on RunningHub (its run time so far is billed),
        record the row FAILED with rhbatch's own code, then learn what it cost."""
        hours = self.settings.task_timeout_s / 3600
        try:
            await self.client.cancel(live.task_id)
            said = "cancelled on RunningHub"
        except ApiError as exc:  # already ended or gone: the next poll would have said so
            said = f"the cancel was answered {clean_text(redact(exc), 200)}"
        self._finish(live)
        self.store.mark_failed(
            live.idx, code=TASK_TIMEOUT_CODE,
            error=f"{TASK_TIMEOUT_CODE} RHBATCH_TASK_TIMEOUT: the task had not ended after "
                  f"--task-timeout {hours:g} h ({said}); raise --task-timeout if such tasks are "
                  f"expected, and `rhbatch retry DIR --code {TASK_TIMEOUT_CODE}` runs it again",
            status=st.FAILED,
        )
        self.on_event(Event("failed", live.idx, "task timeout"))
        self._doubtful += 1
        await self._learn_cost(live, counted=True)

    def _service_answered(self) -> None:
        self._ever_answered = True
        if self._outage_since is not None:
            down = time.time() - self._outage_since
            log.warning("RunningHub answers again after %.0f s", down)
            self.on_event(Event("outage", detail=f"RunningHub answers again after {down:.0f} s"))
        self._outage_since = None
        self._outage_failures = 0

    def _give_up(self, exc: BaseException) -> None:
        """The outage outlasted --give-up-after: stop submitting and polling (exit 3); the
        state is kept and the same command resumes."""
        if self._interrupted:
            return
        message = (f"{self._outage_text()}: {clean_text(redact(exc), 300)}; run the same command "
                   "again to resume")
        log.error("stopping: %s", message)
        self.stop(message, interrupt=True)

    def _outage_text(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self._outage_since or time.time()))
        if not self._ever_answered:
            return (f"RunningHub is unreachable at {self.client.base_url} (nothing answered since "
                    f"{since}); check RUNNINGHUB_BASE_URL and the network")
        return (f"RunningHub has been unreachable since {since} (--give-up-after "
                f"{self.settings.give_up_after_s:g} s)")

    def _note_outage(self, exc: BaseException, retrying: str) -> bool:
        """Count a request that could not get an answer; one line a minute while it lasts.
        True when the outage has lasted --give-up-after and the run should stop."""
        now = time.time()
        if self._outage_since is None:
            self._outage_since = now
        self._outage_failures += 1
        down = now - self._outage_since
        mono = time.monotonic()
        if mono - self._outage_reported >= self.settings.outage_report_interval_s:
            self._outage_reported = mono
            since = time.strftime("%H:%M:%S", time.localtime(self._outage_since))
            line = (f"RunningHub unreachable since {since} ({down:.0f} s, {self._outage_failures} "
                    f"failed request(s), last: {clean_text(redact(exc), 200)}); retrying "
                    f"{retrying}")
            log.warning("%s", line)
            self.on_event(Event("outage", detail=line))
        if not self._ever_answered:
            return True  # never reached in this run: a wrong URL or no network, not an outage
        limit = self.settings.give_up_after_s
        return limit is not None and down >= limit

    async def _guard_run_dir(self) -> None:
        """Stop at once (exit 3) when the run directory is deleted, replaced or not writable."""
        path = self.store.path
        try:
            first = os.stat(path).st_ino
        except OSError:
            return
        while True:
            await asyncio.sleep(RUN_DIR_CHECK_S)
            try:
                gone = os.stat(path).st_ino != first
            except OSError:
                gone = True
            if gone or not os.access(self.store.run_dir, os.W_OK):
                what = "was deleted or replaced" if gone else "is not writable any more"
                self._crash = StorageError(
                    f"The run directory {self.store.run_dir} {what} while the run was going: "
                    "rhbatch stopped at once; restore it (or make it writable) and run the same "
                    "command to resume; tasks already created are polled, never resent"
                )
                self.stop("run directory lost")
                return

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
                if isinstance(exc, TransientApiError) and self._note_outage(
                        exc, f"polls of {len(self.live)} task(s)"):
                    self._give_up(exc)
                if failures >= 3 and self._account_ok:
                    log.info("accountStatus unavailable, polling each task instead: %s",
                             redact(exc))
                    self._account_ok = False
                    for live in self.live.values():
                        self._schedule(live, self.settings.poll_interval_s)
                interval = min(interval * 2, self.settings.max_poll_interval_s)
                continue
            failures = 0
            self._service_answered()
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


def prompt_failure(data: Any) -> dict[str, Any] | None:
    """ComfyUI's validation verdict from a 433 (or a create answered ``taskStatus: FAILED``):
    ``promptTips`` decoded, each node error flattened to what the user must fix, and a one-line
    ``summary`` naming node, class, input, error type and message."""
    tips = data.get("promptTips") if isinstance(data, dict) else None
    if isinstance(tips, str):
        tips = parse_prompt_tips(tips)
    if not isinstance(tips, dict):
        return None
    errors: list[dict[str, Any]] = []
    node_errors = tips.get("node_errors")
    if isinstance(node_errors, dict):
        for node_id, entry in node_errors.items():
            if not isinstance(entry, dict):
                continue
            for error in entry.get("errors") or []:
                if not isinstance(error, dict):
                    continue
                info = error.get("extra_info")
                extra: dict[str, Any] = info if isinstance(info, dict) else {}
                errors.append({
                    "node_id": clean_text(node_id, 100),
                    "class_type": clean_text(entry.get("class_type") or "", 200),
                    "input_name": clean_text(extra.get("input_name") or "", 200),
                    "type": clean_text(error.get("type") or "", 200),
                    "message": clean_text(error.get("message") or "", 1000),
                    "details": clean_text(error.get("details") or "", 1000),
                })
    top_error = tips.get("error")
    top: dict[str, Any] = top_error if isinstance(top_error, dict) else {}
    causes = []
    for e in errors:
        where = f"node {e['node_id']}" + (f" ({e['class_type']})" if e["class_type"] else "")
        field_ = f" input {e['input_name']}" if e["input_name"] else ""
        detail = f" [{e['details']}]" if e["details"] and e["details"] not in e["message"] else ""
        causes.append(f"{where}{field_}: {e['type']}: {e['message']}{detail}")
    if not causes:
        causes.append(clean_text(top.get("message") or "ComfyUI rejected the prompt", 500))
    shown = "; ".join(causes[:3]) + (f"; and {len(causes) - 3} more" if len(causes) > 3 else "")
    first = errors[0] if errors else {}
    return {
        "exception_type": "prompt_validation_failed",
        # the first failing node, where a runtime failure names its node (the report groups by it)
        "node_id": first.get("node_id"),
        "node_name": first.get("class_type"),
        "exception_message": clean_text(shown, 1000),
        "error": {k: clean_text(top.get(k) or "", 1000) for k in ("type", "message", "details")},
        "node_errors": errors,
        "summary": clean_text(shown, 1000),
    }
