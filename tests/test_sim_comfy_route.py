"""The simulator's create validates the prompt as ComfyUI does (shared/comfyui-validation.md), inside
RunningHub's envelope: over real HTTP on loopback, field by field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.sim import TEXT2IMG_WORKFLOW_ID, Simulator
from pipeline.sim.comfy import core_catalogue
from pipeline.sim.testing import SimClient

Starter = Callable[..., tuple[Simulator, SimClient]]
SLOW = {"time_scale": 1e-9, "queue_delay_s": 1.0, "task_duration_s": 20.0}

# Two outputs: "9" (SaveImage of a small image) and "20" (PreviewImage of another), so that one can fail
# while the other is valid.
TWO_OUTPUTS = "600"
TWO_OUTPUTS_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
    "3": {"class_type": "ImageStitch", "inputs": {"image1": ["2", 0], "direction": "right",
                                                  "match_image_size": True, "spacing_width": 0,
                                                  "spacing_color": "white"}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rhbatch", "images": ["1", 0]}},
    "20": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    def factory(**config: Any) -> tuple[Simulator, SimClient]:
        sim, api = frozen_sim(**{**SLOW, **config})
        sim.add_workflow(TWO_OUTPUTS, TWO_OUTPUTS_WORKFLOW)
        return sim, api

    return factory


def spec(class_type: str, name: str) -> list[Any]:
    """An input's ``input_config`` as the catalogue writes it: ``[type, options]``."""
    inputs = core_catalogue()[class_type]["input"]
    found = inputs.get("required", {}).get(name) or inputs["optional"][name]
    return [found[0], found[1] if len(found) > 1 else {}]


def tips_of(answer: dict[str, Any]) -> dict[str, Any]:
    tips = json.loads(answer["data"]["promptTips"])
    assert isinstance(tips, dict)
    return tips


def rejected(api: SimClient, sim: Simulator, nodes: list[tuple[str, str, Any]],
             **extra: Any) -> dict[str, Any]:
    """A create that ComfyUI rejects: 433 VALIDATE_PROMPT_FAILED, no task; its promptTips."""
    answer = api.create(nodes, **extra)
    assert answer["code"] == 433 and answer["msg"] == "VALIDATE_PROMPT_FAILED", answer
    assert set(answer["data"]) == {"promptTips"}
    assert sim.audit.tasks() == []
    tips = tips_of(answer)
    assert tips["result"] is False and tips["outputs_to_execute"] == []
    return tips


UPSTREAM_FAILED = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                   "details": "", "extra_info": {}}


# -- rejected: 433 with ComfyUI's answer ----------------------------------------------------------


@pytest.mark.parametrize("value, kind, message", [
    (999999, "value_bigger_than_max", "Value 999999 bigger than max of 16384"),
    (8, "value_smaller_than_min", "Value 8 smaller than min of 16"),
    ("72000", "value_bigger_than_max", "Value 72000 bigger than max of 16384"),  # converted first
])
def test_a_value_out_of_range_answers_433_with_comfyuis_error(start, value, kind, message):
    sim, api = start()
    tips = rejected(api, sim, [("5", "width", value)])
    converted = int(value)
    assert tips == {
        "result": False,
        "error": UPSTREAM_FAILED,  # the failing node is upstream of the output: no details
        "outputs_to_execute": [],
        "node_errors": {"5": {
            "errors": [{"type": kind, "message": message, "details": "width",
                        "extra_info": {"input_name": "width",
                                       "input_config": spec("EmptyLatentImage", "width"),
                                       "received_value": converted}}],
            "dependent_outputs": ["9"],
            "class_type": "EmptyLatentImage",
        }},
    }


def test_a_value_not_in_a_short_combo_lists_the_options(start):
    sim, api = start()
    tips = rejected(api, sim, [("3", "scheduler", "nosuch")])
    options = spec("KSampler", "scheduler")[0]
    assert len(options) <= 20
    assert tips["error"] == UPSTREAM_FAILED
    assert tips["node_errors"] == {"3": {
        "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                    "details": f"scheduler: 'nosuch' not in {options}",
                    "extra_info": {"input_name": "scheduler",
                                   "input_config": spec("KSampler", "scheduler"),
                                   "received_value": "nosuch"}}],
        "dependent_outputs": ["9"],
        "class_type": "KSampler",
    }}


def test_a_value_not_in_a_long_combo_gives_its_length(start):
    sim, api = start()
    tips = rejected(api, sim, [("3", "sampler_name", "euler_typo")])
    options = spec("KSampler", "sampler_name")[0]
    assert len(options) > 20
    [error] = tips["node_errors"]["3"]["errors"]
    assert error == {"type": "value_not_in_list", "message": "Value not in list",
                     "details": f"sampler_name: 'euler_typo' not in (list of length {len(options)})",
                     "extra_info": {"input_name": "sampler_name", "input_config": None,
                                    "received_value": "euler_typo"}}


def test_a_value_that_does_not_convert_answers_invalid_input_type(start):
    sim, api = start()
    tips = rejected(api, sim, [("3", "steps", "abc")])
    [error] = tips["node_errors"]["3"]["errors"]
    assert error == {"type": "invalid_input_type",
                     "message": "Failed to convert an input value to a INT value",
                     "details": "steps, abc, invalid literal for int() with base 10: 'abc'",
                     "extra_info": {"input_name": "steps", "input_config": spec("KSampler", "steps"),
                                    "received_value": "abc",
                                    "exception_message": "invalid literal for int() with base 10: 'abc'"}}


def test_a_missing_required_input_answers_required_input_missing(start):
    sim, api = start()
    prompt = json.loads(api.post("/api/openapi/getJsonApiFormat",
                                 {"workflowId": TEXT2IMG_WORKFLOW_ID})["data"]["prompt"])
    del prompt["3"]["inputs"]["steps"]
    tips = rejected(api, sim, [], workflow=json.dumps(prompt))
    assert tips["error"] == UPSTREAM_FAILED
    assert tips["node_errors"] == {"3": {
        "errors": [{"type": "required_input_missing", "message": "Required input is missing",
                    "details": "steps", "extra_info": {"input_name": "steps"}}],
        "dependent_outputs": ["9"], "class_type": "KSampler"}}


def test_an_output_node_that_fails_itself_is_listed_in_the_errors_details(start):
    sim, api = start()
    prompt = json.loads(api.post("/api/openapi/getJsonApiFormat",
                                 {"workflowId": TEXT2IMG_WORKFLOW_ID})["data"]["prompt"])
    del prompt["9"]["inputs"]["filename_prefix"]
    tips = rejected(api, sim, [], workflow=json.dumps(prompt))
    assert tips["error"] == {**UPSTREAM_FAILED, "details": "Required input is missing: filename_prefix"}
    assert list(tips["node_errors"]) == ["9"]


def test_the_v2_route_carries_the_same_prompt_tips(start, key):
    sim, api = start()
    response = api.http.post(f"/openapi/v2/run/workflow/{TEXT2IMG_WORKFLOW_ID}",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"nodeInfoList": [{"nodeId": "5", "fieldName": "width",
                                                     "fieldValue": 999999}]})
    answer = response.json()
    assert answer["errorCode"] == "433" and answer["taskId"] == ""
    v1 = rejected(api, sim, [("5", "width", 999999)])
    assert json.loads(answer["promptTips"]) == v1


def test_runninghubs_803_stays_in_front_of_comfyuis_validation(start):
    sim, api = start()
    answer = api.create([("5", "width", 999999), ("5", "no_such_field", 1)])
    assert answer["code"] == 803 and answer["data"]["reason"] == "field_not_found_in_node"
    assert sim.audit.tasks() == []


# -- accepted ---------------------------------------------------------------------------------------


def test_a_bad_value_on_a_node_no_output_depends_on_is_accepted(start):
    sim, api = start()
    sim.add_workflow("601", {**TWO_OUTPUTS_WORKFLOW,
                             "30": {"class_type": "EmptyImage",
                                    "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}})
    answer = api.create([("30", "width", 999999)], workflow_id="601")
    assert answer["code"] == 0
    assert tips_of(answer) == {"result": True, "error": None, "outputs_to_execute": ["9", "20"],
                               "node_errors": {}}


def test_partial_validity_accepts_the_task_and_produces_only_the_valid_outputs(start):
    sim, api = start()
    answer = api.create([("2", "width", 999999)], workflow_id=TWO_OUTPUTS)
    assert answer["code"] == 0 and answer["data"]["taskStatus"] == "QUEUED"
    tips = tips_of(answer)
    assert tips == {
        "result": True, "error": None, "outputs_to_execute": ["9"],
        "node_errors": {"2": {
            "errors": [{"type": "value_bigger_than_max", "message": "Value 999999 bigger than max of 16384",
                        "details": "width",
                        "extra_info": {"input_name": "width", "input_config": spec("EmptyImage", "width"),
                                       "received_value": 999999}}],
            "dependent_outputs": ["20"], "class_type": "EmptyImage"}},
    }
    task_id = answer["data"]["taskId"]
    sim.advance(30)
    done = api.outputs(task_id)
    assert done["code"] == 0
    assert [item["nodeId"] for item in done["data"]] == ["9"]
    assert api.http.get(done["data"][0]["fileUrl"]).status_code == 200
    missing = done["data"][0]["fileUrl"].replace("/9_0.png", "/20_0.png")
    assert api.http.get(missing).status_code == 404


def test_a_workflow_with_a_class_outside_the_catalogue_is_not_constrained(start):
    # the simulator's choice (pipeline.sim.checks.sim_catalogue): custom nodes are taken as installed
    sim, api = start()
    sim.add_workflow("602", {
        "1": {"class_type": "MyCustomSource", "inputs": {"anything": [1, 2, 3]}},
        "2": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 20, "cfg": 8.0, "sampler_name": ["1", 1], "scheduler": "normal",
            "denoise": 1.0, "model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2],
            "latent_image": ["1", 3]}},
        "3": {"class_type": "SaveVideo", "inputs": {"frames": ["2", 0]}},
    })
    answer = api.create([("1", "anything", "x")], workflow_id="602")
    assert answer["code"] == 0
    assert tips_of(answer) == {"result": True, "error": None, "outputs_to_execute": ["3"], "node_errors": {}}


# -- accepted, then failed when it runs (805) --------------------------------------------------------


@pytest.mark.parametrize("workflow_id, nodes, node_id, node_name, exception_type, in_message", [
    (TWO_OUTPUTS, [("3", "direction", "sideways")], "3", "ImageStitch", "ValueError",
     "Invalid value for direction: 'sideways' is not one of ['right', 'down', 'left', 'up']"),
    (TEXT2IMG_WORKFLOW_ID, [("6", "clip", "x")], "6", "CLIPTextEncode", "AttributeError",
     "clip expects CLIP"),
])
def test_a_value_comfyui_checks_only_when_it_runs_is_accepted_billed_and_fails_805(
        start, workflow_id, nodes, node_id, node_name, exception_type, in_message):
    sim, api = start()
    answer = api.create(nodes, workflow_id=workflow_id)
    assert answer["code"] == 0
    tips = tips_of(answer)
    assert tips["result"] is True and tips["node_errors"] == {}
    task_id = answer["data"]["taskId"]
    sim.advance(30)
    failed = api.outputs(task_id)
    assert failed["code"] == 805 and failed["msg"] == "APIKEY_TASK_STATUS_ERROR"
    reason = failed["data"]["failedReason"]
    assert set(reason) == {"node_name", "node_id", "exception_type", "exception_message", "traceback",
                           "current_inputs", "current_outputs"}
    assert (reason["node_id"], reason["node_name"], reason["exception_type"]) == (
        node_id, node_name, exception_type)
    assert in_message in reason["exception_message"]
    assert isinstance(json.loads(reason["traceback"]), list)
    assert api.status(task_id)["data"] == "FAILED"
    [task] = sim.audit.tasks()
    assert task["status"] == "FAILED"
    # billed: it ran (after its 1 s in the queue) for the time it took to fail
    assert task["coins"] is not None and task["coins"] > 0
    assert task["ended_at"] - task["started_at"] == pytest.approx(2.0)
