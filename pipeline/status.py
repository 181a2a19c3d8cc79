"""What a run holds and what it cost, read without the run lock (safe while the run is going):
counts per state, optionally grouped by input columns, the most common failures, and the cost
per task (``rhbatch status``, the summary after a run, ``sweep --cost-from``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import store as st
from pipeline.errors import UsageError
from pipeline.report import cut_words

STATUS_UNKNOWN_SHOWN = 20
FAILURE_CAUSE_CHARS = 160
GROUP_EXTRA_COLUMNS = ("status", "error_code", "workflowId")


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
    top_failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _top_failures(store: st.RunStore, limit: int) -> list[tuple[int, str]]:
    return [(n, f"{code if code is not None else '-'}: "
                f"{cut_words(error or 'no message', FAILURE_CAUSE_CHARS)}")
            for n, code, error in store.top_failures(limit)]


def top_failures(run_dir: str | Path, limit: int = 3) -> list[tuple[int, str]]:
    """The most common failure causes of a run: (count, "code: error"), most frequent first."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        return _top_failures(store, limit)
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


def run_status(run_dir: str | Path, by: Sequence[str] = (), *, failures: int = 0) -> RunStatus:
    """Counts per state (optionally grouped by input columns) and the ``failures`` most common
    failure causes, read without taking the lock."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        unknown = store.unknown_rows(STATUS_UNKNOWN_SHOWN)
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
            top_failures=_top_failures(store, failures) if failures else [],
        )
    finally:
        store.close()


def _group_counts(store: st.RunStore, by: list[str]) -> dict[Any, dict[str, int]]:
    columns = set(store.get_meta("columns") or [])
    for column in by:
        if column not in columns and column not in GROUP_EXTRA_COLUMNS:
            raise UsageError(
                f"--by {column!r} is not a column of this run: choose from "
                f"{', '.join(sorted(columns | set(GROUP_EXTRA_COLUMNS)))}"
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
