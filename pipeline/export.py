"""The output manifest: one record per input row, in input order, written from the run state.

Formats:

- ``jsonl``: one JSON object per row, nested values (``inputs``, ``nodeInfoList``, ``outputs``,
  ``failedReason``, ``files``) as JSON.
- ``csv``: the same fields flattened; ``inputs.COLUMN`` for each input column, nested values as JSON
  text. A text cell that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``,
  ``@``, tab or carriage return) is prefixed with ``'``; ``nodeInfoList`` keeps the exact values.
- ``parquet``: the CSV columns with native scalar types.

Every write goes to a temporary file in the same directory and is renamed over the target, so a
reader (or a kill) never sees half a file. Any of these files fed back to ``rhbatch run``
reproduces the same tasks: the loader reads ``workflowId``, ``nodeInfoList`` and ``options`` and
ignores the result fields.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError, UsageError
from pipeline.store import RunStore, row_record

FORMATS = ("jsonl", "csv", "parquet")
NESTED = ("options", "nodeInfoList", "fileUrls", "outputs", "failedReason", "files")
RESULT_COLUMNS = [
    "row",
    "row_id",
    "workflowId",
    "status",
    "taskId",
    "fileUrls",
    "coins",
    "taskCostTime",
    "error_code",
    "error",
    "attempts",
    "submitted_at",
    "finished_at",
    "nodeInfoList",
    "options",
    "outputs",
    "failedReason",
    "files",
]
WRITE_FIX = (
    "free disk space or make the directory writable, then run the same command again (a run "
    "resumes where it stopped; its state is intact)"
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def iter_records(store: RunStore) -> Iterator[dict[str, Any]]:
    for row, files in store.iter_rows_with_files():
        yield row_record(row, files if row["status"] == "SUCCESS" else ())


def input_columns(store: RunStore) -> list[str]:
    columns = store.get_meta("columns")
    if columns is not None:
        return list(columns)
    first = next(store.iter_rows(batch=1), None)
    return list(json.loads(first["inputs"]).keys()) if first is not None else []


def escape_cell(value: str) -> str:
    """Neutralise spreadsheet formulas; plain numbers such as ``-5`` are left alone."""
    if value.startswith(_FORMULA_START):
        if value[0] in "+-":
            try:
                float(value)
                return value
            except ValueError:
                pass
        return "'" + value
    return value


def flat_record(record: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inputs = record.get("inputs") or {}
    for key in RESULT_COLUMNS[:3]:
        out[key] = record.get(key)
    for column in columns:
        out[f"inputs.{column}"] = inputs.get(column)
    for key in RESULT_COLUMNS[3:]:
        value = record.get(key)
        out[key] = json.dumps(value, ensure_ascii=False) if key in NESTED else value
    return out


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return escape_cell(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return value


RESULT_FILES = ("results.jsonl", "results.csv")  # what write_results keeps current in a run dir


def temporary_prefix(name: str) -> str:
    """How a file being written atomically as ``name`` is named until it is complete."""
    return f".{name}."


class _AtomicFile:
    def __init__(self, target: Path, mode: str = "w"):
        self.target = target
        self.mode = mode

    def __enter__(self) -> Any:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=temporary_prefix(self.target.name),
                                            dir=self.target.parent)
        except OSError as exc:
            raise StorageError(f"Cannot write {self.target}: {exc.strerror}: {WRITE_FIX}") from None
        if "b" in self.mode:
            self.handle: Any = os.fdopen(fd, self.mode)
        else:
            self.handle = os.fdopen(fd, self.mode, encoding="utf-8", newline="")
        return self.handle

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                os.replace(self.tmp, self.target)
            else:
                os.unlink(self.tmp)
        except OSError as exc:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            raise StorageError(f"Cannot write {self.target}: {exc.strerror}: {WRITE_FIX}") from None


def write_jsonl(store: RunStore, target: Path) -> int:
    count = 0
    with _AtomicFile(target) as fh:
        for record in iter_records(store):
            fh.write(json.dumps(record, ensure_ascii=False))
            fh.write("\n")
            count += 1
    return count


def write_csv(store: RunStore, target: Path) -> int:
    columns = input_columns(store)
    header = RESULT_COLUMNS[:3] + [f"inputs.{c}" for c in columns] + RESULT_COLUMNS[3:]
    count = 0
    with _AtomicFile(target) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for record in iter_records(store):
            flat = flat_record(record, columns)
            writer.writerow([_csv_cell(flat.get(h)) for h in header])
            count += 1
    return count


def write_parquet(store: RunStore, target: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = input_columns(store)
    records = [flat_record(r, columns) for r in iter_records(store)]
    table = pa.Table.from_pylist(records) if records else pa.table({"row": pa.array([], pa.int64())})
    with _AtomicFile(target, "wb") as fh:
        pq.write_table(table, fh)
    return len(records)


def export(store: RunStore, fmt: str, target: str | Path) -> int:
    """Write the output manifest of ``store`` as ``fmt`` to ``target``; returns the row count."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    return writer(store, Path(target))


def write_results(store: RunStore) -> None:
    """Refresh ``results.jsonl`` and ``results.csv`` in the run directory."""
    jsonl, csv_name = RESULT_FILES
    write_jsonl(store, store.run_dir / jsonl)
    write_csv(store, store.run_dir / csv_name)
