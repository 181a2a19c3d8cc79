"""The schema applied to a manifest's rows: per distinct value where the schema decomposes by
property (see :mod:`pipeline.manifest.schema`), else to each row object in turn.

Values already reported (unreadable cells, empty node inputs, rows whose request is not complete)
are not judged again: the schema's message about them would only add noise. Problems come in the
order a row-by-row check would find them: column by column, each in row order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.manifest.cells import _BAD, Cells, _Column
from pipeline.manifest.problems import MAX_PROBLEMS_KEPT, _Problems
from pipeline.manifest.rows import Row
from pipeline.manifest.schema import _kind, _Rules


def validate(rules: _Rules, problems: _Problems, unsendable: np.ndarray, columns: list[_Column],
             workflow_ids: Cells, options: Cells | None, has_row_ids: bool,
             explicit_by_row: dict[int, tuple[dict[str, Any], ...]],
             constant_items: tuple[dict[str, Any], ...], rows: Iterable[Row]) -> None:
    """Every problem the schema finds in the rows (``rows``: as built, unreadable values in)."""
    if not rules.decomposable:
        _validate_objects(rules, problems, unsendable, columns, rows)
        return
    validate_columns(rules, problems, columns)
    for item in constant_items:
        for message in rules.item_errors(item["nodeId"], item["fieldName"], item["fieldValue"]):
            problems.add(None, f"defaults.{item['nodeId']}.{item['fieldName']}", message)
    if rules.items is None and explicit_by_row:
        by_index = {row.index: row for row in rows if row.index in explicit_by_row}
    for i, explicit in explicit_by_row.items():
        if rules.items is None:
            if unsendable[i]:
                continue
            for message in rules.list_errors(by_index[i].node_info_list):
                problems.add(i + 1, "nodeInfoList", message)
            continue
        for item in explicit:
            for message in rules.item_errors(item["nodeId"], item["fieldName"], item["fieldValue"]):
                problems.add(i + 1, "nodeInfoList", f"{item['nodeId']}.{item['fieldName']}: {message}")
    if rules.items is None and not explicit_by_row:
        for row in rows:
            if unsendable[row.index]:
                continue
            for message in rules.list_errors(row.node_info_list):
                problems.add(row.number, "nodeInfoList", message)
    # Special keys and options.
    if "workflowId" not in rules.code_checked:
        _validate_special(rules, problems, "workflowId", workflow_ids)
    if "row_id" not in rules.code_checked:
        _validate_special(rules, problems, "row_id", Cells.of_rows([r.row_id for r in rows]))
    _validate_options(rules, problems, columns, options)


def _validate_objects(rules: _Rules, problems: _Problems, unsendable: np.ndarray,
                      columns: list[_Column], rows: Iterable[Row]) -> None:
    """A schema that does not decompose, applied to each row object."""
    for row in rows:
        if unsendable[row.index] or (problems and any(v is _BAD for v in row.inputs.values())):
            continue
        obj = {"row_id": row.row_id, "workflowId": row.workflow_id,
               "nodeInfoList": [dict(x) for x in row.node_info_list], **row.options, **row.inputs}
        sources = [_source_of(item, columns) for item in row.node_info_list]
        for path, message in rules.row_errors(obj):
            where = str(path[0]) if path else None
            if where == "nodeInfoList" and len(path) > 1 and isinstance(path[1], int) \
                    and path[1] < len(sources):
                where = sources[path[1]]
            problems.add(row.number, where, message)


def _validate_special(rules: _Rules, problems: _Problems, key: str, cells: Cells) -> None:
    """A schema rule on ``workflowId`` or ``row_id`` that differs from the one rhbatch enforces."""
    values = cells.values
    for value in set(values):
        if value is None:  # a missing or invalid workflow id, reported already
            continue
        messages = rules.value_errors(key, value)
        if messages:
            for i in cells.rows_where([v == value for v in values]).tolist():
                for message in messages:
                    problems.add(i + 1, key, message)


def _validate_options(rules: _Rules, problems: _Problems, columns: list[_Column],
                      options: Cells | None) -> None:
    present_base = {"row_id", "workflowId", "nodeInfoList", *(c.name for c in columns)}
    if options is None:
        for key in rules.required:
            if key not in present_base:
                problems.add(None, key, "is missing from every row: add this column (the schema "
                             "requires it)")
        return
    found: list[list[tuple[str, str]]] = []
    required_cache: dict[frozenset[str], list[str]] = {}
    for combo in options.values:
        messages = [(key, message) for key, value in combo.items()
                    for message in rules.value_errors(key, value)]
        present = frozenset(combo)
        missing = required_cache.get(present)
        if missing is None:
            missing = required_cache[present] = [
                k for k in rules.required if k not in present_base and k not in present]
        messages += [(key, "is missing: add this column (the schema requires it)") for key in missing]
        found.append(messages)
    codes = options.codes
    for i in options.rows_where([bool(m) for m in found]).tolist():
        for key, message in found[i if codes is None else int(codes[i])]:
            problems.add(i + 1, key, message)


def validate_columns(rules: _Rules, problems: _Problems, columns: list[_Column]) -> None:
    """Each distinct value of each column against the (decomposable) schema, once."""
    for column in columns:
        _validate_column(rules, problems, column)


def _validate_column(rules: _Rules, problems: _Problems, column: _Column) -> None:
    cells = column.cells
    values = cells.values  # one per code (or per row)
    by_kind = rules.by_kind(column.name) and (column.target is None or rules.items_by_kind)

    def judged(value: Any) -> bool:
        """Whether ``value`` is still to be judged (not reported already)."""
        return not column.bad or not (value is _BAD or (value is None and column.target))

    def messages_for(value: Any, exact: bool = False) -> list[str]:
        messages = list(rules.value_errors(column.name, value, exact))
        if column.target is not None and value is not None:
            messages += rules.item_errors(*column.target, value, exact)
        return messages

    if column.ints is not None:  # plain integers, and None for empty cells if there are any
        types: set[type] = {int, type(None)} if column.ints.null_count else {int}
    else:
        types = set(map(type, values))
    mixed = len(types) > 1
    try:
        if by_kind:  # one representative value per kind
            if float in types:
                distinct = set({_kind(v): ((type(v), v) if mixed else v) for v in values}.values())
            elif column.ints is not None:
                some = next(v for v in values if v is not None)
                distinct = {(int, some), (type(None), None)} if mixed else {some}
            else:
                distinct = set({type(v): ((type(v), v) if mixed else v) for v in values}.values())
        else:
            distinct = set(zip(map(type, values), values, strict=True)) if mixed else set(values)
    except TypeError:  # lists or objects in a metadata column
        for i, value in enumerate(cells.row_values()):
            if not judged(value):
                continue
            for message in rules.value_errors(column.name, value):
                problems.add(i + 1, column.name, message)
        return
    if column.bad:
        distinct = {e for e in distinct if judged(e[1] if mixed else e)}
    bad: dict[Any, list[str]] = {}
    for entry in distinct:
        messages = messages_for(entry[1] if mixed else entry)
        if messages:
            bad[entry] = messages
    if not bad:
        return
    if by_kind:  # every value of a bad kind fails the same way
        bad_kinds = {_kind(e[1] if mixed else e) for e in bad}
        for i in cells.rows_where([_kind(v) in bad_kinds for v in values]).tolist():
            value = cells.row_value(i)
            # the message shows this row's own value (past the problems shown, the kind's shared
            # message is as good and much cheaper)
            for message in messages_for(value, len(problems.kept) < MAX_PROBLEMS_KEPT):
                problems.add(i + 1, column.name, message)
        return
    keys = list(zip(map(type, values), values, strict=True)) if mixed else values
    for i in cells.rows_where([k in bad for k in keys]).tolist():
        key = keys[i if cells.codes is None else int(cells.codes[i])]
        for message in bad[key]:
            problems.add(i + 1, column.name, message)


def _source_of(item: dict[str, Any], columns: list[_Column]) -> str:
    for column in columns:
        if column.target == (item["nodeId"], item["fieldName"]):
            return column.name
    return "nodeInfoList"
