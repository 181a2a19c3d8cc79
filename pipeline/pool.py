"""Several keys in one run: the rows they share, the money they share, and what became of each key.

A run with several keys drives one :class:`~pipeline.runner.Runner` per key in the same event
loop. Each runner has its own client (its key), its own in-flight window sized from that key's
limit (the v2 queue status, else capacity answers; capped by the key's ``max=``), its own account
watcher and its own live tasks: a row's key is written with its ``SUBMITTING`` commit, before the
create leaves, and every poll, cancel and cost query of that task goes through the runner of that
key. What they share:

- :class:`RowSource`: the pending rows, handed to whichever key has a free slot first. A row
  refused for capacity or by a key that is retired is given back, and the next key with a free
  slot takes it. A row whose create was *sent* on a key stays with that key (a ``SUBMIT_UNKNOWN``
  row is never sent again on another key by itself).
- :class:`Ledger`: the run's spending and its limits (``--max-coins``, ``--max-money``) over every
  key's tasks, and, inside it, each key's own limits (``max_coins=``, ``max_money=`` in the keys
  file). A key that reaches its own limit stops creating; the run stops creating when the run's
  limit is reached.

A key whose creates are refused for good (412, 414, 416, 801-812: the key is wrong, revoked, or
out of coins) is *retired* for the rest of the run, with one line naming it: it sends no more
creates and the rows it never sent go to the other keys. Its live tasks are still followed with
it while its polls are answered (a key out of coins still reads its tasks); when they are refused
too (a revoked key), those tasks stay recorded as they are, for a resume with the key. The run
stops with exit 3 only when no key is left to create with.

Choices where the service says nothing, made to protect the user's money: a key's retirement is
never undone within the run (a wallet topped up mid-run is used on the next resume, which gives
every key given again a fresh start); and the estimate of what an unpriced task may cost is the
run's, whichever key runs it (a workflow costs the same on any key).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import store as st
from pipeline.errors import StateError
from pipeline.keys import PoolKey
from pipeline.safetext import amount, number

PENDING_BATCH = 500
# A task not yet priced counts at a deliberately high estimate: twice the dearest task seen while
# fewer than BUDGET_FEW_PRICED are priced, then one and a half times (never below --expected-coins).
BUDGET_ESTIMATE_FACTOR_FEW = 2.0
BUDGET_ESTIMATE_FACTOR = 1.5
BUDGET_FEW_PRICED = 3


@dataclass
class KeyOutcome:
    """What one key did in this invocation (the summary's per-key line)."""

    label: str
    fingerprint: str
    created: int = 0  # creates accepted
    capacity_answers: int = 0
    capacity_wait_s: float = 0.0
    window: int = 0  # the window it ended with
    retired: str | None = None  # why it stopped creating before the rows ran out


class _Member(Protocol):
    """What the ledger needs of a runner: the tasks it may still be billed for."""

    live: dict[int, Any]
    _creating: int


class RowSource:
    """The run's pending rows in input order, for every key of the run.

    ``next()`` hands out a row once; ``give_back`` returns one that was not sent (refused for
    capacity, or by a retired key) and wakes every key, so the first with a free slot takes it."""

    def __init__(self, store: st.RunStore, submit_only: Iterable[int] | None = None):
        self.store = store
        self.submit_only = None if submit_only is None else set(submit_only)
        self._rows: list[Any] = []
        self._cursor = -1
        self.exhausted = False
        self._wakers: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    def wake_all(self) -> None:
        for wake in self._wakers:
            wake()

    def next(self) -> Any | None:
        while not self._rows and not self.exhausted:
            batch = self.store.pending(self._cursor, PENDING_BATCH)
            if not batch:
                self.exhausted = True
                break
            self._cursor = batch[-1]["idx"]
            if self.submit_only is not None:
                batch = [r for r in batch if r["idx"] in self.submit_only]
            self._rows = batch[::-1]
        return self._rows.pop() if self._rows else None

    def give_back(self, row: Any) -> None:
        self._rows.append(row)
        if len(self._wakers) > 1:
            self.wake_all()

    @property
    def empty(self) -> bool:
        return self.exhausted and not self._rows


@dataclass
class Ledger:
    """Spending and limits over a set of runners: the whole run (``parent`` None) or one key.

    Every figure counts every attempt, failed and cancelled tasks included. ``doubtful`` counts
    rows whose create is in doubt and ended tasks whose cost was never reported: each counts at
    the estimate until the service says."""

    max_coins: float | None = None
    max_money: float | None = None
    expected_task_coins: float | None = None
    parent: Ledger | None = None
    name: str = ""  # "" for the run; the key's label for a key's own limits
    spent: float = 0.0
    spent_money: float = 0.0
    priced: int = 0
    top_coins: float = 0.0  # the dearest task seen, in coins and in money
    top_money: float = 0.0
    doubtful: int = 0
    members: list[_Member] = field(default_factory=list)

    @property
    def limited(self) -> bool:
        return self.max_coins is not None or self.max_money is not None

    def start(self, spending: st.Spending, priced: int, unknown: int) -> None:
        """The figures so far (``unknown``: rows in SUBMIT_UNKNOWN now)."""
        self.spent = spending.coins
        self.spent_money = spending.all_money
        self.priced = priced
        self.top_coins = spending.max_coins or 0.0
        self.top_money = spending.max_money or 0.0
        self.doubtful = unknown + spending.unpriced + spending.unknown_attempts

    def doubt(self, change: int = 1) -> None:
        """One more (or, with -1, one fewer) task counted at its estimate."""
        self.doubtful = max(0, self.doubtful + change)
        if self.parent is not None:
            self.parent.doubt(change)

    def count_cost(self, coins: float, money: float) -> None:
        self.spent += coins
        self.spent_money += money
        self.priced += 1
        self.top_coins = max(self.top_coins, coins)
        self.top_money = max(self.top_money, money)
        if self.parent is not None:
            self.parent.count_cost(coins, money)

    def _root(self) -> Ledger:
        return self if self.parent is None else self.parent._root()

    def estimate(self, limit: str) -> float | None:
        """A deliberately high cost for a task not yet priced, in coins or money; None if unknown
        (learnt over the whole run: a workflow costs the same on any key)."""
        root = self._root()
        if limit == "coins":
            seen, given = root.top_coins, root.expected_task_coins
        else:
            seen, given = root.top_money, None
        if not root.priced:
            return given
        factor = (BUDGET_ESTIMATE_FACTOR_FEW if root.priced < BUDGET_FEW_PRICED
                  else BUDGET_ESTIMATE_FACTOR)
        return max(seen * factor, given or 0.0)

    def verdict(self) -> str:
        """"ok" to create one more task, "wait" for tasks in flight, or "stop".

        Admit a task only while what is spent, plus the estimate for every task not yet priced
        (live, being created, in doubt) and for the next one, stays within each limit."""
        verdicts = []
        live = sum(len(m.live) for m in self.members)
        creating = sum(m._creating for m in self.members)
        busy = live > 0 or creating > 0
        for limit, cap, spent in (("coins", self.max_coins, self.spent),
                                  ("money", self.max_money, self.spent_money)):
            if cap is None:
                continue
            estimate = self.estimate(limit)
            if estimate is None:  # no price known yet: one task at a time until one is measured
                if busy:
                    verdicts.append("wait")
                elif self.doubtful or spent >= cap:
                    verdicts.append("stop")
                else:
                    verdicts.append("ok")
                continue
            if spent + estimate * (live + creating + self.doubtful + 1) <= cap:
                verdicts.append("ok")
            else:
                verdicts.append("wait" if busy else "stop")
        if "stop" in verdicts:
            return "stop"
        return "wait" if "wait" in verdicts else "ok"

    def message(self) -> str:
        """Why the limit stops creates, and how to go on."""
        flag = "--" if not self.name else ""
        parts = []
        if self.max_coins is not None:
            parts.append(f"{amount(self.spent)} coins spent of {flag}max{'-' if flag else '_'}"
                         f"coins {number(self.max_coins)}")
        if self.max_money is not None:
            parts.append(f"{amount(self.spent_money)} money spent of {flag}max"
                         f"{'-' if flag else '_'}money {number(self.max_money)}")
        doubt = (f"; {self.doubtful} task(s) in doubt or unpriced count at their expected cost"
                 if self.doubtful else "")
        if self.name:
            return (f"key {self.name} reached its own budget: {', '.join(parts)}, and its next "
                    f"task could pass it{doubt}; raise max_coins/max_money in the keys file and "
                    "run the same command to use it again")
        return (f"budget reached: {', '.join(parts)}, and the next task could pass it{doubt}; "
                "raise the limit and run the same command to resume")


async def run_all(runners: list[Any]) -> list[Any]:
    """Drive every key's runner to its end; the first crash stops the others and is raised."""
    tasks = [asyncio.ensure_future(r.run()) for r in runners]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for runner in runners:
            runner.stop("internal error")
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Pool:
    """The runners of one run (one per key), and what they share: rows, the budget, a stop."""

    def __init__(self, store: st.RunStore, *, submit_only: Iterable[int] | None = None,
                 max_coins: float | None = None, max_money: float | None = None,
                 expected_task_coins: float | None = None, size: int = 1):
        self.store = store
        self.size = size  # how many keys (runners) the run has
        self.rows = RowSource(store, submit_only)
        self.ledger = Ledger(max_coins, max_money, expected_task_coins)
        self.runners: list[Any] = []
        self._started = False
        self._by_key: tuple[dict[str | None, st.Spending], dict[str | None, dict[str, int]]] | None = None
        self.planned = 0  # rows this invocation may run: pending or live when it started

    @property
    def solo(self) -> bool:
        """One key: every row and task is its, whatever key the state recorded."""
        return self.size <= 1

    def join(self, runner: Any) -> None:
        self.runners.append(runner)
        self.ledger.members.append(runner)
        self.rows.subscribe(runner._wake.set)

    def start(self, runner: Any) -> None:
        """The spending so far, read once for the run and once for each key with limits of its
        own (a key's figures: the attempts created with it)."""
        if not self._started:
            self._started = True
            counts = self.store.counts()
            self.ledger.start(self.store.spending(), self.store.priced_rows(),
                              counts[st.SUBMIT_UNKNOWN])
            self.planned = sum(counts[state] for state in (
                st.PENDING, st.SUBMITTING, st.QUEUED, st.RUNNING))
            if self.rows.submit_only is not None:
                self.planned = min(self.planned, len(self.rows.submit_only))
        if runner.key_ledger.limited and not self.solo:
            if self._by_key is None:  # read once for every key with limits of its own
                self._by_key = self.store.spending_by_key(), self.store.key_counts()
            spending, by_key = self._by_key
            runner.key_ledger.start(spending.get(runner.key_fp) or st.Spending(), 0,
                                    by_key.get(runner.key_fp, {}).get(st.SUBMIT_UNKNOWN, 0))

    def unknown_tokens(self, runner: Any) -> dict[str, int]:
        """The webhook tokens of the creates in doubt that ``runner``'s key sent."""
        tokens = self.store.unknown_tokens()
        if self.solo or not tokens:
            return tokens
        keys = {r["idx"]: r["key_fp"] for r in self.store.rows_by_idx(list(tokens.values()))}
        return {t: idx for t, idx in tokens.items() if runner.owns(keys.get(idx))}

    @property
    def creating(self) -> int:
        """Creates in flight over every key: while any is, a key with nothing to take waits
        instead of ending, since a refused create may still give its row back."""
        return sum(r._creating for r in self.runners)

    def keys_creating(self, but: Any) -> int:
        """How many keys other than ``but`` are neither retired nor stopped."""
        return sum(1 for r in self.runners
                   if r is not but and r.retired is None and not r._stopped)

    def stop(self, reason: str = "interrupted", *, interrupt: bool = True) -> None:
        for runner in self.runners:
            runner.stop(reason, interrupt=interrupt)

    def hint_finished(self, task_id: str, token: str | None = None) -> bool:
        """A webhook delivery: the runner that follows the task (or sent the create) takes it."""
        return any(r.hint_finished(task_id, token) for r in self.runners)


def merge(summaries: list[Any], store: st.RunStore) -> Any:
    """One summary of a run from its keys' summaries: counts and money read once from the state;
    the exit code 3 when the run stopped (interrupt, budget, or no key left), 1 when rows are
    not done (failed, in doubt, or live on a key that was retired), else 0."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    stopped = next((s.stopped for s in summaries if s.exit_code == 3 and s.stopped), None)
    counts = store.counts()
    spending = store.spending()
    exit_code = max(s.exit_code for s in summaries)
    if exit_code != 3:
        unfinished = sum(counts[s] for s in (st.FAILED, st.SUBMIT_UNKNOWN, st.CANCELLED,
                                            st.QUEUED, st.RUNNING, st.PENDING))
        exit_code = 1 if unfinished else 0
    reconciled: dict[str, int] = {}
    for summary in summaries:
        for how, n in summary.reconciled.items():
            reconciled[how] = reconciled.get(how, 0) + n
    return dataclasses.replace(
        first, counts=counts, total=sum(counts.values()), stopped=stopped, exit_code=exit_code,
        spending=spending, coins=spending.coins,
        elapsed_s=max(s.elapsed_s for s in summaries),
        requests=sum(s.requests for s in summaries),
        capacity_answers=sum(s.capacity_answers for s in summaries),
        capacity_wait_s=sum(s.capacity_wait_s for s in summaries),
        creates_in_flight_max=max(s.creates_in_flight_max for s in summaries),
        reconciled=reconciled, keys=[k for s in summaries for k in s.keys])


# -- the keys of a run, across invocations ---------------------------------------------------

KEYS_META = "keys"
LEGACY_KEY_META = "key_fingerprint"  # runs before keys were recorded per row: their one key


def keys_holding(store: st.RunStore) -> dict[str | None, int]:
    """Per key fingerprint, the rows live or in doubt on it: the keys a resume needs."""
    held = (st.QUEUED, st.RUNNING, st.SUBMITTING, st.SUBMIT_UNKNOWN)
    counts = {fp: sum(by.get(s, 0) for s in held) for fp, by in store.key_counts().items()}
    return {fp: n for fp, n in counts.items() if n}


def check_keys(store: st.RunStore, keys: list[PoolKey]) -> None:
    """Refuse to go on without a key that still has tasks live or in doubt in the run: those
    tasks can only be read (and reconciled) with the key that created them. New keys may be
    added; a key with nothing left in the run may be left out."""
    recorded = store.get_meta(KEYS_META) or {}
    legacy = store.get_meta(LEGACY_KEY_META)
    given = {key.fingerprint for key in keys}
    for key_fp, n in sorted(keys_holding(store).items(), key=lambda kv: str(kv[0])):
        owner = key_fp or legacy
        if owner is None or owner in given:
            continue
        label = (recorded.get(owner) or {}).get("label", "key")
        shown = ", ".join(key.label for key in keys)
        raise StateError(
            f"{store.run_dir}: key {label} (fingerprint {owner}) still has {n} task(s) live or "
            f"in doubt in this run, and it is not among the keys given now ({shown}): its tasks "
            "can only be followed with it. Give it again (RUNNINGHUB_API_KEY, "
            "RUNNINGHUB_API_KEYS or --keys-file, any label), or start a new --out directory"
        )


def record_keys(store: st.RunStore, keys: list[PoolKey]) -> dict[str, Any]:
    """The run's ``keys`` meta with this invocation's keys: label and limits as given now, the
    API each was found to speak kept, a retirement of an earlier invocation cleared (every key
    given again gets a fresh start: a wallet may have been topped up)."""
    recorded = dict(store.get_meta(KEYS_META) or {})
    for key in keys:
        before = recorded.get(key.fingerprint) or {}
        record = {k: v for k, v in key.record().items() if k != "fingerprint"}
        recorded[key.fingerprint] = {**record, "api": before.get("api"), "retired": None}
    store.set_meta(**{KEYS_META: recorded})
    return recorded


def record_outcomes(store: st.RunStore, runners: list[Any]) -> None:
    """After the run: each key's API and, when it was retired, why."""
    recorded = dict(store.get_meta(KEYS_META) or {})
    for runner in runners:
        entry = dict(recorded.get(runner.key_fp) or {"label": runner.label})
        entry["api"] = getattr(runner.client, "read_api", None) or entry.get("api")
        entry["retired"] = runner.retired
        recorded[runner.key_fp] = entry
    store.set_meta(**{KEYS_META: recorded})
