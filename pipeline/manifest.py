"""Load and validate a manifest into rows ready to submit. No network I/O happens here.

Formats (chosen by extension): ``.csv`` / ``.tsv`` (delimiter sniffed among ``, ; TAB |``, UTF-8 with
or without BOM), ``.json`` (an array of row objects, or ``{"workflowId", "bindings", "defaults",
"rows"}``), ``.jsonl`` / ``.ndjson`` (one object per line) and ``.parquet``. An output manifest written
by rhbatch (``results.jsonl`` / ``.csv`` / ``.parquet``) loads back as a manifest that reproduces the
recorded ``workflowId``, ``nodeInfoList`` and ``options`` exactly; its result fields are ignored.

Where a row's node inputs come from:

- a column named ``NODE.FIELD`` (split at the first ``.``; node ids such as ``57:35`` are valid);
- ``--bind COLUMN=NODE.FIELD`` or the JSON object's ``bindings``;
- an explicit ``nodeInfoList`` (a list, or JSON text in a CSV cell).

Other columns are metadata: kept in the output manifest, never sent, and listed in
:attr:`Manifest.unbound` so that an override that would do nothing is visible.

Types: JSON and Parquet values keep their types. A CSV column is typed by the schema when the schema
declares a type for it, otherwise inferred over the whole column: all whole numbers (no leading
zeros) -> int, all numbers -> float, all ``true``/``false`` -> bool, else text.

Validation: every row, as the object ``{row_id, workflowId, nodeInfoList, <options>, <input
columns>}``, must satisfy ``schemas/manifest.schema.json`` or the user's ``--schema``. When the schema
is a plain object schema (properties, required, additionalProperties), each distinct value of each
column is validated once, which keeps a million-row manifest within seconds; other schemas are
applied row by row. Every problem in the file is reported together, with the row number as the user
counts it (the first data row is row 1; for CSV the physical line is given too), the column, the
value and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from pipeline.errors import InputError, ManifestError, Problem, SchemaError

SCHEMA_FILE = "manifest.schema.json"
OPTION_FIELDS = ("instanceType", "usePersonalQueue", "addMetadata", "retainSeconds", "webhookUrl",
                 "webappId")
SPECIAL = {"row_id", "workflowId", "nodeInfoList", "options", *OPTION_FIELDS}
# Fields of an rhbatch output manifest that are results, not inputs.
RESULT_FIELDS = {
    "row", "status", "taskId", "fileUrls", "outputs", "coins", "taskCostTime", "error_code",
    "error", "failedReason", "attempts", "submitted_at", "finished_at", "files", "inputs",
}
MAX_CELL_BYTES = 1 << 20
CSV_FIELD_LIMIT_CHARS = 4 * MAX_CELL_BYTES
MAX_PROBLEMS = 1000
ROW_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
INT_RE = re.compile(r"[+-]?(0|[1-9][0-9]*)")
FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
NODE_FIELD_RE = re.compile(r"([^.\s]+)\.(\S.*)")
DECOMPOSABLE_KEYS = {
    "$schema", "$id", "$defs", "definitions", "$comment", "title", "description", "type",
    "properties", "required", "additionalProperties", "examples", "default",
}


def default_schema_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas" / SCHEMA_FILE, here.parent / "schemas" / SCHEMA_FILE):
        if candidate.is_file():
            return candidate
    raise SchemaError(f"The default schema {SCHEMA_FILE} is missing from the installation")


def parse_binding(text: str) -> tuple[str, str, str]:
    """``"seed=3.seed"`` -> ``("seed", "3", "seed")``."""
    column, sep, target = text.partition("=")
    match = NODE_FIELD_RE.fullmatch(target.strip())
    if not sep or not column.strip() or not match:
        raise InputError(
            f"--bind {text!r} is not COLUMN=NODE.FIELD: write e.g. --bind seed=3.seed "
            "(node id, a dot, then the input name from the workflow's API JSON)"
        )
    return column.strip(), match.group(1), match.group(2)


@dataclass(frozen=True)
class _Layout:
    """What a row's columns mean; shared by every row of a manifest."""

    columns: tuple[str, ...]  # input columns, in file order
    targets: tuple[tuple[int, str, str], ...]  # (position in columns, nodeId, fieldName)
    defaults: tuple[tuple[str, str, Any], ...]  # (nodeId, fieldName, value) sent when not bound

    @property
    def bound_pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((node, name) for _, node, name in self.targets)


@dataclass(frozen=True, slots=True)
class Row:
    index: int
    number: int
    row_id: str
    workflow_id: str
    values: tuple[Any, ...]
    layout: _Layout
    explicit: tuple[dict[str, Any], ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(zip(self.layout.columns, self.values, strict=True))

    @property
    def node_info_list(self) -> tuple[dict[str, Any], ...]:
        if self.explicit is not None:
            return self.explicit
        items = [
            {"nodeId": node, "fieldName": name, "fieldValue": self.values[pos]}
            for pos, node, name in self.layout.targets
        ]
        items.extend(
            {"nodeId": node, "fieldName": name, "fieldValue": value}
            for node, name, value in self.layout.defaults
            if (node, name) not in self.layout.bound_pairs
        )
        return tuple(items)


@dataclass(frozen=True)
class Manifest:
    source: str
    rows: list[Row]
    columns: list[str]
    bound: dict[str, str]
    unbound: list[str]
    fingerprint: str
    duplicates: list[tuple[int, int]] = field(default_factory=list)


# -- reading -------------------------------------------------------------------------------


@dataclass
class _Raw:
    """Rows as read: a header and value lists (CSV), or dicts (JSON, JSONL, Parquet)."""

    kind: str  # "table" (values are text) or "records" (typed)
    columns: list[str]
    rows: list[Any]
    lines: list[int] | None = None  # CSV physical line of each row's start
    workflow_id: str | None = None
    bindings: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


class _Collector:
    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []
        self.count = 0
        self.lines: list[int] | None = None

    def add(self, row: int | None, column: str | None, message: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(row, column, message))

    def raise_if_any(self) -> None:
        if self.count:
            problems = list(self.problems)
            lines = self.lines
            if lines is not None:  # CSV: the physical line too, as an editor shows it
                problems = [
                    Problem(p.row, p.column, f"(line {lines[p.row - 1]}) {p.message}")
                    if p.row is not None and p.row <= len(lines)
                    and not p.message.startswith("(line") else p
                    for p in problems
                ]
            if self.count > len(problems):
                problems.append(Problem(None, None, f"... {self.count - len(problems)} more problems"))
            raise ManifestError(self.source, problems)


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(text) if isinstance(value, str) else text


def _json_kind(value: Any) -> str:
    """How JSON calls the type of ``value``: 'a string', 'a number', 'an array', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _decode(data: bytes, source: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(source, [Problem(None, None,
            f"line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; re-save the file as UTF-8 "
            "(in a spreadsheet: Save As, CSV UTF-8)")]) from None


def _read_csv(path: Path, source: str, delimiter: str | None) -> _Raw:
    text = _decode(path.read_bytes(), source)
    if not text.strip():
        raise ManifestError(source, [Problem(None, None, "the file is empty: add a header line "
                                             "and at least one row")])
    if delimiter is None:
        head = text[:65536]
        first = head.split("\n", 1)[0]
        counts = {d: first.count(d) for d in (",", ";", "\t", "|")}
        delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    # The csv module refuses fields over 128 KiB by default; cells up to MAX_CELL_BYTES are valid
    # (and larger ones are reported as such, with row and column, further on).
    if csv.field_size_limit() < CSV_FIELD_LIMIT_CHARS:
        csv.field_size_limit(CSV_FIELD_LIMIT_CHARS)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ManifestError(source, [Problem(None, None, f"line 1: {exc}")]) from None
    header = [h.strip() for h in header]
    problems = _Collector(source)
    seen: set[str] = set()
    for name in header:
        if not name:
            problems.add(None, None, "the header has an empty column name: name every column")
        elif name in seen:
            problems.add(None, name, "the column appears twice in the header: rename one")
        seen.add(name)
    rows: list[list[str]] = []
    lines: list[int] = []
    width = len(header)
    start = reader.line_num + 1
    try:
        for values in reader:
            number = len(rows) + 1
            if not values or (len(values) == 1 and values[0] == "" and width > 1):
                start = reader.line_num + 1
                continue  # blank line
            if len(values) != width:
                problems.add(number, None, f"(line {start}) has {len(values)} cells but the header "
                             f"has {width}: fix the row or quote cells that contain {delimiter!r}")
            rows.append(values)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        detail = str(exc)
        if "field larger than field limit" in detail:
            detail = (f"a cell is over {CSV_FIELD_LIMIT_CHARS} characters, far past the 1 MiB "
                      "limit (often a quote that is never closed)")
        problems.add(len(rows) + 1, None, f"(line {reader.line_num}) {detail}: check the quotes")
    problems.raise_if_any()
    if not rows:
        raise ManifestError(source, [Problem(None, None, "the file has a header but no rows: add "
                                             "at least one row")])
    return _Raw("table", header, rows, lines)


def _check_depth(value: Any, limit: int = 64) -> None:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise RecursionError
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _read_json(path: Path, source: str) -> _Raw:
    text = _decode(path.read_bytes(), source)
    try:
        data = json.loads(text)
        _check_depth(data)
    except RecursionError:
        raise ManifestError(source, [Problem(None, None, "the JSON is nested too deeply: a row "
                                             "is a flat object of column values")]) from None
    except ValueError as exc:
        raise ManifestError(source, [Problem(None, None, f"not valid JSON: {exc}")]) from None
    raw = _Raw("records", [], [])
    if isinstance(data, dict):
        unknown = set(data) - {"workflowId", "bindings", "defaults", "rows", "description"}
        if "rows" not in data or not isinstance(data["rows"], list):
            raise ManifestError(source, [Problem(None, None,
                'a JSON manifest object needs "rows": a list of row objects '
                '(optionally with "workflowId", "bindings" and "defaults")')])
        if unknown:
            raise ManifestError(source, [Problem(None, None,
                f"unknown top-level key(s) {', '.join(sorted(unknown))}: allowed are workflowId, "
                "bindings, defaults, rows")])
        if data.get("workflowId") is not None:
            raw.workflow_id = str(data["workflowId"])
        bindings = data.get("bindings") or {}
        defaults = data.get("defaults") or {}
        if not isinstance(bindings, dict) or not all(isinstance(v, str) for v in bindings.values()):
            raise ManifestError(source, [Problem(None, None,
                '"bindings" must map column names to "NODE.FIELD" strings')])
        if not isinstance(defaults, dict):
            raise ManifestError(source, [Problem(None, None,
                '"defaults" must map columns or NODE.FIELD names to values')])
        raw.bindings, raw.defaults = dict(bindings), dict(defaults)
        data = data["rows"]
    if not isinstance(data, list):
        raise ManifestError(source, [Problem(None, None,
            f"the JSON is {_json_kind(data)}; expected an array of row objects or an object "
            'with "rows"')])
    raw.rows = data
    return raw


def _read_jsonl(path: Path, source: str) -> _Raw:
    text = _decode(path.read_bytes(), source)
    problems = _Collector(source)
    rows: list[Any] = []
    lines: list[int] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            _check_depth(value)
        except RecursionError:
            problems.add(len(rows) + 1, None, f"(line {line_no}) the JSON is nested too deeply")
            continue
        except ValueError as exc:
            problems.add(len(rows) + 1, None, f"(line {line_no}) not valid JSON: {exc}")
            continue
        rows.append(value)
        lines.append(line_no)
    problems.raise_if_any()
    if not rows:
        raise ManifestError(source, [Problem(None, None, "the file has no rows: write one JSON "
                                             "object per line")])
    return _Raw("records", [], rows, lines)


def _read_parquet(path: Path, source: str) -> _Raw:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ManifestError(source, [Problem(None, None, f"not a readable Parquet file: {exc}")]) \
            from None
    return _Raw("records", list(table.column_names), table.to_pylist())


def _read(path: Path, source: str) -> _Raw:
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
    raise InputError(f"{source}: unknown manifest format {suffix or '(no extension)'!r}: use .csv, "
                     ".tsv, .json, .jsonl or .parquet")


# -- schema ------------------------------------------------------------------------------


def load_schema(path: str | Path | None) -> dict[str, Any]:
    schema_path = Path(path) if path else default_schema_path()
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SchemaError(f"Cannot read schema {schema_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SchemaError(f"Schema {schema_path} is not valid JSON: {exc}") from None
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise SchemaError(f"Schema {schema_path} is not a valid JSON Schema at {where}: "
                          f"{exc.message}") from None
    return schema


class _RowValidator:
    """Validates row objects; per distinct (column, value) when the schema allows it."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.validator = Draft202012Validator(schema)
        self.properties: dict[str, Any] = schema.get("properties", {}) if isinstance(
            schema.get("properties"), dict) else {}
        self.required = list(schema.get("required", []))
        self.additional = schema.get("additionalProperties", True)
        self.decomposable = (
            isinstance(schema, dict)
            and set(schema) <= DECOMPOSABLE_KEYS
            and schema.get("type", "object") == "object"
        )
        nli = self.properties.get("nodeInfoList")
        self.nli_items = None
        if isinstance(nli, dict) and set(nli) <= {"type", "items", "description", "title",
                                                  "minItems"} and nli.get("minItems", 0) <= 1:
            self.nli_items = nli.get("items")
        self._cache: dict[tuple[Any, ...], list[str]] = {}
        default_props = _default_properties()
        # Our own code enforces these exactly; skip per-row schema work for them when unchanged.
        self.skip = {k for k in ("row_id",) if self.properties.get(k) == default_props.get(k)}

    def _subschema(self, key: str) -> Any:
        if key in self.properties:
            return self.properties[key]
        return self.additional

    def _errors(self, key: str, value: Any, schema: Any, instance: Any = None) -> list[str]:
        if isinstance(value, tuple):
            cache_key: tuple[Any, ...] = (key, tuple, *(_vkey(v) for v in value))
            value = instance
        elif value is None or isinstance(value, str | int | float | bool):
            cache_key = (key, type(value), value)
        else:
            try:
                cache_key = (key, dict, json.dumps(value, sort_keys=True, default=str))
            except (TypeError, ValueError):
                cache_key = (key, object, repr(value))
        known = self._cache.get(cache_key)
        if known is None:
            if schema is False:
                known = ["is not an allowed column"]
            elif schema is True:
                known = []
            else:
                known = [_message(e) for e in self.validator.descend(value, schema, path=key)]
            if len(self._cache) < 2_000_000:
                self._cache[cache_key] = known
        return known

    def errors_of_value(self, key: str, value: Any) -> list[str]:
        if key in self.skip:
            return []
        return self._errors(key, value, self._subschema(key))

    def nli_errors(self, nli: Sequence[dict[str, Any]]) -> list[tuple[str | None, str]]:
        if self.nli_items is None:
            return [("nodeInfoList", m) for m in self._errors(
                "nodeInfoList", [dict(x) for x in nli], self._subschema("nodeInfoList"))]
        out: list[tuple[str | None, str]] = []
        for item in nli:
            key = (item["nodeId"], item["fieldName"], item["fieldValue"])
            out.extend(("nodeInfoList", m) for m in self._errors(
                "nodeInfoList[]", key, self.nli_items, item))
        return out

    def missing_required(self, options: dict[str, Any], columns: Sequence[str]
                         ) -> list[tuple[str | None, str]]:
        present = {"row_id", "workflowId", "nodeInfoList", *options, *columns}
        return [(key, "is missing: add this column (the schema requires it)")
                for key in self.required if key not in present]

    def errors_of(
        self,
        row_id: str,
        workflow_id: str,
        nli: Sequence[dict[str, Any]],
        options: dict[str, Any],
        columns: Sequence[str],
        values: Sequence[Any],
    ) -> list[tuple[str | None, str]]:
        """:meth:`errors` for the row object, without building it (decomposable schemas only)."""
        out: list[tuple[str | None, str]] = []
        present = {"row_id", "workflowId", "nodeInfoList", *options, *columns}
        for key in self.required:
            if key not in present:
                out.append((key, "is missing: add this column (the schema requires it)"))
        if "row_id" not in self.skip:
            out.extend(("row_id", m) for m in self._errors("row_id", row_id, self._subschema("row_id")))
        out.extend(("workflowId", m) for m in self._errors("workflowId", workflow_id,
                                                            self._subschema("workflowId")))
        if self.nli_items is not None:
            for item in nli:
                key = (item["nodeId"], item["fieldName"], item["fieldValue"])
                out.extend(("nodeInfoList", m) for m in self._errors(
                    "nodeInfoList[]", key, self.nli_items, item))
        else:
            out.extend(("nodeInfoList", m) for m in self._errors(
                "nodeInfoList", [dict(x) for x in nli], self._subschema("nodeInfoList")))
        for key, value in options.items():
            out.extend((key, m) for m in self._errors(key, value, self._subschema(key)))
        for key, value in zip(columns, values, strict=True):
            out.extend((key, m) for m in self._errors(key, value, self._subschema(key)))
        return out

    def errors(self, obj: dict[str, Any]) -> Iterator[tuple[str | None, str]]:
        if not self.decomposable:
            for error in self.validator.iter_errors(obj):
                column = str(error.path[0]) if error.path else None
                yield column, _message(error)
            return
        for key in self.required:
            if key not in obj:
                yield key, "is missing: add this column (the schema requires it)"
        for key, value in obj.items():
            if key in self.skip:
                continue
            schema = self._subschema(key)
            if key == "nodeInfoList" and self.nli_items is not None and isinstance(value, list):
                for item in value:
                    for message in self._errors(
                        "nodeInfoList[]", (item["nodeId"], item["fieldName"], item["fieldValue"]),
                        self.nli_items, item,
                    ):
                        yield key, message
                continue
            for message in self._errors(key, value, schema):
                yield key, message


_DEFAULTS: dict[str, Any] | None = None


def _default_properties() -> dict[str, Any]:
    global _DEFAULTS
    if _DEFAULTS is None:
        try:
            _DEFAULTS = json.loads(default_schema_path().read_text(encoding="utf-8")).get(
                "properties", {})
        except (SchemaError, OSError, ValueError):
            _DEFAULTS = {}
    return _DEFAULTS


def _message(error: jsonschema.ValidationError) -> str:
    value = _short(error.instance)
    validator = error.validator
    schema = error.schema if isinstance(error.schema, dict) else {}
    if validator == "type":
        return f"{value} is not of type {schema.get('type')}"
    if validator == "enum":
        choices = ", ".join(json.dumps(c) for c in schema.get("enum", []))
        return f"{value} is not one of {choices}"
    if validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{value} breaks {validator} {schema.get(validator)}"
    if validator in ("maxLength", "minLength"):
        return f"{value} breaks {validator} {schema.get(validator)}"
    if validator == "pattern":
        return f"{value} does not match {schema.get('pattern')!r}"
    if validator == "required":
        return error.message
    text = error.message
    return text if len(text) <= 200 else text[:197] + "..."


# -- building rows -------------------------------------------------------------------------


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _canonical_nli(items: Iterable[dict[str, Any]]) -> list[list[Any]]:
    return sorted(([str(i["nodeId"]), str(i["fieldName"]), i["fieldValue"]] for i in items),
                  key=lambda t: (t[0], t[1]))


def _content_key(workflow_id: str, nli: list[list[Any]], options: dict[str, Any]) -> str:
    """sha256 hex of the canonical (workflowId, sorted nodeInfoList, options) of a row."""
    # repr of str/int/float/bool is exact and stable, and several times cheaper than json here
    text = repr((workflow_id, [tuple(item) for item in nli], sorted(options.items())))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _schema_types(schema: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    props = schema.get("properties")
    if isinstance(props, dict):
        for name, sub in props.items():
            if isinstance(sub, dict) and isinstance(sub.get("type"), str):
                out[name] = sub["type"]
    return out


def _to_int(text: str) -> int | None:
    if INT_RE.fullmatch(text):
        return int(text)
    if FLOAT_RE.fullmatch(text):
        number = float(text)
        if number.is_integer():
            return int(number)
    return None


def _type_column(name: str, cells: list[str], declared: str | None, problems: _Collector,
                 bound: bool) -> list[Any]:
    """Typed values for one CSV column; empty cells become None."""
    stripped = [c.strip() for c in cells]
    non_empty = [c for c in stripped if c != ""]
    kind = declared
    inferred = False
    if kind is None:
        inferred = True
        if non_empty and all(INT_RE.fullmatch(c) for c in non_empty) and not any(
            len(c.lstrip("+-")) > 1 and c.lstrip("+-").startswith("0") for c in non_empty
        ):
            kind = "integer"
        elif non_empty and all(FLOAT_RE.fullmatch(c) for c in non_empty):
            kind = "number"
        elif non_empty and all(c.lower() in ("true", "false") for c in non_empty):
            kind = "boolean"
        else:
            kind = "string"
    if inferred and kind == "integer":
        return [int(t) if t else None for t in stripped]
    if inferred and kind == "number":
        floats: dict[str, float] = {}
        return [(floats.get(t) or floats.setdefault(t, float(t))) if t else None for t in stripped]
    if kind == "string":
        interned: dict[str, str] = {}
        return [interned.setdefault(c, c) if c != "" else None for c in cells]
    out: list[Any] = []
    intern: dict[str, str] = {}
    for number, (raw, text) in enumerate(zip(cells, stripped, strict=True), start=1):
        if text == "" and kind != "string":
            out.append(None)
            continue
        if kind == "integer":
            value = _to_int(text)
            if value is None:
                problems.add(number, name, f"{_short(raw)} is not a whole number: write digits "
                             "only, e.g. 42")
            out.append(value)
        elif kind == "number":
            if FLOAT_RE.fullmatch(text):
                out.append(float(text))
            else:
                problems.add(number, name, f"{_short(raw)} is not a number: write e.g. 7.5")
                out.append(None)
        elif kind == "boolean":
            if text.lower() in ("true", "false"):
                out.append(text.lower() == "true")
            else:
                problems.add(number, name, f"{_short(raw)} is not true or false")
                out.append(None)
        else:
            if raw == "":
                out.append(None)
            else:
                out.append(intern.setdefault(raw, raw))
    return out


def load_manifest(
    path: str | Path,
    *,
    binds: Sequence[str] = (),
    workflow_id: str | None = None,
    schema_path: str | Path | None = None,
    allow_duplicates: bool = False,
) -> Manifest:
    """Read, type, bind and validate every row of ``path``; raise ManifestError listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    schema = load_schema(schema_path)
    validator = _RowValidator(schema)
    declared = _schema_types(schema)
    raw = _read(path, source)
    problems = _Collector(source)
    if raw.kind == "table":
        problems.lines = raw.lines

    bind_map: dict[str, tuple[str, str]] = {}
    for column, target in raw.bindings.items():
        match = NODE_FIELD_RE.fullmatch(target)
        if not match:
            problems.add(None, column, f'binding {target!r} is not "NODE.FIELD": write e.g. "6.text"')
            continue
        bind_map[column] = (match.group(1), match.group(2))
    for text in binds:
        column, node, name = parse_binding(text)
        bind_map[column] = (node, name)
    for column in bind_map:
        if column in SPECIAL:
            problems.add(None, column, f"is a reserved column ({', '.join(sorted(SPECIAL))}) and "
                         "cannot be bound to a node input: rename the column in the file")

    # Normalise records into a table of columns.
    if raw.kind == "records":
        columns: list[str] = list(raw.columns)
        seen = set(columns)
        records: list[dict[str, Any]] = []
        for number, record in enumerate(raw.rows, start=1):
            if not isinstance(record, dict):
                problems.add(number, None, f"is {_json_kind(record)} ({_short(record)}), not an "
                             "object of column values: write each row as {\"column\": value, ...}")
                records.append({})
                continue
            records.append(record)
            for key in record:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
        problems.raise_if_any()
    else:
        columns = list(raw.columns)
        records = []

    is_output = "nodeInfoList" in columns and bool(RESULT_FIELDS & set(columns))
    input_columns = [
        c for c in columns
        if c not in SPECIAL and not (is_output and (c in RESULT_FIELDS or c.startswith("inputs.")))
    ]
    for column in bind_map:
        if column not in columns:
            problems.add(None, column, f"--bind names a column that does not exist; columns are: "
                         f"{', '.join(columns)}")
    problems.raise_if_any()

    # Column values, typed.
    n_rows = len(raw.rows)
    values_by_column: dict[str, list[Any]] = {}
    if raw.kind == "table":
        position = {c: i for i, c in enumerate(columns)}
        for column in columns:
            pos = position[column]
            cells = [r[pos] if pos < len(r) else "" for r in raw.rows]
            for number, cell in enumerate(cells, start=1):
                if len(cell) * 4 > MAX_CELL_BYTES and len(cell.encode("utf-8")) > MAX_CELL_BYTES:
                    problems.add(number, column, f"the cell holds {len(cell.encode('utf-8'))} bytes; "
                                 f"the limit is {MAX_CELL_BYTES} (1 MiB): shorten it")
            if column in ("nodeInfoList", "options"):
                values_by_column[column] = cells
            elif column in ("row_id", "workflowId", "instanceType", "webhookUrl", "webappId"):
                values_by_column[column] = [c.strip() or None for c in cells]
            else:
                kind = declared.get(column)
                if column in ("usePersonalQueue", "addMetadata"):
                    kind = kind or "boolean"
                if column == "retainSeconds":
                    kind = kind or "integer"
                values_by_column[column] = _type_column(column, cells, kind, problems,
                                                        column in bind_map)
    else:
        for column in columns:
            values_by_column[column] = [r.get(column) for r in records]
            for number, value in enumerate(values_by_column[column], start=1):
                if isinstance(value, str) and len(value) * 4 > MAX_CELL_BYTES and \
                        len(value.encode("utf-8")) > MAX_CELL_BYTES:
                    problems.add(number, column, f"the value holds {len(value.encode('utf-8'))} "
                                 f"bytes; the limit is {MAX_CELL_BYTES} (1 MiB): shorten it")

    # Which columns feed which node input.
    targets: list[tuple[int, str, str]] = []
    bound: dict[str, str] = {}
    unbound: list[str] = []
    for pos, column in enumerate(input_columns):
        if column in bind_map:
            node, name = bind_map[column]
        else:
            match = NODE_FIELD_RE.fullmatch(column)
            if not match:
                unbound.append(column)
                continue
            node, name = match.group(1), match.group(2)
        targets.append((pos, node, name))
        bound[column] = f"{node}.{name}"
    seen_targets: dict[tuple[str, str], str] = {}
    for pos, node, name in targets:
        column = input_columns[pos]
        if (node, name) in seen_targets:
            problems.add(None, column, f"feeds {node}.{name}, which column "
                         f"{seen_targets[(node, name)]!r} already feeds: bind each input once")
        seen_targets[(node, name)] = column
    defaults: list[tuple[str, str, Any]] = []
    default_by_column: dict[str, Any] = {}
    for key, value in raw.defaults.items():
        if key in bind_map or key in input_columns:
            default_by_column[key] = value
            if key not in bind_map and key not in bound:
                continue
            if key in bind_map and key not in input_columns:
                node, name = bind_map[key]
                defaults.append((node, name, value))
            continue
        match = NODE_FIELD_RE.fullmatch(key)
        if match:
            defaults.append((match.group(1), match.group(2), value))
        else:
            problems.add(None, key, 'a default must name a bound column or a "NODE.FIELD"')
    layout = _Layout(tuple(input_columns), tuple(targets), tuple(defaults))
    problems.raise_if_any()

    rows: list[Row] = []
    first_by_content: dict[Any, int] = {}
    occurrences: dict[Any, int] = {}
    explicit_ids: dict[str, int] = {}
    duplicates: list[tuple[int, int]] = []
    fingerprint = hashlib.sha256()
    input_values = [values_by_column[c] for c in input_columns]
    target_positions = {pos for pos, _, _ in targets}
    decomposable = validator.decomposable
    workflow_intern: dict[str, str] = {}
    wf_checked: dict[str, list[str]] = {}
    column_nli_checked = False
    # Empty, NaN and nested values in bound columns, column by column.
    for pos in sorted(target_positions):
        column = input_columns[pos]
        col = input_values[pos] = list(input_values[pos])
        for i, value in enumerate(col):
            if value is None:
                if column in default_by_column:
                    col[i] = default_by_column[column]
                else:
                    problems.add(i + 1, column, f"is empty, so {bound[column]} has no value to "
                                 "send: fill it in (or give a default)")
            elif value.__class__ is float and value != value:
                problems.add(i + 1, column, "is NaN: write a number")
            elif isinstance(value, dict | list):
                problems.add(i + 1, column, f"{_short(value)} is not a single value: node inputs "
                             "take text, numbers or true/false")
    if raw.kind == "table":
        # A spreadsheet saved without evaluating a formula leaves "=..." text behind: sending it as
        # a prompt would pay for a task that renders the formula. JSON manifests are typed on
        # purpose, so a literal "=" there is taken as meant.
        for pos in sorted(target_positions):
            col = input_values[pos]
            if not any(v.__class__ is str and v[:1] == "=" for v in set(col)):
                continue
            for i, value in enumerate(col):
                if value.__class__ is str and value[:1] == "=":
                    problems.add(i + 1, input_columns[pos], f"{_short(value)} starts with \"=\" like "
                                 "a spreadsheet formula saved without its value: in the "
                                 "spreadsheet paste values only and save again, or write literal "
                                 "text starting with \"=\" in a JSON or JSONL manifest")
    column_bad: list[tuple[int, dict[Any, list[str]]]] = []
    if decomposable:
        # Each distinct value of each column is validated once, as a column value and, for a
        # bound column, as the nodeInfoList item it becomes.
        target_of = {pos: (node, name) for pos, node, name in targets}
        for pos, column in enumerate(input_columns):
            bad: dict[Any, list[str]] = {}
            column_values = input_values[pos]
            try:
                distinct = {(v.__class__, v): v for v in column_values}.items()
            except TypeError:  # unhashable values (JSON objects): one by one
                distinct = {_vkey(v): v for v in column_values}.items()
            for _, value in distinct:
                key = _vkey(value)
                if pos in target_of and (value is None or isinstance(value, dict | list)):
                    continue  # reported above as empty or not a single value
                messages = validator.errors_of_value(column, value)
                if pos in target_of:
                    node, name = target_of[pos]
                    messages = messages + [m for _, m in validator.nli_errors(
                        [{"nodeId": node, "fieldName": name, "fieldValue": value}])]
                if messages:
                    bad[key] = messages
            column_bad.append((pos, bad))
    get = values_by_column.get
    row_ids, workflow_ids = get("row_id"), get("workflowId")
    explicit_lists, option_cells = get("nodeInfoList"), get("options")
    option_columns = [(c, values_by_column[c]) for c in OPTION_FIELDS if c in values_by_column]

    bound_pairs = {(node, name) for _, node, name in targets}
    order = sorted(
        [(node, name, pos, None) for pos, node, name in targets]
        + [(node, name, -1, value) for node, name, value in defaults if (node, name) not in bound_pairs],
        key=lambda t: (t[0], t[1]),
    )
    constant_wf = workflow_id or raw.workflow_id
    bound_positions = [pos for _, _, pos, _ in order if pos >= 0]
    pick_bound = operator.itemgetter(*bound_positions) if bound_positions else None
    fingerprint.update(repr((layout.targets, layout.defaults)).encode())
    no_options = option_cells is None and not option_columns
    empty_options: dict[str, Any] = {}
    all_values = zip(*input_values, strict=True) if input_values else iter([()] * n_rows)

    for i, value_tuple in enumerate(all_values):
        number = i + 1
        values = value_tuple
        wf = workflow_ids[i] if workflow_ids else None
        wf = str(wf).strip() if wf not in (None, "") else constant_wf
        if wf not in wf_checked:
            if wf is None:
                problems.add(number, "workflowId", "has no workflow id: add a workflowId column or "
                             "pass --workflow-id")
            elif not (wf.isdigit() and int(wf) > 0):
                problems.add(number, "workflowId", f"{_short(wf)} is not a workflow id: use the "
                             "digits from the workflow's URL, e.g. 1904136902449209346")
            else:
                wf_checked[wf] = validator.errors_of_value("workflowId", wf) if decomposable else []
        if wf is None:
            wf = ""
        options: dict[str, Any] = empty_options
        if not no_options:
            options = {}
            if option_cells is not None:
                cell = option_cells[i]
                if isinstance(cell, str) and cell.strip():
                    try:
                        cell = json.loads(cell)
                    except ValueError:
                        problems.add(number, "options", "is not JSON: write an object like "
                                     '{"instanceType": "plus"}')
                        cell = None
                if isinstance(cell, dict):
                    options.update({k: v for k, v in cell.items() if v is not None})
                elif cell not in (None, ""):
                    problems.add(number, "options", "must be an object of task options")
            for column, column_values in option_columns:
                if column_values[i] not in (None, ""):
                    options[column] = column_values[i]
        explicit = None
        has_explicit = explicit_lists is not None and explicit_lists[i] not in (None, "")
        if has_explicit:
            explicit = _explicit_list(explicit_lists[i], number, problems)
            if explicit is not None:
                clash = {(str(e["nodeId"]), str(e["fieldName"])) for e in explicit} & bound_pairs
                if clash and not is_output:
                    node, name = sorted(clash)[0]
                    problems.add(number, f"{node}.{name}", "is set both by a column and by "
                                 "nodeInfoList: keep one")
        options_key = tuple(sorted(options.items(), key=lambda kv: kv[0])) if options else None
        if explicit is not None:
            canon = _canonical_nli(explicit)
            sent: Any = _ENCODER.encode(canon)
        else:
            canon = None
            sent = pick_bound(values) if pick_bound else ()
            if not order and not options.get("webappId") and not has_explicit:
                problems.add(number, None, "sends no node inputs: add NODE.FIELD columns, --bind, "
                             "or a nodeInfoList")
        dup_key = (wf, sent, options_key)
        given = row_ids[i] if row_ids else None
        if given is not None and given != "":
            row_id = str(given)
            if not ROW_ID_RE.fullmatch(row_id):
                problems.add(number, "row_id", f"{_short(row_id)} may only use letters, digits and "
                             ". _ : - (at most 128): rename it")
            elif row_id in explicit_ids:
                problems.add(number, "row_id", f"{_short(row_id)} is also the id of row "
                             f"{explicit_ids[row_id]}: row ids must be unique")
            explicit_ids.setdefault(row_id, number)
        else:
            if canon is None:
                canon = [[n, f, values[pos] if pos >= 0 else const] for n, f, pos, const in order]
            row_id = "r" + _content_key(wf, canon, options)[:16]
        try:
            earlier = first_by_content.get(dup_key)
        except TypeError:  # a nested value (reported as a problem) cannot be a key as it is
            dup_key = json.dumps(dup_key, sort_keys=True, default=str)
            earlier = first_by_content.get(dup_key)
        if earlier is not None:
            if not allow_duplicates:
                problems.add(number, None, f"sends the same workflow and node inputs as row "
                             f"{earlier} (ComfyUI may treat it as a cached no-op): remove it, or "
                             "pass --allow-duplicates to keep it on purpose")
            else:
                duplicates.append((number, earlier))
                occurrences[dup_key] = occurrences.get(dup_key, 1) + 1
                if given in (None, ""):
                    row_id = f"{row_id}-{occurrences[dup_key]}"
        else:
            first_by_content[dup_key] = number
        fingerprint.update(repr((row_id, dup_key)).encode())
        if decomposable:
            check = []
            for pos, bad in column_bad:
                value = values[pos]
                if bad and _vkey(value) in bad:
                    check.extend((input_columns[pos], m) for m in bad[_vkey(value)])
            check.extend(("workflowId", m) for m in wf_checked.get(wf, ()))
            if "row_id" not in validator.skip:
                check.extend(("row_id", m) for m in validator.errors_of_value("row_id", row_id))
            if explicit is not None:
                check.extend(validator.nli_errors(explicit))
            for key, value in options.items():
                check.extend((key, m) for m in validator.errors_of_value(key, value))
            if not column_nli_checked:
                check.extend(validator.nli_errors(
                    [{"nodeId": n, "fieldName": f, "fieldValue": v} for n, f, v in defaults]))
                check.extend(validator.missing_required(options, input_columns))
                column_nli_checked = True
            elif options:
                check.extend(validator.missing_required(options, input_columns))
        else:
            full = Row(i, number, row_id, wf, tuple(values), layout, explicit, options)
            obj: dict[str, Any] = {"row_id": row_id, "workflowId": wf,
                                   "nodeInfoList": [dict(x) for x in full.node_info_list],
                                   **options}
            for pos, column in enumerate(input_columns):
                obj[column] = values[pos]
            check = validator.errors(obj)
        for column, message in check:
            problems.add(number, column, f"{message}{_fix_hint(column, message)}")
        row = Row(i, number, row_id, workflow_intern.setdefault(wf, wf), values, layout, explicit,
                  options)
        rows.append(row)
    problems.raise_if_any()
    return Manifest(
        source=source,
        rows=rows,
        columns=input_columns,
        bound=bound,
        unbound=unbound,
        fingerprint=fingerprint.hexdigest(),
        duplicates=duplicates,
    )


def _vkey(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value), value)
    return (object, json.dumps(value, sort_keys=True, default=str))


def _fix_hint(column: str | None, message: str) -> str:
    if "is not of type" in message:
        return ": change the value, or the schema's type for this column"
    if "breaks" in message or "is not one of" in message:
        return ": change the value to one the schema allows"
    return ""


def _explicit_list(cell: Any, number: int, problems: _Collector) -> tuple[dict[str, Any], ...] | None:
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except ValueError as exc:
            problems.add(number, "nodeInfoList", f"is not valid JSON ({exc.msg}): write a list like "
                         '[{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}]')
            return None
    if not isinstance(cell, list):
        problems.add(number, "nodeInfoList", "must be a list of {nodeId, fieldName, fieldValue}")
        return None
    items = []
    for k, item in enumerate(cell):
        if not isinstance(item, dict) or not {"nodeId", "fieldName", "fieldValue"} <= set(item):
            missing = (
                sorted({"nodeId", "fieldName", "fieldValue"} - set(item))
                if isinstance(item, dict) else ["nodeId", "fieldName", "fieldValue"]
            )
            problems.add(number, "nodeInfoList", f"item {k + 1} lacks {', '.join(missing)}: each "
                         "item needs nodeId, fieldName and fieldValue")
            return None
        items.append({"nodeId": str(item["nodeId"]), "fieldName": str(item["fieldName"]),
                      "fieldValue": item["fieldValue"]})
    return tuple(items)


def make_row(
    index: int,
    number: int,
    row_id: str,
    workflow_id: str,
    node_info_list: Sequence[dict[str, Any]],
    inputs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Row:
    """A Row with an explicit nodeInfoList (for callers that build rows without a file)."""
    inputs = inputs or {}
    layout = _Layout(tuple(inputs), (), ())
    return Row(index, number, row_id, workflow_id, tuple(inputs.values()), layout,
               tuple(dict(item) for item in node_info_list), dict(options or {}))
