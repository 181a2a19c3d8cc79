"""The simulator's ComfyUI: prompt validation as ComfyUI 0.3.64 answers it, and the failures it
defers to run time.

This is the simulator's own implementation, written from ``shared/comfyui-validation.md`` and
independent of rhbatch's preflight (``pipeline.nodecheck``, ``pipeline.catalogue``): a mistake in one
must not agree with itself in the other. It reads the same packaged catalogue data file.

:func:`validate_prompt` returns what ComfyUI's own validation returns, ``(ok, error,
outputs_to_execute, node_errors)``:

1. every node must have a ``class_type`` and its class must be installed (in ``catalogue``), else
   ``invalid_prompt`` for the first node that fails, with ``details: "Node ID '#<id>'"`` and no
   ``node_errors``; a prompt without output nodes is ``prompt_no_outputs``;
2. each output node is validated with what it depends on through links; no other node is looked at;
3. per declared input (required and optional; extra inputs are ignored): a missing required input is
   ``required_input_missing``; a link (any list) must be ``[node_id, slot]`` (``bad_linked_input``),
   to an output whose type fits (``return_type_mismatch``); a link that cannot be followed (a missing
   node or slot) is ``exception_during_inner_validation`` on the node holding it (or
   ``exception_during_validation`` when an output node holds it). A value is converted, not type
   checked: ``int()`` for INT (a float is truncated, ``true`` is 1, ``"72"`` is 72), ``float()`` for
   FLOAT, ``str()`` for STRING, ``bool()`` for BOOLEAN (``"false"`` is true); a value that does not
   convert is ``invalid_input_type``. The converted value is checked against ``min`` / ``max``
   (``value_smaller_than_min`` / ``value_bigger_than_max``) and a legacy COMBO's list
   (``value_not_in_list``, the options inlined in ``details`` up to 20). Inputs a node validates
   itself (an uploaded file name) skip these checks; a V3 COMBO (``["COMBO", {"options": [...]}]``)
   and a literal where a link is expected are not checked here: :func:`run_time_failure` fails
   them when the task runs;
4. ``ok`` is true when at least one output is valid: ``outputs_to_execute`` lists the valid ones and
   ``node_errors`` still describes the failed ones (partial validity). When none is valid, ``error``
   is ``prompt_outputs_failed_validation`` with ``details`` listing ``"message: details"`` of the
   errors on the output nodes themselves ("" when the failing nodes are upstream).

``node_errors[id]`` is ``{"errors": [...], "dependent_outputs": [...], "class_type": ...}``, where
``dependent_outputs`` are the failed output nodes that depend on that node.

Choices where the observed behaviour does not say (kept here so they can be revisited):

- an empty legacy COMBO list (the packaged catalogue lists no models) accepts any value; a real
  server without that model would answer ``value_not_in_list`` (pass ``empty_combo_accepts=False``);
- COMBO on both ends of a link (an option list or ``"COMBO"``) fits, whatever the options;
- the ``traceback`` of an exception entry is a short list of text lines, as ComfyUI sends one;
- RunningHub's wrapping (:func:`rh_433_body`, :func:`prompt_tips`) is documented only as "433 with
  ``promptTips``": the body is ``{"code": 433, "msg": "VALIDATE_PROMPT_FAILED", "data":
  {"promptTips": "<json>"}}`` and ``promptTips`` is Python-style JSON text (``", "`` / ``": "``, as in
  RunningHub's published example) of ``{result, error, outputs_to_execute, node_errors}``;
- run-time failures (:func:`run_time_failure`) use the fields of RunningHub's 805 ``failedReason``;
  their exception types and messages are this simulator's, not observed ones.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

CATALOGUE_DATA = ("_data", "catalogue", "core_nodes.json")
COMBO_INLINE_MAX = 20  # options inlined in a value_not_in_list answer
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
# Inputs whose node validates them itself (the file must exist on the server): the built-in range and
# list checks are skipped, and the simulator has no files to look at, so any name passes.
SELF_VALIDATED = frozenset({("LoadImage", "image"), ("LoadImageMask", "image"),
                            ("LoadLatent", "latent"), ("LoadImageOutput", "image")})
RH_433_MSG = "VALIDATE_PROMPT_FAILED"
BAD_LINK_MESSAGE = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
_SIM_TRACEBACK = ['  File "/app/ComfyUI/execution.py", in validate_inputs\n']

Result = tuple[bool, list[dict[str, Any]]]


@functools.lru_cache(maxsize=1)
def core_catalogue() -> dict[str, Any]:
    """The packaged node catalogue (``/object_info`` shape). Shared: do not modify it."""
    data = resources.files("pipeline").joinpath(*CATALOGUE_DATA).read_bytes()
    catalogue = json.loads(data)
    if not isinstance(catalogue, dict):
        raise ValueError("the packaged node catalogue is not a JSON object")
    return catalogue


def node_order(node_id: Any) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", str(node_id)))


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _invalid_prompt(message: str, node_id: str) -> dict[str, Any]:
    return {"type": "invalid_prompt", "message": message, "details": f"Node ID '#{node_id}'",
            "extra_info": {}}


def _declared(definition: Mapping[str, Any]) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """``(name, category, input_type, options)`` of the required and optional inputs."""
    out: list[tuple[str, str, Any, dict[str, Any]]] = []
    inputs = definition.get("input")
    if not isinstance(inputs, dict):
        return out
    for category in ("required", "optional"):
        group = inputs.get(category)
        if not isinstance(group, dict):
            continue
        for name, spec in group.items():
            if isinstance(spec, list | tuple) and spec:
                extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                out.append((str(name), category, spec[0], extra))
            elif isinstance(spec, str):
                out.append((str(name), category, spec, {}))
    return out


def _fits(received: Any, expected: Any) -> bool:
    if received == expected:
        return True
    combo_got = isinstance(received, list) or received == "COMBO"
    combo_want = isinstance(expected, list) or expected == "COMBO"
    if combo_got and combo_want:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _convert(kind: Any, value: Any) -> Any:
    if kind == "INT":
        return int(value)
    if kind == "FLOAT":
        return float(value)
    if kind == "STRING":
        return str(value)
    if kind == "BOOLEAN":
        return bool(value)
    return value


class _Validator:
    def __init__(self, prompt: Mapping[str, Any], catalogue: Mapping[str, Any], empty_combo_accepts: bool):
        self.prompt = prompt
        self.catalogue = catalogue
        self.empty_combo_accepts = empty_combo_accepts
        self.validated: dict[Any, Result] = {}

    def node(self, node_id: Any) -> Result:
        known = self.validated.get(node_id)
        if known is not None:
            return known
        node = self.prompt[node_id]
        class_type = node["class_type"]
        inputs = node["inputs"]
        errors: list[dict[str, Any]] = []
        valid = True
        for name, category, kind, extra in _declared(self.catalogue[class_type]):
            config = [kind, extra]
            if name not in inputs:
                if category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name, "extra_info": {"input_name": name}})
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append({"type": "bad_linked_input",
                                   "message": BAD_LINK_MESSAGE,
                                   "details": name,
                                   "extra_info": {"input_name": name, "input_config": config,
                                                  "received_value": value}})
                    continue
                source_id, slot = value
                source = self.prompt[source_id]  # a missing node raises: the caller reports it
                received = tuple(self.catalogue[source["class_type"]].get("output") or ())[slot]
                if not _fits(received, kind):
                    errors.append({"type": "return_type_mismatch",
                                   "message": "Return type mismatch between linked nodes",
                                   "details": f"{name}, received_type({received}) mismatch "
                                              f"input_type({kind})",
                                   "extra_info": {"input_name": name, "input_config": config,
                                                  "received_type": received, "linked_node": value}})
                    continue
                try:
                    upstream_ok, _ = self.node(source_id)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    valid = False
                    self.validated[source_id] = (False, [{
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(exc),
                        "extra_info": {"input_name": name, "input_config": config,
                                       "exception_message": str(exc), "exception_type": _type_name(exc),
                                       "traceback": list(_SIM_TRACEBACK), "linked_node": value},
                    }])
                    continue
                if not upstream_ok:
                    valid = False
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            try:
                converted = _convert(kind, value)
            except (ValueError, TypeError, OverflowError) as exc:
                errors.append({"type": "invalid_input_type",
                               "message": f"Failed to convert an input value to a {kind} value",
                               "details": f"{name}, {value}, {exc}",
                               "extra_info": {"input_name": name, "input_config": config,
                                              "received_value": value, "exception_message": str(exc)}})
                continue
            if self._self_validated(class_type, name, extra):
                continue
            problem = (self._range(name, config, extra, converted)
                       or self._listed(name, config, kind, converted))
            if problem is not None:
                errors.append(problem)
        result: Result = (False, errors) if errors or not valid else (True, [])
        self.validated[node_id] = result
        return result

    @staticmethod
    def _self_validated(class_type: str, name: str, extra: Mapping[str, Any]) -> bool:
        return (class_type, name) in SELF_VALIDATED or any(extra.get(flag) is True for flag in UPLOAD_FLAGS)

    @staticmethod
    def _range(name: str, config: list[Any], extra: Mapping[str, Any], value: Any) -> dict[str, Any] | None:
        try:
            if "min" in extra and value < extra["min"]:
                kind, message = "value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}"
            elif "max" in extra and value > extra["max"]:
                kind, message = "value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}"
            else:
                return None
        except TypeError:  # not comparable (a bound on a text input): nothing to check
            return None
        return {"type": kind, "message": message, "details": name,
                "extra_info": {"input_name": name, "input_config": config, "received_value": value}}

    def _listed(self, name: str, config: list[Any], kind: Any, value: Any) -> dict[str, Any] | None:
        if not isinstance(kind, list):
            return None  # a V3 COMBO ("COMBO") is left to run time
        if not kind and self.empty_combo_accepts:
            return None
        try:
            if value in kind:
                return None
        except TypeError:
            pass
        many = len(kind) > COMBO_INLINE_MAX
        listed = f"(list of length {len(kind)})" if many else str(kind)
        return {"type": "value_not_in_list", "message": "Value not in list",
                "details": f"{name}: '{value}' not in {listed}",
                "extra_info": {"input_name": name, "input_config": None if many else config,
                               "received_value": value}}


def _upstream(prompt: Mapping[str, Any], start: Any) -> set[Any]:
    seen: set[Any] = set()
    stack = [start]
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = prompt.get(node_id) if isinstance(node_id, str) else None
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            if isinstance(value, list) and len(value) == 2:
                try:
                    if value[0] in prompt and value[0] not in seen:
                        stack.append(value[0])
                except TypeError:
                    continue
    return seen


def validate_prompt(prompt: Mapping[str, Any], catalogue: Mapping[str, Any], *,
                    empty_combo_accepts: bool = True
                    ) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """ComfyUI's answer to ``prompt`` (API format) on a server whose classes are ``catalogue``
    (``/object_info`` shape): ``(ok, error, outputs_to_execute, node_errors)`` (module docstring)."""
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return False, _invalid_prompt(
                "Cannot execute because a node is missing the class_type property.", node_id), [], {}
        class_type = node["class_type"]
        definition = catalogue.get(class_type) if isinstance(class_type, str) else None
        if not isinstance(definition, dict):
            return False, _invalid_prompt(
                f"Cannot execute because node {class_type} does not exist.", node_id), [], {}
        if definition.get("output_node") is True:
            outputs.append(node_id)
    if not outputs:
        return False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                       "extra_info": {}}, [], {}
    validator = _Validator(prompt, catalogue, empty_combo_accepts)
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    for output in sorted(outputs, key=node_order):
        try:
            ok, reasons = validator.node(output)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            ok, reasons = False, [{"type": "exception_during_validation",
                                   "message": "Exception when validating node", "details": str(exc),
                                   "extra_info": {"exception_type": _type_name(exc),
                                                  "traceback": list(_SIM_TRACEBACK)}}]
            validator.validated[output] = (ok, reasons)
        if ok:
            good.append(output)
        else:
            failed.append((output, reasons))
    node_errors: dict[str, Any] = {}
    for output, _ in failed:
        depends = _upstream(prompt, output)
        for node_id, (ok, reasons) in validator.validated.items():
            if ok or not reasons or node_id not in depends:
                continue
            entry = node_errors.get(node_id)
            if entry is None:
                entry = node_errors[node_id] = {"errors": reasons, "dependent_outputs": [],
                                                "class_type": prompt[node_id]["class_type"]}
            entry["dependent_outputs"].append(output)
    if not good:
        lines = [f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons]
        return False, {"type": "prompt_outputs_failed_validation",
                       "message": "Prompt outputs failed validation", "details": "\n".join(lines),
                       "extra_info": {}}, [], node_errors
    return True, None, good, node_errors


# ---------------------------------------------------------------------------------------------
# What fails only when the task runs


def _execution_order(prompt: Mapping[str, Any], outputs: Iterable[str]) -> list[str]:
    """The nodes ``outputs`` depend on, each after the nodes it depends on."""
    order: list[str] = []
    done: set[Any] = set()

    def visit(node_id: Any, path: frozenset[Any]) -> None:
        if node_id in done or node_id in path or node_id not in prompt:
            return
        inputs = prompt[node_id].get("inputs") if isinstance(prompt[node_id], dict) else None
        for value in (inputs or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int):
                visit(value[0], path | {node_id})
        done.add(node_id)
        order.append(node_id)

    for output in sorted(outputs, key=node_order):
        visit(output, frozenset())
    return order


def run_time_failure(prompt: Mapping[str, Any], catalogue: Mapping[str, Any],
                     outputs_to_execute: Iterable[str]) -> dict[str, Any] | None:
    """How an accepted prompt fails when it runs, as RunningHub's 805 ``failedReason``, or None.

    Two things pass ComfyUI's validation and fail here, in execution order: a V3 COMBO value not in
    its options, and a value where only a link can feed the input (``IMAGE`` ...).
    """
    for node_id in _execution_order(prompt, outputs_to_execute):
        node = prompt[node_id]
        class_type = node.get("class_type")
        definition = catalogue.get(class_type) if isinstance(class_type, str) else None
        inputs = node.get("inputs")
        if not isinstance(definition, dict) or not isinstance(inputs, dict):
            continue
        for name, _category, kind, extra in _declared(definition):
            if name not in inputs or isinstance(inputs[name], list):
                continue
            value = inputs[name]
            if kind == "COMBO":
                options = extra.get("options")
                if isinstance(options, list) and options and value not in options:
                    return _failed(node_id, class_type, "ValueError",
                                   f"Invalid value for {name}: '{value}' is not one of {options}", inputs)
            elif isinstance(kind, str) and kind not in WIDGETS and "*" not in kind:
                return _failed(node_id, class_type, "AttributeError",
                               f"'{type(value).__name__}' object has no attribute 'shape' "
                               f"({name} expects {kind} from a link)", inputs)
    return None


def _failed(node_id: str, class_type: str, exception_type: str, message: str,
            inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "node_name": class_type,
        "node_id": str(node_id),
        "exception_type": exception_type,
        "exception_message": message,
        "traceback": json.dumps(['  File "/app/ComfyUI/execution.py", in execute\n']),
        "current_inputs": json.dumps({k: v for k, v in inputs.items() if not isinstance(v, list)},
                                     ensure_ascii=False, default=str),
        "current_outputs": "{}",
    }


# ---------------------------------------------------------------------------------------------
# Answers


def prompt_tips(ok: bool, error: dict[str, Any] | None, outputs_to_execute: Iterable[str],
                node_errors: Mapping[str, Any]) -> str:
    """RunningHub's ``promptTips``: the validation result as (Python-style) JSON text."""
    return json.dumps({"result": ok, "error": error, "outputs_to_execute": list(outputs_to_execute),
                       "node_errors": dict(node_errors)}, ensure_ascii=False)


def rh_433_body(error: dict[str, Any] | None, node_errors: Mapping[str, Any]) -> dict[str, Any]:
    """RunningHub's create answer for a prompt ComfyUI rejected (see the module docstring)."""
    return {"code": 433, "msg": RH_433_MSG,
            "data": {"promptTips": prompt_tips(False, error, [], node_errors)}}


def comfy_answer(ok: bool, error: dict[str, Any] | None, node_errors: Mapping[str, Any], *,
                 prompt_id: str = "", number: int = 0) -> tuple[int, dict[str, Any]]:
    """ComfyUI's own ``POST /prompt`` answer: ``(400, {error, node_errors})`` when rejected,
    ``(200, {prompt_id, number, node_errors})`` when queued (perhaps with some outputs failed)."""
    if not ok:
        return 400, {"error": error, "node_errors": dict(node_errors)}
    return 200, {"prompt_id": prompt_id, "number": number, "node_errors": dict(node_errors)}
