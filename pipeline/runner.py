"""The run loop: keep every paid slot busy, learn of each task's end quickly, lose nothing.

One asyncio process drives cooperating loops over the :class:`~pipeline.store.RunStore`:

- **submitter**: while the in-flight count is below the *window*, takes pending rows, commits
  each one ``SUBMITTING`` (one fsync'd commit for the rows that leave together) and sends its
  create. Several creates may be in flight at once, so the submission rate is not capped at one
  per round trip: as many as the measured round trip and the rate the slots need call for (one
  at a time on loopback and near services), never more than ``creates_in_flight`` (default: one
  per 16 slots of the window, 8 to 64, and at least 1.5 times what turning the slots over once a
  task needs at the measured round trip; at a far service the whole window, within 64, since
  tasks made together end together; 1 sends one at a time). A kill leaves at most that many
  rows in doubt. The window starts at ``--concurrency`` (or the key's stated limit). A capacity
  answer (421, 415, 814, 1520, 1003, 1010-1012) sets it to what the account holds, and the next
  create waits until the account's count shows a free slot (the count includes tasks whose
  creates are in doubt) or a task of this run ends; a growing pause is only the fallback when no
  count can be read.
- **poller**: asks ``outputs`` (or v2 ``query``) about each live task at its *expected end*:
  :class:`~pipeline.pacing.EndModel` learns from the tasks that ended when the others will (after
  a first end seen only roughly, a few tasks of each round probe inside that interval while the
  rest are asked at its top), and a task still running then is asked again after a short gap
  that grows for stragglers. Before any end is
  known, each task is asked every ``max_poll_interval_s`` (four times less often while the
  account's count is exactly ours). At a far service (a round trip of 0.5 % of a task or more)
  a task's slot goes to the next create as its check leaves, so a task and its successor do not
  sit a round trip apart.
- **account watcher**: reads ``accountStatus.currentTaskCounts``, one request for every task of
  the run. When the account holds fewer tasks than we believe are live, that many of ours have
  ended: the likeliest are polled at once and their slots handed to the submitter before the
  poll answers. Until an end is known it reads at the configured interval (a quarter of it while
  four or more tasks are live), slowed to a tenth of the oldest task's age once it has spent
  FIRST_END_READS_PER_ROW reads per row of the run (a run of many rows sees its first ends
  closely for a small share of its calls); then only as often as
  ends are expected and as the reads prove useful: when durations are regular, the expected-end
  polls find every end and the account is read rarely; when they vary, the reads find the ends
  in between. A read that would concern a single task is that task's poll instead. With
  webhooks the deliveries replace it, and the polls become rare safety checks.

Failures of one row never stall the others; a run-fatal answer (bad key, no balance) stops
submissions, finishes what can be finished, and exits with code 3 so the user can fix and resume.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import os
import random
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

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
from pipeline.pacing import (
    ACCOUNT_CALLS_PER_TASK,
    ACCOUNT_POLL_MIN_FRACTION,
    CREATE_FILL_S,
    FAR_RTT_S,
    RECHECK_FRACTION,
    EndModel,
    account_poll_interval,
    create_slots,
    default_creates_in_flight,
)
from pipeline.pool import KeyOutcome, Ledger, Pool
from pipeline.safetext import clean_text

log = logging.getLogger("rhbatch.runner")

_STOPPED_IN_FLIGHT = ("rhbatch was stopped while this row's create request was in flight; check "
                      "RunningHub's call records before resubmitting")

# Polls in flight at once: at least this many, more when the round trip and the rate of ends
# call for them (POLL_HEADROOM x Little's law), always leaving room in the client's connection
# pool for the creates in flight and the account read.
MAX_CONCURRENT_POLLS = 12
POLL_HEADROOM = 3.0
UNKNOWN_STREAK_PAUSE = 2  # creates in doubt in a row before submissions slow down
UNKNOWN_STREAK_STOP = 10  # ... and before the run stops (exit 3) to let the user look
READ_WINDOW_FRACTION = 0.5  # a task's end is looked for by account reads after this share of it
# Before any end is known the account is read every --account-poll-interval, slowed to this share
# of the oldest live task's age (a long first task costs a few reads, not one every 2 s) ...
FIRST_END_AGE_FRACTION = 0.1
FIRST_END_FAST_LIVE = 4  # ... and down to a quarter of that interval while this many are live
# A run of many rows can afford a closer watch of its first tasks: reads before the first end
# stay at that floor, not slowed by the age, while they number less than FIRST_END_READS_PER_ROW
# times the rows the run has to do (split over its keys). They cost at most that many calls per
# task, and the first generation's ends are seen within the floor's interval (0.5 s at the
# default 2 s) instead of a tenth of their age (3 s for 30 s tasks). Within the floor they are
# a tenth of that age apart, down to FIRST_END_CLOSE_FRACTION of the floor: short tasks' first
# ends are seen to a tenth of their duration (0.3 s for 3 s tasks, not 0.5 s; 0.1 s for 1 s
# tasks, where half the floor left the first generation's slots 0.42 s idle at C=50, 200 ms),
# at a few reads more in the first seconds of a run.
FIRST_END_READS_PER_ROW = 0.2
FIRST_END_CLOSE_FRACTION = 0.2
# ... and each task is asked about every max_poll_interval_s, this many times less often while the
# account count is exactly ours (the count then tells every end by itself).
SAFETY_SLOW_FACTOR = 4.0
# With webhooks the deliveries tell each end; a task is polled only as a safety check this many
# expected durations after its create (at least max_poll_interval_s later), then ever less often.
WEBHOOK_SAFETY_FACTOR = 2.0
# When a round trip is at least this share of the expected duration (and FAR_RTT_S), a task's
# slot is handed to the next create as its expected-end check leaves, not when the check
# answers: both reach the service together, and a create that comes too early is refused for
# capacity (nothing is made) and sent again at the task's real end.
HANDOVER_RTT_FRACTION = 0.005
# A create sent within this many round trips of a handover may be taking that slot before its
# task's end: its refusal for capacity teaches nothing about the key's limit.
HANDOVER_CHECK_RTTS = 1.5
# A task still running at its expected-end check moves the checks not yet sent of the others to
# a recheck after its age, by at most this many rechecks each (see _defer_first_checks).
DEFER_MAX_RECHECKS = 3
CREATE_SLOTS_REFRESH_S = 0.05  # how often that figure is worked out again
RTT_SAMPLES = 16  # the round trip is the median of this many recent polls and account reads
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
# While waiting for a free slot the account is read every expected end on the key, slowed to this
# share of the time waited so far and never slower than --account-poll-interval.
CAPACITY_WAIT_AGE_FRACTION = 0.1
# Task ids are committed without an fsync; while the submitter is idle they are flushed at most
# this often (a power cut in between only leaves a row SUBMIT_UNKNOWN, never a second create).
SYNC_INTERVAL_S = 1.0
END_MODEL_META = "end_model"




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
    capacity_wait_s: float = 0.0  # seconds submissions waited for a free slot after a refusal
    creates_in_flight_max: int = 0  # the most creates that were in flight at once
    keys: list[KeyOutcome] = field(default_factory=list)  # what each key did (several keys)


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
    t0: float  # monotonic time the task was made: the answer less half a round trip
    generation: int = 0
    suspected: bool = False  # an account read or a webhook says it ended: its slot is handed over
    polling: bool = False
    by_read: bool = False  # suspected from an account read
    first_check: float | None = None  # offset (s from t0) of its first expected-end check
    probe: bool = False  # that check was a probe of the end model's search (below its top)
    negatives: int = 0  # "still running" answers since that check
    running_at: float | None = None  # monotonic time of its last "still running" answer
    read_low: float | None = None  # monotonic time of the read before the one that suspected it
    read_high: float | None = None  # a read that found no task live on the account: ended by then
    hinted_at: float | None = None  # monotonic time a webhook said it ended
    handover: bool = False  # its slot went to the next create as its expected-end check left


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
        creates_in_flight: int | None = None,
        pool: Pool | None = None,
        key_fp: str | None = None,
        label: str = "key",
        key_limits: tuple[float | None, float | None] = (None, None),
        owns_unrecorded: bool = True,
    ):
        self.store, self.client, self.settings = store, client, settings
        self.on_event = on_event or (lambda event: None)
        # the rows and the run's budget, shared with the runners of the run's other keys;
        # retry: only the rows of submit_only are submitted (others are left for `rhbatch run`)
        self.pool = pool or Pool(store, submit_only=submit_only, max_coins=max_coins,
                                 max_money=max_money, expected_task_coins=expected_task_coins)
        # this runner's key: written with each SUBMITTING commit; its own limits (keys file)
        self.key_fp, self.label = key_fp, label
        self.key_ledger = Ledger(*key_limits, parent=self.pool.ledger, name=label)
        self.key_ledger.members.append(self)
        self._owns_unrecorded = owns_unrecorded  # rows with no key recorded are this key's
        self.outcome, self.retired = KeyOutcome(label, key_fp or ""), cast("str | None", None)
        # each create's webhookUrl carries a token of its own (see hint_finished)
        self.webhook_tokens = webhook_tokens
        # a limit learnt from capacity answers (this run or an earlier start) caps the window
        self._limit_meta = "learnt_limit" if self.pool.solo else f"learnt_limit:{key_fp}"
        self._learnt_limit: int | None = store.get_meta(self._limit_meta)
        self.window = min(settings.concurrency, self._learnt_limit or settings.concurrency)
        self._creates_at_limit = 0
        self._ceiling: int | None = None  # the key's slots as the service states them (v2)
        self.capacity_answers = 0
        self.live: dict[int, _Live] = {}
        self._held = 0  # live tasks not suspected of having ended: the slots they hold
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
        # the last count was at most ours, so it tells every end (until a read says otherwise)
        self._account_exact = True
        # when tasks end (kept with the run, so a resume starts knowing)
        self.model = EndModel.from_state(store.get_meta(END_MODEL_META))
        self._model_known_at_start = self.model.known
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)
        self._rtt_count = 0  # samples taken, and (count, median, min) as of that many
        self._rtt_cache: tuple[int, float, float] = (0, 0.0, 0.0)
        self._read_wake = asyncio.Event()
        self._read_idle = True  # the account watcher waits for a wake-up, with no timer
        self._last_read_at: float | None = None  # monotonic middle of the last account read
        self._handover_at = -math.inf  # when a slot was last handed over as its task's check left
        self._rtt_asked = False  # a first read (or poll) to measure the round trip has left
        self._quiet_read_at: float | None = None  # the last read that showed no end of ours
        self._first_end_reads = 0  # account reads (or lone-task polls) before any end was known
        # at most this many creates in flight (--creates-in-flight; 1 = one at a time; None:
        # from the window, see default_creates_in_flight)
        self._creates_setting: int | None = (creates_in_flight
                                             or getattr(settings, "creates_in_flight", None))
        self._creating = 0
        self._slots, self._slots_at = 1, -math.inf  # creates allowed in flight, and when worked out
        self._creates: set[asyncio.Task[None]] = set()
        # rows SUBMITTING whose create is in flight: their webhook token and body
        self._submitting: dict[int, tuple[str | None, dict[str, Any]]] = {}
        self._most_creating = 0
        # after a capacity answer: wait for the account's count to drop below what it held
        self._capacity_wait = False
        self._capacity_since = 0.0
        self._full_at: int | None = None
        self._refused = False  # a refusal the account has not been read since: it says the limit
        self._capacity_wait_s = 0.0
        self._polls = 0  # polls in flight
        self._poll_tasks: set[asyncio.Task[None]] = set()
        self._reconciled: dict[str, int] = {}
        self._unknown_tokens: dict[str, int] = {}
        self._reconciling: set[int] = set()
        self._reconcile_deadline: float | None = None
        self._outage_since: float | None = None  # wall clock of the first failure in a row
        self._outage_reported = 0.0  # monotonic time of the last outage line
        self._outage_failures = 0
        self._ever_answered = False  # set by the first answer of this run (or the account read)
        self._unsynced = False  # task ids committed without fsync since the last store.sync()
        self._synced_at = -math.inf
        self.pool.join(self)

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
                    self._suspect(live, True)
                    live.hinted_at = time.monotonic()
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
        self.key_ledger.doubt(-1)
        now = time.time()
        self.store.mark_reconciled(idx, task_id, st.RUNNING if result.state != "QUEUED"
                                   else st.QUEUED, "webhook", now)
        self._reconciled["webhook"] = self._reconciled.get("webhook", 0) + 1
        log.info("row %d: the unknown create is task %s (webhook, confirmed by polling)", idx,
                 clean_text(task_id, 40))
        mono = time.monotonic()
        live = _Live(idx, task_id, st.RUNNING if result.state != "QUEUED" else st.QUEUED, now,
                     mono, mono)
        self.on_event(Event("reconciled", idx, "webhook"))
        if result.state in ("QUEUED", "RUNNING"):
            self._add_live(live)
            self._schedule(live, self._first_check_delay(live))
        else:  # it has ended already: recorded at once (it never holds a slot of this run)
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
        if interrupt and self._interrupted and self._creates:
            # A second Ctrl-C: do not wait for the creates in flight; their rows become
            # SUBMIT_UNKNOWN (at most creates_in_flight of them).
            self._forced = True
            for create in list(self._creates):
                create.cancel()
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
        self.pool.start(self)
        if self.webhook_tokens:
            self._unknown_tokens = self.pool.unknown_tokens(self)
        now_wall = time.time()
        for known in self.store.active():
            if not self.owns(known.key_fp):
                continue
            # made before this invocation: its age comes from the stored create time
            t0 = now_mono - min(max(0.0, now_wall - known.submitted_at), 30 * 86400.0)
            live = _Live(known.idx, known.task_id, known.status, known.submitted_at, now_mono, t0)
            self._add_live(live)
            self._schedule(live, self._first_check_delay(live) if self.model.known else 0.0)
        submitter = asyncio.create_task(self._submitter(), name="submitter")
        self._submitter_task = submitter
        submitter.add_done_callback(lambda _: self._poll_wake.set())
        watcher = asyncio.create_task(self._account_watcher(), name="account")
        poller = asyncio.create_task(self._poller(), name="poller")
        guard = asyncio.create_task(self._guard_run_dir(), name="run-dir")
        try:
            await submitter
            await poller
            if self._poll_tasks and not self._interrupted:
                # costs being learnt and unknown creates being confirmed finish first (bounded)
                await asyncio.wait(list(self._poll_tasks),
                                   timeout=2 * self.settings.request_deadline_s)
        finally:
            pending = [*self._creates, submitter, poller, watcher, guard, *self._poll_tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._settle_submitting()
            if self.model.known and self._crash is None:
                try:
                    self.store.set_meta(**{END_MODEL_META: self.model.state()})
                except StorageError:
                    pass  # the model is a hint; the state that matters is committed
        if self._crash is not None:
            raise self._crash
        # read once for the run (several keys: by pipeline.pool.merge; each a scan of every row)
        counts = self.store.counts() if self.pool.solo else dict.fromkeys(st.STATES, 0)
        spending = self.store.spending() if self.pool.solo else None
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
            coins=spending.coins if spending else 0.0,
            requests=self.client.requests_sent,
            keys=[self._outcome()],
            spending=spending,
            reconciled=dict(self._reconciled),
            capacity_answers=self.capacity_answers,
            capacity_wait_s=self._capacity_wait_s,
            creates_in_flight_max=self._most_creating,
        )

    def _settle_submitting(self) -> None:
        """Rows whose create was cancelled before it could say so (a second Ctrl-C, a crash):
        the request may have left, so each is SUBMIT_UNKNOWN, never resent by itself."""
        for idx, (token, _) in list(self._submitting.items()):
            try:
                self.store.mark_unknown(idx, _STOPPED_IN_FLIGHT)
            except StorageError:
                return  # left SUBMITTING: the next open makes it SUBMIT_UNKNOWN (recover)
            self._submitting.pop(idx, None)
            self._remember_unknown(idx, token)

    # -- submitter --------------------------------------------------------------------------

    def _in_flight(self) -> int:
        """Slots this run holds: live tasks not believed ended, and creates in flight."""
        return self._held + self._creating

    def _add_live(self, live: _Live) -> None:
        self.live[live.idx] = live
        self._held += not live.suspected

    def _suspect(self, live: _Live, ended: bool) -> None:
        """Believe ``live`` ended (its slot goes to the next create) or, again, running."""
        if live.suspected != ended:
            live.suspected = ended
            self._held += -1 if ended else 1

    def owns(self, key_fp: str | None) -> bool:
        """Whether a task created with ``key_fp`` is this runner's to follow."""
        if self.pool.solo:
            return True
        return key_fp == self.key_fp or (key_fp is None and self._owns_unrecorded)

    def _outcome(self) -> KeyOutcome:
        out = self.outcome
        out.capacity_answers, out.capacity_wait_s = self.capacity_answers, self._capacity_wait_s
        out.window, out.retired = self.window, self.retired
        return out

    def _next_pending(self) -> Any | None:
        return self.pool.rows.next()

    def _push_back(self, row: Any) -> None:
        self.pool.rows.give_back(row)

    def _looked_at(self, sent: float, answered: float) -> float:
        """When the service handled a request sent at ``sent`` and answered at ``answered``:
        half the fastest recent round trip after it left. Not the middle of this exchange: an
        answer this loop was slow to read would look handled later than it was."""
        floor = self._rtt_floor_s()
        took = answered - sent
        return sent + (took if floor is None else min(floor, took)) / 2

    def _made_at(self, sent: float, answered: float) -> float:
        """When the service made the task of a create sent at ``sent`` and answered at
        ``answered``: half the fastest recent round trip before the answer."""
        floor = self._rtt_floor_s()
        took = answered - sent
        return answered - (took if floor is None else min(floor, took)) / 2

    def _rtt_s(self) -> float | None:
        """The network round trip: the median of recent polls and account reads (creates are
        left out: a create can be slow at the service, which more creates in flight would not
        help)."""
        if not self._rtts:
            return None
        if self._rtt_cache[0] != self._rtt_count:
            self._rtt_cache = (self._rtt_count, statistics.median(self._rtts), min(self._rtts))
        return self._rtt_cache[1]

    def _rtt_floor_s(self) -> float | None:
        """The fastest recent round trip: the network's, not this machine's load."""
        return self._rtt_cache[2] if self._rtt_s() is not None else None

    def _rtt_sample(self, seconds: float) -> None:
        self._rtts.append(seconds)
        self._rtt_count += 1

    def observe_round_trip(self, seconds: float) -> None:
        """A read answered before the loop started (v2 queue/status, on the connection the
        account check opened): its round trip sizes the first creates in flight, so a far
        service's slots fill from the first pass instead of after one create went alone (v1
        keys, whose limit is learnt from a capacity answer, still send their first create
        alone)."""
        if seconds > 0:
            self._rtt_sample(seconds)
            self._rtt_asked = True

    @property
    def create_bound(self) -> int:
        """The most creates in flight at once, so the most rows a kill can leave in doubt."""
        if self._creates_setting:
            return max(1, self._creates_setting)
        return default_creates_in_flight(self.window, self._rtt_floor_s(), self.model.tau)

    @create_bound.setter
    def create_bound(self, value: int) -> None:
        self._creates_setting = value

    def _create_slots(self) -> int:
        if self._unknown_streak:  # creates in doubt: one at a time until one is answered
            return 1
        now = time.monotonic()
        if now - self._slots_at < CREATE_SLOTS_REFRESH_S:
            return self._slots
        self._slots_at = now
        held = self._held
        rtt = self._rtt_floor_s()
        tau = self.model.tau
        soon = 0
        if (tau is not None and rtt is not None and rtt >= HANDOVER_RTT_FRACTION * tau
                and rtt >= FAR_RTT_S):
            # ends come in waves (the tasks of a wave were created together)
            horizon = now + CREATE_FILL_S - tau
            soon = sum(1 for t in self.live.values() if not t.suspected and t.t0 <= horizon)
        self._slots = create_slots(self.create_bound, rtt, to_fill=self.window - held,
                                   window=self.window, task_s=tau, ending_soon=soon)
        return self._slots

    async def _submitter(self) -> None:
        while not self._stop_submitting:
            # cleared before looking, so a wake-up while this pass awaits is never lost
            self._wake.clear()
            wait = self._backoff_until - time.monotonic()
            if wait > 0:
                await self._sleep_or_wake(wait)
                continue
            if self._capacity_wait:  # the account is full: a read or an end of ours says when
                await self._sleep_or_wake(None)
                continue
            if self._in_flight() >= self.window or self._creating >= self._create_slots():
                # idle: make the task ids just recorded durable, at most every SYNC_INTERVAL_S
                # (the next create's fsync'd commit carries them to the disk anyway)
                due = self._synced_at + SYNC_INTERVAL_S - time.monotonic()
                if self._unsynced and not self._creating and due <= 0:
                    await self._sync()
                await self._sleep_or_wake(due if self._unsynced and due > 0 else None)
                continue
            budget, ledger = self._budget()
            if budget == "wait":  # tasks in flight will tell what the next one may cost
                await self._sleep_or_wake(None)
                continue
            if budget == "stop":
                if ledger is self.key_ledger and self.pool.keys_creating(self) > 0:
                    self._retire(ledger.message())  # this key's own budget: the others go on
                else:
                    self.pool.stop(ledger.message(), interrupt=False)
                break
            rows = self._take_rows()
            if not rows:
                if not self.pool.creating:  # (a key's refused create gives its row back)
                    break
                await self._sleep_or_wake(None)  # a refused create may give its row back
                continue
            self._send_creates(rows)
        while self._creates:  # the creates in flight are awaited (a second Ctrl-C cancels them)
            await asyncio.wait(list(self._creates))
        self._poll_wake.set()
        await self._sync()

    def _take_rows(self) -> list[Any]:
        """The rows that leave now: as many as free slots and create slots allow, each admitted
        by the budget with the ones before it counted as in flight."""
        room = min(self.window - self._in_flight(), self._create_slots() - self._creating)
        rows: list[Any] = []
        while len(rows) < room:
            if rows and self._budget()[0] != "ok":
                break
            row = self._next_pending()
            if row is None:
                break
            rows.append(row)
            self._creating += 1  # counted at once: the budget and the window see it
        return rows

    def _prepare(self, row: Any) -> tuple[str | None, dict[str, Any]]:
        """The webhook token of this attempt (when webhooks are on) and the create's body."""
        options = {**self.settings.task_options, **json.loads(row["options"])}
        token = None
        if self.webhook_tokens and options.get("webhookUrl"):
            # this attempt's own token: a delivery to it names the task this create made
            token = f"{row['idx']}-{row['attempts'] + 1}-{secrets.token_hex(6)}"
            options["webhookUrl"] = f"{options['webhookUrl']}/{token}"
        return token, build_payload(row["workflow_id"], json.loads(row["node_info_list"]), options)

    def _send_creates(self, rows: list[Any]) -> None:
        """Commit every row SUBMITTING (one fsync'd commit for the lot), then send their creates."""
        prepared = [(row, *self._prepare(row)) for row in rows]
        try:
            if len(prepared) == 1:
                self.store.mark_submitting(rows[0]["idx"], prepared[0][1], self.key_fp)
            else:
                with self.store.transaction():
                    for row, token, _ in prepared:
                        self.store.mark_submitting(row["idx"], token, self.key_fp)
        except BaseException:
            self._creating -= len(rows)
            raise
        self._most_creating = max(self._most_creating, self._creating)
        loop = asyncio.get_running_loop()
        for row, token, body in prepared:
            self._submitting[row["idx"]] = (token, body)
            task = loop.create_task(self._submit(row))
            self._creates.add(task)
            task.add_done_callback(self._create_done)

    def _create_done(self, task: asyncio.Task[None]) -> None:
        self._creates.discard(task)
        self._creating -= 1
        self._wake.set()
        if not self.pool.creating:  # a key waiting for a given-back row may end now
            self.pool.rows.wake_all()
        if not task.cancelled() and task.exception() is not None:
            self._crash = self._crash or task.exception()
            self.stop(f"internal error: {task.exception()}")

    async def _sync(self) -> None:
        if self._unsynced:
            self._unsynced = False
            self._synced_at = time.monotonic()
            await asyncio.to_thread(self.store.sync)

    def _budget(self) -> tuple[str, Ledger]:
        """"ok" to submit, "wait" for tasks in flight, or "stop", with the limit that says so: the
        run's (--max-coins, --max-money, over every key) or this key's own (the keys file). See
        :meth:`pipeline.pool.Ledger.verdict`."""
        worst = ("ok", self.pool.ledger)
        for ledger in (self.pool.ledger, self.key_ledger):
            if ledger.limited:
                verdict = ledger.verdict()
                if verdict == "stop" or (verdict == "wait" and worst[0] == "ok"):
                    worst = (verdict, ledger)
        return worst

    async def _sleep_or_wake(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _submit(self, row: Any) -> None:
        """Send one row's create and record what its answer means. A row that left with others
        is SUBMITTING already (_send_creates); alone, it is made so here first."""
        idx = row["idx"]
        prepared = self._submitting.get(idx)
        if prepared is None:
            token, body = self._prepare(row)
            self.store.mark_submitting(idx, token, self.key_fp)
            self._submitting[idx] = (token, body)
        else:
            token, body = prepared
        sent = time.monotonic()
        # sent while a handed-over slot's check may still be out: it may reach the service before
        # that task's end (see HANDOVER_RTT_FRACTION)
        early = sent - self._handover_at <= HANDOVER_CHECK_RTTS * (self._rtt_s() or 0.0)
        try:
            try:
                answer = await self.client.create(body)
            finally:
                self._submitting.pop(idx, None)  # its outcome is recorded below, whatever it is
        except asyncio.CancelledError:
            self.store.mark_unknown(idx, _STOPPED_IN_FLIGHT)
            self._remember_unknown(idx, token)
            raise
        except CapacityError as exc:
            self.store.revert_pending(idx)
            self._push_back(row)
            self._on_capacity(exc, early=early)
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
        answered = time.monotonic()
        self._service_answered()
        self._capacity_strikes = 0
        self._unknown_streak = 0
        status = st.RUNNING if answer.status == "RUNNING" else st.QUEUED
        self.store.mark_submitted(idx, answer.task_id, status, now)
        self._unsynced = True
        # the task was made while the request was at the service
        live = _Live(idx, answer.task_id, status, now, answered, self._made_at(sent, answered))
        if answer.status == "FAILED":
            # ComfyUI rejected the prompt but a task exists: record why, then learn its cost
            reason = prompt_failure({"promptTips": answer.prompt_tips})
            summary = reason["summary"] if reason else "prompt rejected"
            self.store.mark_failed(idx, code=433, error=f"433 VALIDATE_PROMPT_FAILED: {summary}",
                                   failed_reason=reason)
            self.on_event(Event("failed", idx, summary))
            self.outcome.created += 1
            self.key_ledger.doubt()  # until its cost is known
            self._spawn(self._learn_cost(live, counted=True))
            return
        self._add_live(live)
        self._schedule(live, self._first_check_delay(live))
        self._after_create_ok()
        self.outcome.created += 1
        self.on_event(Event("submitted", idx))
        if self._read_idle or (self.model.tau is None
                               and len(self.live) == FIRST_END_FAST_LIVE):
            # the account watcher plans its next read with this task (before any end is known
            # it reads four times as often from FIRST_END_FAST_LIVE live tasks on: a read
            # planned for the first task alone would come a whole interval later)
            self._read_wake.set()

    def _remember_unknown(self, idx: int, token: str | None) -> None:
        self.key_ledger.doubt()
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
            self._backoff_until = time.monotonic() + self._unknown_pause_s()

    def _unknown_pause_s(self) -> float:
        """The pause after UNKNOWN_STREAK_PAUSE or more creates in doubt in a row: a typical task
        duration (the time the account needs to show what those creates made; the account poll
        interval while none is known), doubling with each further one, within
        --max-capacity-backoff. Scattered faults cost a short pause; an outage slows the run down
        before UNKNOWN_STREAK_STOP stops it."""
        base = self.model.tau if self.model.known else self.settings.account_poll_interval_s
        assert base is not None
        wait = min(self.settings.max_capacity_backoff_s,
                   base * 2 ** (self._unknown_streak - UNKNOWN_STREAK_PAUSE))
        return wait * random.uniform(0.5, 1.0)

    def _on_capacity(self, exc: CapacityError, *, early: bool = False) -> None:
        """A create was refused for capacity: nothing was made, and the row waits for a slot.

        While the account's count can be read, the next create waits until the count shows a
        free slot, or a task of this run ends: the count includes tasks whose creates are in
        doubt and other clients' tasks, which hold slots this run cannot see. The count read
        just after the refusal is what the key holds: the window and the learnt limit (kept with
        the run). Without a count, the old way: the first refusal while tasks of ours are live
        learns the limit from them and waits for one to end; any other backs off for a growing
        pause.

        A create sent ``early`` (just after a slot was handed over as its task's check left) and
        refused says only that the task had not ended when the create arrived: nothing is learnt
        and nothing waits for the count. (Measured: when the check's "still running" came back
        before the refusal, the count read next was taken as what the key holds while the tasks
        handed over were ending, and a 50-slot key kept a window of 47 for the rest of the run,
        one in ~3 runs at 200 ms; a 1,000-slot run lost 13 points of busy slots.)"""
        self.capacity_answers += 1
        self.on_event(Event("capacity", detail=f"{exc.code} {code_name(exc.code or 0)}"))
        handed = [t for t in self.live.values() if t.handover and t.polling]
        if handed:
            # a slot handed over as a task's check left: that task has not ended yet. It holds
            # its slot again; its checks free it when it ends.
            for live in handed:
                self._suspect(live, False)
                live.handover = False
            log.debug("capacity (%s) while %d handed-over slot(s) were being checked", exc.code,
                      len(handed))
            return
        if early:  # that check has answered: "still running" holds the slot, an end freed it
            log.debug("capacity (%s) for a create sent as a slot was handed over: its task had "
                      "not ended yet", exc.code)
            return
        self._capacity_strikes += 1
        if self._account_ok:
            if not self._capacity_wait:
                self._capacity_wait = self._refused = True
                self._capacity_since = time.monotonic()
                self._full_at = None
                self._read_wake.set()  # read the count now
            log.info("capacity (%s): window %d, next submission when the account shows a free "
                     "slot", exc.code, self.window)
            return
        held = self._held
        if held >= 1 and self._capacity_strikes == 1:
            self._set_learnt_limit(held)
            self.window = held
            wait = 0.0
        else:
            self.window = max(1, held)
            base = self.settings.capacity_backoff_s * 2 ** min(self._capacity_strikes - 1, 5)
            wait = min(self.settings.max_capacity_backoff_s, base) * random.uniform(0.5, 1.0)
            self._backoff_until = time.monotonic() + wait
            self._capacity_wait_s += wait
        log.info("capacity (%s): window %d, next submission %s", exc.code, self.window,
                 f"in {wait:.1f}s" if wait else "when a task of this run ends")

    def _capacity_count(self, count: int) -> None:
        """An account read while waiting for a free slot."""
        self._refused = False
        if self._full_at is None:  # the first read after the refusal: the key is full at this
            # (or at what our own live tasks hold, if some ended unseen); creates in flight at
            # this moment are not on the account yet, or are the ones being refused
            limit = max(1, self._held, count)
            self._full_at = limit
            top = self._top()
            self._set_learnt_limit(min(limit, top))
            self.window = min(limit, top)
            return
        if count < self._full_at:
            self._end_capacity_wait("the account shows a free slot")

    def _end_capacity_wait(self, why: str) -> None:
        if self._capacity_wait:
            self._capacity_wait = False
            waited = time.monotonic() - self._capacity_since
            self._capacity_wait_s += waited
            log.debug("capacity wait over after %.2fs: %s", waited, why)
            self._wake.set()

    def _top(self) -> int:
        top = self._ceiling if self._ceiling is not None else self.settings.concurrency
        if self.settings.concurrency_given:
            top = min(top, self.settings.concurrency)
        return top

    def _set_learnt_limit(self, limit: int) -> None:
        if limit != self._learnt_limit:
            self._learnt_limit = limit
            self.store.set_meta(**{self._limit_meta: limit})
            log.info("the key holds %d task(s) at a time: the window stays there (probing one "
                     "higher every %d creates)", limit, LIMIT_PROBE_EVERY)

    def _after_create_ok(self) -> None:
        """Grow the window back towards --concurrency: one slot at a time while the key's limit
        is unknown; above a learnt limit only as a rare probe, which, if accepted, raises it."""
        top = self._top()
        if self.window >= top:
            return
        held = self._held  # tasks the service accepted (creates in flight are not proof)
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
        if not self.pool.solo:
            self._retire(message)
            if self.pool.keys_creating(self):
                return  # the other keys take its rows
            message = f"no key is left to create with (the last, {self.label}: {message})"
        log.error("stopping: %s", message)
        if not self._stopped:
            self._stopped = message
        self._exit_code = 3
        self._stop_submitting = True
        self.on_event(Event("stopping", detail=message))
        self._poll_wake.set()

    def _retire(self, why: str) -> None:
        """This key creates no more in this run (several keys): the rows it never sent go to the
        others; its live tasks are still followed with it while its polls are answered."""
        if self.retired is None:
            # the advice names the key of the pool, not the one-key variable
            why = why.replace("RUNNINGHUB_API_KEY", f"key {self.label} (and its line in the keys)")
            self.retired = why
            log.error("key %s retired for the rest of the run: %s", self.label, why)
            self.on_event(Event("retired", detail=f"key {self.label}: {why}"))
        self._stop_submitting = True
        self._wake.set()
        self._poll_wake.set()
        self.pool.rows.wake_all()

    # -- polling ----------------------------------------------------------------------------

    def _first_check_delay(self, live: _Live) -> float:
        """Seconds from now to the first poll of a live task.

        At its expected end when one is known (the request leaving half a round trip early, so
        it reaches the service then); until then every max_poll_interval_s (SAFETY_SLOW_FACTOR
        times less often while the account's count is exactly ours and tells every end), or
        every poll_interval_s when the account cannot be read. With webhooks, a rare safety poll.
        """
        now = time.monotonic()
        tau = self.model.tau
        if self.webhook_tokens:
            after = (max(WEBHOOK_SAFETY_FACTOR * tau, tau + self.settings.max_poll_interval_s)
                     if tau is not None else self.settings.max_poll_interval_s)
            return max(0.0, live.t0 + after - now)
        if tau is not None:
            live.first_check = self.model.first_check(self.window)
            live.probe = live.first_check < tau
            live.negatives = 0
            return max(0.0, self._check_leaves_at(live, live.first_check) - now)
        if not self._account_ok:
            return self.settings.poll_interval_s
        slow = SAFETY_SLOW_FACTOR if self._account_exact else 1.0
        return self.settings.max_poll_interval_s * slow

    def _recheck_delay(self, live: _Live) -> float:
        """Seconds before asking again a task that said "still running" (at ``running_at``)."""
        cap = self.settings.max_poll_interval_s
        if self.webhook_tokens:
            return cap * min(2 ** max(0, live.negatives - 1), SAFETY_SLOW_FACTOR)
        tau = self.model.tau
        if tau is not None and live.first_check is not None:
            at = live.running_at if live.running_at is not None else time.monotonic()
            # no round trip in the floor: the answer that says "not yet" has already taken one
            return self.model.recheck_s(at - live.t0 - live.first_check, cap_s=cap,
                                        age_s=at - live.t0)
        if not self._account_ok:
            return self.settings.poll_interval_s * random.uniform(0.8, 1.0)
        slow = SAFETY_SLOW_FACTOR if self._account_exact else 1.0
        return cap * slow * random.uniform(0.8, 1.0)

    def _defer_first_checks(self, late: _Live, age_s: float) -> None:
        """``late`` was still running ``age_s`` after its create, at its expected-end check:
        the tasks of its generation whose checks have not left yet are likely to be running
        at theirs too (the model learns the later end only when that task ends, a recheck
        from now). Their checks move to a recheck after that age, by at most
        DEFER_MAX_RECHECKS rechecks each, so a regular duration that the guess slipped under
        costs one "not yet" instead of one per task still to be checked."""
        tau = self.model.tau
        if tau is None:
            return
        gap = RECHECK_FRACTION * tau
        until = age_s + gap
        for other, due in self._unsent_first_checks():
            if other is not late and due < until:
                self._move_first_check(other, min(until, due + DEFER_MAX_RECHECKS * gap))

    def _unsent_first_checks(self) -> list[tuple[_Live, float]]:
        """The live tasks whose expected-end check (not a search's probe) has not left yet,
        with its offset."""
        return [(t, t.first_check) for t in self.live.values()
                if t.first_check is not None and not (
                    t.polling or t.suspected or t.by_read or t.negatives or t.probe
                    or t.running_at is not None)]

    def _move_first_check(self, live: _Live, first_check: float) -> None:
        live.first_check = first_check
        self._schedule(live, max(0.0, self._check_leaves_at(live, first_check) - time.monotonic()))

    def _check_leaves_at(self, live: _Live, offset: float) -> float:
        """When a check that should reach the service ``offset`` s after ``live``'s create
        leaves (monotonic): half a round trip before."""
        return live.t0 + offset - (self._rtt_s() or 0.0) / 2

    def _replan(self) -> None:
        """The first end is known: every live task is asked at its own expected end instead."""
        for live in self.live.values():
            if not live.suspected and not live.polling and live.first_check is None:
                self._schedule(live, self._first_check_delay(live))
        self._read_wake.set()

    def _poll_limit(self) -> int:
        """Polls allowed in flight: enough for the expected ends at the measured round trip,
        and all the pool can spare while checks fall due faster than that (a wave of ends)."""
        need = MAX_CONCURRENT_POLLS
        rtt, tau = self._rtt_s(), self.model.tau
        pool = getattr(self.client, "max_connections", MAX_CONCURRENT_POLLS + 4)
        # room kept for the creates in flight and the account read: a request that waits for
        # a pooled connection would look handled later than it was
        spare = pool - min(self.create_bound, max(4, pool // 3)) - 1
        if rtt and tau:
            need = max(need, int(max(1, len(self.live)) / tau * rtt * POLL_HEADROOM) + 1)
            if rtt >= FAR_RTT_S:
                # a far service: a wave of tasks made together is checked together (their
                # slots are handed over as the checks leave)
                need = max(need, self.window)
                if self._heap and self._heap[0].at < time.monotonic() - rtt:
                    need = spare  # checks overdue by a round trip: a backlog to clear
        return max(1, min(need, spare))

    def _schedule(self, live: _Live, delay: float) -> None:
        live.generation += 1
        heapq.heappush(self._heap, _Poll(time.monotonic() + delay, live.idx, live.generation))
        self._poll_wake.set()

    async def _poller(self) -> None:
        while True:
            # the submitter ends after its last create answered: until then a task may join
            if (not self.live and self._submitter_task is not None and self._submitter_task.done()
                    and not self._awaiting_webhooks()):
                return
            if self._interrupted:
                return
            now = time.monotonic()
            limit = self._poll_limit()
            while self._heap and self._heap[0].at <= now and self._polls < limit:
                item = heapq.heappop(self._heap)
                live = self.live.get(item.idx)
                if live is None or live.generation != item.generation or live.polling:
                    continue
                live.polling = True
                self._polls += 1
                task = asyncio.create_task(self._poll_one(live))
                self._poll_tasks.add(task)
                task.add_done_callback(self._poll_done)
            timeout = (self._heap[0].at - time.monotonic()) if self._heap else 1.0
            if self._polls >= limit:
                timeout = 1.0  # a poll that ends wakes this loop
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
            wait = min(RECONCILE_WAIT_MAX_S, max(RECONCILE_WAIT_MIN_S, 3 * (self.model.tau or 0)))
            self._reconcile_deadline = now + wait
            log.info("waiting up to %.0fs for the webhooks of %d create(s) that ended in doubt",
                     wait, len(self._unknown_tokens))
            self.on_event(Event("reconciling", detail=f"{len(self._unknown_tokens)} unknown "
                                f"create(s), up to {wait:.0f}s"))
        return now < self._reconcile_deadline

    def _submitter_done(self) -> bool:
        # no row left to take, and none of this key's creates in flight (with several keys the
        # rows run out while a create of this key may still be on its way to a live task)
        return self.pool.rows.empty and not self._creating

    def _hand_over(self, live: _Live, now: float) -> None:
        """At a far service, free the slot of a task as its expected-end check leaves (see
        HANDOVER_RTT_FRACTION): only for the check itself (not a search's probe), durations
        that are regular, and while rows wait."""
        tau, rtt = self.model.tau, self._rtt_s()
        if (tau is None or rtt is None or rtt < max(HANDOVER_RTT_FRACTION * tau, FAR_RTT_S)
                or self.webhook_tokens
                or live.suspected or live.by_read or live.negatives or live.first_check is None
                or now - live.t0 < live.first_check - rtt or self.model.read_share() >= 1.0
                or self.model.searching and live.first_check < tau  # a probe: maybe early
                or self._submitter_done() or self._stop_submitting):
            return
        self._suspect(live, True)
        live.handover = True
        self._handover_at = now
        self._wake.set()

    async def _poll_one(self, live: _Live) -> None:
        sent = time.monotonic()
        self._hand_over(live, sent)
        try:
            result = await self.client.poll(live.task_id)
        except RunFatalError as exc:
            live.polling = False
            self._run_fatal(exc)
            self._forget(live)
            return
        except TaskGoneError as exc:
            self._forget(live)
            self.store.mark_failed(
                live.idx,
                code=exc.code,
                error=f"{redact(exc)}: the task record is gone; `rhbatch retry` can run it again",
            )
            self.on_event(Event("failed", live.idx, "task gone"))
            return
        except ApiError as exc:
            live.polling = False
            if live.handover:  # nothing is known: it holds its slot until a check says
                self._suspect(live, False)
                live.handover = False
            if isinstance(exc, TransientApiError):
                if self._note_outage(exc, f"polls of {len(self.live)} task(s)"):
                    self._give_up(exc)
            else:
                log.warning("poll of task %s failed, will ask again: %s",
                            clean_text(live.task_id, 60), clean_text(redact(exc), 500))
            self._schedule(live, self.settings.poll_interval_s)
            return
        finally:
            self._polls -= 1
            self._poll_wake.set()
        answered = time.monotonic()
        self._rtt_sample(answered - sent)
        at = self._looked_at(sent, answered)
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
            # asked on a read's (or a webhook's) word, not at its expected end
            guessed = (live.suspected and not live.handover) or live.by_read
            if live.suspected:  # a wrong guess: it holds its slot again
                self._suspect(live, False)
                live.handover = False
                live.hinted_at = None
            live.by_read = False
            live.running_at = at
            self.model.not_yet(at - live.t0)
            if guessed and live.first_check is not None and live.negatives == 0:
                due = self._check_leaves_at(live, live.first_check)
                if due > time.monotonic():  # asked before its expected end: that check stands
                    self._schedule(live, due - time.monotonic())
                    return
            if (live.first_check is not None and live.negatives == 0 and not guessed
                    and not live.probe and not self.model.searching):
                self._defer_first_checks(live, at - live.t0)
            if live.first_check is not None:
                live.negatives += 1
            self._schedule(live, self._recheck_delay(live))
            return
        self._finish(live, at)
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
            self.key_ledger.doubt()  # counted at its expected cost until the service says
            await self._learn_cost(live, counted=True)

    async def _learn_cost(self, live: _Live, *, counted: bool) -> None:
        cost = await self.client.task_cost(live.task_id)
        if cost is None:
            return  # stays unpriced: shown as unknown, counted at the expected cost by budgets
        self.store.set_cost(live.idx, cost)
        if counted:
            self.key_ledger.doubt(-1)
        self._count_cost(cost)
        self._wake.set()

    def _count_cost(self, cost: st.Cost) -> None:
        money = (cost.money or 0.0) + (cost.third_party_money or 0.0)
        self.key_ledger.count_cost(cost.coins or 0.0, money)
        self.on_event(Event("cost", detail=repr(self.pool.ledger.spent)))

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
        self._forget(live)
        self.store.mark_failed(
            live.idx, code=TASK_TIMEOUT_CODE,
            error=f"{TASK_TIMEOUT_CODE} RHBATCH_TASK_TIMEOUT: the task had not ended after "
                  f"--task-timeout {hours:g} h ({said}); raise --task-timeout if such tasks are "
                  f"expected, and `rhbatch retry DIR --code {TASK_TIMEOUT_CODE}` runs it again",
            status=st.FAILED,
        )
        self.on_event(Event("failed", live.idx, "task timeout"))
        self.key_ledger.doubt()
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

    def _finish(self, live: _Live, at: float | None = None) -> None:
        """A task ended (seen at monotonic ``at``): learn when, and free its slot."""
        at = time.monotonic() if at is None else at
        if live.hinted_at is not None:  # a webhook said when: the end itself, nearly
            ended = live.hinted_at - live.t0
            late = self.model.tau is not None and ended > self.model.tau
            running = None
        else:
            ended = at - live.t0
            if live.read_high is not None:  # ended by a read that found the account idle
                ended = min(ended, live.read_high - live.t0)
            running = None if live.running_at is None else live.running_at - live.t0
            quiet = live.read_low if live.by_read else self._quiet_read_at
            if quiet is not None and quiet > live.t0 and (running is None
                                                          or quiet - live.t0 > running):
                running = quiet - live.t0  # a read after that showed no end of ours, about
            late = live.negatives > 0
        known, top = self.model.known, self.model.tau if self.model.searching else None
        # a generation is the slots' worth of tasks (not the few left at the run's end)
        self.model.learn(max(0.0, ended), running_at=running, late=late, by_read=live.by_read,
                         first_check=live.first_check, live=max(self.window, len(self.live)),
                         probe=live.probe)
        self._forget(live)
        if not known and self.model.known:
            self._replan()
        elif top is not None and self.model.tau is not None and self.model.tau < top:
            self._advance_first_checks(top)

    def _advance_first_checks(self, top: float) -> None:
        """The search's top (where every task has ended) came down from ``top``: the checks
        not yet sent that were due there are due at the new top instead (the tasks made
        during the first ends would otherwise all be asked where the first end was seen)."""
        tau = self.model.tau
        assert tau is not None
        for other, due in self._unsent_first_checks():
            if tau < due <= top:
                self._move_first_check(other, tau)

    def _forget(self, live: _Live) -> None:
        if self.live.pop(live.idx, None) is not None and not live.suspected:
            self._held -= 1
        live.generation += 1
        self._end_capacity_wait("a task of this run ended")
        self._wake.set()
        self._poll_wake.set()

    # -- the shared account signal ------------------------------------------------------------

    def _next_read_at(self, now: float) -> float | None:
        """When the next accountStatus read is worth its call (monotonic); None: not now."""
        base = self.settings.account_poll_interval_s
        last = self._last_read_at if self._last_read_at is not None else now
        if self._refused and self._full_at is None:
            return now  # what the key holds, at once
        if self._capacity_wait:
            if self._full_at is None:
                return now  # what the key holds, at once
            tau = self.model.tau
            ends = (tau / (2 * self._full_at) if tau is not None
                    else base * ACCOUNT_POLL_MIN_FRACTION)
            waited = now - self._capacity_since
            return last + min(base, max(ends, CAPACITY_WAIT_AGE_FRACTION * waited,
                                        2 * (self._rtt_s() or 0.0)))
        live = [t for t in self.live.values() if not t.suspected]
        if not live:
            return None
        if not self._rtts and not self._rtt_asked:
            return now  # one read measures the round trip (it sizes the creates in flight)
        if self.webhook_tokens:
            return None  # the deliveries tell each end
        tau = self.model.tau
        if tau is None:
            oldest = min(t.t0 for t in live)
            # many tasks share each read: down to a quarter of the interval, as when they end
            floor = (base * ACCOUNT_POLL_MIN_FRACTION if len(live) >= FIRST_END_FAST_LIVE
                     else base)
            if self._first_end_reads < self._first_end_budget():
                # a run of many rows: the first ends seen closely, the floor apart at the
                # service (``last`` is when the last read was handled, half a trip after it left)
                # or a tenth of the oldest task's age, if less (within FIRST_END_CLOSE_FRACTION)
                if len(live) >= FIRST_END_FAST_LIVE:
                    floor = min(floor, max(FIRST_END_CLOSE_FRACTION * floor,
                                           FIRST_END_AGE_FRACTION * (now - oldest)))
                return last + floor - (self._rtt_floor_s() or 0.0) / 2
            return last + max(floor, FIRST_END_AGE_FRACTION * (now - oldest))
        opens = [t.t0 + READ_WINDOW_FRACTION * tau for t in live]
        open_now = sum(1 for at in opens if at <= now)
        if not open_now:
            return min(opens)
        return last + account_poll_interval(
            base, tau, open_now, ACCOUNT_CALLS_PER_TASK * self.model.read_share(),
            slowest_s=math.inf)

    def _first_end_budget(self) -> float:
        """How many reads this key may spend closely before its first end: a share of the rows
        the run has to do, split over its keys."""
        return FIRST_END_READS_PER_ROW * self.pool.planned / max(1, self.pool.size)

    def _lone_task(self, now: float) -> _Live | None:
        """The one live task whose end a read would look for, when there is only one (not
        while waiting for a free slot: that wait needs the count itself)."""
        if self._capacity_wait:
            return None
        live = [t for t in self.live.values() if not t.suspected]
        if len(live) != 1 and self.model.known:
            tau = self.model.tau
            assert tau is not None
            live = [t for t in live if now - t.t0 >= READ_WINDOW_FRACTION * tau]
        if len(live) != 1 or live[0].polling:
            return None
        return live[0]

    async def _account_watcher(self) -> None:
        base = self.settings.account_poll_interval_s
        failures = 0
        retry_at = 0.0
        self._last_read_at = time.monotonic()
        while True:
            now = time.monotonic()
            due = self._next_read_at(now)
            if due is None or max(due, retry_at) > now:
                self._read_wake.clear()
                self._read_idle = due is None
                timeout = None if due is None else max(due, retry_at) - now
                try:
                    await asyncio.wait_for(self._read_wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            self._rtt_asked = True
            if not self.model.known:
                self._first_end_reads += 1
            lone = self._lone_task(now)
            if lone is not None:  # a read for one task costs what its own poll costs: poll it
                lone.by_read = True
                self._last_read_at = now
                self._schedule(lone, 0.0)
                await asyncio.sleep(0)
                continue
            before = list(self.live.values())
            sent = time.monotonic()
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
                        if not live.polling:
                            self._schedule(live, self.settings.poll_interval_s)
                if self._capacity_wait:  # no count to wait on: the growing pause instead
                    self._end_capacity_wait("the account count is not available")
                    pause = self.settings.capacity_backoff_s * 2 ** min(self._capacity_strikes - 1, 5)
                    wait = min(self.settings.max_capacity_backoff_s, pause) * random.uniform(0.5, 1)
                    self._backoff_until = time.monotonic() + wait
                    self._capacity_wait_s += wait
                retry_at = time.monotonic() + min(base * 2 ** failures,
                                                  self.settings.max_poll_interval_s)
                continue
            answered = time.monotonic()
            self._rtt_sample(answered - sent)
            previous = self._last_read_at
            self._last_read_at = self._looked_at(sent, answered)
            failures = 0
            retry_at = 0.0
            self._service_answered()
            self._account_ok = True
            count = status.current_task_counts
            self._on_account_count(count, before, sent, previous)
            if self._capacity_wait or self._full_at is None and self._refused:
                self._capacity_count(count)

    def _on_account_count(self, count: int, before: list[_Live], asked_at: float,
                          previous: float | None = None) -> None:
        """``count`` tasks are live on the account; ``before`` were ours when we asked (at
        ``asked_at``; the read before was at ``previous``)."""
        ours = [t for t in before if t.idx in self.live and t.seen_at <= asked_at]
        self._account_exact = count <= len(ours)
        # a task seen running after we asked cannot be one that had ended
        could_have_ended = [t for t in ours if t.running_at is None or t.running_at < asked_at]
        if count == 0:
            # nothing live on the account: every task of ours made before the read had ended
            # by the time it was handled (a bound the confirming poll, a round trip later, is not)
            for t in could_have_ended:
                t.read_high = self._last_read_at
        gap = len(ours) - count - sum(1 for t in ours if t.suspected)
        if gap <= 0:
            if count == len(ours):  # exactly ours: none of them had ended then
                self._quiet_read_at = self._last_read_at
            return
        # Of the tasks that could have ended, the one expected to end first is the likeliest. A
        # task still running at its expected end is a straggler: expect it a recheck after that
        # answer.
        tau = self.model.tau

        def expected_end(t: _Live) -> float:
            if tau is None:
                return t.t0
            if t.running_at is not None and t.running_at - t.t0 >= tau:
                return t.running_at + tau * RECHECK_FRACTION
            return t.t0 + tau

        candidates = sorted((t for t in could_have_ended if not t.suspected), key=expected_end)
        for live in candidates[:gap]:
            self._suspect(live, True)
            live.by_read = True
            live.read_low = previous
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
