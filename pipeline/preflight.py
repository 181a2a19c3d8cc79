"""Offline pre-flight: check every row's ``nodeInfoList`` against the workflow's own API JSON.

RunningHub rejects a bad override for free (803 / 433), but one task at a time, and a value of the
wrong type can slip through and quietly do something else. Here every row is checked before anything
is submitted, against the workflow in ComfyUI **API format** (what ``getJsonApiFormat`` returns, or
ComfyUI's "Export (API)")::

    {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "cfg": 8, "model": ["4", 0], ...},
           "_meta": {"title": "KSampler"}}, ...}

For each ``{nodeId, fieldName, fieldValue}``:

1. the node exists (bypassed and muted nodes are not in the API JSON, so they count as missing);
2. ``fieldName`` is a key of the node's ``inputs``;
3. that input holds a literal, not a link (``["4", 0]`` = output 0 of node 4): links cannot be set;
4. the value fits the literal it replaces. ComfyUI converts a widget value with ``int()``,
   ``float()``, ``str()`` or ``bool()`` before it runs; the rules below accept what that conversion
   turns into the intended value and reject what it would reject or silently change:

   ======  =====================================================================================
   kind    accepted
   ======  =====================================================================================
   int     an integer, a whole float (``7.0``) or integer text (``"7"``). Inputs known to be
           integers (:data:`INT_INPUTS`: seed, steps, width, ...) reject fractions (ComfyUI would
           truncate 7.5 to 7). Any other integer literal may be a float widget that JSON wrote
           as ``8`` for 8.0, so it takes any finite number or numeric text.
   float   an integer, a finite float or numeric text (``"7.5"``); never a boolean, NaN or inf.
           Integer literals of inputs known to be floats (:data:`FLOAT_INPUTS`: cfg, denoise, ...)
           are shown and checked as float.
   bool    ``true``/``false``, or 0/1. Text is rejected: ``bool("false")`` is True in ComfyUI.
   str     text or a number (ComfyUI applies ``str()``; a CSV cell ``1990`` arrives as a number).
           A boolean is rejected: it would arrive as the text ``True``.
   other   (the literal is null, a mapping or a non-link list) anything nodeInfoList can carry.
   ======  =====================================================================================

   In every kind a value must be text, a number or a boolean (``null``, lists and mappings cannot be
   sent as a ``fieldValue``). COMBO choices (sampler names, checkpoints) are not checked: the API JSON
   does not list them.

The verdict for ``(workflowId, nodeId, fieldName, type(value))`` is computed once and cached; only
value-dependent checks (text that must parse as a number, fractions, 0/1) look at each value, so a
million rows with four overrides take a few seconds. Problems are listed up to ``limit`` and counted
beyond it (:class:`Problems`).

Getting the workflows (files, the cache, ``getJsonApiFormat``) is :mod:`pipeline.workflows`; this
module does no I/O.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import nodecheck
from pipeline.catalogue import Catalogue, InputSpec
from pipeline.errors import MAX_PROBLEMS_LISTED, Problem, Problems
from pipeline.nodecheck import is_link  # the one definition (nodecheck cannot import preflight)

VALUE_SHOWN_CHARS = 40  # value column of ``rhbatch inspect``
WARNINGS_SHOWN = 20  # catalogue warnings listed before they are only counted

# Integer inputs of core ComfyUI nodes and common custom nodes: a fraction here is always a mistake.
INT_INPUTS = frozenset(
    """seed noise_seed steps width height batch_size length start_at_step end_at_step batch_index
    frame_count num_frames frame_load_cap skip_first_frames select_every_nth stop_at_clip_layer""".split()
)
# Float inputs whose saved literal is often an integer (the JSON of 8.0 is 8).
FLOAT_INPUTS = frozenset(
    """cfg denoise strength strength_model strength_clip guidance shift max_shift base_shift
    start_percent end_percent scale_by upscale_by megapixels eta s_noise sigma_min sigma_max rho
    conditioning_to_strength frame_rate force_rate fps weight blend_factor opacity""".split()
)
FLOAT_SUFFIXES = ("_strength", "_percent", "_weight", "_scale", "_cfg")

_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


# ---------------------------------------------------------------------------------------------
# Describing a workflow


@dataclass(frozen=True)
class Field:
    """One input of one node. ``kind`` is int, float, str, bool, link or other."""

    node_id: str
    class_type: str
    title: str | None
    name: str
    value: Any
    kind: str
    allowed: str | None = None  # what the node catalogue allows (range, step, default, options)
    spec: InputSpec | None = None  # the catalogue's definition, when it knows the input

    @property
    def target(self) -> str:
        return f"{self.node_id}.{self.name}"

    @property
    def bindable(self) -> bool:
        return self.kind != "link"


def _is_float_name(name: str) -> bool:
    return name in FLOAT_INPUTS or name.endswith(FLOAT_SUFFIXES)


def kind_of(name: str, value: Any) -> str:
    """The kind of literal ``value`` held by input ``name`` (see the module docstring)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "float" if _is_float_name(name) else "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if is_link(value):
        return "link"
    return "other"


def node_sort_key(node_id: str) -> tuple[tuple[int, int, str], ...]:
    """Numeric-aware order: 2 < 10 < 57:3 < 57:35 < a."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", str(node_id))
    )


def _nodes(api_json: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): v for k, v in api_json.items() if isinstance(v, dict)}


def _title(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    return str(title) if title else None


def _inputs(node: Mapping[str, Any]) -> dict[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def describe_workflow(api_json: Mapping[str, Any], catalogue: Catalogue | None = None) -> list[Field]:
    """Every input of every node, sorted by node id (numeric-aware), then field name; with a
    ``catalogue``, each bindable field's range, step, default and options where it knows them."""
    fields: list[Field] = []
    for node_id, node in sorted(_nodes(api_json).items(), key=lambda kv: node_sort_key(kv[0])):
        class_type = str(node.get("class_type", "?"))
        title = _title(node)
        for name, value in sorted(_inputs(node).items()):
            kind = kind_of(name, value)
            spec = None if catalogue is None or kind == "link" else catalogue.input(class_type, name)
            allowed = None
            if catalogue is not None and kind != "link":
                allowed = spec.summary() if spec is not None else "not known here"
            fields.append(Field(node_id, class_type, title, name, value, kind, allowed, spec))
    return fields


def _shown(value: Any, width: int = VALUE_SHOWN_CHARS) -> str:
    if is_link(value):
        return f"-> node {value[0]}.{value[1]}"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_fields(fields: Sequence[Field]) -> str:
    """The ``rhbatch inspect`` table: one line per input; links are marked not bindable."""
    header: tuple[str, ...] = ("NODE", "CLASS", "TITLE", "FIELD", "VALUE", "KIND")
    lines: list[tuple[str, ...]] = [
        (
            f.node_id,
            f.class_type,
            f.title if f.title and f.title != f.class_type else "-",
            f.name,
            _shown(f.value),
            "link (not bindable)" if f.kind == "link" else f.kind,
        )
        for f in fields
    ]
    if any(f.allowed for f in fields):
        header = (*header, "ALLOWED")
        lines = [(*line, f.allowed or "") for line, f in zip(lines, fields, strict=True)]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *lines]
    )


def fields_to_json(fields: Sequence[Field]) -> list[dict[str, Any]]:
    """The JSON form of ``rhbatch inspect``: one object per input, links as ``{node, output}``."""
    out = []
    for f in fields:
        value = {"node": str(f.value[0]), "output": f.value[1]} if f.kind == "link" else f.value
        out.append(
            {
                "nodeId": f.node_id,
                "classType": f.class_type,
                "title": f.title,
                "fieldName": f.name,
                "target": f.target,
                "value": value,
                "kind": f.kind,
                "bindable": f.bindable,
                **({} if f.allowed is None else {"allowed": f.allowed}),
                **({} if f.spec is None else {"catalogue": _spec_json(f.spec)}),
            }
        )
    return out



def _spec_json(spec: InputSpec) -> dict[str, Any]:
    """An input's definition in the catalogue, for ``inspect --json``."""
    out: dict[str, Any] = {"type": spec.type, "required": spec.required}
    for name in ("default", "min", "max", "step"):
        value = getattr(spec, name)
        if value is not None:
            out[name] = value
    if spec.is_combo:
        out["options"] = list(spec.options or ()) if spec.options_known else None
    return out


# ---------------------------------------------------------------------------------------------
# Checking rows


def column_names(bound: Mapping[str, str] | None) -> dict[str, str]:
    """``NODE.FIELD`` -> the column the user wrote (the first column bound to it)."""
    names: dict[str, str] = {}
    for column, target in (bound or {}).items():
        names.setdefault(str(target), str(column))
    return names


def targets_named(column: str, workflows: Iterable[Mapping[str, Any]], limit: int = 2) -> list[str]:
    """The bindable ``NODE.FIELD`` inputs a column called ``column`` probably meant: fields with
    that name in any case (for ``KSampler.cfg`` or ``my:cfg``, the part after the last ``.`` or
    ``:``), in node order, at most ``limit``: ``cfg`` -> ``["3.cfg"]``."""
    name = re.split(r"[.:]", column.strip())[-1].casefold()
    found: list[str] = []
    for api_json in workflows:
        for field in describe_workflow(api_json):
            if field.bindable and field.name.casefold() == name and field.target not in found:
                found.append(field.target)
                if len(found) >= limit:
                    return found
    return found


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


Checker = Callable[[Any], "str | None"]
_OK = "ok"  # verdict: nothing to check
# A verdict is _OK, a message (str, a problem whatever the value) or a Checker of the value.


class _WorkflowIndex:
    """What the checks need from one workflow, with lazy did-you-mean helpers."""

    def __init__(self, workflow_id: str, api_json: Mapping[str, Any]):
        self.workflow_id = workflow_id
        self.nodes = _nodes(api_json)

    def label(self, node_id: str) -> str:
        node = self.nodes[node_id]
        return _title(node) or str(node.get("class_type", "?"))

    def literal_fields(self, node_id: str) -> list[str]:
        return [k for k, v in _inputs(self.nodes[node_id]).items() if not is_link(v)]

    def nodes_with_field(self, field: str) -> list[str]:
        found = [
            n
            for n in self.nodes
            if field in _inputs(self.nodes[n]) and not is_link(_inputs(self.nodes[n])[field])
        ]
        return sorted(found, key=node_sort_key)

    def near_nodes(self, node_id: str) -> list[str]:
        """Node ids close to ``node_id``, or whose title / class type is close to it."""
        by_name: dict[str, str] = {}
        for nid in sorted(self.nodes, key=node_sort_key):
            for name in (self.label(nid), str(self.nodes[nid].get("class_type", ""))):
                by_name.setdefault(name.lower(), nid)
        hits = difflib.get_close_matches(node_id, list(self.nodes), n=3, cutoff=0.5)
        for name in difflib.get_close_matches(node_id.lower(), list(by_name), n=3, cutoff=0.6):
            if by_name[name] not in hits:
                hits.append(by_name[name])
        return hits[:3]


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _verdict(ix: _WorkflowIndex, node: Any, field: Any, vtype: type) -> str | Checker:
    node_id, name = str(node), str(field)
    target = f"{node_id}.{name}"
    inspect = f"run `rhbatch inspect {ix.workflow_id}` to list its fields"
    if node_id not in ix.nodes:
        hints = [f"{n}.{name} ({ix.label(n)})" for n in ix.nodes_with_field(name)[:3]]
        if not hints:
            hints = [f"node {n} ({ix.label(n)})" for n in ix.near_nodes(node_id)]
        hint = f"did you mean {_or_list(hints)}? " if hints else ""
        return (
            f"node {node_id} is not in workflow {ix.workflow_id} (bypassed and muted nodes are "
            f"left out of it): {hint}{inspect}"
        )
    inputs = _inputs(ix.nodes[node_id])
    where = f"node {node_id} ({ix.label(node_id)})"
    if name not in inputs:
        literal = ix.literal_fields(node_id)
        close = difflib.get_close_matches(name, literal, n=3, cutoff=0.6)
        if close:
            hint = f"did you mean {_or_list([repr(c) for c in close])}?"
        else:
            elsewhere = [f"{n}.{name} ({ix.label(n)})" for n in ix.nodes_with_field(name)[:3]]
            if elsewhere:
                hint = f"did you mean {_or_list(elsewhere)}?"
            elif literal:
                hint = f"its fields are {', '.join(literal[:12])}{' ...' if len(literal) > 12 else ''}"
            else:
                hint = "it has no field that can be set"
        return f'{where} has no field "{name}": {hint}'
    current = inputs[name]
    if is_link(current):
        literal = ix.literal_fields(node_id)
        others = f"; fields of node {node_id} that can be set: {', '.join(literal)}" if literal else ""
        return f"{target} is a link to node {current[0]}, it cannot be overridden{others}"
    kind = kind_of(name, current)
    if vtype not in (str, int, float, bool):
        what = {type(None): "null", list: "a list", dict: "a mapping"}.get(vtype, f"a {vtype.__name__}")
        return f"{what} cannot be sent as a fieldValue: {target} needs text, a number or true/false"
    rule = _RULES[kind]
    verdict = rule(vtype, name)
    if verdict is _OK:
        return _OK
    if isinstance(verdict, str):
        return verdict.format(about=_about(ix, node, field))
    return verdict  # returns a template with {value} and {about}, or None


def _about(ix: _WorkflowIndex, node: Any, field: Any) -> str:
    current = _inputs(ix.nodes[str(node)])[str(field)]
    kind = kind_of(str(field), current)
    return f"{node}.{field} is {_KIND_TEXT[kind]}, now {show_value(current)}"


_KIND_TEXT = {
    "int": "an integer input",
    "float": "a number input",
    "bool": "a true/false input",
    "str": "a text input",
    "other": "an input",
}


def _finite_text(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _whole_number(value: Any) -> str | None:
    if isinstance(value, float):
        return None if value.is_integer() else "{value} is not a whole number ({about})"
    return None if _INT_TEXT.fullmatch(value) else "{value} is not an integer ({about})"


def _finite_number(value: Any) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else "{value} is not a finite number ({about})"
    return None if _finite_text(value) else "{value} is not a number ({about})"


def _zero_or_one(value: Any) -> str | None:
    return None if value in (0, 1) else "{value} is not true or false ({about})"


def _rule_int(vtype: type, name: str) -> str | Checker:
    if vtype is bool:
        return "a true/false value for {about}: write a whole number"
    if vtype is int:
        return _OK
    return _whole_number if name in INT_INPUTS else _finite_number


def _rule_float(vtype: type, name: str) -> str | Checker:
    if vtype is bool:
        return "a true/false value for {about}: write a number"
    if vtype is int:
        return _OK
    return _finite_number


def _rule_bool(vtype: type, name: str) -> str | Checker:
    if vtype is bool:
        return _OK
    if vtype is int:
        return _zero_or_one
    if vtype is float:
        return "a number for {about}: write true or false"
    return (
        "text for {about}: write true or false without quotes (ComfyUI reads any non-empty text, "
        "even 'false', as true)"
    )


def _rule_str(vtype: type, name: str) -> str | Checker:
    if vtype is bool:
        return "a true/false value for {about}: it would arrive as the text 'True'; quote it"
    return _OK


def _rule_other(vtype: type, name: str) -> str | Checker:
    return _OK


_RULES: dict[str, Callable[[type, str], str | Checker]] = {
    "int": _rule_int,
    "float": _rule_float,
    "bool": _rule_bool,
    "str": _rule_str,
    "other": _rule_other,
}


def missing_workflow_message(workflow_id: str, count: int, first_rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in first_rows) + (" ..." if count > len(first_rows) else "")
    return (
        f"workflow {workflow_id} is not available to check {count} row{'s' if count != 1 else ''} "
        f"({shown}): pass --workflow-json FILE (its API-format JSON, from getJsonApiFormat or "
        "ComfyUI's Export (API)) or run with network access so rhbatch can fetch it"
    )


def check_rows(
    rows: Iterable[Any],
    workflows: Mapping[str, Mapping[str, Any]],
    *,
    bound: Mapping[str, str] | None = None,
    limit: int = MAX_PROBLEMS_LISTED,
) -> Problems:
    """Every problem of every row's nodeInfoList against ``workflows`` (workflowId -> API JSON).

    ``rows`` need ``number``, ``workflow_id`` and ``node_info_list``. A problem's column is the one
    the user wrote (via ``bound``: column -> ``NODE.FIELD``), else ``NODE.FIELD``. A workflowId missing
    from ``workflows`` gives one problem, listed first, at its first row, saying how to provide it.
    """
    found = Problems(limit)
    columns = column_names(bound)
    indexes: dict[Any, _WorkflowIndex | None] = {}
    missing: dict[str, list[int]] = {}  # workflowId -> [row count, first rows...]
    verdicts: dict[tuple[Any, Any, Any, type], str | Checker] = {}
    ok = _OK
    parts = operator.itemgetter("nodeId", "fieldName", "fieldValue")
    for row in rows:
        wid = row.workflow_id
        ix = indexes.get(wid, ...)
        if ix is ...:
            api_json = workflows.get(str(wid))
            ix = indexes[wid] = None if api_json is None else _WorkflowIndex(str(wid), api_json)
        if ix is None:
            seen = missing.setdefault(str(wid), [0])
            seen[0] += 1
            if len(seen) <= 5:
                seen.append(row.number)
            continue
        for item in row.node_info_list:
            node, field, value = parts(item)
            key = (wid, node, field, type(value))
            verdict = verdicts.get(key)
            if verdict is None:
                verdict = verdicts[key] = _verdict(ix, node, field, type(value))
            if verdict is ok:
                continue
            template = verdict if isinstance(verdict, str) else verdict(value)
            if template is None:
                continue
            if len(found) >= limit:  # counted, not listed: no message is built
                found.total += 1
                continue
            target = f"{node}.{field}"
            message = (
                template
                if isinstance(verdict, str)
                else template.format(value=show_value(value), about=_about(ix, node, field))
            )
            found.add(Problem(row.number, columns.get(target, target), message))
    if not missing:
        return found
    problems = Problems(limit)
    for wid, (count, *first_rows) in missing.items():
        problems.add(Problem(first_rows[0], "workflowId", missing_workflow_message(wid, count, first_rows)))
    for problem in found:
        problems.add(problem)
    problems.total += found.unlisted
    return problems


@dataclass
class CatalogueCheck:
    """What the node catalogue adds to preflight: errors (problems like preflight's own), warnings
    (values the service would change silently, fields no output depends on), and the coverage line
    (how many fields were checked against the catalogue, and which could not be)."""

    problems: Problems
    warnings: list[str]
    coverage: str


def check_with_catalogue(
    rows: Sequence[Any],
    workflows: Mapping[str, Mapping[str, Any]],
    catalogue: Catalogue,
    *,
    bound: Mapping[str, str] | None = None,
    limit: int = MAX_PROBLEMS_LISTED,
    already: Iterable[Problem] = (),
) -> CatalogueCheck:
    """The catalogue's checks (:mod:`pipeline.nodecheck`) of ``workflows`` and of every row's values.

    Per workflow: missing required inputs and link type mismatches are problems of the workflow (row
    None, column ``workflowId``); unknown classes are only counted. Per row: ranges, COMBO membership
    (with "did you mean"), link-only inputs given a value. ``already`` (preflight's own problems) keeps
    a cell from being reported twice."""
    problems = Problems(limit)
    warnings: list[str] = []
    targets = list((bound or {}).values())
    for wid in sorted({str(r.workflow_id) for r in rows}):
        api_json = workflows.get(wid)
        if api_json is None:
            continue
        report = nodecheck.check_workflow(api_json, catalogue, workflow_id=wid, targets=targets,
                                          bound=bound)
        for finding in report.findings:
            if finding.severity == nodecheck.ERROR:
                problems.add(Problem(None, "workflowId", f"workflow {wid}: {finding.text}"))
            elif finding.severity == nodecheck.WARNING:
                warnings.append(f"workflow {wid}: {finding.text}")
    seen = {(p.row, p.column) for p in already}
    values = nodecheck.check_rows(rows, workflows, catalogue, bound=bound, limit=limit)
    warned = 0
    for finding in values.findings:
        if finding.severity == nodecheck.ERROR:
            if (finding.row, finding.column) not in seen:
                problems.add(finding.problem())
        elif finding.severity == nodecheck.WARNING:
            warned += 1
            if warned <= WARNINGS_SHOWN:
                warnings.append(str(finding))
    errors_unlisted = values.totals[nodecheck.ERROR] - sum(
        1 for f in values.findings if f.severity == nodecheck.ERROR)
    problems.total += errors_unlisted
    more = values.totals[nodecheck.WARNING] - min(warned, WARNINGS_SHOWN)
    if more > 0:
        warnings.append(f"... and {more:,} more values the service would change silently")
    return CatalogueCheck(problems, warnings, values.coverage())
