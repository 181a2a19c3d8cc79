"""Reading a manifest file into a table of columns; nothing is typed or checked here but the format.

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

A CSV file is read by pyarrow's multi-threaded reader when that is certain to read it exactly as
Python's :mod:`csv` module (``strict=True``) would: every quoted cell closes before a delimiter or
the end of its line, no cell spans lines, no blank line sits between rows, no line is only
delimiters, and the header is one plain line. Any other file, and every file with a problem, is
read by :mod:`csv`, whose messages name the row and CSV line. The two give the same table.

The path must name a regular file: a directory, a device (``/dev/zero``), a FIFO or a socket is
refused from ``stat`` alone, and the file is opened without blocking. In JSON, JSONL and the JSON
of a CSV ``nodeInfoList`` / ``options`` cell, a key given twice in one object is an error (JSON
would keep the last one silently).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.manifest.cells import Cells
from pipeline.manifest.problems import _fail, _Problems, _show
from pipeline.safetext import escape_controls

JSON_TOP_KEYS = ("workflowId", "bindings", "defaults", "rows", "description")
MAX_JSON_DEPTH = 32  # nesting a manifest value may have (nodeInfoList needs 3)
CSV_FIELD_LIMIT_CHARS = 64 << 20  # larger than MAX_CELL_BYTES so oversized cells get our message
CSV_CHUNK_ROWS = 65536
CSV_DELIMITERS = (",", ";", "\t", "|")
ARROW_BLOCK_BYTES = 4 << 20  # pyarrow parses the file in blocks of this size, in parallel
MOSTLY_DISTINCT_MIN_ROWS = 4096  # a column this long of mostly distinct values is kept as it is
UTF8_BOM = b"\xef\xbb\xbf"
UTF8_CHECK_BYTES = 1 << 20


@dataclass
class _Table:
    """Rows as read, column by column. ``text`` tables (CSV) hold str cells with ``""`` for empty;
    others hold typed values with ``None`` for null or missing."""

    columns: list[str]
    cells: list[Cells]
    n_rows: int
    text: bool
    lines: list[int] | None = None  # CSV line each row starts on (None: row n on line n + 1)
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
    counts = {d: plain.count(d) for d in CSV_DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _read_csv(path: Path, source: str, delimiter: str | None) -> _Table:
    data = read_file_bytes(path)
    table = _read_csv_arrow(data, delimiter)
    if table is not None:
        return table
    text = _decode(data, source)
    del data
    if not text.strip():
        raise _fail(source, "the file is empty: write a header line (e.g. workflowId,6.text,3.seed) "
                    "and at least one row")
    delimiter = delimiter or _sniff(text)
    stream = io.StringIO(text, newline="")
    del text
    previous = csv.field_size_limit()
    try:
        csv.field_size_limit(max(previous, CSV_FIELD_LIMIT_CHARS))
        return _read_csv_text(stream, source, delimiter)
    finally:
        csv.field_size_limit(previous)  # a process-wide setting: left as the caller had it


def _read_csv_text(stream: io.StringIO, source: str, delimiter: str) -> _Table:
    """A CSV table read with :mod:`csv`, every problem with its row and CSV line."""
    reader = csv.reader(stream, delimiter=delimiter, strict=True)
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
    indexes: list[dict[str, int]] = [{} for _ in header]  # each column's distinct texts -> code
    codes: list[list[np.ndarray]] = [[] for _ in header]
    lines: list[int] = []
    chunk: list[list[str]] = []
    previous_end = reader.line_num

    def flush() -> None:
        for j, cells in enumerate(zip(*chunk, strict=True)):
            index = indexes[j]
            codes[j].append(np.array([index.setdefault(c, len(index)) for c in cells], dtype=np.int32))
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
            if any(indexes[j]):
                problems.add(None, None, f"column {j + 1} has no name in the header: name it")
            continue  # a trailing delimiter on every line leaves a nameless, empty column
        keep.append(j)
    seen_names: set[str] = set()
    for j in keep:
        if header[j] in seen_names:
            problems.add(None, header[j], "appears twice in the header: rename one of them")
        seen_names.add(header[j])
    problems.raise_if_any()
    cells = [Cells(list(indexes[j]), np.concatenate(codes[j])) for j in keep]
    return _Table([header[j] for j in keep], cells, len(lines), True, lines)


@lru_cache(maxsize=len(CSV_DELIMITERS))
def _plainly_quoted(delimiter: str) -> re.Pattern[bytes]:
    """CSV text in which every quote opens a cell (after a delimiter or at a line start), every
    quoted cell closes before a delimiter or a line end, and no quoted cell holds a line break:
    text that pyarrow and :mod:`csv` (``strict=True``) split into exactly the same cells."""
    d = re.escape(delimiter).encode()
    return re.compile(rb'(?:[^"]*+(?<![^' + d + rb'\r\n])"(?:[^"\r\n]++|"")*+"(?![^' + d
                      + rb'\r\n]))*+[^"]*+')


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(data), UTF8_CHECK_BYTES):
            decoder.decode(data[start:start + UTF8_CHECK_BYTES])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _csv_header(data: bytes, start: int, delimiter: str | None) -> tuple[list[str], str, int] | None:
    """The header of a CSV file that pyarrow may read (see :func:`_read_csv_arrow`): its names,
    the delimiter, and where the first data line starts; None when the header is not one plain line
    of distinct names."""
    end = data.find(b"\n", start)
    first = data[start:end]
    if end < 0 or b"\r" in first[:-1]:  # a lone CR ends a line too
        return None
    try:
        first_text = first.decode("utf-8")
    except UnicodeDecodeError:
        return None
    delimiter = delimiter or _sniff(first_text)
    try:
        records = list(csv.reader([first_text], delimiter=delimiter, strict=True))
    except csv.Error:
        return None
    if len(records) != 1 or not any(h.strip() for h in records[0]):
        return None
    header = [h.strip() for h in records[0]]
    named = [h for h in header if h]
    return (header, delimiter, end + 1) if len(set(named)) == len(named) else None


def _read_csv_arrow(data: bytes, delimiter: str | None) -> _Table | None:
    """The table of a CSV file, read by pyarrow; None when the file may not read exactly as
    :mod:`csv` reads it (see the module docstring), and :func:`_read_csv_text` must read it."""
    import pyarrow.compute as pc

    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    head = data[start:start + 4096]
    if not head or b"\x00" in head or head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # empty, or UTF-16: the csv path says so
    found = _csv_header(data, start, delimiter)
    if found is None:
        return None
    header, delimiter, body = found
    stop = len(data)
    while stop > body and data[stop - 1] in b"\r\n":  # trailing blank lines are no rows
        stop -= 1
    if stop == body:
        return None
    names = [f"f{j}" for j in range(len(header))]
    # pyarrow parses (without the GIL) while this thread checks that it may: both take a while
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rhbatch-csv") as pool:
        parsing = pool.submit(_parse_arrow, data, body, stop, names, delimiter)
        plain = _is_utf8(data) and _plainly_quoted(delimiter).fullmatch(
            memoryview(data)[body:stop]) is not None
        breaks = data.count(b"\n", body, stop)
        if b"\r" in data:  # CRLF counts once, a lone CR ends a line too
            breaks += data.count(b"\r", body, stop) - data.count(b"\r\n", body, stop)
        read = parsing.result()
    if not plain or read is None:
        return None
    if read.num_rows != breaks + 1:  # a blank line between rows: csv gives each row its line
        return None
    columns = [_coded(read.column(j)) for j in range(len(names))]
    del read
    for name, cells in zip(header, columns, strict=True):
        longest = pc.max(pc.binary_length(cells.arrow)).as_py() or 0
        if longest > CSV_FIELD_LIMIT_CHARS or (not name and longest):
            return None  # a cell over csv's limit, or a nameless column with a value: csv reports it
    if _some_row_empty(columns):
        return None  # a line of delimiters only, which csv skips as blank
    return _Table([h for h in header if h], [c for h, c in zip(header, columns, strict=True) if h],
                  len(columns[0]), True)


def _parse_arrow(data: bytes, body: int, stop: int, names: list[str], delimiter: str) -> Any:
    """``data[body:stop]`` parsed by pyarrow into string columns ``names``; None when it cannot
    be (a row with more or fewer cells than the header, ...)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(
            pa.BufferReader(pa.py_buffer(data).slice(body, stop - body)),
            read_options=pacsv.ReadOptions(column_names=names, block_size=ARROW_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"', double_quote=True,
                                             escape_char=False, newlines_in_values=False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                                 strings_can_be_null=False, null_values=[],
                                                 quoted_strings_can_be_null=False))
    except (pa.ArrowException, ValueError):
        return None


def _coded(column: Any) -> Cells:
    """An Arrow column of strings as codes into its distinct values. A column whose first block
    is mostly distinct values (a seed per row) is not encoded: each row is its own code."""
    import pyarrow as pa

    from pipeline.manifest import arrow

    first = column.chunks[0].dictionary_encode()
    if len(first.dictionary) > len(first.indices) // 2 and len(column) >= MOSTLY_DISTINCT_MIN_ROWS:
        return Cells(None, np.arange(len(column), dtype=np.int32), arrow=column.combine_chunks())
    chunks = [first] + [chunk.dictionary_encode() for chunk in column.chunks[1:]]
    if len(chunks) == 1:
        return Cells(None, arrow.to_numpy(first.indices, np.int32), arrow=first.dictionary)
    sizes = np.cumsum([0] + [len(c.dictionary) for c in chunks])
    codes = np.concatenate([arrow.to_numpy(c.indices, np.int32) + np.int32(start)
                            for c, start in zip(chunks, sizes[:-1].tolist(), strict=True)])
    values = pa.concat_arrays([c.dictionary for c in chunks])
    if len(values) < len(codes):  # values repeat across blocks: each distinct value once
        distinct = values.dictionary_encode()
        codes = arrow.to_numpy(distinct.indices, np.int32)[codes]
        values = distinct.dictionary
    return Cells(None, codes.astype(np.int32, copy=False), arrow=values)


def _some_row_empty(columns: list[Cells]) -> bool:
    """Whether some row has every cell empty (only its delimiters on its line)."""
    import pyarrow.compute as pc

    from pipeline.manifest import arrow

    all_empty: np.ndarray | None = None
    for cells in columns:
        empty = arrow.to_numpy(pc.equal(cells.arrow, arrow.string("")), bool)  # per code
        if not empty.any():
            return False
        per_row = empty[cells.codes]
        all_empty = per_row if all_empty is None else all_empty & per_row
    return all_empty is not None and bool(all_empty.any())




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
    cells = [Cells.of_rows([r.get(c) for r in records]) for c in columns]
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
        cells.append(Cells.of_rows(values))
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

