"""Load and validate a manifest into rows ready to submit. Nothing is sent from here: no network I/O.

Formats, chosen by extension:

- ``.csv`` / ``.tsv``: UTF-8 with or without BOM; the delimiter is sniffed among ``, ; TAB |`` from
  the header line (``.tsv`` is always TAB). Quoted cells may hold newlines. Blank lines are skipped
  and are not rows. Row numbers count data rows (the header is not a row; the first data row is row
  1); when a row does not start on line ``number + 1`` the message also gives its CSV line.
- ``.json``: an array of row objects, or ``{"workflowId", "bindings": {COLUMN: "NODE.FIELD"},
  "defaults": {COLUMN or NODE.FIELD: value}, "rows": [...]}``.
- ``.jsonl`` / ``.ndjson``: one row object per line; lines end at ``\\n`` (or ``\\r\\n``) only, so
  U+2028, U+2029, U+0085 and the other breaks ``str.splitlines`` knows stay inside their strings.
- ``.parquet``: read with pyarrow.

The path must name a regular file: a directory, a device (``/dev/zero``), a FIFO or a socket is
refused from ``stat`` alone, and the file is opened without blocking. In JSON, JSONL and the JSON
of a CSV ``nodeInfoList`` / ``options`` cell, a key given twice in one object is an error (JSON
would keep the last one silently).

An output manifest written by rhbatch (``results.jsonl`` / ``.csv`` / ``.parquet``: it has a
``nodeInfoList`` and a ``status`` or ``taskId`` column) loads back as a manifest: each row sends
exactly the recorded ``workflowId``, ``nodeInfoList`` and ``options`` under the recorded ``row_id``;
``inputs`` / ``inputs.*`` come back as metadata and every result field is ignored.

Where node inputs come from: a column named ``NODE.FIELD`` whose node id is digits, optionally
``:``-separated (``3.seed``, ``57:35.text``; split at the first dot); ``--bind COLUMN=NODE.FIELD``
or the JSON ``bindings`` (any node id); an explicit ``nodeInfoList`` (a list, or JSON text in a CSV
cell). Any other column is metadata: kept in :attr:`Row.inputs`, never sent, and listed in
:attr:`Manifest.unbound`. ``nodeInfoList`` is sent in this order: explicit items, bound columns in
file order, then constant ``defaults`` given as ``NODE.FIELD``. An explicit item and a bound column
for the same node input in one row is an error.

Types: JSON, JSONL and Parquet values keep their types. A CSV column is read as the type its schema
property declares (``properties`` or ``patternProperties``; for a ``--bind`` column, the one
declared for its ``NODE.FIELD``): ``string`` keeps the text as is (``"42"`` stays text),
``integer`` accepts whole numbers and also ``7.0`` (read as 7, as JSON Schema counts 7.0 as an
integer; ``12.5`` is an error), ``number`` reads a float, ``boolean`` reads true/false (any case).
Undeclared columns are inferred over the whole column: every non-empty cell an integer literal (no
leading zeros, except ``0``) -> int; every cell a number -> float; every cell true/false -> bool;
else text, byte for byte (no stripping; a leading ``=`` is just text). An integer-declared JSON
float with no fraction is sent as an int. An empty cell (CSV) or a null/missing key (JSON) is
``None``; in a bound column that is an error unless ``defaults`` gives the value. Cells are limited
to 1 MiB of UTF-8.

Validation: every row, as the object ``{row_id, workflowId, nodeInfoList, <options the row sets>,
<input columns>}``, must satisfy ``schemas/manifest.schema.json`` or the ``--schema`` that replaces
it. rhbatch also enforces, whatever the schema: ``workflowId`` is digits and not 0, ``row_id`` is
unique and matches ``[A-Za-z0-9._:-]{1,128}``, every nodeInfoList item has nodeId, fieldName and a
scalar fieldValue, and no two rows send the same request (``allow_duplicates`` keeps them, with
derived ids suffixed ``-2``, ``-3``...). Integers sent as ``seed`` / ``noise_seed`` are 0 to
2**64-1 (ComfyUI's seed range); any other integer, sent or not, fits in a signed 64 bits.
NaN and infinity are refused in every node input (CSV ``nan`` / ``inf`` in a number column, JSON
``NaN`` / ``Infinity``): strict JSON cannot carry them; a NaN in a metadata column of a JSON or
Parquet file reads as empty (pandas' missing value). Column names may not hold control characters
(a NUL, ESC, U+2028, ...), and every message shows such characters escaped (``\\x00``).

When the schema is a plain object schema (``properties``, ``patternProperties``,
``additionalProperties``, ``required``), each distinct value of each column,
each distinct nodeInfoList item and each option value is validated once, which keeps a
million-row manifest within seconds; any other schema is applied to each row object in turn.
Every problem is reported together in one :class:`ManifestProblems` (a ManifestError), grouped by
kind: binding problems (which column feeds which node input, bindings, defaults), then value
problems (cells, types, the schema, row ids, duplicates); each kind lists its first
:data:`PROBLEMS_SHOWN_PER_KIND` and counts the rest. A problem in one row or column does not hide
the others: the schema is checked for every value that could be read, and the error carries the
rows whose workflow id is valid (with their readable node inputs) so that the checks made after
loading (preflight against the workflow, input files) report in the same pass. Two rows are
duplicates only when both requests are complete and identical: a row with a missing or unreadable
node input, workflow id, nodeInfoList or options is never called a duplicate of another.

Row ids: a ``row_id`` column, or ``"r" + sha256(canonical JSON of [workflowId, nodeInfoList sorted
by (nodeId, fieldName) as [nodeId, fieldName, fieldValue] triples, options])[:16 hex]``, which is
stable across runs and column order. :attr:`Manifest.fingerprint` hashes every row's id and
canonical content in order: it identifies "the same run".

Rows share what they can: the item dicts of ``node_info_list`` are shared between rows with the same
value, and an empty ``options`` is one shared dict. Treat them as read-only.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from pipeline.errors import InputError, ManifestError, Problem, SchemaError
from pipeline.safetext import escape_controls

SCHEMA_FILE = "manifest.schema.json"
OPTION_FIELDS = ("instanceType", "usePersonalQueue", "addMetadata", "retainSeconds", "webhookUrl",
                 "webappId")
OPTION_TYPES = {"usePersonalQueue": "boolean", "addMetadata": "boolean", "retainSeconds": "integer"}
SPECIAL_COLUMNS = frozenset({"row_id", "workflowId", "nodeInfoList", "options", *OPTION_FIELDS})
# Fields of an rhbatch output manifest that are results, never inputs.
RESULT_FIELDS = frozenset({
    "row", "status", "taskId", "fileUrls", "outputs", "coins", "taskCostTime", "error_code",
    "error", "failedReason", "attempts", "submitted_at", "finished_at", "files", "inputs",
    "money", "thirdPartyMoney", "reconciled",
})
JSON_TOP_KEYS = ("workflowId", "bindings", "defaults", "rows", "description")
MAX_CELL_BYTES = 1 << 20  # one cell or value, UTF-8
MAX_JSON_DEPTH = 32  # nesting a manifest value may have (nodeInfoList needs 3)
# Problems listed per kind (binding, value, preflight, file); the rest of each kind are counted.
PROBLEMS_SHOWN_PER_KIND = 50
MAX_PROBLEMS_KEPT = PROBLEMS_SHOWN_PER_KIND
SHOWN_VALUE_CHARS = 60
CSV_FIELD_LIMIT_CHARS = 64 << 20  # larger than MAX_CELL_BYTES so oversized cells get our message
CSV_CHUNK_ROWS = 65536
EXAMPLE_WORKFLOW_ID = "1904136902449209346"

ROW_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
WORKFLOW_ID_RE = re.compile(r"[1-9][0-9]*")
INT_RE = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
NUMBER_RE = re.compile(r"[+-]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
COLUMN_TARGET_RE = re.compile(r"([0-9]+(?::[0-9]+)*)\.(\S(?:.*\S)?)", re.S)  # auto-bound columns
TARGET_RE = re.compile(r"([^\s.=]+)\.(\S(?:.*\S)?)", re.S)  # --bind, bindings, defaults
NONFINITE_RE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.I)  # what float() reads as NaN or infinity
BOOL_TEXT = {"true": True, "false": False}
# Integers: ComfyUI's documented range for a seed (KSampler seed, KSamplerAdvanced noise_seed: 0 to
# 0xffffffffffffffff); any other integer must fit in a signed 64-bit integer, the widest that
# RunningHub's JSON reader and a Parquet manifest (int64) hold. (SQLite sets no limit here: rows are
# stored as JSON text.)
SEED_FIELDS = frozenset({"seed", "noise_seed"})
SEED_RANGE = (0, 2**64 - 1)
INT64_RANGE = (-(2**63), 2**63 - 1)
MAX_INT_DIGITS = 40  # longer integer literals are out of every range (and slow to convert)
# Root keywords that still let a row schema be checked one column at a time.
DECOMPOSABLE_ROOT_KEYS = frozenset({
    "$schema", "$id", "$defs", "definitions", "$comment", "title", "description", "examples",
    "default", "deprecated", "readOnly", "writeOnly", "type", "properties", "patternProperties",
    "additionalProperties", "required",
})
ANNOTATION_KEYS = frozenset({"title", "description", "$comment", "examples", "default", "format",
                             "deprecated", "readOnly", "writeOnly"})

_BAD: Any = type("_Bad", (), {"__repr__": lambda self: "<bad value>"})()  # a cell already reported
_EMPTY_OPTIONS: dict[str, Any] = {}
_ENC_NAN = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_ENC = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                        allow_nan=False).encode


@dataclass(frozen=True, slots=True)
class Row:
    """One row, ready to submit. ``node_info_list`` items may be shared between rows: read-only."""

    index: int  # 0-based position in the input
    number: int  # 1-based data row, as the user counts (the CSV header is not a row)
    row_id: str
    workflow_id: str
    node_info_list: tuple[dict[str, Any], ...]
    inputs: dict[str, Any]  # input columns (not row_id/workflowId/nodeInfoList/options), typed
    options: dict[str, Any]  # per-row task options: instanceType, usePersonalQueue, ...


class _RowMaker:
    """Builds a :class:`Row` in a third of the time of the frozen ``__init__`` (which goes through
    ``object.__setattr__`` per field): same slots, plain assignment, then the class is switched to
    Row, whose instances are immutable as usual. Used only in the loader's hot loop."""

    __slots__ = Row.__slots__

    def __init__(self, index: int, number: int, row_id: str, workflow_id: str,
                 node_info_list: tuple[dict[str, Any], ...], inputs: dict[str, Any],
                 options: dict[str, Any]):
        self.index = index
        self.number = number
        self.row_id = row_id
        self.workflow_id = workflow_id
        self.node_info_list = node_info_list
        self.inputs = inputs
        self.options = options


def _fast_row(*fields: Any) -> Row:
    row: Any = _RowMaker(*fields)
    row.__class__ = Row
    return row


@dataclass(frozen=True)
class Manifest:
    source: str  # file name as given
    rows: list[Row]
    columns: list[str]  # input columns in file order
    bound: dict[str, str]  # column -> "NODE.FIELD" for every column that feeds nodeInfoList
    unbound: list[str]  # columns kept as metadata only, never sent
    fingerprint: str  # sha256 over every row's (row_id, canonical content), in order
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row number, earlier number)
    # an rhbatch output manifest (results.*): its recorded nodeInfoList is sent, and its input
    # columns are the earlier run's inputs, kept as metadata
    from_results: bool = False


@dataclass(frozen=True)
class ProblemGroup:
    """The problems of one kind: the first :data:`PROBLEMS_SHOWN_PER_KIND`, and how many in all."""

    kind: str | None  # "binding", "value", "preflight", "file"; None for a file that cannot be read
    problems: tuple[Problem, ...]
    total: int

    def more_line(self) -> Problem | None:
        """The line that counts the problems not listed, or None when every one is."""
        more = self.total - len(self.problems)
        if more <= 0:
            return None
        what = f"{self.kind} problems" if self.kind else "problems like these"
        return Problem(None, None, f"... and {more:,} more {what}")


class ManifestProblems(ManifestError):
    """Every problem found in a manifest, by kind; ``total`` counts them all.

    ``problems`` is what is shown: each group's listed problems followed by its "... and N more"
    line. ``manifest``, when the file could be read as rows, holds the rows that the checks made
    after loading can still judge (see :func:`load_manifest`).
    """

    def __init__(self, source: str, groups: Sequence[ProblemGroup], manifest: Manifest | None = None):
        groups = [g for g in groups if g.total]
        shown: list[Problem] = []
        for group in groups:
            shown.extend(group.problems)
            more = group.more_line()
            if more is not None:
                shown.append(more)
        total = sum(g.total for g in groups)
        listed = "\n".join(f"  {p}" for p in shown)
        InputError.__init__(
            self, f"{source}: {total:,} problem{'s' if total != 1 else ''}, nothing was submitted:"
                  f"\n{listed}")
        self.source = source
        self.problems = shown
        self.groups = tuple(groups)
        self.total = total
        self.manifest = manifest


def make_row(
    index: int,
    number: int,
    row_id: str,
    workflow_id: str,
    node_info_list: Sequence[dict[str, Any]],
    inputs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Row:
    """A :class:`Row` built without a file (callers that rewrite or synthesise rows)."""
    return Row(index, number, row_id, workflow_id, tuple(dict(item) for item in node_info_list),
               dict(inputs or {}), dict(options or {}))


def default_schema_path() -> Path:
    from pipeline import resources

    try:
        return resources.schema_path(SCHEMA_FILE)
    except resources.ResourceMissing as exc:
        raise SchemaError(str(exc)) from None


def parse_binding(text: str) -> tuple[str, str, str]:
    """``"seed=3.seed"`` -> ``("seed", "3", "seed")``; raises InputError saying how to write it."""
    column, sep, target = text.partition("=")
    match = TARGET_RE.fullmatch(target.strip())
    if not sep or not column.strip() or not match or _has_controls(text):
        raise InputError(
            f"--bind {text!r} is not COLUMN=NODE.FIELD: write e.g. --bind seed=3.seed (the column, "
            "'=', the node id, a dot, then the input name from the workflow's API JSON)"
        )
    return column.strip(), match.group(1), match.group(2)


# -- problems and messages ------------------------------------------------------------------


class _Problems:
    """Collects problems of one kind; keeps the first MAX_PROBLEMS_KEPT and counts the rest."""

    def __init__(self, source: str, lines: Sequence[int] | None = None, kind: str | None = None):
        self.source = source
        self.lines = lines
        self.kind = kind
        self.kept: list[Problem] = []
        self.seen: set[tuple[int | None, str | None, str]] = set()
        self.count = 0

    def add(self, row: int | None, column: str | None, message: str) -> None:
        key = (row, column, message)
        if key in self.seen:
            return
        self.count += 1
        if len(self.kept) < MAX_PROBLEMS_KEPT:
            self.seen.add(key)
            if row is not None and self.lines is not None and row <= len(self.lines) \
                    and self.lines[row - 1] != row + 1:
                message = f"{message} (CSV line {self.lines[row - 1]})"
            self.kept.append(_problem(row, column, message))

    def __bool__(self) -> bool:
        return self.count > 0

    def group(self) -> ProblemGroup:
        return ProblemGroup(self.kind, tuple(self.kept), self.count)

    def raise_if_any(self) -> None:
        if self.count:
            raise ManifestProblems(escape_controls(self.source), [self.group()])


def _problem(row: int | None, column: str | None, message: str) -> Problem:
    """A Problem whose column name and message show every control character escaped (``\\x00``),
    so user text with a NUL, an escape sequence or a line separator cannot hide in a message."""
    return Problem(row, None if column is None else escape_controls(column), escape_controls(message))


def _fail(source: str, message: str, row: int | None = None, column: str | None = None) -> ManifestError:
    return ManifestError(escape_controls(source), [_problem(row, column, message)])


def _has_controls(text: str) -> bool:
    """Whether ``text`` holds a character that messages show escaped (a NUL, ESC, U+2028, ...)."""
    return escape_controls(text) != text


def _show(value: Any) -> str:
    """A value as the user wrote it, cut to SHOWN_VALUE_CHARS."""
    if isinstance(value, str):
        if len(value) > SHOWN_VALUE_CHARS:
            return repr(value[: SHOWN_VALUE_CHARS - 3] + "...")
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


_TYPE_WORDS = {
    "integer": ("a whole number", "write digits only, e.g. 42"),
    "number": ("a number", "write a number, e.g. 7.5"),
    "boolean": ("true or false", "write true or false"),
    "string": ("text", "write it as text (in JSON, in quotes)"),
    "null": ("empty", "leave it empty"),
    "array": ("a list", "write a JSON list"),
    "object": ("an object", "write a JSON object"),
}


def _type_message(value: Any, types: Any) -> str:
    if isinstance(value, dict | list):
        return (f"{_show(value)} is not a single value: a column holds text, a number or "
                "true/false")
    names = [types] if isinstance(types, str) else list(types or [])
    if not names:
        return f"{_show(value)} has the wrong type: change it or the schema"
    words = " or ".join(_TYPE_WORDS.get(n, (n, ""))[0] for n in names)
    fix = _TYPE_WORDS.get(names[0], ("", "change it"))[1] if len(names) == 1 else "change it"
    if isinstance(value, str):  # "12" in JSON: the digits are right, the quotes make it text
        parsed = next((p for p in (_PARSERS[n](value) for n in names if n in _PARSERS)
                       if p is not None), None)
        if parsed is not None:
            fix = f"remove the quotes (write {_ENC(parsed)}, not {_ENC(value)})"
    return f"{_show(value)} is not {words} (the schema requires it): {fix}"


def _schema_message(error: jsonschema.ValidationError) -> str:
    """A jsonschema error as one short, human sentence with the value and the fix."""
    value = error.instance
    shown = _show(value)
    kind = error.validator
    schema = error.schema if isinstance(error.schema, dict) else {}
    arg = error.validator_value
    if kind == "type":
        return _type_message(value, arg)
    if kind == "enum":
        choices = ", ".join(_show(c) for c in arg)
        return f"{shown} is not one of {choices}: use one of these"
    if kind == "const":
        return f"{shown} is not {_show(arg)}: the schema allows only that value"
    if kind == "minimum":
        return f"{shown} is less than the minimum {arg}: use {arg} or more"
    if kind == "maximum":
        return f"{shown} is more than the maximum {arg}: use {arg} or less"
    if kind == "exclusiveMinimum":
        return f"{shown} must be greater than {arg}: raise it"
    if kind == "exclusiveMaximum":
        return f"{shown} must be less than {arg}: lower it"
    if kind == "multipleOf":
        return f"{shown} is not a multiple of {arg}: round it"
    if kind == "minLength":
        return f"{shown} is shorter than {arg} characters: lengthen it"
    if kind == "maxLength":
        return f"{shown} is {len(value)} characters, more than {arg}: shorten it"
    if kind == "pattern":
        return f"{shown} does not match the pattern {arg!r}: change it to match"
    if kind == "required":
        missing = [k for k in arg if isinstance(value, dict) and k not in value]
        return f"lacks {', '.join(missing) or arg}: the schema requires it"
    if kind in ("additionalProperties", "unevaluatedProperties") and schema.get(kind) is False:
        extra = sorted(set(value) - set(schema.get("properties", {}))) if isinstance(value, dict) else []
        return f"has {', '.join(extra) or 'a key'} that the schema does not allow: remove it"
    if kind is False or kind == "false":
        return "is not allowed by the schema: remove it"
    text = error.message
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{text} (schema rule {kind!r}): change the value or the schema"


# -- reading --------------------------------------------------------------------------------


@dataclass
class _Table:
    """Rows as read, column-major. ``text`` tables (CSV) hold str cells with ``""`` for empty;
    others hold typed values with ``None`` for null or missing."""

    columns: list[str]
    cells: list[list[Any]]
    n_rows: int
    text: bool
    lines: list[int] | None = None  # CSV line each row starts on
    workflow_id: Any = None
    bindings: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


# What a path may be instead of a file, and what to do about it. A FIFO would block the open (or
# the read) until some other process writes, and a device like /dev/zero never ends.
_NOT_A_FILE = (
    (stat.S_ISDIR, "a directory", "name the {what} file inside it"),
    (stat.S_ISFIFO, "a named pipe (FIFO)", "write the {what} to a file and name that file "
                    "(rhbatch reads it more than once)"),
    (stat.S_ISSOCK, "a socket", "write the {what} to a file and name that file"),
    (stat.S_ISCHR, "a device", "name a {what} file"),
    (stat.S_ISBLK, "a device", "name a {what} file"),
)


def _file_problem(source: str, mode: int, what: str) -> InputError | None:
    for test, kind, fix in _NOT_A_FILE:
        if test(mode):
            return InputError(escape_controls(f"{source} is {kind}, not a {what} file: "
                                              f"{fix.format(what=what)}"))
    if not stat.S_ISREG(mode):
        return InputError(escape_controls(f"{source} is not a regular file: name a {what} file"))
    return None


def _unreadable(source: str, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(escape_controls(f"{source}: no such file: check the path"))
    return InputError(escape_controls(f"{source}: cannot be read ({exc.strerror}): check the path and "
                                      "its permissions"))


def check_manifest_path(path: str | Path, what: str = "manifest") -> None:
    """Raise :class:`InputError` unless ``path`` is a regular file (not a directory, a device, a
    FIFO or a socket). Only ``stat`` is called: it never blocks and never reads."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _unreadable(str(path), exc) from None
    problem = _file_problem(str(path), info.st_mode, what)
    if problem is not None:
        raise problem


def read_file_bytes(path: str | Path, what: str = "manifest") -> bytes:
    """The whole of a regular file; :class:`InputError` for anything else. Opened without blocking
    and checked on the open file, so neither a FIFO nor a device (``/dev/zero``) can hang it."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _unreadable(source, exc) from None
    with os.fdopen(fd, "rb") as fh:
        problem = _file_problem(source, os.fstat(fd).st_mode, what)
        if problem is not None:
            raise problem
        return fh.read()


def _read_text(path: Path, source: str) -> str:
    return _decode(read_file_bytes(path), source)


def _decode(data: bytes, source: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") * 4 >= len(head) > 0:
        # UTF-16: a NUL byte beside every ASCII letter; read as UTF-8 it would make NUL-laden names
        raise _fail(source, "the file is UTF-16 text, not UTF-8: re-save it as UTF-8 (in a "
                    "spreadsheet: Save As > CSV UTF-8)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start: exc.start + 4].hex(" ")
        raise _fail(source, f"line {line} has bytes that are not UTF-8 ({bad}): re-save the file as "
                    "UTF-8 (in a spreadsheet: Save As > CSV UTF-8)") from None


def _sniff(text: str) -> str:
    first = text.split("\n", 1)[0]
    outside, quoted = [], False
    for ch in first:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            outside.append(ch)
    plain = "".join(outside)
    counts = {d: plain.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _read_csv(path: Path, source: str, delimiter: str | None) -> _Table:
    text = _read_text(path, source)
    if not text.strip():
        raise _fail(source, "the file is empty: write a header line (e.g. workflowId,6.text,3.seed) "
                    "and at least one row")
    delimiter = delimiter or _sniff(text)
    if csv.field_size_limit() < CSV_FIELD_LIMIT_CHARS:
        csv.field_size_limit(CSV_FIELD_LIMIT_CHARS)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    del text
    problems = _Problems(source)
    try:
        header = next(reader)
        while not any(h.strip() for h in header):  # leading blank lines
            header = next(reader)
    except StopIteration:
        raise _fail(source, "the file is empty: write a header line and at least one row") from None
    except csv.Error as exc:
        raise _fail(source, f"line 1: {exc}: check the quotes in the header") from None
    header = [h.strip() for h in header]
    width = len(header)
    columns: list[list[str]] = [[] for _ in header]
    interns: list[dict[str, str] | None] = [{} for _ in header]
    lines: list[int] = []
    chunk: list[list[str]] = []
    previous_end = reader.line_num

    def flush() -> None:
        for j, cells in enumerate(zip(*chunk, strict=True)):
            seen = interns[j]
            if seen is None:
                columns[j].extend(cells)
                continue
            columns[j].extend(map(seen.setdefault, cells, cells))
            if len(seen) > len(columns[j]) // 2 + 1024:  # mostly distinct: stop interning
                interns[j] = None
        chunk.clear()

    try:
        for values in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if len(values) != width:
                if not any(values):
                    continue  # blank line
                lines.append(start)
                problems.add(len(lines), None, f"has {len(values)} cells but the header has {width} "
                             f"(CSV line {start}): fix the row, or quote cells that contain "
                             f"{delimiter!r}")
                continue
            if not any(values):
                continue
            lines.append(start)
            chunk.append(values)
            if len(chunk) >= CSV_CHUNK_ROWS:
                flush()
    except csv.Error as exc:
        problems.add(len(lines) + 1, None, f"{exc} (CSV line {reader.line_num}): a quote is not "
                     "closed; check the quotes from this row on")
    problems.raise_if_any()
    flush()
    if not lines:
        raise _fail(source, "the file has a header but no rows: add at least one row under the header")
    keep = []
    for j, name in enumerate(header):
        if not name:
            if any(columns[j]):
                problems.add(None, None, f"column {j + 1} has no name in the header: name it")
            continue  # a trailing delimiter on every line leaves a nameless, empty column
        keep.append(j)
    seen_names: set[str] = set()
    for j in keep:
        if header[j] in seen_names:
            problems.add(None, header[j], "appears twice in the header: rename one of them")
        seen_names.add(header[j])
    problems.raise_if_any()
    return _Table([header[j] for j in keep], [columns[j] for j in keep], len(lines), True, lines)


def _too_deep(value: Any) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


_DEEP = (f"is nested more than {MAX_JSON_DEPTH} levels deep: a row is a flat object of column "
         "values (only nodeInfoList and options hold lists or objects)")


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object in which a key appeared more than once; ``repeated`` lists those keys.
    ``json`` would keep the last value silently; the loader reports them instead."""

    repeated: list[str]


_KEEP_ONE = "keep one of them (JSON would keep only the last one, silently)"


class _JsonReader:
    """``json.loads`` that marks objects with a repeated key (see :class:`_Repeated`); ``found``
    says whether the text read since the last :meth:`clear` had one, so only then is it walked."""

    def __init__(self) -> None:
        self.found = False
        self.decode = json.JSONDecoder(object_pairs_hook=self._object).decode

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        seen: set[str] = set()
        again: dict[str, None] = {}
        for key, _ in pairs:
            if key in seen:
                again[key] = None
            seen.add(key)
        repeated = _Repeated(obj)
        repeated.repeated = list(again)
        self.found = True
        return repeated

    def clear(self) -> None:
        self.found = False


def _repeats(value: Any) -> list[tuple[tuple[Any, ...], str]]:
    """(path, key) for every key repeated in an object inside ``value``, in document order."""
    out: list[tuple[tuple[Any, ...], str]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _Repeated):
            out.extend((path, key) for key in item.repeated)
        if isinstance(item, dict):
            stack.extend(((*path, k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(item))))
    return out


def _add_repeats(problems: _Problems, number: int | None, record: Any) -> None:
    """A problem for every repeated key in one row object (row ``number``)."""
    for path, key in _repeats(record):
        if not path:
            problems.add(number, key, f"appears more than once in this row: {_KEEP_ONE}")
        else:
            problems.add(number, str(path[0]), f"has the key {_show(key)} more than once: {_KEEP_ONE}")


def _json_error(exc: ValueError) -> str:
    text = str(exc)
    if "integer string conversion" in text:  # Python's own limit, sys.get_int_max_str_digits()
        return (f"a number has more than {sys.get_int_max_str_digits()} digits, far outside any "
                "integer RunningHub takes (at most 20 digits)")
    return text


def _loads(text: str, source: str) -> tuple[Any, bool]:
    """The JSON value of a whole file, and whether an object in it repeats a key."""
    reader = _JsonReader()
    try:
        data = reader.decode(text)
    except RecursionError:
        raise _fail(source, f"the JSON {_DEEP}") from None
    except ValueError as exc:
        raise _fail(source, f"not valid JSON: {_json_error(exc)}: fix the syntax at that place") from None
    if _too_deep(data):
        raise _fail(source, f"the JSON {_DEEP}")
    return data, reader.found


def _records_table(records: list[Any], source: str, lines: list[int] | None = None,
                   repeats: bool = False) -> _Table:
    problems = _Problems(source)
    order: dict[str, None] = {}
    for number, record in enumerate(records, start=1):
        where = f" (line {lines[number - 1]})" if lines else ""
        if not isinstance(record, dict):
            problems.add(number, None, f"is {_show(record)}, not an object of column values{where}: "
                         'write {"column": value, ...}')
            continue
        if repeats:
            _add_repeats(problems, number, record)
        for key in record:
            if key not in order:
                order[key] = None
    problems.raise_if_any()
    columns = list(order)
    cells = [[r.get(c) for r in records] for c in columns]
    return _Table(columns, cells, len(records), False)


def _read_json(path: Path, source: str) -> _Table:
    data, repeats = _loads(_read_text(path, source), source)
    shape = ('expected an array of row objects, or an object {"workflowId": ..., "bindings": '
             '{...}, "defaults": {...}, "rows": [...]}')
    if isinstance(data, list):
        if not data:
            raise _fail(source, "the JSON array has no rows: add at least one row object")
        return _records_table(data, source, repeats=repeats)
    if not isinstance(data, dict):
        raise _fail(source, f"the JSON is {_show(data)}; {shape}")
    unknown = [k for k in data if k not in JSON_TOP_KEYS]
    problems = _Problems(source)
    if repeats:  # the rows' own repeats are reported by _records_table, with their row numbers
        for where, key in _repeats({k: v for k, v in data.items() if k != "rows"}):
            problems.add(None, ".".join(map(str, (*where, key))), f"is given more than once: "
                         f"{_KEEP_ONE}")
        if isinstance(data, _Repeated):
            for key in data.repeated:
                problems.add(None, key, f"appears more than once in the file's top-level object: "
                             f"{_KEEP_ONE}")
    if unknown:
        problems.add(None, None, f"unknown top-level key(s) {', '.join(map(repr, unknown))}: "
                     f"allowed are {', '.join(JSON_TOP_KEYS)}")
    rows = data.get("rows")
    if not isinstance(rows, list):
        problems.add(None, None, f'the JSON object has no "rows" list; {shape}')
    elif not rows:
        problems.add(None, None, 'the "rows" list is empty: add at least one row object')
    bindings = data.get("bindings", {})
    if not isinstance(bindings, dict):
        problems.add(None, None, '"bindings" must be an object mapping columns to "NODE.FIELD", '
                     'e.g. {"prompt": "6.text"}')
        bindings = {}
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.add(None, None, '"defaults" must be an object mapping columns or "NODE.FIELD" '
                     'to values, e.g. {"3.steps": 20}')
        defaults = {}
    problems.raise_if_any()
    assert isinstance(rows, list)
    table = _records_table(rows, source, repeats=repeats)
    table.workflow_id, table.bindings, table.defaults = data.get("workflowId"), bindings, defaults
    return table


def _read_jsonl(path: Path, source: str) -> _Table:
    text = _read_text(path, source)
    problems = _Problems(source)
    records: list[Any] = []
    lines: list[int] = []
    reader = _JsonReader()
    # Lines end at "\n" only (a "\r" before it is dropped): U+2028, U+2029, U+0085, \x0b, \x0c and
    # \x1c-\x1e, which str.splitlines() also breaks at, are text inside JSON strings (json.dumps
    # writes U+2028/U+2029/U+0085 as they are), so a results.jsonl holding them reads back whole.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip(" \t"):  # blank: JSON whitespace only
            continue
        records.append(None)
        lines.append(line_no)
        try:
            value = reader.decode(line)
        except RecursionError:
            problems.add(len(records), None, f"(line {line_no}) {_DEEP}")
            continue
        except ValueError as exc:
            problems.add(len(records), None, f"line {line_no} is not valid JSON ({_json_error(exc)}): "
                         "write one complete JSON object per line")
            continue
        if (isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values())
                and _too_deep(value)):
            problems.add(len(records), None, f"(line {line_no}) {_DEEP}")
            continue
        if reader.found:
            _add_repeats(problems, len(records), value)
            reader.clear()
            continue
        records[-1] = value
    problems.raise_if_any()
    if not records:
        raise _fail(source, "the file has no rows: write one JSON object per line")
    return _records_table(records, source, lines)


def _plain(value: Any) -> Any:
    """Parquet scalars that JSON has no type for, as text (dates) or floats (decimals)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _read_parquet(path: Path, source: str) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _fail(source, f"not a readable Parquet file ({exc}): re-export it, or use CSV or "
                    "JSONL") from None
    if table.num_rows == 0:
        raise _fail(source, "the Parquet file has no rows: add at least one row")
    columns = list(table.column_names)
    cells = []
    for name in columns:
        column = table.column(name)
        values = column.to_pylist()
        kind = column.type
        if pa.types.is_temporal(kind) or pa.types.is_decimal(kind):
            values = [_plain(v) for v in values]
        cells.append(values)
    return _Table(columns, cells, table.num_rows, False)


def _read(path: Path, source: str) -> _Table:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, source, None)
    if suffix == ".tsv":
        return _read_csv(path, source, "\t")
    if suffix == ".json":
        return _read_json(path, source)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, source)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, source)
    raise InputError(escape_controls(f"{source}: unknown manifest format {suffix or '(no extension)'!r}: "
                                     "name the file .csv, .tsv, .json, .jsonl, .ndjson or .parquet"))


# -- the schema -----------------------------------------------------------------------------


def _load_schema(schema_path: str | Path | None) -> tuple[dict[str, Any] | bool, Path]:
    path = Path(schema_path) if schema_path is not None else default_schema_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"Cannot read the schema {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SchemaError(f"The schema {path} is not UTF-8 text: re-save it as UTF-8") from None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"The schema {path} is not valid JSON ({exc}): fix the JSON syntax") from None
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top level)"
        raise SchemaError(f"The schema {path} is not a valid JSON Schema (draft 2020-12) at {where}: "
                          f"{exc.message}") from None
    except RecursionError:
        raise SchemaError(f"The schema {path} is nested too deeply") from None
    if not isinstance(schema, dict | bool):
        raise SchemaError(f"The schema {path} must be a JSON object")
    return schema, path


@lru_cache(maxsize=1)
def _builtin() -> dict[str, Any]:
    schema, _ = _load_schema(None)
    return schema if isinstance(schema, dict) else {}


def _kind(value: Any) -> Any:
    """What a type-only schema can tell apart about a value."""
    if value.__class__ is float:
        return "integral" if value.is_integer() else float
    return value.__class__


class _Rules:
    """The row schema, applied per distinct value when it decomposes by property."""

    def __init__(self, schema: dict[str, Any] | bool, path: Path):
        self.path = path
        self.root: dict[str, Any] = schema if isinstance(schema, dict) else {}
        self.validator = Draft202012Validator(schema)
        root = self.root
        self.decomposable = (
            isinstance(schema, dict) and set(root) <= DECOMPOSABLE_ROOT_KEYS
            and root.get("type", "object") == "object"
        ) or schema is True
        props = root.get("properties", {})
        self.properties: dict[str, Any] = props if isinstance(props, dict) else {}
        patterns = root.get("patternProperties", {})
        self.patterns = [(re.compile(p), s) for p, s in patterns.items()] \
            if isinstance(patterns, dict) else []
        self.additional = root.get("additionalProperties", True)
        self.required: list[str] = list(root.get("required", [])) if self.decomposable else []
        builtin = _builtin()
        builtin_props = builtin.get("properties", {})
        # rhbatch checks these itself with the same rule; no need to run the schema over 1M ids
        self.code_checked = {k for k in ("row_id", "workflowId")
                             if self.properties.get(k) == builtin_props.get(k)}
        nli = self.properties.get("nodeInfoList")
        self.items: Any = None  # the item schema, when nodeInfoList can be checked item by item
        if isinstance(nli, dict) and set(nli) - ANNOTATION_KEYS <= {"type", "items"} \
                and nli.get("type", "array") == "array":
            self.items = nli.get("items", True)
        self.items_by_kind = self.items == builtin_props.get("nodeInfoList", {}).get("items")
        self._subs: dict[str, list[Any]] = {}
        self._by_kind: dict[str, bool] = {}
        self._cache: dict[Any, list[str]] = {}

    def _resolve(self, schema: Any) -> Any:
        seen = 0
        while isinstance(schema, dict) and set(schema) - ANNOTATION_KEYS == {"$ref"} and seen < 16:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return schema
            target: Any = self.root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    return schema
                target = target[part]
            schema, seen = target, seen + 1
        return schema

    def subschemas(self, key: str) -> list[Any]:
        subs = self._subs.get(key)
        if subs is None:
            subs = [self.properties[key]] if key in self.properties else []
            subs.extend(s for pattern, s in self.patterns if pattern.search(key))
            if not subs:
                subs.append(self.additional)
            subs = [self._resolve(s) for s in subs]
            self._subs[key] = subs
        return subs

    def declared_type(self, *keys: str) -> str | None:
        """The one JSON type the schema declares for the first of ``keys`` that declares one."""
        for key in keys:
            if key not in self.properties and not any(p.search(key) for p, _ in self.patterns):
                continue
            for sub in self.subschemas(key):
                kind = sub.get("type") if isinstance(sub, dict) else None
                if isinstance(kind, list):
                    kinds = [k for k in kind if k != "null"]
                    kind = kinds[0] if len(kinds) == 1 else None
                if isinstance(kind, str):
                    return kind
        return None

    def by_kind(self, key: str) -> bool:
        """Whether ``key``'s value is judged by its JSON type alone (so one value per kind will do)."""
        known = self._by_kind.get(key)
        if known is None:
            known = self._by_kind[key] = all(
                s is True or s is False
                or (isinstance(s, dict) and set(s) - ANNOTATION_KEYS <= {"type"})
                for s in self.subschemas(key))
        return known

    def value_errors(self, key: str, value: Any, exact: bool = False) -> list[str]:
        """Messages for ``value`` as the row object's ``key`` (decomposable schemas only). Values
        judged by kind share one verdict, whose message shows the first value; ``exact`` gives the
        message for this very value."""
        subs = self.subschemas(key)
        if self.by_kind(key) and all(s is True for s in subs):
            return []
        if self.by_kind(key) and not exact:
            cache_key: Any = (key, _kind(value))
        elif value is None or isinstance(value, str | int | float | bool):
            cache_key = (key, value.__class__, value)
        else:
            cache_key = (key, "json", _ENC(value) if not _too_deep(value) else id(value))
        known = self._cache.get(cache_key)
        if known is None:
            known = []
            for sub in subs:
                if sub is False:
                    allowed = ", ".join(sorted(self.properties)) or "none"
                    known.append(f"is not a column the schema allows (it allows: {allowed}): remove or "
                                 "rename it, or allow it in the schema")
                elif sub is not True:
                    known.extend(_schema_message(e) for e in self.validator.descend(value, sub))
            self._cache[cache_key] = known
        return known

    def item_errors(self, node: str, name: str, value: Any, exact: bool = False) -> list[str]:
        """Messages for one nodeInfoList item, against the item schema (``exact``: as above)."""
        if self.items is None or self.items is True:
            return []
        if self.items_by_kind and not exact:
            cache_key: Any = ("item", node, name, _kind(value))
        else:
            cache_key = ("item", node, name, value.__class__, value)
        known = self._cache.get(cache_key)
        if known is None:
            item = {"nodeId": node, "fieldName": name, "fieldValue": value}
            known = [_schema_message(e) for e in self.validator.descend(item, self.items)]
            self._cache[cache_key] = known
        return known

    def list_errors(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Messages for a whole nodeInfoList when its schema does not go item by item."""
        sub = self.subschemas("nodeInfoList")
        return [_schema_message(e) for s in sub if s is not True
                for e in self.validator.descend([dict(i) for i in items], s)]

    def row_errors(self, obj: dict[str, Any]) -> list[tuple[list[Any], str]]:
        return [(list(e.absolute_path), _schema_message(e)) for e in self.validator.iter_errors(obj)]


# -- typing cells ---------------------------------------------------------------------------


def _parse_int(text: str) -> int | None:
    t = text.strip()
    if len(t) > MAX_INT_DIGITS:
        return None  # out of every range anyway (the message says so), and slow to convert
    if INT_RE.fullmatch(t):
        return int(t)
    if NUMBER_RE.fullmatch(t):
        number = float(t)
        if number.is_integer():
            return int(number)
    return None


def _parse_number(text: str) -> float | None:
    t = text.strip()
    return float(t) if NUMBER_RE.fullmatch(t) and math.isfinite(float(t)) else None


def _parse_bool(text: str) -> bool | None:
    return BOOL_TEXT.get(text.strip().lower())


_PARSERS = {"integer": _parse_int, "number": _parse_number, "boolean": _parse_bool}


def _int_range(field_name: str | None) -> tuple[int, int]:
    return SEED_RANGE if field_name in SEED_FIELDS else INT64_RANGE


def _range_message(shown: str, field_name: str | None) -> str:
    if field_name in SEED_FIELDS:
        return (f"{shown} is outside the seed range 0 to {SEED_RANGE[1]} (2**64-1, ComfyUI's largest "
                "seed): use a seed in that range, e.g. 42")
    return (f"{shown} is outside -2**63 to 2**63-1 ({INT64_RANGE[0]} to {INT64_RANGE[1]}), the widest "
            "integer RunningHub and a Parquet manifest carry: use a smaller number")


def _int_problem(value: Any, field_name: str | None) -> str | None:
    """Why an integer cannot be sent as ``field_name`` (None when it can, or is no integer)."""
    if value.__class__ is not int:
        return None
    low, high = _int_range(field_name)
    return None if low <= value <= high else _range_message(_show(value), field_name)


def _infer(distinct: Iterable[str]) -> str:
    stripped = [t.strip() for t in distinct]
    if not stripped:
        return "string"
    if all(INT_RE.fullmatch(t) for t in stripped):
        return "integer"
    if all(NUMBER_RE.fullmatch(t) for t in stripped):
        return "number"
    # nan / inf among numbers: a float column whose NaN cells are refused, not a text column that
    # would send "nan" as text
    if any(NUMBER_RE.fullmatch(t) for t in stripped) \
            and all(NUMBER_RE.fullmatch(t) or NONFINITE_RE.fullmatch(t) for t in stripped):
        return "number"
    if all(t.lower() in BOOL_TEXT for t in stripped):
        return "boolean"
    return "string"


# -- building rows --------------------------------------------------------------------------


@dataclass
class _Column:
    name: str  # as in the file (for output manifests, ``inputs.`` removed)
    values: list[Any]
    target: tuple[str, str] | None = None  # (nodeId, fieldName) when it feeds nodeInfoList
    bad: bool = False  # some cell is _BAD (reported), or empty in a bound column (reported)


_encode_text = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _enc_scalar(value: Any) -> str:
    """JSON of a scalar, exactly as ``_ENC`` writes it, without the pure-Python encoder."""
    cls = value.__class__
    if cls is str:
        return _encode_text(value)
    if cls is bool:
        return "true" if value else "false"
    if cls is int:
        return int.__repr__(value)
    if cls is float and math.isfinite(value):
        return float.__repr__(value)
    return _ENC(value)


def _canonical_item(node: str, name: str, value: Any) -> str:
    return f"[{_encode_text(node)},{_encode_text(name)},{_enc_scalar(value)}]"


def _content_text(workflow_id: str, fragments: Iterable[str], options: dict[str, Any]) -> str:
    """Canonical JSON of [workflowId, sorted [nodeId, fieldName, fieldValue] triples, options]."""
    return f"[{_ENC(workflow_id)},[{','.join(fragments)}],{_ENC(options)}]"


def content_key(workflow_id: str, node_info_list: Iterable[dict[str, Any]],
                options: dict[str, Any] | None = None) -> str:
    """sha256 hex of a row's canonical content; ``"r" + content_key(...)[:16]`` is its derived id."""
    triples = sorted(([str(i["nodeId"]), str(i["fieldName"]), i["fieldValue"]] for i in node_info_list),
                     key=lambda t: (t[0], t[1]))
    text = _content_text(workflow_id, (_ENC(t) for t in triples), options or {})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _nothing_sent(names: Sequence[str]) -> str:
    return ("no column sends a node input: name columns NODE.FIELD (e.g. 6.text), bind one with "
            f"--bind COLUMN=NODE.FIELD (columns: {', '.join(names) or 'none'}), or give a "
            "nodeInfoList column")


class _Builder:
    def __init__(self, source: str, table: _Table, rules: _Rules, binds: list[tuple[str, str, str]],
                 workflow_id: str | None, allow_duplicates: bool):
        self.source = source
        self.table = table
        self.rules = rules
        self.binds = binds
        self.workflow_id = workflow_id
        self.allow_duplicates = allow_duplicates
        self.binding = _Problems(source, table.lines, "binding")  # columns, bindings, defaults
        self.problems = _Problems(source, table.lines, "value")  # cells, schema, ids, duplicates
        self.unsendable: set[int] = set()  # rows (0-based) whose request is not complete
        self.is_output = False
        self.cells = dict(zip(table.columns, table.cells, strict=True))
        self.json_reader = _JsonReader()  # for JSON text in CSV cells (nodeInfoList, options)

    # ---- columns

    def layout(self) -> tuple[list[_Column], list[tuple[str, str, Any]], dict[str, Any]]:
        """Input columns (with targets), constant node defaults, and option defaults."""
        table, problems = self.table, self.binding
        names = table.columns
        is_output = "nodeInfoList" in self.cells and ("status" in self.cells or "taskId" in self.cells)
        self.is_output = is_output
        columns: list[_Column] = []
        if is_output:
            for name in names:
                if name.startswith("inputs."):
                    columns.append(_Column(name[len("inputs."):], self.cells[name]))
                elif name not in RESULT_FIELDS and name not in SPECIAL_COLUMNS:
                    columns.append(_Column(name, self.cells[name]))
            recorded = self.cells.get("inputs")
            if recorded is not None and not table.text:
                keys: dict[str, None] = {}
                for value in recorded:
                    if isinstance(value, dict):
                        keys.update(dict.fromkeys(value))
                columns.extend(_Column(k, [v.get(k) if isinstance(v, dict) else None for v in recorded])
                               for k in keys if k not in {c.name for c in columns})
        else:
            columns = [_Column(n, self.cells[n]) for n in names if n not in SPECIAL_COLUMNS]
        by_name = {c.name: c for c in columns}
        for column in columns:
            if _has_controls(column.name):
                problems.add(None, column.name, "the name holds a control character: retype the "
                             "name, with letters, digits and punctuation only")

        bind_map: dict[str, tuple[str, str]] = {}
        for bound_name, target in table.bindings.items():
            match = TARGET_RE.fullmatch(target) if isinstance(target, str) else None
            if match is None or _has_controls(target):
                problems.add(None, bound_name, f'bindings: {_show(target)} is not "NODE.FIELD": write '
                             'e.g. "6.text"')
                continue
            bind_map[bound_name] = (match.group(1), match.group(2))
        bound_by_flag: dict[str, tuple[str, str]] = {}
        for bound_name, node, name in self.binds:
            earlier = bound_by_flag.setdefault(bound_name, (node, name))
            if earlier != (node, name):
                problems.add(None, bound_name, f"--bind {bound_name}={'.'.join(earlier)} and --bind "
                             f"{bound_name}={node}.{name} both bind this column, and a column feeds one "
                             "node input: keep one --bind (to send one value to two inputs, copy the "
                             "column under another name and bind the copy)")
                continue
            bind_map[bound_name] = (node, name)
        column_defaults: dict[str, Any] = {}
        node_defaults: list[tuple[str, str, Any]] = []
        option_defaults: dict[str, Any] = {}
        for key, value in table.defaults.items():
            if isinstance(value, dict | list) or (isinstance(value, float) and not math.isfinite(value)):
                problems.add(None, f"defaults.{key}", f"{_show(value)} is not a single value: "
                             "a default is text, a number or true/false")
            elif key in OPTION_FIELDS:
                option_defaults[key] = value
            elif key in by_name or key in bind_map:
                column_defaults[key] = value
            elif (match := TARGET_RE.fullmatch(key)) is not None:
                if (message := _int_problem(value, match.group(2))) is not None:
                    problems.add(None, f"defaults.{key}", message)
                else:
                    node_defaults.append((match.group(1), match.group(2), value))
            else:
                problems.add(None, f"defaults.{key}", 'names neither a column nor a "NODE.FIELD": '
                             'write e.g. "3.steps": 20')
        for bound_name in bind_map:
            if bound_name in SPECIAL_COLUMNS:
                problems.add(None, bound_name, f"is a reserved column ({', '.join(sorted(SPECIAL_COLUMNS))}"
                             ") and cannot feed a node input: bind another column, or rename this one")
                continue
            if bound_name not in by_name:
                if bound_name in column_defaults:  # bound and defaulted, absent from every row
                    by_name[bound_name] = _Column(bound_name, [None] * table.n_rows)
                    columns.append(by_name[bound_name])
                    continue
                existing = ", ".join(c.name for c in columns) or "(none)"
                problems.add(None, bound_name, f"is bound to {'.'.join(bind_map[bound_name])} but there "
                             f"is no such column; the columns are: {existing}")
        for column in columns:
            if column.name in bind_map:
                column.target = bind_map[column.name]
            elif is_output:
                continue  # an output manifest's recorded nodeInfoList is what is sent; inputs are metadata
            elif (match := COLUMN_TARGET_RE.fullmatch(column.name)) is not None:
                column.target = (match.group(1), match.group(2))
        fed: dict[tuple[str, str], str] = {}
        for column in columns:
            if column.target is None:
                continue
            if column.target in fed:
                problems.add(None, column.name, f"feeds {'.'.join(column.target)}, which column "
                             f"{fed[column.target]!r} feeds already: bind each node input once")
            fed.setdefault(column.target, column.name)
        node_defaults = [d for d in node_defaults if (d[0], d[1]) not in fed]
        # no raise here: the cells are read and checked too, so that one pass reports everything
        for column in columns:
            self._type_column(column, column_defaults.get(column.name))
        return columns, node_defaults, option_defaults

    def _type_column(self, column: _Column, default: Any) -> None:
        """Turn cells into typed values: None for empty, _BAD for a reported cell."""
        values = column.values
        problems = self.problems
        reported = problems.count
        declared = self.rules.declared_type(
            column.name, *(['.'.join(column.target)] if column.target else []))
        field_name = column.target[1] if column.target else None
        if (message := _int_problem(default, field_name)) is not None:
            problems.add(None, f"defaults.{column.name}", message)
            default = None
        if self.table.text:
            distinct = set(values)
            distinct.discard("")
            kind = declared or _infer(distinct)
            if kind not in _PARSERS:
                kind = "string"
            parser = _PARSERS.get(kind)
            if parser is None and (not distinct or max(map(len, distinct)) <= MAX_CELL_BYTES // 4) \
                    and (column.target is None or not any(t.startswith("=") for t in distinct)):
                distinct = set()  # plain text, kept as is: only "" needs mapping (to None)
            mapping: dict[str, Any] = {"": None}
            low, high = _int_range(field_name)
            for text in distinct:
                if len(text) > MAX_CELL_BYTES // 4 and len(text.encode("utf-8")) > MAX_CELL_BYTES:
                    mapping[text] = _BAD
                    continue
                if parser is None:
                    # a spreadsheet formula saved as text: sending it would pay for the formula
                    formula = column.target is not None and text.startswith("=")
                    mapping[text] = _BAD if formula else text
                    continue
                value = parser(text)
                if value is None or (value.__class__ is int and not low <= value <= high):
                    value = _BAD  # reported below, with _cell_message
                mapping[text] = value
            values = list(map(mapping.get, values, values))
            if _BAD in mapping.values():
                for i, (text, value) in enumerate(zip(column.values, values, strict=True)):
                    if value is _BAD:
                        problems.add(i + 1, column.name, self._cell_message(text, kind, column))
        else:
            kinds = set(map(type, values))
            fix_float = declared == "integer" and float in kinds
            if kinds - {str, int, float, bool, type(None)} or fix_float or str in kinds or float in kinds:
                out = []
                for i, value in enumerate(values):
                    if isinstance(value, str):
                        if len(value) > MAX_CELL_BYTES // 4 and len(value.encode("utf-8")) > MAX_CELL_BYTES:
                            problems.add(i + 1, column.name, self._cell_message(value, "", column))
                            value = _BAD
                    elif isinstance(value, float):
                        if not math.isfinite(value):
                            if column.target is not None or not math.isnan(value):
                                problems.add(i + 1, column.name, f"is {_ENC_NAN.get(str(value), value)} "
                                             "(an empty cell?): write a number")
                                value = _BAD
                            else:
                                value = None
                        elif fix_float and value.is_integer():
                            if _int_problem(int(value), field_name):  # shown as written: 1e+300
                                problems.add(i + 1, column.name, _range_message(_show(value),
                                                                                field_name))
                                value = _BAD
                            else:
                                value = int(value)
                    elif isinstance(value, dict | list) and column.target is not None:
                        problems.add(i + 1, column.name, f"{_show(value)} is not a single value: "
                                     f"{'.'.join(column.target)} takes text, a number or true/false")
                        value = _BAD
                    out.append(value)
                values = out
            if int in kinds or fix_float:
                low, high = _int_range(field_name)
                ints = [v for v in values if v.__class__ is int]
                if ints and (min(ints) < low or max(ints) > high):
                    values = list(values)
                    for i, value in enumerate(values):
                        message = _int_problem(value, field_name)
                        if message:
                            problems.add(i + 1, column.name, message)
                            values[i] = _BAD
        if column.target is not None and None in values:
            if default is not None:
                values = [default if v is None else v for v in values]
            else:
                target = ".".join(column.target)
                for i, value in enumerate(values):
                    if value is None:
                        problems.add(i + 1, column.name, f"is empty, so {target} has no value to send: "
                                     "fill it in (or give a default for it in a JSON manifest's "
                                     '"defaults")')
        elif default is not None and None in values:
            values = [default if v is None else v for v in values]
        column.values = values
        if problems.count != reported:  # this column's cells were reported: skip them from now on
            column.bad = True
            if column.target is not None:
                self.unsendable.update(i for i, v in enumerate(values) if v is _BAD or v is None)

    def _cell_message(self, text: str, kind: str, column: _Column) -> str:
        size = len(text.encode("utf-8"))
        if size > MAX_CELL_BYTES:
            return (f"holds {size:,} bytes, more than the {MAX_CELL_BYTES:,}-byte (1 MiB) limit for "
                    "one value: shorten it")
        if kind == "string" and text.startswith("="):
            return (f'{_show(text)} starts with "=": a spreadsheet formula was saved instead of its '
                    "value; paste values only, or use a JSON or JSONL manifest for text that "
                    'starts with "="')
        what = f"{'.'.join(column.target)}" if column.target else f'column "{column.name}"'
        if kind == "integer" and (_parse_int(text) is not None or INT_RE.fullmatch(text.strip())):
            return _range_message(_show(text), column.target[1] if column.target else None)
        if kind == "integer":
            return f"{_show(text)} is not a whole number ({what} takes whole numbers): write digits " \
                   "only, e.g. 42"
        if kind == "number" and NONFINITE_RE.fullmatch(text.strip()):
            return (f"{_show(text)} is not a finite number ({what} takes numbers, and NaN or infinity "
                    "cannot be sent as JSON): write a number, e.g. 7.5")
        if kind == "number":
            return f"{_show(text)} is not a number ({what} takes numbers): write e.g. 7.5"
        return f"{_show(text)} is not true or false ({what} takes true/false): write true or false"

    # ---- special columns

    def _text_or_value(self, name: str) -> list[Any] | None:
        values = self.cells.get(name)
        if values is None:
            return None
        if self.table.text:
            return [v.strip() or None for v in values]
        return values

    def workflow_ids(self) -> list[str | None]:
        problems = self.problems
        default = self.workflow_id
        if default is None and self.table.workflow_id is not None:
            top = self.table.workflow_id
            top = str(top) if isinstance(top, int) and not isinstance(top, bool) else top
            if not isinstance(top, str) or not WORKFLOW_ID_RE.fullmatch(top.strip()):
                problems.add(None, "workflowId", f"{_show(top)} (the file's workflowId) is not a "
                             f"workflow id: use the digits from the workflow's URL, e.g. "
                             f"{EXAMPLE_WORKFLOW_ID}")
            else:
                default = top.strip()
        column = self._text_or_value("workflowId")
        if column is None:
            if default is None and not problems:
                problems.add(None, "workflowId", "no row has a workflow id: add a workflowId column, "
                             "give \"workflowId\" in a JSON manifest, or pass --workflow-id ID")
            return [default] * self.table.n_rows
        checked: dict[Any, str | None] = {}
        out: list[str | None] = []
        for i, value in enumerate(column):
            if value is None or value == "":
                out.append(default)
                if default is None:
                    problems.add(i + 1, "workflowId", "is empty and there is no default: fill it in, or "
                                 "pass --workflow-id ID")
                continue
            key = (value.__class__, value) if not isinstance(value, dict | list) else ("json", id(value))
            if key not in checked:
                text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
                if isinstance(text, str) and WORKFLOW_ID_RE.fullmatch(text.strip()):
                    checked[key] = text.strip()
                else:
                    checked[key] = None
            wid = checked[key]
            if wid is None:
                problems.add(i + 1, "workflowId", f"{_show(value)} is not a workflow id: use the digits "
                             f"from the workflow's URL, e.g. {EXAMPLE_WORKFLOW_ID} (not 0, and as text "
                             "in JSON)")
            out.append(wid)
        return out

    def options_for(self, n_rows: int, option_defaults: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Each row's options, or None when no row has any."""
        problems = self.problems
        cells = self.cells.get("options")
        columns = []
        for name in OPTION_FIELDS:
            values = self.cells.get(name)
            if values is None:
                continue
            if self.table.text:
                parser = _PARSERS.get(OPTION_TYPES.get(name, ""))
                typed: list[Any] = []
                for text in values:
                    t = text.strip()
                    if not t:
                        typed.append(None)
                    else:
                        parsed = parser(t) if parser else t
                        typed.append(t if parsed is None else parsed)  # the schema names the fix
                values = typed
            columns.append((name, values))
        if cells is None and not columns and not option_defaults:
            return None
        out: list[dict[str, Any]] = []
        for i in range(n_rows):
            reported = problems.count
            options = dict(option_defaults)
            cell = cells[i] if cells is not None else None
            if isinstance(cell, str):
                cell = cell.strip()
                if cell:
                    self.json_reader.clear()
                    try:
                        cell = self.json_reader.decode(cell)
                    except (ValueError, RecursionError):
                        problems.add(i + 1, "options", f"{_show(cell)} is not JSON: write an object "
                                     'like {"instanceType": "plus"}, or use an instanceType column')
                        cell = None
                    if self.json_reader.found:
                        for _, key in _repeats(cell):
                            problems.add(i + 1, "options", f"has the key {_show(key)} more than once: "
                                         f"{_KEEP_ONE}")
                else:
                    cell = None
            if isinstance(cell, dict):
                for key, value in cell.items():
                    if key not in OPTION_FIELDS:
                        problems.add(i + 1, "options", f"has an unknown option {_show(key)}: use "
                                     f"{', '.join(OPTION_FIELDS)}")
                    elif value is not None:
                        options[key] = value
            elif cell is not None:
                problems.add(i + 1, "options", f"{_show(cell)} is not an object of task options: write "
                             'e.g. {"instanceType": "plus"}')
            for name, values in columns:
                value = values[i]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if name in options and options[name] != value and isinstance(cell, dict) \
                        and name in cell:
                    problems.add(i + 1, name, f"{_show(value)} differs from the options cell's "
                                 f"{_show(options[name])}: keep one")
                options[name] = value
            if problems.count != reported:
                self.unsendable.add(i)
            out.append(options or _EMPTY_OPTIONS)
        return out

    def explicit_list(self, cell: Any, number: int) -> tuple[dict[str, Any], ...] | None:
        problems = self.problems
        example = '[{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}]'
        if isinstance(cell, str):
            reader = self.json_reader
            reader.clear()
            try:
                cell = reader.decode(cell)
            except RecursionError:
                problems.add(number, "nodeInfoList", f"is JSON that {_DEEP}")
                return None
            except json.JSONDecodeError as exc:
                problems.add(number, "nodeInfoList", f"is not valid JSON ({exc.msg} at character "
                             f"{exc.pos + 1}): write a list like {example}")
                return None
            except ValueError as exc:
                problems.add(number, "nodeInfoList", f"is not valid JSON ({_json_error(exc)}): write a "
                             f"list like {example}")
                return None
            if reader.found:
                for _, key in _repeats(cell):
                    problems.add(number, "nodeInfoList", f"has the key {_show(key)} more than once: "
                                 f"{_KEEP_ONE}")
                return None
        if not isinstance(cell, list | tuple):
            problems.add(number, "nodeInfoList", f"{_show(cell)} is not a list: write a list like "
                         f"{example}")
            return None
        items = []
        seen: set[tuple[str, str]] = set()
        ok = True
        for k, item in enumerate(cell, start=1):
            if not isinstance(item, dict):
                problems.add(number, "nodeInfoList", f"item {k} is {_show(item)}, not an object: write "
                             f"{example}")
                ok = False
                continue
            missing = [key for key in ("nodeId", "fieldName", "fieldValue") if key not in item]
            if missing:
                problems.add(number, "nodeInfoList", f"item {k} lacks {', '.join(missing)}: each item "
                             "needs nodeId, fieldName and fieldValue")
                ok = False
                continue
            node, name, value = item["nodeId"], item["fieldName"], item["fieldValue"]
            if isinstance(node, int) and not isinstance(node, bool):
                node = str(node)
            if not isinstance(node, str) or not node or not isinstance(name, str) or not name \
                    or _has_controls(node) or _has_controls(name):
                problems.add(number, "nodeInfoList", f"item {k} has nodeId {_show(node)} and fieldName "
                             f"{_show(name)}: both must be non-empty text without control characters")
                ok = False
                continue
            if value is None or isinstance(value, dict | list) or (
                    isinstance(value, float) and not math.isfinite(value)):
                problems.add(number, "nodeInfoList", f"item {k} ({node}.{name}) has fieldValue "
                             f"{_show(value)}: send text, a number or true/false")
                ok = False
                continue
            if (message := _int_problem(value, name)) is not None:
                problems.add(number, "nodeInfoList", f"item {k} ({node}.{name}): {message}")
                ok = False
                continue
            if isinstance(value, str) and len(value) > MAX_CELL_BYTES // 4 \
                    and len(value.encode("utf-8")) > MAX_CELL_BYTES:
                problems.add(number, "nodeInfoList", f"item {k} ({node}.{name}) holds "
                             f"{len(value.encode('utf-8')):,} bytes, more than the 1 MiB limit: "
                             "shorten it")
                ok = False
                continue
            if (node, name) in seen:
                problems.add(number, "nodeInfoList", f"sets {node}.{name} twice: keep one item")
                ok = False
                continue
            seen.add((node, name))
            extra = {k2: v for k2, v in item.items() if k2 not in ("nodeId", "fieldName", "fieldValue")}
            items.append({"nodeId": node, "fieldName": name, "fieldValue": value, **extra})
        return tuple(items) if ok else None

    # ---- rows

    def build(self) -> Manifest:
        table, problems = self.table, self.problems
        n = table.n_rows
        columns, node_defaults, option_defaults = self.layout()
        bound = [c for c in columns if c.target is not None]
        workflow_ids = self.workflow_ids()
        if None in workflow_ids:
            self.unsendable.update(i for i, wid in enumerate(workflow_ids) if wid is None)
        options_list = self.options_for(n, option_defaults)
        row_ids = self._text_or_value("row_id")
        explicit_cells = self.cells.get("nodeInfoList")
        unsendable = self.unsendable
        # a problem with the columns or bindings changes every row's request: no row is compared
        compare = not self.binding

        # Node inputs fed by columns: one shared item dict and canonical fragment per distinct value.
        item_columns: list[list[dict[str, Any]]] = []
        fragment_columns: list[tuple[tuple[str, str], list[str]]] = []
        for column in bound:
            node, name = column.target  # type: ignore[misc]
            mixed = len(set(map(type, column.values))) > 1
            items: dict[Any, dict[str, Any]] = {}
            fragment_of: dict[Any, str] = {}
            item_list, fragment_list = [], []
            for value in column.values:
                key = (value.__class__, value) if mixed else value
                item = items.get(key)
                if item is None:
                    item = items[key] = {"nodeId": node, "fieldName": name, "fieldValue": value}
                    try:
                        fragment_of[key] = _canonical_item(node, name, value)
                    except (TypeError, ValueError):  # a reported bad value
                        fragment_of[key] = "null"
                item_list.append(item)
                fragment_list.append(fragment_of[key])
            item_columns.append(item_list)
            fragment_columns.append(((node, name), fragment_list))
        constant_items = tuple({"nodeId": node, "fieldName": name, "fieldValue": value}
                               for node, name, value in node_defaults)
        constant_fragments = [((node, name), _canonical_item(node, name, value))
                              for node, name, value in node_defaults]
        order = sorted(range(len(fragment_columns)), key=lambda j: fragment_columns[j][0])
        sorted_fragment_columns = [fragment_columns[j][1] for j in order]
        all_constant = sorted(constant_fragments)
        targets_fed = {target for target, _ in fragment_columns}

        names = [c.name for c in columns]
        value_columns = [c.values for c in columns]
        rows: list[Row] = []
        fingerprint = hashlib.sha256()
        first_by_content: dict[bytes, int] = {}
        occurrences: dict[bytes, int] = {}
        explicit_ids: dict[str, int] = {}
        duplicates: list[tuple[int, int]] = []
        wf_json: dict[str, str] = {}
        nothing_sent = not bound and not node_defaults and explicit_cells is None
        if nothing_sent and not (self.binding and (self.binds or table.bindings)):
            problems.add(None, None, _nothing_sent(names))  # (a broken binding says it better)
        zipped_items = zip(*item_columns, strict=True) if item_columns else iter(lambda: (), None)
        zipped_fragments = zip(*sorted_fragment_columns, strict=True) if sorted_fragment_columns \
            else iter(lambda: (), None)
        zipped_values = zip(*value_columns, strict=True) if value_columns else iter(lambda: (), None)
        explicit_by_row: dict[int, tuple[dict[str, Any], ...]] = {}
        make = _fast_row

        for i, column_items, column_fragments, values in zip(
                range(n), zipped_items, zipped_fragments, zipped_values, strict=False):
            number = i + 1
            wf = workflow_ids[i] or ""
            options = options_list[i] if options_list is not None else _EMPTY_OPTIONS
            explicit = None
            if explicit_cells is not None and explicit_cells[i] not in (None, ""):
                explicit = self.explicit_list(explicit_cells[i], number)
                if explicit is not None:
                    explicit_by_row[i] = explicit
                else:
                    unsendable.add(i)
            if explicit is not None:
                given = {(e["nodeId"], e["fieldName"]) for e in explicit}
                for target in sorted(given & targets_fed):
                    column_name = next(c.name for c in bound if c.target == target)
                    problems.add(number, column_name, f"sets {'.'.join(target)}, which this row's "
                                 "nodeInfoList sets too: keep one of them")
                    unsendable.add(i)
                node_info_list = explicit + column_items + tuple(
                    c for c in constant_items if (c["nodeId"], c["fieldName"]) not in given)
                merged = [((e["nodeId"], e["fieldName"]),
                           _canonical_item(e["nodeId"], e["fieldName"], e["fieldValue"]))
                          for e in explicit]
                merged += [(target, fragment_list[i]) for target, fragment_list in fragment_columns]
                merged += [(t, f) for t, f in constant_fragments if t not in given]
                merged.sort()
                fragments: Iterable[str] = [f for _, f in merged]
            else:
                node_info_list = column_items + constant_items if constant_items else column_items
                if all_constant:
                    fragments = [f for _, f in sorted(
                        list(zip((fragment_columns[j][0] for j in order), column_fragments,
                                 strict=True)) + all_constant)]
                else:
                    fragments = column_fragments
                if explicit_cells is not None and not node_info_list and not nothing_sent \
                        and explicit_cells[i] in (None, ""):
                    problems.add(number, "nodeInfoList", "is empty and no column sends a node input: "
                                 'write a list like [{"nodeId": "6", "fieldName": "text", '
                                 '"fieldValue": "a cat"}]')
                    unsendable.add(i)
            wf_text = wf_json.get(wf)
            if wf_text is None:
                wf_text = wf_json[wf] = _ENC(wf)
            text = f"[{wf_text},[{','.join(fragments)}],{_ENC(options) if options else '{}'}]"
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            given_id = row_ids[i] if row_ids is not None else None
            if row_ids is not None:
                if isinstance(given_id, int) and not isinstance(given_id, bool):
                    given_id = str(given_id)
                if given_id is None or given_id == "":
                    problems.add(number, "row_id", "is empty: give every row an id, or drop the row_id "
                                 "column to derive ids from the content")
                    row_id = ""
                elif not isinstance(given_id, str) or not ROW_ID_RE.fullmatch(given_id):
                    problems.add(number, "row_id", f"{_show(given_id)} is not a valid row id: use 1 to "
                                 "128 letters, digits, '.', '_', ':' or '-'")
                    row_id = str(given_id)
                else:
                    row_id = given_id
                    earlier_id = explicit_ids.setdefault(row_id, number)
                    if earlier_id != number:
                        problems.add(number, "row_id", f"{_show(row_id)} is also the id of row "
                                     f"{earlier_id}: row ids must be unique")
            else:
                row_id = "r" + digest[:8].hex()
            earlier = first_by_content.setdefault(digest, number) \
                if compare and i not in unsendable else number
            if earlier != number:
                if not self.allow_duplicates:
                    problems.add(number, None, f"sends the same workflow, node inputs and options as "
                                 f"row {earlier} (ComfyUI may return a cached result for an identical "
                                 "graph): remove it, change a value such as the seed, or pass "
                                 "--allow-duplicates")
                else:
                    duplicates.append((number, earlier))
                    occurrences[digest] = occurrences.get(digest, 1) + 1
                    if row_ids is None:
                        row_id = f"{row_id}-{occurrences[digest]}"
            fingerprint.update(row_id.encode("utf-8") + b"\t" + data + b"\n")
            inputs = dict(zip(names, values, strict=False))  # same length by construction
            rows.append(make(i, number, row_id, wf, node_info_list, inputs, options))
        if self.allow_duplicates and row_ids is None and duplicates:
            taken: dict[str, int] = {}
            for row in rows:
                other = taken.setdefault(row.row_id, row.number)
                if other != row.number:
                    problems.add(row.number, "row_id", f"the derived id {row.row_id} is also row "
                                 f"{other}'s: give the rows a row_id column")
        self.validate(columns, workflow_ids, options_list, row_ids, explicit_by_row, constant_items,
                      rows)

        def manifest(kept: list[Row]) -> Manifest:
            return Manifest(
                source=self.source,
                rows=kept,
                columns=names,
                bound={c.name: ".".join(c.target) for c in bound},  # type: ignore[arg-type]
                unbound=[c.name for c in columns if c.target is None],
                fingerprint=fingerprint.hexdigest(),
                duplicates=duplicates,
                from_results=self.is_output,
            )

        if self.binding or problems:
            raise ManifestProblems(escape_controls(self.source),
                                   [self.binding.group(), problems.group()],
                                   manifest([self._checkable(row) for row in rows
                                             if workflow_ids[row.index] is not None]))
        return manifest(rows)

    def _checkable(self, row: Row) -> Row:
        """``row`` as the checks after loading may judge it: without its unreadable values."""
        if row.index not in self.unsendable:
            return row
        items = [i for i in row.node_info_list if i["fieldValue"] is not _BAD
                 and i["fieldValue"] is not None]
        inputs = {k: v for k, v in row.inputs.items() if v is not _BAD}
        return make_row(row.index, row.number, row.row_id, row.workflow_id, items, inputs,
                        row.options)

    # ---- schema

    def validate(self, columns: list[_Column], workflow_ids: list[str | None],
                 options_list: list[dict[str, Any]] | None, row_ids: list[Any] | None,
                 explicit_by_row: dict[int, tuple[dict[str, Any], ...]],
                 constant_items: tuple[dict[str, Any], ...], rows: list[Row]) -> None:
        rules, problems = self.rules, self.problems
        # Values already reported (unreadable cells, empty node inputs, rows whose request is not
        # complete) are not judged again: the schema's message about them would only add noise.
        unsendable = self.unsendable
        if not rules.decomposable:
            for row in rows:
                if row.index in unsendable or (problems and any(v is _BAD for v in row.inputs.values())):
                    continue
                obj = {"row_id": row.row_id, "workflowId": row.workflow_id,
                       "nodeInfoList": [dict(x) for x in row.node_info_list], **row.options,
                       **row.inputs}
                sources = [self._source_of(item, columns) for item in row.node_info_list]
                for path, message in rules.row_errors(obj):
                    where = str(path[0]) if path else None
                    if where == "nodeInfoList" and len(path) > 1 and isinstance(path[1], int) \
                            and path[1] < len(sources):
                        where = sources[path[1]]
                    problems.add(row.number, where, message)
            return
        self.validate_columns(columns)
        for item in constant_items:
            for message in rules.item_errors(item["nodeId"], item["fieldName"], item["fieldValue"]):
                problems.add(None, f"defaults.{item['nodeId']}.{item['fieldName']}", message)
        for i, explicit in explicit_by_row.items():
            if rules.items is None:
                if i in unsendable:
                    continue
                for message in rules.list_errors(rows[i].node_info_list):
                    problems.add(i + 1, "nodeInfoList", message)
                continue
            for item in explicit:
                for message in rules.item_errors(item["nodeId"], item["fieldName"], item["fieldValue"]):
                    problems.add(i + 1, "nodeInfoList", f"{item['nodeId']}.{item['fieldName']}: "
                                 f"{message}")
        if rules.items is None and not explicit_by_row:
            for row in rows:
                if row.index in unsendable:
                    continue
                for message in rules.list_errors(row.node_info_list):
                    problems.add(row.number, "nodeInfoList", message)
        # Special keys and options.
        special: tuple[tuple[str, list[Any] | None], ...] = (("workflowId", workflow_ids), ("row_id", None))
        for key, special_values in special:
            if key in rules.code_checked:
                continue
            column_values = special_values if special_values is not None else [r.row_id for r in rows]
            for value in set(column_values):
                if value is None:  # a missing or invalid workflow id, reported already
                    continue
                messages = rules.value_errors(key, value)
                if messages:
                    for i, v in enumerate(column_values):
                        if v == value:
                            for message in messages:
                                problems.add(i + 1, key, message)
        present_base = {"row_id", "workflowId", "nodeInfoList", *(c.name for c in columns)}
        if options_list is None:
            for key in rules.required:
                if key not in present_base:
                    problems.add(None, key, "is missing from every row: add this column (the schema "
                                 "requires it)")
            return
        required_cache: dict[frozenset[str], list[str]] = {}
        for i, options in enumerate(options_list):
            for key, value in options.items():
                for message in rules.value_errors(key, value):
                    problems.add(i + 1, key, message)
            present = frozenset(options)
            missing = required_cache.get(present)
            if missing is None:
                missing = required_cache[present] = [
                    k for k in rules.required if k not in present_base and k not in present]
            for key in missing:
                problems.add(i + 1, key, "is missing: add this column (the schema requires it)")

    def validate_columns(self, columns: list[_Column]) -> None:
        """Each distinct value of each column against the (decomposable) schema, once."""
        rules, problems = self.rules, self.problems
        for column in columns:
            values = column.values
            by_kind = rules.by_kind(column.name) and (column.target is None or rules.items_by_kind)

            def judged(value: Any, column: _Column = column) -> bool:
                """Whether ``value`` is still to be judged (not reported already)."""
                return not column.bad or not (value is _BAD or (value is None and column.target))

            try:
                mixed = len(set(map(type, values))) > 1
                if by_kind:  # one representative value per kind
                    distinct = set({(_kind(v) if mixed else _kind(v)): ((type(v), v) if mixed else v)
                                    for v in values}.values()) if float in set(map(type, values)) \
                        else set({type(v): ((type(v), v) if mixed else v) for v in values}.values())
                    bad_kinds: set[Any] = set()
                else:
                    distinct = set(zip(map(type, values), values, strict=True)) if mixed else set(values)
                keyed = True
            except TypeError:  # lists or objects in a metadata column
                keyed = False
            if keyed and column.bad:
                distinct = {e for e in distinct if judged(e[1] if mixed else e)}
            if keyed:
                bad: dict[Any, list[str]] = {}
                for entry in distinct:
                    value = entry[1] if mixed else entry
                    messages = list(rules.value_errors(column.name, value))
                    if column.target is not None and value is not None:
                        messages += rules.item_errors(*column.target, value)
                    if messages:
                        bad[entry] = messages
                        if by_kind:
                            bad_kinds.add(_kind(value))
                if bad and by_kind:  # every value of a bad kind fails the same way
                    for i, value in enumerate(values):
                        if _kind(value) in bad_kinds:
                            # the message shows this row's own value (past the problems shown, the
                            # kind's shared message is as good and much cheaper)
                            exact = len(problems.kept) < MAX_PROBLEMS_KEPT
                            messages = list(rules.value_errors(column.name, value, exact))
                            if column.target is not None and value is not None:
                                messages += rules.item_errors(*column.target, value, exact)
                            for message in messages:
                                problems.add(i + 1, column.name, message)
                elif bad:
                    keys = zip(map(type, values), values, strict=True) if mixed else values
                    for i, key in enumerate(keys):
                        for message in bad.get(key, ()):
                            problems.add(i + 1, column.name, message)
            else:
                for i, value in enumerate(values):
                    if not judged(value):
                        continue
                    for message in rules.value_errors(column.name, value):
                        problems.add(i + 1, column.name, message)

    @staticmethod
    def _source_of(item: dict[str, Any], columns: list[_Column]) -> str:
        for column in columns:
            if column.target == (item["nodeId"], item["fieldName"]):
                return column.name
        return "nodeInfoList"


def load_manifest(
    path: str | Path,
    *,
    binds: Sequence[str] = (),
    workflow_id: str | None = None,
    schema_path: str | Path | None = None,
    allow_duplicates: bool = False,
) -> Manifest:
    """Read, type, bind and validate every row of ``path``.

    Raises InputError for a bad ``--bind`` / ``--workflow-id`` or an unreadable file, SchemaError
    for a bad schema, and ManifestError listing every problem in the manifest at once: a
    :class:`ManifestProblems` whose ``manifest``, once the file could be read as rows, holds every
    row with a valid workflow id, without its unreadable node inputs, for the checks that follow
    (:func:`pipeline.prepare.load_and_prepare` adds theirs to the same error).
    """
    path = Path(path)
    source = str(path)
    parsed = [parse_binding(text) for text in binds]
    if workflow_id is not None:
        workflow_id = str(workflow_id).strip()
        if not WORKFLOW_ID_RE.fullmatch(workflow_id):
            raise InputError(f"--workflow-id {workflow_id!r} is not a workflow id: use the digits from "
                             f"the workflow's URL, e.g. {EXAMPLE_WORKFLOW_ID}")
    schema, schema_file = _load_schema(schema_path)
    rules = _Rules(schema, schema_file)
    check_manifest_path(path)
    # Millions of new dicts and tuples and no reference cycles: the cyclic collector would rescan
    # them over and over (it doubles the load time of a large manifest), so it waits until the end.
    collecting = gc.isenabled()
    gc.disable()
    try:
        table = _read(path, source)
        return _Builder(source, table, rules, parsed, workflow_id, allow_duplicates).build()
    finally:
        if collecting:
            gc.enable()


def column_problems(columns: Sequence[tuple[str, Sequence[Any]]], *, text: bool) -> list[Problem]:
    """What :func:`load_manifest` (default schema, no ``--bind``) would say about these columns'
    values, for code that writes manifests (``rhbatch sweep``) and must write only what loads.

    Each column is ``(name, values)``: its distinct values, at least one. A problem's ``row`` is the
    1-based position of the value in its column (``None`` for the manifest as a whole, e.g. no
    column sends a node input). With ``text`` each value is read back as the CSV cell :mod:`csv`
    writes for it (``str(value)``, booleans as ``true`` / ``false``) and typed as a CSV column is;
    without it values keep their types (JSONL, Parquet). Like the loader, schema rules are
    judged only once the values read back cleanly.
    """
    def cell(value: Any) -> Any:
        if not text:
            return value
        return "true" if value is True else "false" if value is False else str(value)

    names = [name for name, _ in columns]
    cells = [[cell(value) for value in values] for _, values in columns]
    table = _Table(names, cells, max(map(len, cells), default=0), text)
    builder = _Builder("manifest", table, _Rules(*_load_schema(None)), [], None, True)
    try:
        typed, node_defaults, _ = builder.layout()
        if not any(c.target for c in typed) and not node_defaults:
            builder.problems.add(None, None, _nothing_sent(names))
        if not builder.problems and not builder.binding:
            builder.validate_columns(typed)
    except ManifestError as exc:
        return list(exc.problems)
    return list(ManifestProblems("manifest", [builder.binding.group(),
                                              builder.problems.group()]).problems)
