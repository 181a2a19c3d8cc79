"""The output manifest: one record per input row, in input order, written from the run state.

Formats:

- ``jsonl``: one JSON object per row, nested values (``inputs``, ``nodeInfoList``, ``outputs``,
  ``failedReason``, ``files``) as JSON.
- ``csv``: the same fields flattened; ``inputs.COLUMN`` for each input column, nested values as JSON
  text. A text cell that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``,
  ``@``, tab or carriage return) is prefixed with ``'``; ``nodeInfoList`` keeps the exact values.
  Text from the service (``taskId``, ``error``, ...) has its control characters written as visible
  escapes (``\\n``, ``\\x1b``), so a newline in a task id cannot forge a line and an escape
  sequence cannot reach a terminal that shows the file; ``inputs.*`` cells are the user's own text,
  kept exactly. JSON text (``jsonl`` lines, nested CSV values) escapes every control character,
  U+2028 and U+2029 included, so each record is one line.
- ``parquet``: the CSV columns with native scalar types.

Every write goes to a temporary file in the same directory and is renamed over the target
(:func:`pipeline._files.atomic_open`), so a reader (or a kill) never sees half a file. The temporary
file is made by ``mkstemp`` (``O_EXCL``, ``O_NOFOLLOW``) and renamed over the target's name, so a
symbolic link planted at ``results.jsonl`` is replaced, never written through. Any of these files fed
back to ``rhbatch run`` reproduces the same tasks: the loader reads ``workflowId``, ``nodeInfoList``
and ``options`` and ignores the result fields.

Records are rendered one line at a time (:func:`jsonl_line`, :class:`CsvLines`), so that a run's
results can be rewritten record by record (:mod:`pipeline.refresh`) to exactly the bytes a whole
rewrite gives.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pipeline._files import atomic_open
from pipeline.errors import StorageError, UsageError
from pipeline.safetext import escape_controls
from pipeline.store import DISK_FULL_FIX, RunPaths, RunStore, loads, storage_error

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
    "money",
    "thirdPartyMoney",
    "taskCostTime",
    "error_code",
    "error",
    "attempts",
    "reconciled",
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


def row_record(row: sqlite3.Row, files: Sequence[sqlite3.Row] = ()) -> dict[str, Any]:
    """The output-manifest record for one stored row (fields in DESIGN.md)."""
    outputs = loads(row["outputs"]) or []
    record: dict[str, Any] = {
        "row": row["number"],
        "row_id": row["row_id"],
        "workflowId": row["workflow_id"],
        "inputs": loads(row["inputs"]),
        "options": loads(row["options"]),
        "nodeInfoList": loads(row["node_info_list"]),
        "status": row["status"],
        "taskId": row["task_id"],
        "fileUrls": [o.get("fileUrl") for o in outputs if o.get("fileUrl")],
        "outputs": outputs,
        "coins": row["coins"],
        "money": row["money"],
        "thirdPartyMoney": row["third_party_money"],
        "taskCostTime": row["task_cost_s"],
        "error_code": row["error_code"],
        "error": row["error"],
        "failedReason": loads(row["failed_reason"]),
        "attempts": row["attempts"],
        "reconciled": row["reconciled"],
        "submitted_at": _iso(row["submitted_at"]),
        "finished_at": _iso(row["finished_at"]),
    }
    if files:
        record["files"] = [
            {"path": f["path"], "sha256": f["sha256"], "size": f["size"], "status": f["status"],
             "nodeId": f["node_id"]}
            for f in files
        ]
    else:
        record["files"] = []
    return record


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def record_of(row: Any, files: Any) -> dict[str, Any]:
    """The output-manifest record of a stored row; its files are listed once it is SUCCESS."""
    return row_record(row, files if row["status"] == "SUCCESS" else ())


def iter_records(store: RunStore) -> Iterator[dict[str, Any]]:
    for row, files in store.iter_rows_with_files():
        yield record_of(row, files)


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
        out[key] = json_text(value) if key in NESTED else value
    return out


# What json.dumps(ensure_ascii=False) leaves raw: DEL, C1 controls, the line/paragraph separators.
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def json_text(value: Any) -> str:
    """``value`` as one line of JSON with no raw control character (non-ASCII text kept)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if _JSON_RAW.search(text) else text


def _csv_cell(value: Any, exact: bool = False) -> Any:
    """A CSV cell; text other than the user's own (``exact``) has its controls escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return escape_cell(value if exact else escape_controls(value))
    if isinstance(value, dict | list):
        return json_text(value)
    return value


RESULT_FILES = RunPaths.RESULT_FILES  # what a run keeps current in its directory


def jsonl_line(record: dict[str, Any]) -> str:
    """One record of ``results.jsonl``, newline included."""
    return json_text(record) + "\n"


class CsvLines:
    """The lines of a CSV output manifest whose input columns are ``columns``, one at a time."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.fields = RESULT_COLUMNS[:3] + [f"inputs.{c}" for c in columns] + RESULT_COLUMNS[3:]
        self._exact = [f.startswith("inputs.") for f in self.fields]  # the user's own text
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")

    def _line(self, cells: list[Any]) -> str:
        self._writer.writerow(cells)
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text

    def header(self) -> str:
        return self._line(self.fields)

    def line(self, record: dict[str, Any]) -> str:
        flat = flat_record(record, self.columns)
        return self._line([_csv_cell(flat.get(f), exact)
                           for f, exact in zip(self.fields, self._exact, strict=True)])


def _write_error(exc: OSError, target: Path, run_dir: Path | None) -> StorageError:
    """The one message for a results file that cannot be written, with the fix for its cause."""
    if run_dir is not None:  # results.* of a run: the run's own fixes (free space, copy the run)
        return storage_error(exc, target, run_dir, fallback=WRITE_FIX)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = DISK_FULL_FIX.replace(" to resume", "")
    else:
        fix = "choose a writable place for it with -o FILE"
    return StorageError(f"Cannot write {escape_controls(target)}: {exc.strerror or exc}: {fix}")


class AtomicFile:
    """:func:`pipeline._files.atomic_open` with its OSError turned into the StorageError that
    says how to fix it. ``run_dir``: the run the file belongs to (its fixes name the run), None for
    ``export -o``."""

    def __init__(self, target: Path, mode: str = "w", run_dir: Path | None = None):
        self.target = target
        self.mode = mode
        self.run_dir = run_dir
        self._opened: Any = None

    def __enter__(self) -> IO[Any]:
        self._opened = atomic_open(self.target, self.mode, newline="" if "b" not in self.mode else None)
        try:
            handle: IO[Any] = self._opened.__enter__()
        except OSError as exc:
            raise _write_error(exc, self.target, self.run_dir) from None
        return handle

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._opened.__exit__(exc_type, exc, tb)
        except OSError as error:
            raise _write_error(error, self.target, self.run_dir) from None
        if isinstance(exc, OSError):  # a write inside the block failed (disk full, ...)
            raise _write_error(exc, self.target, self.run_dir) from None




def _run_dir_of(store: RunStore, target: Path) -> Path | None:
    """``store``'s run directory when ``target`` is one of its files, else None."""
    try:
        inside = Path(os.path.realpath(target.parent)) == Path(os.path.realpath(store.run_dir))
    except OSError:
        inside = False
    return store.run_dir if inside else None


def write_jsonl(store: RunStore, target: Path) -> int:
    count = 0
    with AtomicFile(target, run_dir=_run_dir_of(store, target)) as fh:
        for record in iter_records(store):
            fh.write(jsonl_line(record))
            count += 1
    return count


def write_csv(store: RunStore, target: Path) -> int:
    lines = CsvLines(input_columns(store))
    count = 0
    with AtomicFile(target, run_dir=_run_dir_of(store, target)) as fh:
        fh.write(lines.header())
        for record in iter_records(store):
            fh.write(lines.line(record))
            count += 1
    return count


def write_parquet(store: RunStore, target: Path) -> int:
    # Imported here, not at the top: pyarrow takes about 0.2 s to import and only `export --format
    # parquet` needs it, while every `rhbatch run` imports this module.
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = input_columns(store)
    records = [flat_record(r, columns) for r in iter_records(store)]
    if not records:
        table = pa.table({"row": pa.array([], pa.int64())})
    else:
        # A seed may be up to 2**64-1 (ComfyUI's range), past Parquet's int64: such a column is
        # written as uint64 when every value fits it, else as text; nothing is cut or rounded.
        wide = {key for r in records for key, v in r.items()
                if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63}
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in wide}
                                      for r in records])
        for position, key in enumerate(records[0]):
            if key not in wide:
                continue
            values = [r.get(key) for r in records]
            unsigned = all(v is None or (isinstance(v, int) and not isinstance(v, bool)
                                         and 0 <= v < 2**64) for v in values)
            column = (pa.array(values, pa.uint64()) if unsigned else
                      pa.array([None if v is None else str(v) for v in values], pa.string()))
            table = table.add_column(position, key, column)
    with AtomicFile(target, "wb", run_dir=_run_dir_of(store, target)) as fh:
        pq.write_table(table, fh)
    return len(records)


def export(store: RunStore, fmt: str, target: str | Path) -> int:
    """Write the output manifest of ``store`` as ``fmt`` to ``target``; returns the row count."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    return writer(store, Path(target))


def export_run(run_dir: str | Path, fmt: str, target: str | Path | None = None) -> tuple[Path, int]:
    """``rhbatch export``: write the output manifest of the run in ``run_dir`` as ``fmt`` to
    ``target`` (default: ``DIR/results.FORMAT``), read without the run lock (works while it runs);
    returns the file written and its row count."""
    path = Path(target) if target is not None else RunPaths(Path(run_dir)).results(fmt)
    store = RunStore.open(run_dir, readonly=True)
    try:
        return path, export(store, fmt, path)
    finally:
        store.close()


def write_results(store: RunStore) -> None:
    """Rewrite ``results.jsonl`` and ``results.csv`` in the run directory, every record rendered
    again. (:func:`pipeline.refresh.write_results` also records where each record starts, so the
    run's next refresh rewrites only what changed.)"""
    jsonl, csv_name = RESULT_FILES
    write_jsonl(store, store.run_dir / jsonl)
    write_csv(store, store.run_dir / csv_name)
