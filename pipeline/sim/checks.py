"""The create's checks that need no account: its parameters (check 1 of runninghub-api.md
section 8, answered 301), its nodeInfoList against the saved workflow (check 6, 803) and the
prompt those values make, validated as ComfyUI does (check 7, :func:`comfy_verdict`: 433 with
``promptTips`` when no output is valid; see :mod:`pipeline.sim.comfy`).

Pure functions of the request body and the workflow; :class:`pipeline.sim.api.RunningHubApi`
runs them in the documented order around the key, balance, workflow and concurrency checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sim import comfy
from pipeline.sim.envelopes import Reply, envelope
from pipeline.sim.model import Workflow, is_output_node


@dataclass
class CreateParams:
    """A create's body once its parameters passed check 1 (section 8)."""

    node_info: list[dict[str, Any]]
    personal: bool
    add_metadata: bool
    webhook_url: str | None
    instance_type: str | None
    override: dict[str, Any] | None  # the ``workflow`` parameter, parsed


def _parse_bool(value: Any, default: bool) -> bool | None:
    """A boolean flag as clients send it: true/false or "true"/"false"; None if neither."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def id_param(value: Any) -> str | None:
    """A workflowId / webappId: a number or a non-blank string other than "0"; stripped."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or value.strip() == "0":
        return None
    return value.strip()


def create_params(body: dict[str, Any]) -> CreateParams | None:
    """Check 1, the parameters: None (answer 301) if one is malformed."""
    node_info = body.get("nodeInfoList")
    if node_info is None:
        node_info = []
    if not isinstance(node_info, list) or not all(
        isinstance(i, dict) and isinstance(i.get("nodeId"), str | int) and not isinstance(
            i.get("nodeId"), bool) and isinstance(i.get("fieldName"), str) and "fieldValue" in i
        for i in node_info
    ):
        return None
    personal = _parse_bool(body.get("usePersonalQueue"), False)
    add_metadata = _parse_bool(body.get("addMetadata"), True)
    if personal is None or add_metadata is None:
        return None
    webhook_url = body.get("webhookUrl") or None
    if webhook_url is not None and (
        not isinstance(webhook_url, str) or not webhook_url.startswith(("http://", "https://"))
    ):
        return None
    instance_type = body.get("instanceType")
    if instance_type is not None and not isinstance(instance_type, str):
        return None
    override = body.get("workflow")
    override_data: Any = None
    if override not in (None, ""):
        try:
            override_data = json.loads(override) if isinstance(override, str) else override
        except ValueError:
            return None
        if not isinstance(override_data, dict):
            return None
    return CreateParams(node_info, personal, add_metadata, webhook_url, instance_type, override_data)


def node_info_error(workflow: Workflow, params: CreateParams) -> Reply | None:
    """Check 6: every nodeInfoList item names a node and a field of the saved workflow (803)."""
    if params.override is not None and params.node_info:
        return envelope(803, {"reason": "node_not_found_in_workflow",
                              "detail": "nodeInfoList is checked against the saved workflow, "
                                        "not the workflow parameter: bake values into workflow"})
    for item in params.node_info:
        node = workflow.nodes.get(str(item["nodeId"]))
        if node is None:
            return envelope(803, {"nodeId": str(item["nodeId"]), "fieldName": item["fieldName"],
                                  "reason": "node_not_found_in_workflow"})
        if item["fieldName"] not in node.get("inputs", {}):
            return envelope(803, {"nodeId": str(item["nodeId"]), "fieldName": item["fieldName"],
                                  "reason": "field_not_found_in_node"})
    return None




# -- check 7: the prompt, as ComfyUI validates it -------------------------------------------------


@dataclass
class ComfyVerdict:
    """ComfyUI's answer to a create's prompt (:func:`pipeline.sim.comfy.validate_prompt`), and how
    the prompt fails when it runs if it passes (:func:`pipeline.sim.comfy.run_time_failure`)."""

    ok: bool
    error: dict[str, Any] | None
    outputs_to_execute: list[str]
    node_errors: dict[str, Any]
    run_failure: dict[str, Any] | None = None

    def prompt_tips(self) -> str:
        return comfy.prompt_tips(self.ok, self.error, self.outputs_to_execute, self.node_errors)

    def rejection(self) -> Reply:
        """RunningHub's 433 for a prompt ComfyUI rejected (its ``promptTips``)."""
        body = comfy.rh_433_body(self.error, self.node_errors)
        return envelope(body["code"], body["data"], body["msg"])


def prompt_with(nodes: Mapping[str, Any], node_info: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt a create runs: the workflow with each nodeInfoList value set as
    ``prompt[nodeId]["inputs"][fieldName] = fieldValue`` (the workflow itself is left as it is)."""
    prompt: dict[str, Any] = {}
    for node_id, node in nodes.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        prompt[node_id] = ({**node, "inputs": dict(inputs)} if isinstance(inputs, dict)
                           else node)
    for item in node_info:
        prompt[str(item["nodeId"])]["inputs"][item["fieldName"]] = item["fieldValue"]
    return prompt


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 0)


def sim_catalogue(prompt: Mapping[str, Any]) -> Mapping[str, Any]:
    """The catalogue the simulator validates ``prompt`` against: the packaged core catalogue, plus an
    unconstrained definition for each class it does not know.

    ComfyUI answers ``invalid_prompt`` for a class it has not installed, but RunningHub's servers
    carry custom nodes this catalogue cannot list, and workflows in tests and configs use them: so
    the simulator takes such a class as installed and checks nothing about it (no declared inputs;
    an output node when it looks like one, :func:`pipeline.sim.model.is_output_node`). Each of its
    output slots that links use fits what it feeds: ``"COMBO"`` when it feeds only COMBO inputs,
    ``"*"`` otherwise.
    """
    core = comfy.core_catalogue()
    unknown = {node["class_type"] for node in prompt.values()
               if isinstance(node, dict) and isinstance(node.get("class_type"), str)
               and node["class_type"] not in core}
    if not unknown:
        return core
    feeds: dict[str, dict[int, set[bool]]] = {}  # class -> slot -> {feeds a COMBO input?}
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        definition = core.get(node.get("class_type")) if isinstance(node.get("class_type"), str) else None
        declared: dict[str, Any] = {}
        for group in ((definition or {}).get("input") or {}).values():
            if isinstance(group, dict):
                declared.update({k: v[0] for k, v in group.items() if isinstance(v, list) and v})
        for name, value in inputs.items():
            if not _is_link(value) or not isinstance(prompt.get(value[0]), dict):
                continue
            source = prompt[value[0]].get("class_type")
            if source in unknown:
                kind = declared.get(name)
                feeds.setdefault(source, {}).setdefault(value[1], set()).add(
                    isinstance(kind, list) or kind == "COMBO")
    merged = dict(core)
    for class_type in unknown:
        slots = feeds.get(class_type, {})
        merged[class_type] = {
            "input": {"required": {}, "optional": {}},
            "output": ["COMBO" if slots.get(i) == {True} else "*" for i in range(max(slots, default=-1) + 1)],
            "output_node": is_output_node(class_type),
        }
    return merged


def comfy_verdict(prompt: Mapping[str, Any]) -> ComfyVerdict:
    """Check 7: ComfyUI's validation of the prompt a create runs (after RunningHub's 803 checks)."""
    catalogue = sim_catalogue(prompt)
    ok, error, outputs, errors = comfy.validate_prompt(prompt, catalogue)
    verdict = ComfyVerdict(ok, error, outputs, errors)
    if ok:
        verdict.run_failure = comfy.run_time_failure(prompt, catalogue, outputs)
    return verdict


def malformed_prompt(prompt: Mapping[str, Any], reason: str) -> Reply:
    """433 for a ``workflow`` parameter the simulator cannot take as a workflow: ComfyUI's own
    answer where it has one (a node without ``class_type``, no output nodes); otherwise (``inputs``
    that are not a mapping, which ComfyUI does not answer cleanly) an ``invalid_prompt`` naming
    ``reason``, the simulator's choice."""
    try:
        verdict = comfy_verdict(prompt)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        verdict = ComfyVerdict(True, None, [], {})
    if not verdict.ok:
        return verdict.rejection()
    return ComfyVerdict(False, {"type": "invalid_prompt", "message": f"Cannot execute: {reason}",
                                "details": "", "extra_info": {}}, [], {}).rejection()
