"""A manifest column as codes into its distinct values, and how a CSV cell's text becomes a value.

A column is held as :class:`Cells`: ``values[codes[i]]`` is row ``i``'s cell, so a column of a
million cells with a thousand distinct values holds a thousand Python objects and a million small
integers. Each distinct value is typed and judged once; only the rows of a value that has a problem
are visited one by one. A CSV column read with pyarrow keeps its distinct values as an Arrow array
until they are needed, so a column of plain integers (a seed per row) never becomes a million Python
strings.

Typing a CSV cell: ``integer`` accepts whole numbers and also ``7.0`` (read as 7; ``12.5`` is an
error), ``number`` reads a finite float, ``boolean`` reads true/false in any case, ``string`` keeps
the text as is. Integers sent as ``seed`` / ``noise_seed`` are 0 to 2**64-1 (ComfyUI's seed range);
any other integer fits in a signed 64 bits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.manifest.problems import _Problems, _show

MAX_CELL_BYTES = 1 << 20  # one cell or value, UTF-8
MAX_INT_DIGITS = 40  # longer integer literals are out of every range (and slow to convert)
# Integers: ComfyUI's documented range for a seed (KSampler seed, KSamplerAdvanced noise_seed: 0 to
# 0xffffffffffffffff); any other integer must fit in a signed 64-bit integer, the widest that
# RunningHub's JSON reader and a Parquet manifest (int64) hold. (SQLite sets no limit here: rows are
# stored as JSON text.)
SEED_FIELDS = frozenset({"seed", "noise_seed"})
SEED_RANGE = (0, 2**64 - 1)
INT64_RANGE = (-(2**63), 2**63 - 1)
INT_RE = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
NUMBER_RE = re.compile(r"[+-]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
NONFINITE_RE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.I)  # what float() reads as NaN or infinity
BOOL_TEXT = {"true": True, "false": False}
_ENC_NAN = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
# A column with at least this many distinct integers is typed by pyarrow, not one value at a time.
VECTOR_MIN_DISTINCT = 4096
# Integer text pyarrow reads exactly as int() does: an optional minus, no leading zeros, no spaces,
# at most 18 digits (so it fits in int64); empty is a missing value.
_PLAIN_INT_RE2 = r"^(?:-?(?:0|[1-9][0-9]{0,17}))?$"


class _Bad:
    def __repr__(self) -> str:
        return "<bad value>"


_BAD: Any = _Bad()  # a cell already reported


class Cells:
    """One column's cells: ``values[codes[i]]`` is row ``i``'s. With ``codes`` None, ``values`` is
    the column itself (one value per row). ``arrow``, when the column was read by pyarrow, is the
    distinct values as an Arrow array; ``values`` is then made from it on first use."""

    __slots__ = ("_values", "codes", "arrow", "n")

    def __init__(self, values: list[Any] | None, codes: np.ndarray | None = None,
                 arrow: Any = None, n: int | None = None):
        self._values = values
        self.codes = codes
        self.arrow = arrow
        if n is None:
            n = len(codes) if codes is not None else len(values or ())
        self.n = n

    @classmethod
    def of_rows(cls, values: list[Any]) -> Cells:
        """One value per row, as given (values that may be unhashable: lists, objects)."""
        return cls(values)

    @classmethod
    def of_texts(cls, texts: Iterable[str]) -> Cells:
        """CSV cells as read: each distinct text once."""
        index: dict[str, int] = {}
        codes = [index.setdefault(t, len(index)) for t in texts]
        return cls(list(index), np.array(codes, dtype=np.int32))

    @classmethod
    def constant(cls, value: Any, n: int) -> Cells:
        return cls([value], np.zeros(n, dtype=np.int32))

    @property
    def values(self) -> list[Any]:
        """The value each code stands for (with ``codes`` None: each row's value)."""
        if self._values is None:
            self._values = self.arrow.to_pylist()
        return self._values

    def __len__(self) -> int:
        return self.n

    def with_values(self, values: list[Any]) -> Cells:
        """The same rows, each code now standing for ``values[code]``."""
        return Cells(values, self.codes, n=self.n)

    def row_values(self, start: int = 0, stop: int | None = None) -> list[Any]:
        """The cells of rows ``start`` to ``stop``, one per row."""
        stop = self.n if stop is None else stop
        if self.codes is None:
            return self.values[start:stop]
        return list(map(self.values.__getitem__, self.codes[start:stop].tolist()))

    def take(self, rows: np.ndarray) -> list[Any]:
        """The cells of ``rows`` (0-based, any order), one per row."""
        if self.codes is None:
            return list(map(self.values.__getitem__, rows.tolist()))
        return list(map(self.values.__getitem__, self.codes[rows].tolist()))

    def row_value(self, i: int) -> Any:
        if self.codes is None:
            return self.values[i]
        code = int(self.codes[i])
        if self._values is None:  # one value from Arrow, not the whole column
            return self.arrow[code].as_py()
        return self._values[code]

    def rows_where(self, flags: Sequence[bool] | np.ndarray) -> np.ndarray:
        """The rows (0-based, in order) whose code is flagged (``flags[code]``)."""
        flag = np.asarray(flags, dtype=bool)
        if not flag.any():
            return np.zeros(0, dtype=np.intp)
        return np.flatnonzero(flag if self.codes is None else flag[self.codes])

    def code_counts(self) -> np.ndarray:
        """How many rows each code stands in."""
        if self.codes is None:
            return np.ones(len(self.values), dtype=np.int64)
        return np.bincount(self.codes, minlength=len(self.values))


@dataclass
class _Column:
    """An input column as the builder sees it."""

    name: str  # as in the file (for output manifests, ``inputs.`` removed)
    cells: Cells
    target: tuple[str, str] | None = None  # (nodeId, fieldName) when it feeds nodeInfoList
    bad: bool = False  # some cell is _BAD (reported), or empty in a bound column (reported)
    ints: Any = None  # a column of plain integers: each code's value as an Arrow int64 array


# -- typing CSV text -----------------------------------------------------------------------------


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


def _plain_integers(cells: Cells, field_name: str | None) -> tuple[list[Any], Any] | None:
    """The typed values of a CSV column of many distinct plain integers, read by pyarrow, or None
    when some text is anything else (the column is then typed one distinct text at a time).

    Each code stands for an int, None (the empty cell) or :data:`_BAD` (outside the range of
    ``field_name``); the second item is the ints as an Arrow int64 array (null where not an int).
    Only text that ``int()`` reads exactly as pyarrow does is taken: an optional minus, no
    leading zeros, no spaces, at most 18 digits."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.manifest import arrow

    texts = cells.arrow
    if texts is None or len(texts) < VECTOR_MIN_DISTINCT:
        return None
    if not pc.all(pc.match_substring_regex(texts, _PLAIN_INT_RE2)).as_py():
        return None
    empty = pc.equal(texts, arrow.string(""))
    try:
        ints = pc.cast(pc.if_else(empty, arrow.null(pa.string()), texts), pa.int64())
    except pa.ArrowInvalid:
        return None
    low, high = _int_range(field_name)
    low, high = arrow.int64(max(low, INT64_RANGE[0])), arrow.int64(min(high, INT64_RANGE[1]))
    within = pc.fill_null(ints, low)  # an empty cell is not outside
    outside = pc.or_(pc.less(within, low), pc.greater(within, high))
    values: list[Any] = ints.to_pylist() if ints.null_count \
        else arrow.to_numpy(ints, np.int64).tolist()
    if pc.any(outside).as_py():
        for code in np.flatnonzero(arrow.to_numpy(outside, bool)).tolist():
            values[code] = _BAD
        ints = pc.if_else(outside, arrow.null(pa.int64()), ints)
    return values, ints


def type_texts(column: _Column, declared: str | None, field_name: str | None,
           problems: _Problems) -> list[Any]:
    """The typed value of each distinct CSV text of ``column``; bad cells are reported."""
    cells = column.cells
    plain = _plain_integers(cells, field_name) if declared in (None, "integer") else None
    if plain is not None:
        values, column.ints = plain
        kind = "integer"
    else:
        texts = cells.values
        distinct = set(texts)
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
        values = list(map(mapping.get, texts, texts))
    flags = [v is _BAD for v in values]
    if any(flags):
        for i in cells.rows_where(flags).tolist():
            text = cells.row_value(i)
            problems.add(i + 1, column.name, cell_message(text, kind, column))
    return values

def type_values(column: _Column, declared: str | None, field_name: str | None,
            problems: _Problems) -> list[Any]:
    """Each row's value of a JSON, JSONL or Parquet ``column``; bad values are reported."""
    if column.cells.codes is not None:  # a column made for a default: one value per row now
        column.cells = Cells.of_rows(column.cells.row_values())
    values = column.cells.values
    kinds = set(map(type, values))
    fix_float = declared == "integer" and float in kinds
    if kinds - {str, int, float, bool, type(None)} or fix_float or str in kinds or float in kinds:
        out = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                if len(value) > MAX_CELL_BYTES // 4 and len(value.encode("utf-8")) > MAX_CELL_BYTES:
                    problems.add(i + 1, column.name, cell_message(value, "", column))
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
                        problems.add(i + 1, column.name, _range_message(_show(value), field_name))
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
    return values

def cell_message(text: str, kind: str, column: _Column) -> str:
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
