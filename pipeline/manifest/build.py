"""From a table to rows: bindings, typed cells, workflow ids, options, explicit nodeInfoList items,
row ids and duplicates, every problem found in one pass.

Where node inputs come from: a column named ``NODE.FIELD`` whose node id is digits, optionally
``:``-separated (``3.seed``, ``57:35.text``; split at the first dot); ``--bind COLUMN=NODE.FIELD``
or the JSON ``bindings`` (any node id); an explicit ``nodeInfoList`` (a list, or JSON text in a CSV
cell). Any other column is metadata: kept in ``Row.inputs``, never sent, and listed in
``Manifest.unbound``. ``nodeInfoList`` is sent in this order: explicit items, bound columns in file
order, then constant ``defaults`` given as ``NODE.FIELD``. An explicit item and a bound column for
the same node input in one row is an error.

Work is done per distinct value of a column wherever the rule allows (typing, workflow ids,
options, the schema), and per row only for the rows that have a problem; the canonical content of
every row is assembled by pyarrow (:mod:`pipeline.manifest.content`). A problem in one row or column
does not hide the others, and they are reported in the order a row-by-row reading would find them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.manifest import arrow
from pipeline.manifest.cells import (
    _BAD,
    _PARSERS,
    MAX_CELL_BYTES,
    Cells,
    _Column,
    _int_problem,
    type_texts,
    type_values,
)
from pipeline.manifest.content import (
    _ENC,
    _canonical_item,
    _encode_text,
    _fragment,
    _options_text,
    derived_ids,
    digests_of,
    fingerprint_update,
    first_seen,
    join_pieces,
    join_rows,
)
from pipeline.manifest.judge import validate
from pipeline.manifest.problems import ManifestProblems, _has_controls, _Problems, _show
from pipeline.manifest.read import _DEEP, _KEEP_ONE, _json_error, _JsonReader, _repeats, _Table
from pipeline.manifest.rows import _EMPTY_OPTIONS, Manifest, RowIds, RowParts, Rows
from pipeline.manifest.schema import _Rules
from pipeline.safetext import escape_controls

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
EXAMPLE_WORKFLOW_ID = "1904136902449209346"
CONTENT_CHUNK_ROWS = 1 << 17  # rows whose canonical content is assembled at a time

ROW_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
WORKFLOW_ID_RE = re.compile(r"[1-9][0-9]*")
COLUMN_TARGET_RE = re.compile(r"([0-9]+(?::[0-9]+)*)\.(\S(?:.*\S)?)", re.S)  # auto-bound columns
TARGET_RE = re.compile(r"([^\s.=]+)\.(\S(?:.*\S)?)", re.S)  # --bind, bindings, defaults

_Events = defaultdict[int, list[tuple[str | None, str]]]  # row (0-based) -> (column, message)


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


def _nothing_sent(names: Sequence[str]) -> str:
    return ("no column sends a node input: name columns NODE.FIELD (e.g. 6.text), bind one with "
            f"--bind COLUMN=NODE.FIELD (columns: {', '.join(names) or 'none'}), or give a "
            "nodeInfoList column")


def _value_key(value: Any) -> Any:
    """What tells apart two JSON values that send different text (``1``, ``True``, ``1.0``,
    ``-0.0``); None for a list or an object."""
    cls = value.__class__
    if cls is float:
        return (cls, value.hex())
    if cls is dict or cls is list:
        return None
    return (cls, value)


def _combine(parts: Sequence[Cells], n: int) -> tuple[np.ndarray | None, list[int]]:
    """One code per distinct combination of ``parts``' codes: the code of each row (None: one per
    row, when a part has one value per row) and a row holding each combination."""
    if not parts:
        return np.zeros(n, dtype=np.int32), [0]
    if any(p.codes is None for p in parts):
        return None, list(range(n))
    if len(parts) == 1:
        codes = parts[0].codes
        assert codes is not None
        _, first = np.unique(codes, return_index=True)
        return codes, first.tolist()  # a code of a CSV column is its first row's rank of appearance
    stacked = np.stack([p.codes for p in parts], axis=1)  # type: ignore[misc]
    _, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    return inverse.ravel().astype(np.int32), first.tolist()


class _Builder:
    def __init__(self, source: str, table: _Table, rules: _Rules, binds: list[tuple[str, str, str]],
                 workflow_id: str | None, allow_duplicates: bool):
        self.source = source
        self.table = table
        self.rules = rules
        self.binds = binds
        self.workflow_id = workflow_id
        self.allow_duplicates = allow_duplicates
        self.n = table.n_rows
        self.binding = _Problems(source, table.lines, "binding")  # columns, bindings, defaults
        self.problems = _Problems(source, table.lines, "value")  # cells, schema, ids, duplicates
        self.unsendable = np.zeros(self.n, dtype=bool)  # rows whose request is not complete
        self.is_output = False
        self.cells = dict(zip(table.columns, table.cells, strict=True))
        self.json_reader = _JsonReader()  # for JSON text in CSV cells (nodeInfoList, options)

    # ---- columns

    def layout(self) -> tuple[list[_Column], list[tuple[str, str, Any]], dict[str, Any]]:
        """Input columns (with targets), constant node defaults, and option defaults."""
        columns = self._input_columns()
        by_name = {c.name: c for c in columns}
        for column in columns:
            if _has_controls(column.name):
                self.binding.add(None, column.name, "the name holds a control character: retype "
                                 "the name, with letters, digits and punctuation only")
        bind_map = self._bind_map()
        column_defaults, node_defaults, option_defaults = self._defaults(by_name, bind_map)
        self._bind_columns(columns, by_name, bind_map, column_defaults)
        fed: dict[tuple[str, str], str] = {}
        for column in columns:
            if column.target is None:
                continue
            if column.target in fed:
                self.binding.add(None, column.name, f"feeds {'.'.join(column.target)}, which column "
                                 f"{fed[column.target]!r} feeds already: bind each node input once")
            fed.setdefault(column.target, column.name)
        node_defaults = [d for d in node_defaults if (d[0], d[1]) not in fed]
        # no raise here: the cells are read and checked too, so that one pass reports everything
        for column in columns:
            self._type_column(column, column_defaults.get(column.name))
        return columns, node_defaults, option_defaults

    def _input_columns(self) -> list[_Column]:
        names = self.table.columns
        self.is_output = "nodeInfoList" in self.cells and ("status" in self.cells
                                                           or "taskId" in self.cells)
        if not self.is_output:
            return [_Column(n, self.cells[n]) for n in names if n not in SPECIAL_COLUMNS]
        columns: list[_Column] = []
        for name in names:
            if name.startswith("inputs."):
                columns.append(_Column(name[len("inputs."):], self.cells[name]))
            elif name not in RESULT_FIELDS and name not in SPECIAL_COLUMNS:
                columns.append(_Column(name, self.cells[name]))
        recorded = self.cells.get("inputs")
        if recorded is not None and not self.table.text:
            values = recorded.row_values()
            keys: dict[str, None] = {}
            for value in values:
                if isinstance(value, dict):
                    keys.update(dict.fromkeys(value))
            present = {c.name for c in columns}
            columns.extend(
                _Column(k, Cells.of_rows([v.get(k) if isinstance(v, dict) else None for v in values]))
                for k in keys if k not in present)
        return columns

    def _bind_map(self) -> dict[str, tuple[str, str]]:
        """Column -> (nodeId, fieldName) from the JSON ``bindings`` and every ``--bind``."""
        problems = self.binding
        bind_map: dict[str, tuple[str, str]] = {}
        for bound_name, target in self.table.bindings.items():
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
        return bind_map

    def _defaults(self, by_name: dict[str, _Column], bind_map: dict[str, tuple[str, str]]
                  ) -> tuple[dict[str, Any], list[tuple[str, str, Any]], dict[str, Any]]:
        """The JSON ``defaults``: per column, per NODE.FIELD (constant node inputs), per option."""
        problems = self.binding
        column_defaults: dict[str, Any] = {}
        node_defaults: list[tuple[str, str, Any]] = []
        option_defaults: dict[str, Any] = {}
        for key, value in self.table.defaults.items():
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
        return column_defaults, node_defaults, option_defaults

    def _bind_columns(self, columns: list[_Column], by_name: dict[str, _Column],
                      bind_map: dict[str, tuple[str, str]], column_defaults: dict[str, Any]) -> None:
        """Give each column the node input it feeds (bound, or named NODE.FIELD)."""
        problems = self.binding
        for bound_name in bind_map:
            if bound_name in SPECIAL_COLUMNS:
                problems.add(None, bound_name, f"is a reserved column ({', '.join(sorted(SPECIAL_COLUMNS))}"
                             ") and cannot feed a node input: bind another column, or rename this one")
                continue
            if bound_name not in by_name:
                if bound_name in column_defaults:  # bound and defaulted, absent from every row
                    by_name[bound_name] = _Column(bound_name, Cells.constant(None, self.n))
                    columns.append(by_name[bound_name])
                    continue
                existing = ", ".join(c.name for c in columns) or "(none)"
                problems.add(None, bound_name, f"is bound to {'.'.join(bind_map[bound_name])} but there "
                             f"is no such column; the columns are: {existing}")
        for column in columns:
            if column.name in bind_map:
                column.target = bind_map[column.name]
            elif self.is_output:
                continue  # an output manifest's recorded nodeInfoList is what is sent; inputs are metadata
            elif (match := COLUMN_TARGET_RE.fullmatch(column.name)) is not None:
                column.target = (match.group(1), match.group(2))

    def _type_column(self, column: _Column, default: Any) -> None:
        """Turn cells into typed values: None for empty, _BAD for a reported cell."""
        problems = self.problems
        reported = problems.count
        declared = self.rules.declared_type(
            column.name, *(['.'.join(column.target)] if column.target else []))
        field_name = column.target[1] if column.target else None
        if (message := _int_problem(default, field_name)) is not None:
            problems.add(None, f"defaults.{column.name}", message)
            default = None
        if self.table.text:
            values = type_texts(column, declared, field_name, problems)
        else:
            values = type_values(column, declared, field_name, problems)
        cells = column.cells
        if column.target is not None and None in values:
            if default is not None:
                values = [default if v is None else v for v in values]
            else:
                target = ".".join(column.target)
                for i in cells.rows_where([v is None for v in values]).tolist():
                    problems.add(i + 1, column.name, f"is empty, so {target} has no value to send: "
                                 "fill it in (or give a default for it in a JSON manifest's "
                                 '"defaults")')
        elif default is not None and None in values:
            values = [default if v is None else v for v in values]
        column.cells = cells.with_values(values)
        if problems.count != reported:  # this column's cells were reported: skip them from now on
            column.bad = True
            column.ints = None
            if column.target is not None:
                self.unsendable[column.cells.rows_where([v is _BAD or v is None for v in values])] = True

    # ---- special columns

    def _text_or_value(self, name: str) -> Cells | None:
        cells = self.cells.get(name)
        if cells is None or not self.table.text:
            return cells
        return cells.with_values([v.strip() or None for v in cells.values])

    def workflow_ids(self) -> Cells:
        """Each row's workflow id (None when it is missing or not one)."""
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
            return Cells.constant(default, self.n)
        checked: dict[Any, str | None] = {}
        empty: list[bool] = []
        wids: list[str | None] = []
        for value in column.values:
            empty.append(value is None or value == "")
            if empty[-1]:
                wids.append(default)
                continue
            key = (value.__class__, value) if not isinstance(value, dict | list) else ("json", id(value))
            if key not in checked:
                text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
                if isinstance(text, str) and WORKFLOW_ID_RE.fullmatch(text.strip()):
                    checked[key] = text.strip()
                else:
                    checked[key] = None
            wids.append(checked[key])
        for i in column.rows_where([w is None for w in wids]).tolist():
            code = i if column.codes is None else int(column.codes[i])
            if empty[code]:
                problems.add(i + 1, "workflowId", "is empty and there is no default: fill it in, or "
                             "pass --workflow-id ID")
            else:
                problems.add(i + 1, "workflowId", f"{_show(column.values[code])} is not a workflow id: "
                             f"use the digits from the workflow's URL, e.g. {EXAMPLE_WORKFLOW_ID} (not "
                             "0, and as text in JSON)")
        return column.with_values(wids)

    def options_for(self, option_defaults: dict[str, Any]) -> Cells | None:
        """Each row's options (one dict per distinct combination of option cells), or None when
        no row has any; a row whose options have a problem is reported (and cannot be sent)."""
        cell_column = self.cells.get("options")
        columns: list[tuple[str, Cells]] = []
        for name in OPTION_FIELDS:
            cells = self.cells.get(name)
            if cells is None:
                continue
            if self.table.text:
                parser = _PARSERS.get(OPTION_TYPES.get(name, ""))
                typed: list[Any] = []
                for text in cells.values:
                    t = text.strip()
                    if not t:
                        typed.append(None)
                    else:
                        parsed = parser(t) if parser else t
                        typed.append(t if parsed is None else parsed)  # the schema names the fix
                cells = cells.with_values(typed)
            columns.append((name, cells))
        if cell_column is None and not columns and not option_defaults:
            return None
        parts = ([cell_column] if cell_column is not None else []) + [c for _, c in columns]
        codes, examples = _combine(parts, self.n)
        combos: list[dict[str, Any]] = []
        messages: list[list[tuple[str, str]]] = []
        for row in examples:
            cell = cell_column.row_value(row) if cell_column is not None else None
            options, found = self._row_options(cell, [(name, c.row_value(row)) for name, c in columns],
                                               option_defaults)
            combos.append(options)
            messages.append(found)
        result = Cells(combos, codes, n=self.n)
        for i in result.rows_where([bool(m) for m in messages]).tolist():
            for column, message in messages[i if codes is None else int(codes[i])]:
                self.problems.add(i + 1, column, message)
            self.unsendable[i] = True
        return result

    def _row_options(self, cell: Any, columns: list[tuple[str, Any]], option_defaults: dict[str, Any]
                     ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """The options of a row with this ``options`` cell and these option columns' values, and
        the (column, message) of each problem with them."""
        found: list[tuple[str, str]] = []
        options = dict(option_defaults)
        if isinstance(cell, str):
            cell = cell.strip()
            if cell:
                self.json_reader.clear()
                try:
                    cell = self.json_reader.decode(cell)
                except (ValueError, RecursionError):
                    found.append(("options", f"{_show(cell)} is not JSON: write an object like "
                                  '{"instanceType": "plus"}, or use an instanceType column'))
                    cell = None
                if self.json_reader.found:
                    found.extend(("options", f"has the key {_show(key)} more than once: {_KEEP_ONE}")
                                 for _, key in _repeats(cell))
            else:
                cell = None
        if isinstance(cell, dict):
            for key, value in cell.items():
                if key not in OPTION_FIELDS:
                    found.append(("options", f"has an unknown option {_show(key)}: use "
                                  f"{', '.join(OPTION_FIELDS)}"))
                elif value is not None:
                    options[key] = value
        elif cell is not None:
            found.append(("options", f"{_show(cell)} is not an object of task options: write e.g. "
                          '{"instanceType": "plus"}'))
        for name, value in columns:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if name in options and options[name] != value and isinstance(cell, dict) and name in cell:
                found.append((name, f"{_show(value)} differs from the options cell's "
                              f"{_show(options[name])}: keep one"))
            options[name] = value
        return options or _EMPTY_OPTIONS, found

    def explicit_list(self, cell: Any) -> tuple[tuple[dict[str, Any], ...] | None, list[str]]:
        """A nodeInfoList cell's items (None when it has a problem), and its problems."""
        found: list[str] = []
        example = '[{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}]'
        if isinstance(cell, str):
            reader = self.json_reader
            reader.clear()
            try:
                cell = reader.decode(cell)
            except RecursionError:
                return None, [f"is JSON that {_DEEP}"]
            except json.JSONDecodeError as exc:
                return None, [f"is not valid JSON ({exc.msg} at character {exc.pos + 1}): write a "
                              f"list like {example}"]
            except ValueError as exc:
                return None, [f"is not valid JSON ({_json_error(exc)}): write a list like {example}"]
            if reader.found:
                return None, [f"has the key {_show(key)} more than once: {_KEEP_ONE}"
                              for _, key in _repeats(cell)]
        if not isinstance(cell, list | tuple):
            return None, [f"{_show(cell)} is not a list: write a list like {example}"]
        items = []
        seen: set[tuple[str, str]] = set()
        for k, item in enumerate(cell, start=1):
            problem, node, name = _item_problem(k, item, example)
            if problem is None and (node, name) in seen:
                problem = f"sets {node}.{name} twice: keep one item"
            if problem is not None:
                found.append(problem)
                continue
            seen.add((node, name))
            extra = {k2: v for k2, v in item.items() if k2 not in ("nodeId", "fieldName", "fieldValue")}
            items.append({"nodeId": node, "fieldName": name, "fieldValue": item["fieldValue"], **extra})
        return (None if found else tuple(items)), found

    # ---- rows

    def build(self) -> Manifest:
        columns, node_defaults, option_defaults = self.layout()
        bound = [c for c in columns if c.target is not None]
        workflow_ids = self.workflow_ids()
        self.unsendable[workflow_ids.rows_where([w is None for w in workflow_ids.values])] = True
        options = self.options_for(option_defaults)
        given_ids = self._text_or_value("row_id")
        constant_items = tuple({"nodeId": node, "fieldName": name, "fieldValue": value}
                               for node, name, value in node_defaults)
        names = [c.name for c in columns]
        if not bound and not node_defaults and "nodeInfoList" not in self.cells \
                and not (self.binding and (self.binds or self.table.bindings)):
            self.problems.add(None, None, _nothing_sent(names))  # (a broken binding says it better)
        events: _Events = defaultdict(list)
        explicit = self._explicit_rows(bound, constant_items, events)
        given = self._given_ids(given_ids, events) if given_ids is not None else None
        ids, duplicates, fingerprint = self._hash_rows(bound, node_defaults, workflow_ids, options,
                                                       explicit, given, events)
        for row in sorted(events):
            for column, message in events[row]:
                self.problems.add(row + 1, column, message)
        if self.allow_duplicates and given_ids is None and duplicates:
            self._derived_id_collisions(ids)
        fed = [(*c.target, k) for k, c in enumerate(columns) if c.target is not None]
        parts = RowParts(self.n, names, [c.cells for c in columns], fed,  # type: ignore[arg-type]
                         constant_items, workflow_ids, options, ids, explicit)
        validate(self.rules, self.problems, self.unsendable, columns, workflow_ids, options,
                 given_ids is not None, explicit, constant_items, Rows(parts))

        def manifest(rows: Rows) -> Manifest:
            return Manifest(
                source=self.source,
                rows=rows,
                columns=names,
                bound={c.name: ".".join(c.target) for c in bound},  # type: ignore[arg-type]
                unbound=[c.name for c in columns if c.target is None],
                fingerprint=fingerprint,
                duplicates=duplicates,
                from_results=self.is_output,
            )

        if self.binding or self.problems:
            sendable = workflow_ids.rows_where([w is not None for w in workflow_ids.values])
            raise ManifestProblems(escape_controls(self.source),
                                   [self.binding.group(), self.problems.group()],
                                   manifest(Rows(parts, select=sendable, strip=self.unsendable)))
        return manifest(Rows(parts))

    def _explicit_rows(self, bound: list[_Column], constant_items: tuple[dict[str, Any], ...],
                       events: _Events) -> dict[int, tuple[dict[str, Any], ...]]:
        """The items of each row's nodeInfoList cell (rows whose cell has a problem are left out,
        and cannot be sent)."""
        cells = self.cells.get("nodeInfoList")
        if cells is None:
            return {}
        targets_fed = {c.target: c.name for c in bound}
        sends_nothing = not bound and not constant_items
        parsed: dict[int, tuple[tuple[dict[str, Any], ...] | None, list[str]]] = {}
        explicit: dict[int, tuple[dict[str, Any], ...]] = {}
        for i in range(self.n):
            code = i if cells.codes is None else int(cells.codes[i])
            cell = cells.values[code]
            if cell is None or cell == "":
                if sends_nothing:
                    events[i].append(("nodeInfoList", "is empty and no column sends a node input: "
                                      'write a list like [{"nodeId": "6", "fieldName": "text", '
                                      '"fieldValue": "a cat"}]'))
                    self.unsendable[i] = True
                continue
            if code not in parsed:
                parsed[code] = self.explicit_list(cell)
            items, found = parsed[code]
            events[i].extend(("nodeInfoList", message) for message in found)
            if items is None:
                self.unsendable[i] = True
                continue
            explicit[i] = items
            given = {(e["nodeId"], e["fieldName"]) for e in items}
            for target in sorted(given & targets_fed.keys()):
                events[i].append((targets_fed[target], f"sets {'.'.join(target)}, which this row's "
                                  "nodeInfoList sets too: keep one of them"))
                self.unsendable[i] = True
        return explicit

    def _contents(self, bound: list[_Column], node_defaults: list[tuple[str, str, Any]],
                  workflow_ids: Cells, options: Cells | None,
                  explicit: dict[int, tuple[dict[str, Any], ...]]) -> Iterator[list[bytes]]:
        """Each row's canonical content (see :mod:`pipeline.manifest.content`) as UTF-8, in lists
        of consecutive rows: joined from each column's text per value, one row at a time only for
        chunks with rows that have nodeInfoList items."""
        fragments = [_column_fragments(column) for column in bound]
        constants = [((node, name), _canonical_item(node, name, value).encode())
                     for node, name, value in node_defaults]
        keyed: list[tuple[tuple[str, str], int | bytes]] = [
            (column.target, j) for j, column in enumerate(bound) if column.target is not None]
        keyed += constants
        pieces = [piece for _, piece in sorted(keyed, key=lambda p: p[0])]
        encoded: dict[str | None, bytes] = {}
        wf_texts = [encoded[w] if w in encoded else encoded.setdefault(w, _ENC(w or "").encode())
                    for w in workflow_ids.values]
        option_texts = [_options_text(o).encode() for o in options.values] \
            if options is not None else [b"{}"]
        for start in range(0, self.n, CONTENT_CHUNK_ROWS):
            rows = np.arange(start, min(self.n, start + CONTENT_CHUNK_ROWS))
            if explicit and any(start <= i < start + len(rows) for i in explicit):
                yield self._explicit_contents(rows, bound, fragments, constants, workflow_ids,
                                              options, explicit)
                continue
            joined: list[bytes | list[bytes]] = [b"[", _take(wf_texts, workflow_ids, rows), b",["]
            for k, piece in enumerate(pieces):
                if k:
                    joined.append(b",")
                joined.append(_take(fragments[piece], bound[piece].cells, rows)
                              if isinstance(piece, int) else piece)
            joined += [b"],", _take(option_texts, options, rows) if options is not None else b"{}",
                       b"]"]
            yield join_rows(joined, len(rows))

    def _explicit_contents(self, rows: np.ndarray, bound: list[_Column], fragments: list[list[bytes]],
                           constants: list[tuple[tuple[str, str], bytes]], workflow_ids: Cells,
                           options: Cells | None, explicit: dict[int, tuple[dict[str, Any], ...]]
                           ) -> list[bytes]:
        """:meth:`_contents` for rows some of which have nodeInfoList items, one row at a time."""
        texts: list[bytes] = []
        for i in rows.tolist():
            merged = [(column.target, texts_of[i if column.cells.codes is None
                                               else int(column.cells.codes[i])])
                      for texts_of, column in zip(fragments, bound, strict=True)]
            items = explicit.get(i)
            given = {(e["nodeId"], e["fieldName"]) for e in items} if items is not None else set()
            if items is not None:
                merged += [((e["nodeId"], e["fieldName"]), _canonical_item(
                    e["nodeId"], e["fieldName"], e["fieldValue"]).encode()) for e in items]
            merged += [(t, f) for t, f in constants if t not in given]
            merged.sort()  # type: ignore[arg-type]
            wf = workflow_ids.row_value(i) or ""
            opts = options.row_value(i) if options is not None else _EMPTY_OPTIONS
            texts.append(b"[%s,[%s],%s]" % (_ENC(wf).encode(), b",".join(f for _, f in merged),
                                           _options_text(opts).encode()))
        return texts

    def _hash_rows(self, bound: list[_Column], node_defaults: list[tuple[str, str, Any]],
                   workflow_ids: Cells, options: Cells | None,
                   explicit: dict[int, tuple[dict[str, Any], ...]], given: RowIds | None,
                   events: _Events) -> tuple[RowIds, list[tuple[int, int]], str]:
        """Each row's id (given, or derived from its content key), the duplicates, and the
        fingerprint. The content of a chunk of rows is dropped once hashed, unless derived ids
        may still change (kept duplicates get ``-2``, ``-3``...): then it waits for them."""
        late = given is None and self.allow_duplicates
        fingerprint = hashlib.sha256()
        parts: list[bytes] = []
        held: list[list[bytes]] = []
        start = 0
        for chunk in self._contents(bound, node_defaults, workflow_ids, options, explicit):
            digests = digests_of(chunk)
            parts.append(digests)
            if late:
                held.append(chunk)
            else:
                chunk_ids = given.arrow(start, start + len(chunk)) if given is not None \
                    else RowIds(derived=derived_ids(digests)).arrow(0, len(chunk))
                fingerprint_update(fingerprint, chunk_ids, arrow.strings(chunk))
            start += len(chunk)
        digests = b"".join(parts)
        ids = given if given is not None else RowIds(derived=derived_ids(digests))
        duplicates = self._duplicates(digests, ids, events)
        start = 0
        for chunk in held:
            fingerprint_update(fingerprint, ids.arrow(start, start + len(chunk)), arrow.strings(chunk))
            start += len(chunk)
        return ids, duplicates, fingerprint.hexdigest()

    def _given_ids(self, given: Cells, events: _Events) -> RowIds:
        """The ``row_id`` column's ids; empty, invalid and repeated ones are reported."""
        ids: list[str] = []
        kinds: list[int] = []  # 0 valid, 1 empty, 2 invalid
        for value in given.values:
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if value is None or value == "":
                ids.append("")
                kinds.append(1)
            elif not isinstance(value, str) or not ROW_ID_RE.fullmatch(value):
                ids.append(str(value))
                kinds.append(2)
            else:
                ids.append(value)
                kinds.append(0)
        for i in given.rows_where([k != 0 for k in kinds]).tolist():
            code = i if given.codes is None else int(given.codes[i])
            if kinds[code] == 1:
                events[i].append(("row_id", "is empty: give every row an id, or drop the row_id "
                                  "column to derive ids from the content"))
            else:
                events[i].append(("row_id", f"{_show(given.values[code])} is not a valid row id: use "
                                  "1 to 128 letters, digits, '.', '_', ':' or '-'"))
        key_of: dict[str, int] = {}
        keys = np.array([key_of.setdefault(t, len(key_of)) if k == 0 else -1 - c
                         for c, (t, k) in enumerate(zip(ids, kinds, strict=True))], dtype=np.int64)
        per_row = keys if given.codes is None else keys[given.codes]
        _, first, inverse, counts = np.unique(per_row, return_index=True, return_inverse=True,
                                              return_counts=True)
        for i in np.flatnonzero((counts[inverse] > 1) & (per_row >= 0)).tolist():
            earlier = int(first[inverse[i]])
            if earlier != i:
                events[i].append(("row_id", f"{_show(ids[i if given.codes is None else int(given.codes[i])])}"
                                  f" is also the id of row {earlier + 1}: row ids must be unique"))
        return RowIds(given=given.with_values(ids))

    def _duplicates(self, digests: bytes, ids: RowIds, events: _Events) -> list[tuple[int, int]]:
        """(row number, earlier number) of each row that sends what an earlier row sends; without
        ``allow_duplicates`` each is reported, with it derived ids get ``-2``, ``-3``..."""
        # a problem with the columns or bindings changes every row's request: no row is compared
        comparable = np.flatnonzero(~self.unsendable) if not self.binding else np.zeros(0, np.intp)
        duplicates: list[tuple[int, int]] = []
        occurrences: dict[bytes, int] = {}
        for row, earlier in first_seen(digests, comparable):
            if not self.allow_duplicates:
                events[row].append((None, f"sends the same workflow, node inputs and options as row "
                                    f"{earlier + 1} (ComfyUI may return a cached result for an "
                                    "identical graph): remove it, change a value such as the seed, "
                                    "or pass --allow-duplicates"))
                continue
            duplicates.append((row + 1, earlier + 1))
            digest = digests[row * 32:(row + 1) * 32]
            occurrences[digest] = occurrences.get(digest, 1) + 1
            if ids.derived is not None:
                ids.renamed[row] = f"{ids.derived[row].decode()}-{occurrences[digest]}"
        return duplicates

    def _derived_id_collisions(self, ids: RowIds) -> None:
        taken: dict[str, int] = {}
        for number, row_id in enumerate(ids.take(np.arange(self.n)), start=1):
            other = taken.setdefault(row_id, number)
            if other != number:
                self.problems.add(number, "row_id", f"the derived id {row_id} is also row "
                                  f"{other}'s: give the rows a row_id column")



def _item_problem(k: int, item: Any, example: str) -> tuple[str | None, Any, Any]:
    """Why item ``k`` of a nodeInfoList cannot be sent (None when it can), with its nodeId (as
    text) and fieldName."""
    if not isinstance(item, dict):
        return f"item {k} is {_show(item)}, not an object: write {example}", None, None
    missing = [key for key in ("nodeId", "fieldName", "fieldValue") if key not in item]
    if missing:
        return (f"item {k} lacks {', '.join(missing)}: each item needs nodeId, fieldName and "
                "fieldValue"), None, None
    node, name, value = item["nodeId"], item["fieldName"], item["fieldValue"]
    if isinstance(node, int) and not isinstance(node, bool):
        node = str(node)
    if not isinstance(node, str) or not node or not isinstance(name, str) or not name \
            or _has_controls(node) or _has_controls(name):
        return (f"item {k} has nodeId {_show(node)} and fieldName {_show(name)}: both must be "
                "non-empty text without control characters"), node, name
    if value is None or isinstance(value, dict | list) or (
            isinstance(value, float) and not math.isfinite(value)):
        return f"item {k} ({node}.{name}) has fieldValue {_show(value)}: send text, a number or " \
               "true/false", node, name
    if (message := _int_problem(value, name)) is not None:
        return f"item {k} ({node}.{name}): {message}", node, name
    if isinstance(value, str) and len(value) > MAX_CELL_BYTES // 4 \
            and len(value.encode("utf-8")) > MAX_CELL_BYTES:
        return (f"item {k} ({node}.{name}) holds {len(value.encode('utf-8')):,} bytes, more than the "
                "1 MiB limit: shorten it"), node, name
    return None, node, name


def _column_fragments(column: _Column) -> list[bytes]:
    """The canonical ``[nodeId, fieldName, fieldValue]`` text (UTF-8) of each value of a bound
    column: one per code, or per row for a column without codes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    node, name = column.target  # type: ignore[misc]
    if column.ints is not None and column.ints.null_count == 0:
        texts = join_pieces([f"[{_encode_text(node)},{_encode_text(name)},",
                             pc.cast(column.ints, pa.string()), "]"])
        fragments: list[bytes] = texts.cast(pa.binary()).to_pylist()
        return fragments
    values = column.cells.values
    if column.cells.codes is not None:
        return [_fragment(node, name, v).encode() for v in values]
    known: dict[Any, bytes] = {}
    fragments = []
    for value in values:
        key = _value_key(value)
        text = known.get(key) if key is not None else None
        if text is None:
            text = _fragment(node, name, value).encode()
            if key is not None:
                known[key] = text
        fragments.append(text)
    return fragments


def _take(texts: list[bytes], cells: Cells, rows: np.ndarray) -> bytes | list[bytes]:
    """Row by row, the text of each of ``rows``' code; just the text when the column has one."""
    if len(texts) == 1:
        return texts[0]
    index = rows if cells.codes is None else cells.codes[rows]
    return list(map(texts.__getitem__, index.tolist()))
