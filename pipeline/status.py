"""What a run holds and what it cost, read without the run lock (safe while the run is going):
counts per state, optionally grouped by input columns, the most common failures, the cost per
task (``rhbatch status``, the summary after a run, ``sweep --cost-from``), and, for a run on
several keys, the same per key (:func:`key_breakdown`).

A row counts for the key its current attempt was created with (``rows.key_fp``); costs count every
attempt on the key that created it. Rows an old single-key run created have no fingerprint: they
belong to the key of its ``key_fingerprint`` meta, labelled ``key`` unless the run's ``keys`` meta
names it. A fingerprint the meta does not name is labelled ``fp:`` and its first 8 characters."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import store as st
from pipeline.errors import UsageError
from pipeline.report import cut_words
from pipeline.safetext import amount, escape_controls

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
    keys: list[KeyRow] = dataclasses.field(default_factory=list)  # per key (shown when 2 or more)


HOLDING_STATES = (st.SUBMITTING, st.QUEUED, st.RUNNING, st.SUBMIT_UNKNOWN)
LEGACY_KEY_LABEL = "key"  # the one key of a run from before key pools


@dataclass(frozen=True)
class KeyRow:
    """One key of a run: its rows by state, what it was billed, and whether it was retired."""

    label: str
    fingerprint: str | None  # None: an old run that did not record its key
    rows: dict[str, int]  # state -> rows whose current attempt this key created
    holding: int  # rows live or in doubt on this key
    coins: float
    money: float  # consumeMoney and third-party money
    unpriced: int  # tasks that ran without a reported cost (not counted as 0)
    retired: str | None = None  # why the key stopped creating
    api: str | None = None

    def count(self, *states: str) -> int:
        return sum(self.rows.get(s, 0) for s in states)


def _key_meta(store: st.RunStore) -> dict[str, dict[str, Any]]:
    recorded = store.get_meta("keys") or {}
    return {fp: info if isinstance(info, dict) else {} for fp, info in recorded.items() if fp}


def key_breakdown(store: st.RunStore) -> list[KeyRow]:
    """Every key the run knows (its ``keys`` meta and every key that created a row), in the
    order the run lists them, then by label."""
    meta = _key_meta(store)
    legacy = store.get_meta("key_fingerprint")
    counts: dict[str | None, dict[str, int]] = {}
    for fp, by_status in store.key_counts().items():
        into = counts.setdefault(fp if fp is not None else legacy, {})
        for status, n in by_status.items():
            into[status] = into.get(status, 0) + n
    spent: dict[str | None, list[float]] = {}
    for fp, spending in store.spending_by_key().items():
        if not any(b["tasks"] for s, b in spending.by_status.items() if s != st.PENDING):
            continue  # rows never sent: no key's
        into_cost = spent.setdefault(fp if fp is not None else legacy, [0.0, 0.0, 0])
        into_cost[0] += spending.coins
        into_cost[1] += spending.all_money
        into_cost[2] += spending.unpriced
    labels: dict[str | None, str] = {fp: str(info.get("label") or f"fp:{fp[:8]}")
                                     for fp, info in meta.items()}
    others = [fp for fp in {**counts, **spent} if fp not in meta]
    for fp in others:
        labels[fp] = LEGACY_KEY_LABEL if fp is None or fp == legacy else f"fp:{fp[:8]}"
    out = []
    for fp in [*meta, *sorted(others, key=lambda f: (labels[f], f or ""))]:
        rows = dict(counts.get(fp, {}))
        coins, money, unpriced = spent.get(fp, [0.0, 0.0, 0])
        info = meta.get(fp, {}) if fp is not None else {}
        out.append(KeyRow(labels[fp], fp, rows, sum(rows.get(s, 0) for s in HOLDING_STATES),
                          coins, money, int(unpriced), info.get("retired"), info.get("api")))
    return out


def key_records(keys: Sequence[KeyRow]) -> list[dict[str, Any]]:
    """:func:`key_breakdown` as JSON values (``status --json``)."""
    return [dataclasses.asdict(k) for k in keys]


def key_breakdown_of(run_dir: str | Path) -> list[KeyRow]:
    """:func:`key_breakdown` of the run in ``run_dir``, read without the lock."""
    store = st.RunStore.open(run_dir, readonly=True)
    try:
        return key_breakdown(store)
    finally:
        store.close()


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
            coins=store.spending().coins,
            source=store.get_meta("manifest_source"),
            unknown=unknown,
            groups=groups,
            spending=store.spending(),
            reconciled=reconciled,
            top_failures=_top_failures(store, failures) if failures else [],
            keys=key_breakdown(store),
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


def status_json(report: RunStatus, run_dir: str | Path) -> dict[str, Any]:
    """What ``rhbatch status --json`` prints."""
    spending = report.spending
    data: dict[str, Any] = {"run_dir": str(run_dir), "total": report.total,
                            "counts": report.counts, "coins": report.coins,
                            "reconciled": report.reconciled}
    if spending is not None:
        data.update(money=spending.money, third_party_money=spending.third_party_money,
                    unpriced_tasks=spending.unpriced,
                    billed_by_status={k: v for k, v in spending.by_status.items()
                                      if k in ("SUCCESS", "FAILED", "CANCELLED")})
    if len(report.keys) > 1:
        data["keys"] = key_records(report.keys)
    if report.groups is not None:
        data["groups"] = [
            {"key": list(k) if isinstance(k, tuple) else k, "counts": v}
            for k, v in report.groups.items()
        ]
    return data


def status_lines(report: RunStatus, run_dir: str | Path, by: Sequence[str]) -> Iterator[str]:
    """What ``rhbatch status`` prints, line by line (service text escaped)."""
    from pipeline.progress import key_table_lines, spending_lines

    yield (f"{escape_controls(run_dir)}: {report.total} rows from "
           f"{escape_controls(report.source)}, {amount(report.coins)} coins")
    for state, n in report.counts.items():
        if n:
            yield f"  {state:<15} {n}"
    for line in [*spending_lines(report.spending), *key_table_lines(report.keys)]:
        yield f"  {line}"
    for how, n in report.reconciled.items():
        yield f"  reconciled by {how}: {n} unknown create(s) proven to be a task"
    if report.top_failures:
        yield "  top failure causes:"
        for count, cause in report.top_failures:
            yield f"    {count} x {escape_controls(cause)}"
    for number, row_id, why in report.unknown:
        yield f"  unknown: row {number} ({escape_controls(row_id)}): {escape_controls(why)}"
    more = report.counts.get("SUBMIT_UNKNOWN", 0) - len(report.unknown)
    if more > 0:
        yield f"  ... and {more} more unknown row(s): `rhbatch export {run_dir}` lists them all"
    if report.groups is not None:
        states = [s for s in report.counts if any(g[s] for g in report.groups.values())]
        yield "  " + " | ".join([escape_controls(", ".join(by))] + states)
        for key, counts in report.groups.items():
            yield "  " + " | ".join([escape_controls(key)] + [str(counts[s]) for s in states])
