"""The row schema: where it is, how it is read, and how it is applied one column at a time.

Every row, as the object ``{row_id, workflowId, nodeInfoList, <options the row sets>, <input
columns>}``, must satisfy ``schemas/manifest.schema.json`` or the ``--schema`` that replaces it.
When the schema is a plain object schema (``properties``, ``patternProperties``,
``additionalProperties``, ``required``), each distinct value of each column, each distinct
nodeInfoList item and each option value is validated once (:class:`_Rules`), which keeps a
million-row manifest within seconds; any other schema is applied to each row object in turn.
A jsonschema error becomes one short sentence with the value and the fix (:func:`_schema_message`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from pipeline.errors import SchemaError
from pipeline.manifest.cells import _PARSERS
from pipeline.manifest.content import _ENC
from pipeline.manifest.problems import _show
from pipeline.manifest.read import _too_deep

SCHEMA_FILE = "manifest.schema.json"
# Root keywords that still let a row schema be checked one column at a time.
DECOMPOSABLE_ROOT_KEYS = frozenset({
    "$schema", "$id", "$defs", "definitions", "$comment", "title", "description", "examples",
    "default", "deprecated", "readOnly", "writeOnly", "type", "properties", "patternProperties",
    "additionalProperties", "required",
})
ANNOTATION_KEYS = frozenset({"title", "description", "$comment", "examples", "default", "format",
                             "deprecated", "readOnly", "writeOnly"})


def bundled_schema(name: str) -> Path:
    """The path of a JSON Schema that ships with rhbatch (``manifest.schema.json``,
    ``sweep.schema.json``); SchemaError, saying what is missing, when this installation lacks it."""
    from pipeline import resources

    try:
        return resources.schema_path(name)
    except resources.ResourceMissing as exc:
        raise SchemaError(str(exc)) from None


def default_schema_path() -> Path:
    return bundled_schema(SCHEMA_FILE)


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
