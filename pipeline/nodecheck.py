"""Checks against the node catalogue: what ComfyUI would reject, or silently change, in a row.

Pure functions over an API-format workflow, the rows' ``nodeInfoList`` values and a
:class:`~pipeline.catalogue.Catalogue`; no I/O. Preflight calls them after its own checks (node and
field exist, not a link, the literal's kind), so they assume those passed and skip what failed them.

Per value (:func:`check_value`, and :func:`check_rows` for every row):

- INT and FLOAT: ComfyUI converts with ``int()`` / ``float()`` and then checks ``min`` / ``max``. Text
  that does not convert (``"abc"``, ``"7.5"`` for an INT) and values out of range are errors; a
  fraction for an INT (truncated) and ``true`` / ``false`` (sent as 1 / 0) are warnings; an INT off
  its ``step`` grid (a width of 500 where the step is 8) is info: ComfyUI does not check it.
- BOOLEAN: ComfyUI applies ``bool()``, so any non-empty text is true: ``"false"`` is a warning.
- STRING: ``str()``: ``true`` and ``null`` arrive as the text ``True`` / ``None`` (warnings).
- COMBO, in both encodings, when the catalogue lists its options: a value not among them is an error
  with "did you mean". An empty list (models, input files) is not known here and never checked. A V3
  COMBO is checked by ComfyUI only when the task runs, so the row fails after it is billed.
- a link-only input (``IMAGE`` ...) given a value: an error; the task would fail when it runs.

Per workflow (:func:`check_workflow`): unknown classes (custom nodes) are "not known here", never an
error; then, for the nodes an output depends on (ComfyUI validates nothing else), missing required
inputs, links to missing nodes or slots, link type mismatches and the workflow's own values. Output
nodes that no bound field reaches are info (every row gives the same result there); a bound field on a
node no output depends on is a warning (ComfyUI never runs it).

Every :class:`Finding` has a severity (``error``, ``warning``, ``info``), a machine ``code`` (ComfyUI's
error type where there is one), the node id, the input name, a message and its fix;
:meth:`Finding.problem` turns it into preflight's :class:`~pipeline.errors.Problem`. Reports count the
fields checked against the catalogue and those that could not be, with the reason.

Speed: the check of one ``(workflowId, nodeId, fieldName)`` is compiled once; per value it is a type
test, a comparison or a set lookup. "Did you mean" (difflib) is computed only for the findings that are
listed, once per distinct bad value: 100,000 rows of 3 checked fields take about 0.3 s.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.catalogue import Catalogue, InputSpec
from pipeline.errors import Problem

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES = (ERROR, WARNING, INFO)

MAX_FINDINGS_LISTED = 1000
SUGGESTIONS = 3  # "did you mean" candidates
SUGGESTION_CUTOFF = 0.6
OPTIONS_SHOWN = 8  # options listed when nothing is close
SUGGESTION_CACHE_SIZE = 10_000  # distinct bad values remembered per input
VALUE_SHOWN_CHARS = 60

_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_FALSY_TEXT = frozenset({"false", "0", "no", "off", "none", "null"})


@dataclass(frozen=True)
class Finding:
    """One thing the catalogue says about a workflow or a row's value."""

    severity: str  # error, warning or info
    code: str  # e.g. value_bigger_than_max, value_not_in_list, truncated, unknown_class
    message: str
    fix: str = ""
    node_id: str | None = None
    input_name: str | None = None
    row: int | None = None  # 1-based, as the user counts; None for the workflow itself
    column: str | None = None  # the user's column, else NODE.FIELD

    @property
    def text(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message

    def problem(self) -> Problem:
        """The same finding as preflight's Problem (row, column, message with the fix)."""
        return Problem(self.row, self.column, self.text)

    def __str__(self) -> str:
        return str(self.problem())


def show_value(value: Any) -> str:
    """A value as messages show it (text quoted, booleans and null as in JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= VALUE_SHOWN_CHARS else value[: VALUE_SHOWN_CHARS - 3] + "...")
    return repr(value)


def is_link(value: Any) -> bool:
    """A ``[node_id, output_index]`` pair, as in an API-format workflow."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _range_text(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"from {lo} to {hi}"
    if lo is not None:
        return f"of at least {lo}"
    if hi is not None:
        return f"of at most {hi}"
    return ""


# ---------------------------------------------------------------------------------------------
# One value against one input

# A check returns None (fine) or (severity, code, message, fix); a costly fix ("did you mean") is a
# function, called only for the findings that are listed.
Fix = str | Callable[[], str]
Verdict = tuple[str, str, str, Fix]
Check = Callable[[Any], "Verdict | None"]


def _fix(fix: Fix) -> str:
    return fix if isinstance(fix, str) else fix()

NOT_KNOWN_CLASS = "the node's class is not known here"
NOT_KNOWN_INPUT = "the input is not in the node catalogue"
NOT_KNOWN_OPTIONS = "its options (models, files) are not known here"
NOT_KNOWN_TYPE = "its type cannot be checked here"
NOT_VALIDATED = "no output depends on the node, so ComfyUI ignores it"


def where(spec: InputSpec, node_id: str | None = None) -> str:
    """``width in node 5 (EmptyLatentImage)``, or ``EmptyLatentImage.width`` without a node id."""
    if node_id is None:
        return f"{spec.class_type}.{spec.name}"
    return f"{spec.name} in node {node_id} ({spec.class_type})"


def _number_check(spec: InputSpec, at: str, integer: bool) -> Check:
    lo, hi = spec.min, spec.max
    step = spec.step if integer and isinstance(spec.step, int) and spec.step > 1 else None
    origin = lo if isinstance(lo, int) else 0
    span = _range_text(lo, hi)
    what = "a whole number" if integer else "a number"
    takes = f"{what} {span}".rstrip()
    kind = "INT" if integer else "FLOAT"

    def in_range(converted: int | float, value: Any, note: str = "") -> Verdict | None:
        if lo is not None and converted < lo:
            return (ERROR, "value_smaller_than_min",
                    f"{show_value(value)}{note} is less than {lo}, the minimum of {at}",
                    f"use a value {span}")
        if hi is not None and converted > hi:
            return (ERROR, "value_bigger_than_max",
                    f"{show_value(value)}{note} is more than {hi}, the maximum of {at}",
                    f"use a value {span}")
        if step is not None and isinstance(converted, int) and (converted - origin) % step:
            return (INFO, "off_step",
                    f"{show_value(value)} is not a multiple of {step}, the step of {at}",
                    "ComfyUI does not check it, but the node may round it")
        return None

    def check(value: Any) -> Verdict | None:
        vtype = type(value)
        if vtype is int:
            if (lo is None or value >= lo) and (hi is None or value <= hi) and step is None:
                return None
            return in_range(value, value)
        if vtype is float:
            if math.isnan(value):
                return (WARNING, "not_a_number", f"nan is not a number {at} can use", f"write {takes}")
            if math.isinf(value):
                if integer:
                    return (ERROR, "invalid_input_type", f"{value!r} cannot be converted for {at}",
                            f"write {takes}")
                return in_range(value, value)
            if integer:
                converted = int(value)
                if value != converted:
                    ranged = in_range(converted, value, f" (truncated to {converted})")
                    if ranged is not None and ranged[0] == ERROR:
                        return ranged
                    return (WARNING, "truncated",
                            f"{show_value(value)} is not a whole number: ComfyUI would truncate it "
                            f"to {converted} for {at}", "write a whole number")
                return in_range(converted, value)
            return in_range(value, value)
        if vtype is bool:
            return (WARNING, "converted", f"{show_value(value)} would be sent to {at} as {int(value)}",
                    f"write {takes}")
        if vtype is str:
            if integer:
                if not _INT_TEXT.fullmatch(value):
                    return (ERROR, "invalid_input_type",
                            f"{show_value(value)} is not an integer ({kind} input {at})",
                            f"write {takes}")
                return in_range(int(value), value)
            try:
                converted_f = float(value)
            except ValueError:
                return (ERROR, "invalid_input_type",
                        f"{show_value(value)} is not a number ({kind} input {at})", f"write {takes}")
            if math.isnan(converted_f):
                return (WARNING, "not_a_number", f"{show_value(value)} is not a number {at} can use",
                        f"write {takes}")
            return in_range(converted_f, value)
        shown = "null" if value is None else f"a {vtype.__name__}"
        return (ERROR, "invalid_input_type", f"{shown} cannot be converted for {at}", f"write {takes}")

    return check


def _boolean_check(spec: InputSpec, at: str) -> Check:
    def check(value: Any) -> Verdict | None:
        vtype = type(value)
        if vtype is bool:
            return None
        if vtype is str:
            if value.strip().casefold() in _FALSY_TEXT:
                return (WARNING, "converted",
                        f"{show_value(value)} would be read as true by {at} (ComfyUI reads any "
                        "non-empty text as true)", "write true or false without quotes")
            if value == "":
                return (WARNING, "converted", f"empty text would be read as false by {at}",
                        "write true or false")
            return None
        if vtype in (int, float):
            if value in (0, 1):
                return None
            return (WARNING, "converted", f"{show_value(value)} would be read as true by {at}",
                    "write true or false")
        return (WARNING, "converted", f"{show_value(value)} would be read as false by {at}",
                "write true or false")

    return check


def _string_check(spec: InputSpec, at: str) -> Check:
    def check(value: Any) -> Verdict | None:
        vtype = type(value)
        if vtype is str or vtype is int or vtype is float:
            return None
        if vtype is bool:
            return (WARNING, "converted", f"{show_value(value)} would arrive in {at} as the text "
                    f"'{value}'", "quote it if that text is meant")
        if value is None:
            return (WARNING, "converted", f"null would arrive in {at} as the text 'None'",
                    "write the text meant")
        return (WARNING, "converted", f"a {vtype.__name__} would arrive in {at} as its Python text",
                "write the text meant")

    return check


def _combo_check(spec: InputSpec, at: str) -> Check:
    options = spec.options or ()
    try:
        members: frozenset[Any] | tuple[Any, ...] = frozenset(options)
    except TypeError:  # an unhashable option: compare one by one
        members = options
    texts = [str(o) for o in options]
    by_text = {str(o): o for o in options}
    folded: dict[str, str] = {}
    for option_text in texts:
        folded.setdefault(option_text.casefold(), option_text)
    late = (" (ComfyUI checks it only when the task runs, so the row would fail after it is billed)"
            if spec.encoding == "v3" else "")
    suggestions: dict[Any, str] = {}

    def fix_for(value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        if not isinstance(value, str) and text in by_text and isinstance(by_text[text], str):
            return f"write it as the text {text!r}"
        # compared without case, so that a case slip (Euler for euler) is the closest match
        close = [folded[t] for t in difflib.get_close_matches(
            text.casefold(), list(folded), n=SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)]
        if close:
            return f"did you mean {_or_list([repr(c) for c in close])}?"
        shown = ", ".join(texts[:OPTIONS_SHOWN])
        more = f", ... ({len(texts)} options)" if len(texts) > OPTIONS_SHOWN else ""
        return f"choose one of {shown}{more}"

    def suggest(value: Any) -> str:
        key = (type(value), value) if isinstance(value, str | int | float | bool) else None
        fix = suggestions.get(key) if key is not None else None
        if fix is None:
            fix = fix_for(value)
            if key is not None and len(suggestions) < SUGGESTION_CACHE_SIZE:
                suggestions[key] = fix
        return fix

    def check(value: Any) -> Verdict | None:
        try:
            if value in members:
                return None
        except TypeError:  # an unhashable value is in no option set
            pass
        return (ERROR, "value_not_in_list", f"{show_value(value)} is not an option of {at}{late}",
                functools.partial(suggest, value))

    return check


def _link_only_check(spec: InputSpec, at: str) -> Check:
    def check(value: Any) -> Verdict | None:
        if is_link(value):
            return None
        return (ERROR, "literal_on_link",
                f"a value cannot feed {at}, an input of type {spec.type}: only a link from another node can",
                "the task would fail when it runs; bind a field that takes a value instead")

    return check


def compile_check(spec: InputSpec, node_id: str | None = None) -> Check | str:
    """The check of values for ``spec``, or the reason (a str) why they cannot be checked."""
    at = where(spec, node_id)
    kind = spec.type
    if kind == "INT":
        return _number_check(spec, at, integer=True)
    if kind == "FLOAT":
        return _number_check(spec, at, integer=False)
    if kind == "BOOLEAN":
        return _boolean_check(spec, at)
    if kind == "STRING":
        return _string_check(spec, at)
    if kind == "COMBO":
        return _combo_check(spec, at) if spec.options else NOT_KNOWN_OPTIONS
    if not kind or "*" in kind.split(","):
        return NOT_KNOWN_TYPE
    return _link_only_check(spec, at)


def check_value(spec: InputSpec, value: Any, *, node_id: str | None = None, row: int | None = None,
                column: str | None = None) -> Finding | None:
    """One value against one input: None when ComfyUI would take it as meant (or it cannot be
    checked here), else the finding."""
    check = compile_check(spec, node_id)
    if isinstance(check, str):
        return None
    verdict = check(value)
    if verdict is None:
        return None
    severity, code, message, fix = verdict
    return Finding(severity, code, message, _fix(fix), node_id, spec.name, row, column)


# ---------------------------------------------------------------------------------------------
# The workflow


def _nodes(api_json: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): v for k, v in api_json.items() if isinstance(v, dict)}


def _inputs(node: Mapping[str, Any]) -> dict[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def _class(node: Mapping[str, Any]) -> str | None:
    class_type = node.get("class_type")
    return class_type if isinstance(class_type, str) else None


def types_match(received: Any, expected: Any) -> bool:
    """Whether an output of type ``received`` may feed an input of type ``expected``: the same
    type, ``*`` on either side, a shared member of comma-separated types (``IMAGE,MASK``), or COMBO
    on both sides (an option list or ``COMBO``)."""
    if received == expected:
        return True
    if isinstance(received, list | tuple) or isinstance(expected, list | tuple):
        return (isinstance(received, list | tuple) or received == "COMBO") and (
            isinstance(expected, list | tuple) or expected == "COMBO")
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _type_text(value: Any) -> str:
    return "COMBO" if isinstance(value, list | tuple) else str(value)


@dataclass
class Graph:
    """What the checks need from one workflow: nodes, outputs and who feeds whom."""

    nodes: dict[str, dict[str, Any]]
    outputs: list[str]  # output nodes per the catalogue
    unknown: list[str]  # nodes whose class is not known here
    reachable: set[str]  # nodes an output (or a node not known here) depends on

    @classmethod
    def of(cls, api_json: Mapping[str, Any], catalogue: Catalogue) -> Graph:
        nodes = _nodes(api_json)
        outputs, unknown = [], []
        for node_id, node in nodes.items():
            class_type = _class(node)
            if class_type is None:
                continue  # ComfyUI rejects the prompt; check_workflow says so
            if not catalogue.knows(class_type):
                unknown.append(node_id)
            elif catalogue.is_output_node(class_type):
                outputs.append(node_id)
        # A node not known here may be an output node: what it depends on counts as reachable.
        reachable = upstream(nodes, [*outputs, *unknown])
        return cls(nodes, sorted(outputs, key=node_order), sorted(unknown, key=node_order), reachable)


def upstream(nodes: Mapping[str, Mapping[str, Any]], starts: Iterable[str]) -> set[str]:
    """``starts`` and every node they depend on through links (links to missing nodes skipped)."""
    seen: set[str] = set()
    stack = [s for s in starts if s in nodes]
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        for value in _inputs(nodes[node_id]).values():
            if is_link(value) and str(value[0]) in nodes and str(value[0]) not in seen:
                stack.append(str(value[0]))
    return seen


def node_order(node_id: str) -> tuple[tuple[int, int, str], ...]:
    """Numeric-aware order of node ids: 2 < 10 < 57:3 < a."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", node_id))


@dataclass
class WorkflowCheck:
    """The findings about one workflow, and what the catalogue covers of it."""

    workflow_id: str
    findings: list[Finding] = field(default_factory=list)
    known_nodes: int = 0
    unknown_nodes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def problems(self, severities: Iterable[str] = (ERROR,)) -> list[Problem]:
        wanted = set(severities)
        return [f.problem() for f in self.findings if f.severity in wanted]


def check_workflow(api_json: Mapping[str, Any], catalogue: Catalogue, *, workflow_id: str = "",
                   targets: Iterable[str] = (), bound: Mapping[str, str] | None = None
                   ) -> WorkflowCheck:
    """Everything the catalogue says about one API-format workflow.

    ``targets`` are the ``NODE.FIELD`` the rows set (their values are checked by
    :func:`check_rows`, so the workflow's own values of those fields are not); ``bound`` maps the
    user's columns to targets, for the column shown with a finding.
    """
    wid = str(workflow_id)
    about = f"workflow {wid}" if wid else "the workflow"
    report = WorkflowCheck(wid)
    graph = Graph.of(api_json, catalogue)
    nodes = graph.nodes
    report.outputs = list(graph.outputs)
    columns = column_names(bound)
    set_fields: dict[str, set[str]] = {}
    for target in targets:
        target_node, _, target_name = str(target).rpartition(".")
        if target_node:
            set_fields.setdefault(target_node, set()).add(target_name)

    def add(severity: str, code: str, message: str, fix: str = "", node_id: str | None = None,
            input_name: str | None = None) -> None:
        target = f"{node_id}.{input_name}" if node_id is not None and input_name is not None else None
        column = columns.get(target, target) if target else None
        report.findings.append(Finding(severity, code, message, fix, node_id, input_name, None, column))

    for node_id in sorted(nodes, key=node_order):
        class_type = _class(nodes[node_id])
        if class_type is None:
            add(ERROR, "missing_class_type", f"node {node_id} of {about} has no class_type",
                "export the workflow again in API format", node_id)
        elif not catalogue.knows(class_type):
            report.unknown_nodes.append(node_id)
            add(INFO, "unknown_class", f"node {node_id} ({class_type}) is not known here",
                "its fields are not checked; pass --object-info FILE saved from a server that has it",
                node_id)
        else:
            report.known_nodes += 1
    if not graph.outputs and not graph.unknown:
        add(ERROR, "prompt_no_outputs", f"{about} has no output node (SaveImage, PreviewImage ...)",
            "ComfyUI rejects a prompt without outputs: add one and export the workflow again")

    for node_id in sorted(graph.reachable, key=node_order):
        node = nodes[node_id]
        class_type = _class(node)
        specs = catalogue.inputs(class_type) if class_type else None
        if class_type is None or specs is None:
            continue
        inputs = _inputs(node)
        for name, spec in specs.items():
            if spec.category == "hidden":
                continue
            if name not in inputs:
                if spec.required:
                    add(ERROR, "required_input_missing",
                        f"node {node_id} ({class_type}) lacks its required input \"{name}\"",
                        "connect or set it in ComfyUI and export the workflow again", node_id, name)
                continue
            value = inputs[name]
            if is_link(value):
                _check_link(add, catalogue, nodes, node_id, class_type, spec, value)
            elif isinstance(value, list):
                add(ERROR, "bad_linked_input",
                    f"{name} in node {node_id} ({class_type}) is a list that is not a link",
                    "a link is [node_id, output_index]: export the workflow again", node_id, name)
            elif name not in set_fields.get(node_id, ()):
                check = compile_check(spec, node_id)
                verdict = None if isinstance(check, str) else check(value)
                if verdict is not None:
                    severity, code, message, fix = verdict
                    add(severity, code, f"the workflow's own value: {message}",
                        f"change it in the workflow ({_fix(fix)}) or bind {node_id}.{name} to a column",
                        node_id, name)

    for node_id in sorted(set_fields, key=node_order):
        if node_id in nodes and node_id not in graph.reachable:
            for name in sorted(set_fields[node_id]):
                add(WARNING, "not_reached",
                    f"node {node_id} ({_class(nodes[node_id]) or '?'}) feeds no output, so ComfyUI "
                    f"never runs it and {name} changes nothing",
                    "bind a field of a node that an output depends on", node_id, name)
    if set_fields:
        changed = [n for n in set_fields if n in nodes]
        for output in graph.outputs:
            if not upstream(nodes, [output]) & set(changed):
                add(INFO, "output_not_reached",
                    f"output node {output} ({_class(nodes[output])}) depends on no bound field",
                    "every row gives the same result there", output)
    return report


def _check_link(add: Callable[..., None], catalogue: Catalogue, nodes: Mapping[str, Mapping[str, Any]],
                node_id: str, class_type: str, spec: InputSpec, link: list[Any]) -> None:
    source, slot = str(link[0]), link[1]
    name = spec.name
    if source not in nodes:
        add(ERROR, "exception_during_inner_validation",
            f"{name} in node {node_id} ({class_type}) is linked to node {source}, which is not in "
            "the workflow", "connect it in ComfyUI and export the workflow again", node_id, name)
        return
    source_class = _class(nodes[source])
    outputs = catalogue.output_types(source_class) if source_class else None
    if outputs is None:  # the source is not known here
        return
    if not 0 <= slot < len(outputs):
        add(ERROR, "exception_during_inner_validation",
            f"{name} in node {node_id} ({class_type}) is linked to output {slot} of node {source} "
            f"({source_class}), which has {len(outputs)} output{'s' if len(outputs) != 1 else ''}",
            "connect it in ComfyUI and export the workflow again", node_id, name)
        return
    received = outputs[slot]
    expected: Any = list(spec.options or ()) if spec.is_combo and spec.encoding == "legacy" else spec.type
    if spec.type and not types_match(received, expected):
        add(ERROR, "return_type_mismatch",
            f"{name} in node {node_id} ({class_type}) takes {_type_text(expected)} but is linked to "
            f"output {slot} of node {source} ({source_class}), a {_type_text(received)}",
            "connect an output of the right type in ComfyUI and export the workflow again",
            node_id, name)


# ---------------------------------------------------------------------------------------------
# Rows


def column_names(bound: Mapping[str, str] | None) -> dict[str, str]:
    """``NODE.FIELD`` -> the column the user wrote (the first column bound to it)."""
    names: dict[str, str] = {}
    for column, target in (bound or {}).items():
        names.setdefault(str(target), str(column))
    return names


@dataclass
class RowCheck:
    """The findings about the rows' values (listed up to ``limit``, counted beyond), and what the
    catalogue covered: fields are distinct ``(workflowId, NODE.FIELD)``, values are row cells."""

    limit: int = MAX_FINDINGS_LISTED
    findings: list[Finding] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEVERITIES, 0))
    checked_fields: set[tuple[str, str]] = field(default_factory=set)
    unchecked_fields: dict[tuple[str, str], str] = field(default_factory=dict)  # -> the reason
    values_checked: int = 0
    values_unchecked: int = 0

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def unlisted(self) -> int:
        return self.total - len(self.findings)

    def problems(self, severities: Iterable[str] = (ERROR,)) -> list[Problem]:
        wanted = set(severities)
        return [f.problem() for f in self.findings if f.severity in wanted]

    def coverage(self) -> str:
        """``3 fields checked against the node catalogue (300000 values); 1 not checkable:
        12.seed (the node's class is not known here)``."""
        checked = len(self.checked_fields)
        text = (f"{checked} field{'s' if checked != 1 else ''} checked against the node catalogue "
                f"({self.values_checked} value{'s' if self.values_checked != 1 else ''})")
        if not self.unchecked_fields:
            return text
        shown = [f"{target} ({reason})" for (_, target), reason in sorted(self.unchecked_fields.items())]
        more = f" ... and {len(shown) - 5} more" if len(shown) > 5 else ""
        return f"{text}; {len(shown)} not checkable: {', '.join(shown[:5])}{more}"


class _Fields:
    """Compiled checks per ``(workflowId, nodeId, fieldName)``, with the graph of each workflow."""

    def __init__(self, workflows: Mapping[str, Mapping[str, Any]], catalogue: Catalogue):
        self.workflows = workflows
        self.catalogue = catalogue
        self.graphs: dict[str, Graph | None] = {}

    def graph(self, wid: str) -> Graph | None:
        if wid not in self.graphs:
            api_json = self.workflows.get(wid)
            self.graphs[wid] = None if api_json is None else Graph.of(api_json, self.catalogue)
        return self.graphs[wid]

    def compile(self, wid: str, node_id: str, name: str) -> Check | str | None:
        """The check, the reason it cannot be made, or None when preflight reports the target
        (unknown workflow, node or field, or a link)."""
        graph = self.graph(wid)
        if graph is None or node_id not in graph.nodes:
            return None
        node = graph.nodes[node_id]
        if name not in _inputs(node) or is_link(_inputs(node)[name]):
            return None
        class_type = _class(node)
        if class_type is None or not self.catalogue.knows(class_type):
            return NOT_KNOWN_CLASS
        if node_id not in graph.reachable:
            return NOT_VALIDATED
        spec = self.catalogue.input(class_type, name)
        if spec is None:
            return NOT_KNOWN_INPUT
        return compile_check(spec, node_id)


def check_rows(rows: Iterable[Any], workflows: Mapping[str, Mapping[str, Any]], catalogue: Catalogue,
               *, bound: Mapping[str, str] | None = None, limit: int = MAX_FINDINGS_LISTED) -> RowCheck:
    """Every row's ``nodeInfoList`` values against the catalogue.

    ``rows`` need ``number``, ``workflow_id`` and ``node_info_list`` (as in preflight). Targets that
    preflight reports (unknown workflow, node or field, a link) are skipped here. A finding's column is the
    user's (via ``bound``: column -> ``NODE.FIELD``), else ``NODE.FIELD``.
    """
    report = RowCheck(limit)
    fields = _Fields(workflows, catalogue)
    columns = column_names(bound)
    compiled: dict[tuple[str, Any, Any], Check | str | None] = {}
    parts = operator.itemgetter("nodeId", "fieldName", "fieldValue")
    findings, totals = report.findings, report.totals
    checked = unchecked = 0
    for row in rows:
        wid = str(row.workflow_id)
        for item in row.node_info_list:
            node, name, value = parts(item)
            key = (wid, node, name)
            check = compiled.get(key, ...)
            if check is ...:
                check = compiled[key] = fields.compile(wid, str(node), str(name))
                target = (wid, f"{node}.{name}")
                if isinstance(check, str):
                    report.unchecked_fields[target] = check
                elif check is not None:
                    report.checked_fields.add(target)
            if check is None:
                continue
            if isinstance(check, str):
                unchecked += 1
                continue
            checked += 1
            verdict = check(value)
            if verdict is None:
                continue
            severity = verdict[0]
            totals[severity] += 1
            if len(findings) < limit:
                target_name = f"{node}.{name}"
                findings.append(Finding(severity, verdict[1], verdict[2], _fix(verdict[3]), str(node),
                                        str(name), row.number, columns.get(target_name, target_name)))
    report.values_checked = checked
    report.values_unchecked = unchecked
    return report
