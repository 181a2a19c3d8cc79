"""``rhbatch retry``: choose rows of a run by state, code, failure class or expression, and start
them again inside the same run (each row's earlier attempts are kept in ``attempts_log``).

A SUBMIT_UNKNOWN row's create was sent and never answered, so its task may have run and been
billed: such rows are chosen only with ``Selection(unknown=True, accept_double_pay=True)``, the
user's word that they checked RunningHub's call records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import store as st
from pipeline.batch import RunOptions, check_base_url, execute, run_keys
from pipeline.client import build_payload
from pipeline.config import Settings
from pipeline.errors import Kind, UsageError, classify
from pipeline.pool import check_keys
from pipeline.runner import RunSummary

log = logging.getLogger("rhbatch")

FAILURE_CLASSES = ("task_failed", "row_fatal", "task_gone", "oom", "cancelled", "unknown")
UNKNOWN_CONSENT = (
    "SUBMIT_UNKNOWN rows may already have run and been billed: check RunningHub's call records, "
    "then add --accept-double-pay to resubmit them"
)


@dataclass(frozen=True)
class Selection:
    """Which rows ``rhbatch retry`` starts again."""

    statuses: tuple[str, ...] = (st.FAILED,)
    codes: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    where: str | None = None
    unknown: bool = False  # SUBMIT_UNKNOWN rows too: they may pay twice
    accept_double_pay: bool = False  # the consent ``unknown`` needs

    def check_consent(self) -> None:
        """Refuse SUBMIT_UNKNOWN rows without the user's consent to pay twice."""
        if (self.unknown or st.SUBMIT_UNKNOWN in self.statuses) and not self.accept_double_pay:
            raise UsageError(UNKNOWN_CONSENT)


def failure_class(status: str, code: int | None, failed_reason: Any) -> str | None:
    """A coarse label for why a row did not succeed (``retry --class``, the report's triage)."""
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


def _where(records: list[dict[str, Any]], where: str) -> list[int]:
    """The ``idx`` of the records for which the pandas expression ``where`` holds."""
    # Imported here, not at the top: pandas takes about half a second to import, and only
    # `retry --where` needs it (every `rhbatch retry` and `import pipeline.retry` would pay it).
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    try:
        chosen = frame.query(where, engine="python")
    except Exception as exc:  # pandas raises anything an expression can: name, syntax, type
        columns = ", ".join(f"`{c}`" if not str(c).isidentifier() else str(c)
                            for c in frame.columns if c != "idx")
        raise UsageError(
            f"--where {where!r} could not be evaluated ({type(exc).__name__}: {exc}); "
            f"columns are {columns} (put names like `3.cfg` in backticks)"
        ) from None
    return [int(i) for i in chosen["idx"]]


def select_rows(store: st.RunStore, selection: Selection) -> list[int]:
    """Indexes of the rows ``selection`` names (final or unknown rows only; live rows never)."""
    for name in selection.classes:
        if name not in FAILURE_CLASSES:
            raise UsageError(f"--class {name!r} is not a failure class: use one of "
                             f"{', '.join(FAILURE_CLASSES)}")
    selection.check_consent()
    statuses = set(selection.statuses)
    if selection.unknown:
        statuses.add(st.SUBMIT_UNKNOWN)
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
    return _where(records, selection.where)


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
    **options: Any,
) -> tuple[RetryPlan, RunSummary | None]:
    """Start the selected rows again inside the same run (history kept), then drive the run.

    Only the selected rows are submitted: rows still PENDING are left for ``rhbatch run``. The
    run's budget holds (a limit given here replaces the stored one). ``dry_run`` reads the run
    without the lock and changes nothing. ``options`` are
    :class:`~pipeline.batch.RunOptions` fields.
    """
    run_options = RunOptions(**options)
    selection.check_consent()  # before anything else: without it nothing is read or sent
    run_dir = Path(run_dir)
    if dry_run:
        reader = st.RunStore.open(run_dir, readonly=True)
        try:
            return plan_retry(reader, settings, selection), None
        finally:
            reader.close()
    run_keys(settings, run_options)  # a key is needed (before the lock: nothing changes)
    with st.RunLock(run_dir):
        store = st.RunStore.open(run_dir)
        try:
            # before anything is requeued: a refused retry changes nothing
            check_keys(store, run_keys(settings, run_options))
            check_base_url(store, settings, run_options.base_url_moved, record=False)
            store.recover()
            plan = plan_retry(store, settings, selection)
            chosen = [r["idx"] for r in plan.rows]
            if plan.pending_left:
                run_options.on_notice(
                    f"{plan.pending_left} row(s) are still PENDING and are not part of this retry: "
                    f"`rhbatch run MANIFEST --out {run_dir}` submits them"
                )
            store.requeue(chosen)
            log.info("retry: %d row(s) requeued", len(chosen))
            run_options = dataclasses.replace(run_options, submit_only=frozenset(chosen))
            return plan, execute(store, settings, False, run_options)
        finally:
            store.close()
