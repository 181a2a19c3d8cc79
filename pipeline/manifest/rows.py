"""Rows ready to submit, and the manifest that holds them.

A loaded manifest keeps its columns, not a million :class:`Row` objects: :attr:`Manifest.rows` is a
:class:`Rows` sequence that makes each Row when it is read (iterating makes them a chunk at a time),
so a large manifest costs memory per distinct value rather than per row. Each Row it gives is
complete and immutable like any other; two reads of one row give equal Rows, not the same object.
Rows share what they can: the item dicts of ``node_info_list`` are shared between rows with the
same value of a column that has few distinct values, and an empty ``options`` is one shared dict.
Treat them as read-only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from pipeline.manifest.cells import _BAD, Cells

ROWS_PER_CHUNK = 8192  # rows made at a time when iterating
ITEMS_SHARED_MAX = 1 << 16  # a column with at most this many distinct values shares its item dicts
_EMPTY_OPTIONS: dict[str, Any] = {}


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
    ``object.__setattr__`` per field): same slots, plain assignment, then the object's class is
    switched to Row, whose instances are immutable as usual: ``_RowMaker(...)`` returns a Row. Used
    only where rows are made by the thousand."""

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
        self.__class__ = Row  # type: ignore[assignment]


def _fast_row(*fields: Any) -> Row:
    row: Any = _RowMaker(*fields)
    return row


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


class RowIds:
    """Each row's id: derived ones as 17-byte strings (``"r"`` + 16 hex digits) with the ids of
    kept duplicates (``-2``, ``-3``...) apart, or the ``row_id`` column's."""

    def __init__(self, derived: np.ndarray | None = None, given: Cells | None = None,
                 renamed: dict[int, str] | None = None):
        self.derived = derived
        self.given = given
        self.renamed = renamed or {}

    def take(self, rows: np.ndarray) -> list[str]:
        if self.given is not None:
            return self.given.take(rows)
        assert self.derived is not None
        ids: list[str] = self.derived[rows].astype(f"U{self.derived.itemsize}").tolist()
        if self.renamed:
            for k, row in enumerate(rows.tolist()):
                ids[k] = self.renamed.get(row, ids[k])
        return ids

    def arrow(self, start: int, stop: int) -> Any:
        """The ids of rows ``start`` to ``stop`` as an Arrow string array."""
        import pyarrow as pa

        from pipeline.manifest import arrow

        if self.given is not None or self.renamed:
            return arrow.strings(self.take(np.arange(start, stop)))
        assert self.derived is not None
        width = self.derived.itemsize
        offsets = np.arange(0, (stop - start + 1) * width, width, dtype=np.int32)
        return pa.Array.from_buffers(pa.string(), stop - start, [
            None, pa.py_buffer(offsets), pa.py_buffer(self.derived[start:stop].tobytes())])


@dataclass
class RowParts:
    """What each row is made of, column by column (see :class:`Rows`)."""

    n: int
    names: list[str]  # input columns, in file order
    values: list[Cells]  # each input column's typed cells
    fed: list[tuple[str, str, int]]  # (nodeId, fieldName, index in values) of each bound column
    constant_items: tuple[dict[str, Any], ...]  # node defaults given as NODE.FIELD
    workflow_ids: Cells  # str, or None when missing or invalid (the row then sends "")
    options: Cells | None  # each row's options dict; None when no row has any
    ids: RowIds
    explicit: dict[int, tuple[dict[str, Any], ...]] = field(default_factory=dict)  # row -> items
    _items: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def items(self, j: int) -> list[dict[str, Any]] | None:
        """The shared item dict of each value of bound column ``j``, when it has few values."""
        known = self._items.get(j)
        if known is None:
            node, name, k = self.fed[j]
            values = self.values[k].values
            if self.values[k].codes is None or len(values) > ITEMS_SHARED_MAX:
                return None
            known = self._items[j] = [{"nodeId": node, "fieldName": name, "fieldValue": v}
                                      for v in values]
        return known


class Rows(Sequence[Row]):
    """The rows of a manifest, made from its columns when they are read.

    ``select`` limits the sequence to those rows (0-based, ascending); rows flagged in ``strip``
    come without their unreadable values (the rows a ManifestProblems hands to the checks made
    after loading)."""

    def __init__(self, parts: RowParts, select: np.ndarray | None = None,
                 strip: np.ndarray | None = None):
        self._parts = parts
        self._select = select
        self._strip = strip

    def __len__(self) -> int:
        return self._parts.n if self._select is None else len(self._select)

    @overload
    def __getitem__(self, i: int) -> Row: ...

    @overload
    def __getitem__(self, i: slice) -> list[Row]: ...

    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        positions = np.arange(len(self))
        if isinstance(i, slice):
            return list(self._make(self._rows_at(positions[i])))
        return next(self._make(self._rows_at(positions[[i]])))  # IndexError as a list gives it

    def __iter__(self) -> Iterator[Row]:
        for start in range(0, len(self), ROWS_PER_CHUNK):
            positions = np.arange(start, min(len(self), start + ROWS_PER_CHUNK))
            yield from self._make(self._rows_at(positions))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Rows: {len(self):,} manifest rows>"

    def workflow_ids(self) -> list[str]:
        """The distinct workflow ids of these rows, sorted: ``sorted({r.workflow_id for r in
        rows})`` without making a row."""
        cells = self._parts.workflow_ids
        if cells.codes is None:
            values = cells.values if self._select is None else cells.take(self._select)
        else:
            codes = cells.codes if self._select is None else cells.codes[self._select]
            values = [cells.values[c] for c in np.unique(codes).tolist()]
        return sorted({v or "" for v in values})

    def text_inputs(self) -> Iterator[tuple[str, dict[str, Any], list[int], int]]:
        """Each text value these rows send as a node input, once per workflow and place in the
        nodeInfoList: ``(workflow id, item, numbers, position)``, ``numbers`` being the (1-based,
        ascending) numbers of the rows whose ``node_info_list[position]`` is ``item``. Together
        they are every text item that iterating the rows would give, without making the rows."""
        parts = self._parts
        rows = np.arange(parts.n) if self._select is None else self._select
        own = np.zeros(parts.n, dtype=bool)  # rows made one by one: their items are their own
        own[list(parts.explicit)] = True
        if self._strip is not None:
            own |= self._strip
        plain = rows[~own[rows]]
        wf = parts.workflow_ids
        wf_codes = wf.codes[plain] if wf.codes is not None else plain
        for position, (node, name, k) in enumerate(parts.fed):
            cells = parts.values[k]
            text = np.fromiter((isinstance(v, str) for v in cells.values), bool, len(cells.values))
            if text.any():
                codes = cells.codes[plain] if cells.codes is not None else plain
                keep = text[codes]
                for w, code, numbers in _groups(plain[keep], wf_codes[keep], codes[keep]):
                    item = {"nodeId": node, "fieldName": name, "fieldValue": cells.values[code]}
                    yield wf.values[w] or "", item, numbers.tolist(), position
        for c, item in enumerate(parts.constant_items):
            if isinstance(item["fieldValue"], str):
                for w, _, numbers in _groups(plain, wf_codes, np.zeros(len(plain), dtype=np.int32)):
                    yield wf.values[w] or "", item, numbers.tolist(), len(parts.fed) + c
        if own[rows].any():
            for row in self._make(rows[own[rows]]):
                for position, item in enumerate(row.node_info_list):
                    if isinstance(item["fieldValue"], str):
                        yield row.workflow_id, item, [row.number], position

    def _rows_at(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._select is None else self._select[positions]

    def _make(self, rows: np.ndarray) -> Iterator[Row]:
        """The Rows of ``rows`` (0-based), each made as it is taken: a consumer that drops each row
        before taking the next never holds more than one, and the cyclic collector has nothing to
        scan (making them a chunk at a time doubled the time to read a million rows)."""
        parts = self._parts
        m = len(rows)
        repeat = itertools.repeat
        values = [cells.take(rows) for cells in parts.values]
        items: list[Iterator[dict[str, Any]]] = []
        for j, (node, name, k) in enumerate(parts.fed):
            shared = parts.items(j)
            codes = parts.values[k].codes
            if shared is not None and codes is not None:
                items.append(map(shared.__getitem__, codes[rows].tolist()))
            else:
                items.append(map(_item_maker(node, name), values[k]))
        node_info_lists: Iterator[tuple[dict[str, Any], ...]] = zip(*items, strict=True) if items \
            else repeat((), m)
        index = rows.tolist()
        if parts.constant_items:
            node_info_lists = map(tuple.__add__, node_info_lists, repeat(parts.constant_items))
        if parts.explicit and not parts.explicit.keys().isdisjoint(index):
            node_info_lists = _with_explicit(node_info_lists, index, parts.explicit, len(items),
                                             parts.constant_items)
        inputs = map(dict, map(zip, repeat(parts.names), zip(*values, strict=True))) if values \
            else (dict() for _ in range(m))
        workflow_ids = parts.workflow_ids.take(rows)
        if None in workflow_ids:
            workflow_ids = [w or "" for w in workflow_ids]
        options = map(_own_options, parts.options.take(rows)) if parts.options is not None \
            else repeat(_EMPTY_OPTIONS, m)
        made: Iterator[Row] = map(_RowMaker, index, map(int.__add__, index, repeat(1)),  # type: ignore[arg-type]
                                  parts.ids.take(rows), workflow_ids, node_info_lists, inputs, options)
        if self._strip is None:
            return made
        strip = self._strip
        return (_checkable(row) if strip[row.index] else row for row in made)


def _groups(rows: np.ndarray, first: np.ndarray, second: np.ndarray
            ) -> Iterator[tuple[int, int, np.ndarray]]:
    """``rows`` (ascending) grouped by their pair of codes: (first, second, the rows' numbers)."""
    if not len(rows):
        return
    key = first.astype(np.int64) * (int(second.max()) + 1) + second
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    numbers = rows[order] + 1
    firsts, seconds = first[order], second[order]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(firsts[start]), int(seconds[start]), numbers[start:end]


def _item_maker(node: str, name: str) -> Callable[[Any], dict[str, Any]]:
    def item(value: Any) -> dict[str, Any]:
        return {"nodeId": node, "fieldName": name, "fieldValue": value}
    return item


def _own_options(options: dict[str, Any]) -> dict[str, Any]:
    return dict(options) if options else _EMPTY_OPTIONS


def _with_explicit(node_info_lists: Iterator[tuple[dict[str, Any], ...]], index: list[int],
                   explicit: dict[int, tuple[dict[str, Any], ...]], fed: int,
                   constants: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], ...]]:
    """A row with nodeInfoList items sends them first, then its bound columns, then the constant
    node inputs it does not set itself."""
    for row, items in zip(index, node_info_lists, strict=True):
        given = explicit.get(row)
        if given is None:
            yield items
            continue
        targets = {(e["nodeId"], e["fieldName"]) for e in given}
        yield given + items[:fed] + tuple(c for c in constants
                                          if (c["nodeId"], c["fieldName"]) not in targets)


def _checkable(row: Row) -> Row:
    """``row`` as the checks after loading may judge it: without its unreadable values."""
    items = [i for i in row.node_info_list if i["fieldValue"] is not _BAD
             and i["fieldValue"] is not None]
    inputs = {k: v for k, v in row.inputs.items() if v is not _BAD}
    return make_row(row.index, row.number, row.row_id, row.workflow_id, items, inputs, row.options)


@dataclass(frozen=True)
class Manifest:
    source: str  # file name as given
    rows: Sequence[Row]  # a Rows sequence when loaded from a file
    columns: list[str]  # input columns in file order
    bound: dict[str, str]  # column -> "NODE.FIELD" for every column that feeds nodeInfoList
    unbound: list[str]  # columns kept as metadata only, never sent
    fingerprint: str  # sha256 over every row's (row_id, canonical content), in order
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row number, earlier number)
    # an rhbatch output manifest (results.*): its recorded nodeInfoList is sent, and its input
    # columns are the earlier run's inputs, kept as metadata
    from_results: bool = False


def workflow_ids(rows: Iterable[Row]) -> list[str]:
    """The distinct workflow ids of ``rows``, sorted (read from the columns for :class:`Rows`)."""
    if isinstance(rows, Rows):
        return rows.workflow_ids()
    return sorted({r.workflow_id for r in rows})


def text_inputs(rows: Iterable[Row]) -> Iterator[tuple[str, dict[str, Any], Sequence[int], int]]:
    """Every text value ``rows`` send as a node input: see :meth:`Rows.text_inputs` (any other
    iterable of rows gives one tuple per item)."""
    if isinstance(rows, Rows):
        yield from rows.text_inputs()
        return
    for row in rows:
        for position, item in enumerate(row.node_info_list):
            if isinstance(item["fieldValue"], str):
                yield row.workflow_id, item, (row.number,), position
