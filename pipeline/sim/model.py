"""The simulated service without HTTP: accounts, workflows, tasks, billing, webhook bookkeeping.

Time model
----------
All times are *simulated* seconds from :class:`Clock` (``time_scale`` simulated seconds per real
second, plus whatever :meth:`Clock.advance` added). A task is a handful of timestamps drawn when it
is accepted, and its state is computed from them on demand, so ten thousand tasks cost nothing
while they wait::

    created_at ── queue delay ──> start_at ── duration (or fail_after) ──> end_at
       QUEUED                        RUNNING                               SUCCESS | FAILED

A task that waits in an EXCLUSIVE account's personal queue has no ``start_at`` until a slot
frees; :meth:`Account.settle` replays the slot releases in time order (a heap of end times), so
promotion times are exact whatever the request or ticker timing. Settling is also where a task is
billed: ``coins_per_second`` x simulated GPU seconds, rounded up to whole coins, charged at the
task's end (success, failure or cancel). A workflow's ``WorkflowBilling`` can bill money instead
(or as well), to the cent, and split the bill over child tasks (:meth:`Service.bill_task`).
Money is kept in whole cents (``money_cents``) so that ledgers add up exactly.

Every method here runs under the simulator's lock; nothing in this module awaits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.sim.config import AccountConfig, SimConfig, WorkflowBilling

WELL_FORMED_KEY = re.compile(r"^[0-9A-Za-z]{32}$")

QUEUED, RUNNING, SUCCESS, FAILED, CANCEL = "QUEUED", "RUNNING", "SUCCESS", "FAILED", "CANCEL"


# key_fingerprint and canonical_node_info below are the simulator's own copies of what
# rhbatch's client also computes, kept apart on purpose: the simulator judges the client, and a
# helper both sides shared would let a bug agree with itself (see pipeline.sim). Do not merge them.


def key_fingerprint(key: str) -> str:
    """First 8 hex digits of sha256(key): what the audit and webhook records show instead of a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def canonical_node_info(node_info_list: Any) -> str:
    """A stable text for a nodeInfoList: items sorted by (nodeId, fieldName), values JSON-encoded."""
    items = sorted(
        (str(i.get("nodeId")), str(i.get("fieldName")), json.dumps(i.get("fieldValue"), sort_keys=True))
        for i in (node_info_list or [])
        if isinstance(i, dict)
    )
    return json.dumps(items, ensure_ascii=False)


def signature(workflow_id: str, node_info_list: Any) -> str:
    """The identity of a create for duplicate counting: workflowId + canonical nodeInfoList."""
    return f"{workflow_id}|{canonical_node_info(node_info_list)}"


class Clock:
    """Simulated seconds: ``offset + (monotonic() - t0) * time_scale``."""

    def __init__(self, time_scale: float, monotonic: Callable[[], float]):
        self.time_scale = time_scale
        self._monotonic = monotonic
        self._t0 = monotonic()
        self._offset = 0.0

    def now(self) -> float:
        return self._offset + (self._monotonic() - self._t0) * self.time_scale

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the simulated clock only moves forward")
        self._offset += seconds


# -- workflows -----------------------------------------------------------------------------------


def is_output_node(class_type: str) -> bool:
    """The simulator's guess for a class its node catalogue does not know (a Save or Preview node);
    a known class is an output node when the catalogue says so (:mod:`pipeline.sim.comfy`)."""
    return class_type == "PreviewImage" or class_type.startswith("Save")


@dataclass
class Workflow:
    """An API-format workflow: node id -> {class_type, inputs, _meta}."""

    workflow_id: str
    nodes: dict[str, dict[str, Any]]
    prompt_text: str = ""  # the JSON text getJsonApiFormat returns (encoded once)
    output_nodes: list[str] = field(default_factory=list)

    @classmethod
    def from_api_json(cls, workflow_id: str, data: Any) -> Workflow:
        if not isinstance(data, dict) or not data:
            raise ValueError("an API-format workflow is a non-empty mapping of node id -> node")
        nodes: dict[str, dict[str, Any]] = {}
        for node_id, node in data.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise ValueError(f"node {node_id!r} has no class_type")
            inputs = node.get("inputs", {})
            if not isinstance(inputs, dict):
                raise ValueError(f"node {node_id!r}: inputs must be a mapping")
            nodes[str(node_id)] = node
        outputs = sorted((n for n, v in nodes.items() if is_output_node(v["class_type"])), key=_node_order)
        return cls(workflow_id, nodes, json.dumps(data, ensure_ascii=False), outputs)


def _node_order(node_id: str) -> tuple[int, str]:
    head = node_id.split(":", 1)[0]
    return (int(head), node_id) if head.isdigit() else (1 << 62, node_id)


# -- accounts and tasks --------------------------------------------------------------------------


def fmt_money(cents: int) -> str:
    """Whole cents as the service writes money: "0.14", "12.00", "-0.30"."""
    sign, cents = ("-", -cents) if cents < 0 else ("", cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


@dataclass(eq=False)
class ChildTask:
    """One child task of a task whose workflow spawns some (``WorkflowBilling.child_tasks``)."""

    task_id: str
    cost_s: float = 0.0
    coins: int | None = None  # None: the workflow's billing has no coins
    money_cents: int | None = None  # None: no money


@dataclass(eq=False)
class Task:
    task_id: str
    client_id: str
    account: Account
    workflow_id: str
    workflow: Workflow
    node_info_list: list[Any]
    signature: str
    created_at: float
    queue_delay: float
    runtime: float  # simulated seconds of GPU time until the end (failure: the time to fail)
    fail: bool
    webapp_id: str | None = None
    webhook_url: str | None = None
    add_metadata: bool = True
    instance_type: str | None = None
    personal_queue: bool = False
    start_at: float | None = None
    end_at: float | None = None
    cancelled: bool = False
    coins: int | None = None  # billed at the end (0 for a workflow billed in money only)
    faults: list[str] = field(default_factory=list)
    outputs_cache: bytes | None = None
    webhook: WebhookRecord | None = None
    billing: WorkflowBilling = field(default_factory=WorkflowBilling)
    v2: bool = False  # created on a v2 route: its webhook's eventData is a v2 query object
    money_cents: int | None = None  # money billed at the end, when its workflow bills money
    children: list[ChildTask] = field(default_factory=list)
    # ComfyUI's ``outputs_to_execute`` for the task's prompt: the output nodes that passed validation
    # (None: every output node of the workflow), the only ones whose files the task produces
    outputs_to_execute: list[str] | None = None
    # the ``failedReason`` of a value that passed validation and fails when the task runs (805)
    run_failure: dict[str, Any] | None = None

    def outputs(self) -> list[str]:
        """The output nodes whose files this task produces."""
        return self.workflow.output_nodes if self.outputs_to_execute is None else self.outputs_to_execute

    @property
    def money(self) -> float | None:
        """The money billed, in CNY (exact to the cent), or None."""
        return None if self.money_cents is None else self.money_cents / 100

    def status(self, now: float) -> str:
        if self.cancelled:
            return CANCEL
        if self.start_at is None or now < self.start_at:
            return QUEUED
        assert self.end_at is not None
        if now < self.end_at:
            return RUNNING
        return FAILED if self.fail else SUCCESS

    def used_s(self) -> float:
        if self.start_at is None or self.end_at is None:
            return 0.0
        return max(0.0, self.end_at - self.start_at)

    def gone(self, now: float, retention_s: float) -> bool:
        return self.end_at is not None and now >= self.end_at and now - self.end_at > retention_s


class Account:
    """The live state of one key: balance, slot holders, personal queue.

    ``coins`` may be set by tests (a top-up). Counts are truthful: ``live`` is queued + running.
    """

    def __init__(self, config: AccountConfig, service: Service):
        self.key_fp = key_fingerprint(config.key)
        self.api_type = config.api_type
        self.concurrency = config.concurrency
        self.coins: float = config.coins
        self.money_cents: int | None = None if config.money is None else round(config.money * 100)
        self.billed_money_cents = 0
        self.v1_task_routes = str(config.v1_task_routes)
        self.free_user = config.free_user
        self.revoked = config.revoked
        self.revoke_at_s = config.revoke_at_s
        self.revoke_after_creates = config.revoke_after_creates
        self.creates = 0  # tasks accepted for this key
        self.personal_queue_limit = config.personal_queue_limit
        self.wallet_code = config.wallet_code
        self._service = service
        self.active: dict[str, Task] = {}  # tasks holding a slot (queue delay or running)
        self.pqueue: deque[Task] = deque()  # EXCLUSIVE personal queue, waiting for a slot
        self._ends: list[tuple[float, int, Task]] = []
        self.billed_coins = 0

    def __repr__(self) -> str:
        return f"Account(key_fp={self.key_fp!r}, api_type={self.api_type!r}, coins={self.coins!r})"

    @property
    def money(self) -> float | None:
        """The money wallet in CNY (None: the account has none); may be assigned to top it up."""
        return None if self.money_cents is None else self.money_cents / 100

    @money.setter
    def money(self, value: float | None) -> None:
        self.money_cents = None if value is None else round(value * 100)

    @property
    def billed_money(self) -> float:
        """Every cent of money billed to this account so far, in CNY."""
        return self.billed_money_cents / 100

    # live views (thread-safe: they take the simulator's lock)
    @property
    def live(self) -> int:
        with self._service.lock:
            self.settle(self._service.clock.now())
            return len(self.active) + len(self.pqueue)

    current_task_counts = live

    @property
    def running(self) -> int:
        with self._service.lock:
            now = self._service.clock.now()
            self.settle(now)
            return sum(1 for t in self.active.values() if t.status(now) == RUNNING)

    @property
    def queued(self) -> int:
        with self._service.lock:
            now = self._service.clock.now()
            self.settle(now)
            return len(self.pqueue) + sum(1 for t in self.active.values() if t.status(now) == QUEUED)

    # bookkeeping (caller holds the lock)
    def revoked_at(self, now: float) -> bool:
        """Whether the key is revoked at simulated time ``now`` (``revoke_at_s`` passed, or
        revoked by ``revoke_after_creates`` or :meth:`Simulator.revoke`)."""
        if not self.revoked and self.revoke_at_s is not None and now >= self.revoke_at_s:
            self.revoked = True
        return self.revoked

    def count_create(self) -> None:
        """One more task accepted; the key is revoked once it reaches ``revoke_after_creates``."""
        self.creates += 1
        if self.revoke_after_creates is not None and self.creates >= self.revoke_after_creates:
            self.revoked = True

    def start(self, task: Task, at: float) -> None:
        task.start_at = at + task.queue_delay
        task.end_at = task.start_at + task.runtime
        self.active[task.task_id] = task
        heapq.heappush(self._ends, (task.end_at, self._service.next_seq(), task))
        self._service.task_scheduled(task)

    def settle(self, now: float) -> None:
        """Finish, bill and release every task that ended by ``now``; promote queued ones."""
        ends = self._ends
        while ends and ends[0][0] <= now:
            end_at, _, task = heapq.heappop(ends)
            if task.cancelled or self.active.get(task.task_id) is not task:
                continue
            self._finish(task)
            if self.pqueue:
                self.start(self.pqueue.popleft(), end_at)

    def _finish(self, task: Task) -> None:
        del self.active[task.task_id]
        self._charge(task)

    def _charge(self, task: Task) -> None:
        self._service.bill_task(task)
        assert task.coins is not None
        self.coins -= task.coins
        self.billed_coins += task.coins
        if task.money_cents:
            self.billed_money_cents += task.money_cents
            if self.money_cents is not None:
                self.money_cents -= task.money_cents

    def cancel(self, task: Task, now: float) -> None:
        self.settle(now)
        if task.start_at is None:
            self.pqueue.remove(task)
            task.start_at = task.end_at = now
            task.cancelled = True
            self._charge(task)  # nothing ran: zero coins (and zero money)
            return
        task.cancelled = True
        if now < task.start_at:  # still in its queue delay: nothing ran
            task.start_at = now
        task.end_at = now
        self._finish(task)
        if self.pqueue:
            self.start(self.pqueue.popleft(), now)


@dataclass(eq=False)
class WebhookRecord:
    webhook_id: str
    task: Task
    url: str
    event_data: Any  # v1: the outputs answer as a JSON string; v2: a v2 query object
    create_time: float
    update_time: float
    status: str = "PENDING"  # PENDING -> SUCCESS | RETRYING -> ... -> FAILED
    response: str = ""
    retry_count: int = 0
    attempts: int = 0
    retries_left: int = 0
    in_flight: bool = False


# -- the service ---------------------------------------------------------------------------------


class Service:
    """All simulated state; the HTTP layer calls it under ``lock``."""

    def __init__(self, config: SimConfig, clock: Clock, lock: Any):
        self.config = config
        self.clock = clock
        self.lock = lock
        seed = config.seed
        self.rng_ids = random.Random(f"{seed}:ids")
        self.rng_tasks = random.Random(f"{seed}:tasks")
        self.rng_faults = random.Random(f"{seed}:faults")
        self._next_task_id = self.rng_ids.randrange(1_900_000_000_000_000_000, 1_950_000_000_000_000_000)
        self._next_webhook_id = self.rng_ids.randrange(1_900_000_000_000_000_000, 1_950_000_000_000_000_000)
        self._seq = 0
        self.accounts: dict[str, Account] = {}
        self.workflows: dict[str, Workflow] = {}
        self.webapps: dict[str, str] = {}
        self.tasks: dict[str, Task] = {}
        self.task_list: list[Task] = []
        self.webhooks: dict[str, WebhookRecord] = {}
        self._webhook_ends: list[tuple[float, int, Task]] = []
        self._webhook_due: list[tuple[float, int, WebhookRecord]] = []
        self.uploads: dict[str, int] = {}
        self.upload_blobs: dict[str, tuple[bytes, float]] = {}  # v2 uploads: name -> (bytes, time)
        for account in config.accounts:
            self.add_account(account)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def new_task_id(self) -> str:
        self._next_task_id += self.rng_ids.randrange(1, 1_000_000)
        return str(self._next_task_id)

    def new_client_id(self) -> str:
        return f"{self.rng_ids.getrandbits(128):032x}"

    def add_account(self, config: AccountConfig) -> Account:
        config.validate()
        account = Account(config, self)
        self.accounts[config.key] = account
        return account

    def add_workflow(self, workflow_id: str, data: Any) -> Workflow:
        workflow = Workflow.from_api_json(str(workflow_id), data)
        self.workflows[workflow.workflow_id] = workflow
        return workflow

    def lookup_account(self, key: str | None) -> Account | None:
        if not key:
            return None
        account = self.accounts.get(key)
        if account is None and self.config.open_accounts and WELL_FORMED_KEY.match(key):
            account = self.add_account(dataclasses.replace(self.config.default_account, key=key))
        return account

    def bill(self, used_s: float, coins_per_second: float | None = None) -> int:
        """Coins for ``used_s`` GPU seconds, rounded up to a whole coin."""
        if used_s <= 0:
            return 0
        rate = self.config.coins_per_second if coins_per_second is None else coins_per_second
        return math.ceil(used_s * rate - 1e-9)

    @staticmethod
    def bill_money(used_s: float, money_per_second: float) -> int:
        """Money for ``used_s`` seconds, in cents, rounded up to a whole cent."""
        if used_s <= 0:
            return 0
        return math.ceil(used_s * money_per_second * 100 - 1e-6)

    def new_children(self, billing: WorkflowBilling) -> list[ChildTask]:
        return [ChildTask(self.new_task_id()) for _ in range(billing.child_tasks)]

    def bill_task(self, task: Task) -> None:
        """Set ``task.coins`` / ``money_cents`` (and its children's) for the time it used."""
        billing = task.billing
        used = task.used_s()
        shares: list[tuple[ChildTask | None, float]] = [
            (child, used / len(task.children)) for child in task.children] or [(None, used)]
        coins = money = 0
        for child, share in shares:
            child_coins = self.bill(share, billing.coins_per_second) if billing.coins else None
            child_money = self.bill_money(share, billing.money_per_second) if billing.money else None
            coins += child_coins or 0
            money += child_money or 0
            if child is not None:
                child.cost_s, child.coins, child.money_cents = share, child_coins, child_money
        task.coins = coins
        task.money_cents = money if billing.money else None

    def draw_task(self, fault_failure: float) -> tuple[float, float, bool, str | None]:
        """(queue_delay, runtime, fail, fault) for a new task, from the task RNG."""
        rng = self.rng_tasks
        low, high = self.config.queue_delay_range
        delay = rng.uniform(low, high) if high > low else low
        low, high = self.config.duration_range
        duration = rng.uniform(low, high) if high > low else low
        fail = self.config.failure_rate > 0 and rng.random() < self.config.failure_rate
        fault = None
        if not fail and fault_failure > 0 and self.rng_faults.random() < fault_failure:
            fail, fault = True, "task_failure"
        if fail:
            duration = min(duration, rng.uniform(2.0, 10.0)) if duration > 0 else 0.0
        return delay, duration, fail, fault

    # -- webhooks -------------------------------------------------------------------------------

    def task_scheduled(self, task: Task) -> None:
        if task.webhook_url and task.end_at is not None:
            heapq.heappush(self._webhook_ends, (task.end_at, self.next_seq(), task))

    def new_webhook_id(self) -> str:
        self._next_webhook_id += self.rng_ids.randrange(1, 1_000_000)
        return str(self._next_webhook_id)

    def due_webhooks(self, now: float, event_data: Callable[[Task], Any]) -> list[WebhookRecord]:
        """Records to deliver now: tasks that just ended and retries that fell due."""
        for account in self.accounts.values():
            if account.active or account.pqueue:
                account.settle(now)
        due: list[WebhookRecord] = []
        ends = self._webhook_ends
        while ends and ends[0][0] <= now:
            end_at, _, task = heapq.heappop(ends)
            if task.cancelled or task.end_at != end_at or task.webhook is not None:
                continue
            assert task.webhook_url is not None
            record = WebhookRecord(
                webhook_id=self.new_webhook_id(), task=task, url=task.webhook_url,
                event_data=event_data(task), create_time=now, update_time=now,
                retries_left=self.config.webhook_retries,
            )
            task.webhook = record
            self.webhooks[record.webhook_id] = record
            record.in_flight = True
            due.append(record)
        queue = self._webhook_due
        while queue and queue[0][0] <= now:
            _, _, record = heapq.heappop(queue)
            if record.in_flight or record.status != "RETRYING":
                continue
            record.retry_count += 1
            record.in_flight = True
            due.append(record)
        return due

    def webhook_result(self, record: WebhookRecord, ok: bool, response: str, now: float,
                       *, manual: bool = False) -> None:
        record.in_flight = False
        record.attempts += 1
        record.update_time = now
        record.response = response
        if ok:
            record.status = "SUCCESS"
        elif not manual and record.retries_left > 0:
            record.retries_left -= 1
            record.status = "RETRYING"
            heapq.heappush(self._webhook_due,
                           (now + self.config.webhook_retry_interval_s, self.next_seq(), record))
        else:
            record.status = "FAILED"
