"""What the simulator saw: every request and every accepted task, for tests and benchmarks.

Records never hold an API key: ``key_fp`` is the first 8 hex digits of sha256(key).

A request record is ``{t, method, path, route, key_fp, status_http, code, task_id, fault}``, where
``t`` is the simulated time, ``key_fp`` the fingerprint of the key the request carried (None
without one; a request failed by a pre-fault is not read, so only a Bearer or query-string key
is seen there), ``status_http`` is None when the connection was dropped, ``code`` is the
business code answered (None for a dropped connection, garbage body or HTTP 5xx), and ``fault`` names
the injected fault(s) joined with ``+`` (None without one). After-work faults read
``after_work:<mode>``; for them ``code`` is the integer code of the body sent (None for an HTML page,
a redirect, garbage, ``code_null``/``code_text`` or a drop) and ``status_http`` the status sent.

A task record carries ``coins``, the coins billed when it ended (None while it is queued or
running; cancelled and failed tasks pay for the runtime they used; 0 for a workflow billed in
money only), ``money``, the money billed in CNY (None unless its workflow bills money, or before
it ended), ``childTaskIds`` (the exact ids of its child tasks), ``v2`` (created on a v2 route),
and ``faults``, every fault that touched its create (``lost_create``, ``create_813``,
``after_work:<mode>``, ``newline_task_id``, a hostile shape such as ``oversized``) or its run
(``task_failure``). :meth:`Audit.ledger` and :meth:`Audit.ledger_total` sum the coins billed,
:meth:`Audit.money_ledger` and :meth:`Audit.money_total` the money (floats made from whole cents:
exact to the cent, but compare sums with ``pytest.approx``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.sim.model import Service, Task, WebhookRecord

REQUEST_FIELDS = ("t", "method", "path", "route", "key_fp", "status_http", "code", "task_id", "fault")


class Audit:
    """Read-only views over the simulator's records (thread-safe snapshots)."""

    def __init__(self, service: Service, requests: list[tuple[Any, ...]]):
        self._service = service
        self._requests = requests

    def requests(self, route: str | None = None) -> list[dict[str, Any]]:
        """Every request in arrival order, optionally only one route's."""
        with self._service.lock:
            rows = list(self._requests)
        out = [dict(zip(REQUEST_FIELDS, row, strict=True)) for row in rows]
        return [r for r in out if r["route"] == route] if route else out

    def codes(self, route: str) -> Counter[int | None]:
        """How often each business code was answered on ``route``."""
        return Counter(r["code"] for r in self.requests(route))

    def task_key_fps(self) -> dict[str, set[str]]:
        """{taskId: the fingerprints of every key that named it}: the key that created it and
        every key that polled, cancelled or queried it (requests without a key, such as file
        downloads, are left out). With several keys, a task polled only with the key that
        created it has a set of one."""
        touched: dict[str, set[str]] = {}
        for row in self.requests():
            if row["task_id"] is not None and row["key_fp"] is not None:
                touched.setdefault(row["task_id"], set()).add(row["key_fp"])
        return touched

    def faults(self) -> list[dict[str, Any]]:
        """The requests that carried an injected fault."""
        return [r for r in self.requests() if r["fault"]]

    def tasks(self) -> list[dict[str, Any]]:
        """One record per accepted task, in creation order, with its status now."""
        service = self._service
        with service.lock:
            now = service.clock.now()
            for account in service.accounts.values():
                account.settle(now)
            return [_task_record(t, now) for t in service.task_list]

    def ledger(self) -> dict[str, int]:
        """{taskId: coins billed} for every task that has ended (success, failure or cancel)."""
        service = self._service
        with service.lock:
            now = service.clock.now()
            for account in service.accounts.values():
                account.settle(now)
            return {t.task_id: t.coins for t in service.task_list if t.coins is not None}

    def ledger_total(self) -> int:
        """Every coin billed so far: the sum of :meth:`ledger`."""
        return sum(self.ledger().values())

    def money_ledger(self) -> dict[str, float]:
        """{taskId: money billed in CNY} for every ended task whose workflow bills money."""
        service = self._service
        with service.lock:
            now = service.clock.now()
            for account in service.accounts.values():
                account.settle(now)
            return {t.task_id: t.money_cents / 100 for t in service.task_list
                    if t.money_cents is not None}

    def money_total(self) -> float:
        """Every cent of money billed so far, in CNY: the sum of :meth:`money_ledger`."""
        service = self._service
        with service.lock:
            now = service.clock.now()
            for account in service.accounts.values():
                account.settle(now)
            return sum(t.money_cents for t in service.task_list if t.money_cents is not None) / 100

    def creates_by_signature(self) -> Counter[str]:
        """Accepted tasks per (workflowId, canonical nodeInfoList): >1 means paid twice."""
        with self._service.lock:
            return Counter(t.signature for t in self._service.task_list)

    def duplicate_creates(self) -> dict[str, int]:
        return {sig: n for sig, n in self.creates_by_signature().items() if n > 1}

    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook delivery record (as getWebhookDetail shows it, plus attempts)."""
        with self._service.lock:
            return [_webhook_record(r) for r in self._service.webhooks.values()]

    def dump_jsonl(self, path: str | Path) -> Path:
        """Write every request, task and webhook record as JSON lines tagged with ``kind``."""
        path = Path(path)
        with path.open("w", encoding="utf-8") as fh:
            for kind, records in (("request", self.requests()), ("task", self.tasks()),
                                  ("webhook", self.webhooks())):
                for record in records:
                    fh.write(json.dumps({"kind": kind, **record}, ensure_ascii=False) + "\n")
        return path


def _task_record(task: Task, now: float) -> dict[str, Any]:
    return {
        "taskId": task.task_id,
        "clientId": task.client_id,
        "workflowId": task.workflow_id,
        "webapp_id": task.webapp_id,
        "nodeInfoList": task.node_info_list,
        "signature": task.signature,
        "key_fp": task.account.key_fp,
        "created_at": task.created_at,
        "started_at": task.start_at,
        "ended_at": task.end_at,
        "status": task.status(now),
        "planned_outcome": "FAILED" if task.fail else "SUCCESS",
        "coins": task.coins,
        "money": task.money,
        "childTaskIds": [child.task_id for child in task.children],
        "v2": task.v2,
        "personal_queue": task.personal_queue,
        "instanceType": task.instance_type,
        "webhookUrl": task.webhook_url,
        "faults": list(task.faults),
    }


def _webhook_record(record: WebhookRecord) -> dict[str, Any]:
    return {
        "id": record.webhook_id,
        "taskId": record.task.task_id,
        "key_fp": record.task.account.key_fp,
        "webhookUrl": record.url,
        "callbackStatus": record.status,
        "callbackResponse": record.response,
        "retryCount": record.retry_count,
        "attempts": record.attempts,
        "createTime": record.create_time,
        "updateTime": record.update_time,
    }
