"""The simulator's ComfyUI validation, rule by rule, against ``shared/comfyui-validation.md``: the
same model-free node kinds as the observations there (EmptyImage, ImageBlend, ImageScale,
ImageStitch, SaveImage, ImagePadForOutpaint), every field of every answer compared."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest

from pipeline.sim.comfy import (
    comfy_answer,
    core_catalogue,
    prompt_tips,
    rh_433_body,
    run_time_failure,
    validate_prompt,
)

CAT = core_catalogue()
EMPTY_IMAGE_WIDTH = ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
FAILED = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
          "details": "", "extra_info": {}}


def graph() -> dict[str, Any]:
    """1 EmptyImage -> 2 ImageScale -> 3 SaveImage; 4 ImagePadForOutpaint(1) -> 5 ImageBlend(1, 4)
    -> 6 SaveImage: two outputs, sharing node 1."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                     "width": 32, "height": 32, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "a"}},
        "4": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["1", 0], "left": 8, "top": 0,
                                                              "right": 0, "bottom": 0, "feathering": 4}},
        "5": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["4", 0],
                                                     "blend_factor": 0.5, "blend_mode": "normal"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "b"}},
    }


def with_value(node: str, name: str, value: Any, prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    prompt = copy.deepcopy(prompt or graph())
    prompt.setdefault(node, {}).setdefault("inputs", {})[name] = value
    return prompt


def test_a_valid_prompt_runs_every_output():
    assert validate_prompt(graph(), CAT) == (True, None, ["3", "6"], {})


# -- what is checked, and when ------------------------------------------------------------------


def test_only_nodes_an_output_depends_on_are_validated():
    prompt = graph()
    prompt["7"] = {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": "abc"}}
    prompt["8"] = {"class_type": "ImageScale", "inputs": {"image": ["99", 0], "upscale_method": "nosuch"}}
    assert validate_prompt(prompt, CAT) == (True, None, ["3", "6"], {})


def test_one_valid_output_queues_the_prompt_and_still_reports_the_failed_one():
    ok, error, outputs, node_errors = validate_prompt(with_value("5", "blend_factor", 7.0), CAT)
    assert (ok, error, outputs) == (True, None, ["3"])
    assert node_errors == {"5": {
        "errors": [{"type": "value_bigger_than_max", "message": "Value 7.0 bigger than max of 1.0",
                    "details": "blend_factor",
                    "extra_info": {"input_name": "blend_factor",
                                   "input_config": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0,
                                                              "step": 0.01}],
                                   "received_value": 7.0}}],
        "dependent_outputs": ["6"], "class_type": "ImageBlend"}}
    tips = json.loads(prompt_tips(ok, error, outputs, node_errors))
    assert tips == {"result": True, "error": None, "outputs_to_execute": ["3"], "node_errors": node_errors}


def test_range_bigger_than_max():
    ok, error, outputs, node_errors = validate_prompt(with_value("1", "width", 999999), CAT)
    assert (ok, error, outputs) == (False, FAILED, [])
    assert list(node_errors) == ["1"]
    assert node_errors["1"] == {
        "errors": [{"type": "value_bigger_than_max", "message": "Value 999999 bigger than max of 16384",
                    "details": "width",
                    "extra_info": {"input_name": "width", "input_config": EMPTY_IMAGE_WIDTH,
                                   "received_value": 999999}}],
        "dependent_outputs": ["3", "6"], "class_type": "EmptyImage"}


def test_range_smaller_than_min():
    _, _, _, node_errors = validate_prompt(with_value("1", "batch_size", 0), CAT)
    assert node_errors["1"]["errors"] == [{
        "type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "batch_size",
        "extra_info": {"input_name": "batch_size",
                       "input_config": ["INT", {"default": 1, "min": 1, "max": 4096}],
                       "received_value": 0}}]


def test_an_input_the_node_validates_itself_skips_the_list_check():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "api/uploaded-1234.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    assert validate_prompt(prompt, CAT) == (True, None, ["2"], {})


def test_legacy_combo_inlines_up_to_20_options():
    _, _, _, node_errors = validate_prompt(with_value("2", "upscale_method", "nosuch"), CAT)
    assert node_errors["2"]["errors"] == [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "upscale_method: 'nosuch' not in "
                   "['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']",
        "extra_info": {"input_name": "upscale_method", "input_config": [UPSCALE_METHODS, {}],
                       "received_value": "nosuch"}}]
    assert node_errors["2"]["dependent_outputs"] == ["3"]


def test_legacy_combo_of_more_than_20_options_gives_its_length_and_no_config():
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "any.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
        "1": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": 1, "steps": 20, "cfg": 8.0,
            "sampler_name": "eulr", "scheduler": "normal", "positive": ["6", 0], "negative": ["6", 0],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["4", 2]}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    _, _, _, node_errors = validate_prompt(prompt, CAT)
    assert node_errors == {"1": {"errors": [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "sampler_name: 'eulr' not in (list of length 42)",
        "extra_info": {"input_name": "sampler_name", "input_config": None, "received_value": "eulr"}}],
        "dependent_outputs": ["2"], "class_type": "KSamplerAdvanced"}}


def _stitched(**inputs: Any) -> dict[str, Any]:
    values = {"image1": ["1", 0], "direction": "right", "match_image_size": True, "spacing_width": 0,
              "spacing_color": "white", **inputs}
    empty = {"width": 8, "height": 8, "batch_size": 1, "color": 0}
    return {"1": {"class_type": "EmptyImage", "inputs": empty},
            "2": {"class_type": "ImageStitch", "inputs": values},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "s"}}}


def test_v3_combo_is_not_checked_at_submission_and_fails_when_the_task_runs():
    prompt = _stitched(direction="diagonal")
    assert validate_prompt(prompt, CAT) == (True, None, ["3"], {})
    failure = run_time_failure(prompt, CAT, ["3"])
    assert failure is not None
    assert (failure["node_id"], failure["node_name"], failure["exception_type"]) == ("2", "ImageStitch",
                                                                                     "ValueError")
    assert "'diagonal'" in failure["exception_message"]
    assert set(failure) == {"node_name", "node_id", "exception_type", "exception_message", "traceback",
                            "current_inputs", "current_outputs"}
    assert run_time_failure(_stitched(direction="down"), CAT, ["3"]) is None


def test_a_v3_combo_range_is_still_checked():
    _, _, _, node_errors = validate_prompt(_stitched(spacing_width=2000), CAT)
    assert node_errors["2"]["errors"][0]["message"] == "Value 2000 bigger than max of 1024"


def test_model_lists_not_known_here_accept_any_name_unless_asked_to_be_strict():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mine.safetensors"}},
              "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
              "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}}}
    assert validate_prompt(prompt, CAT)[0] is True
    _, _, _, node_errors = validate_prompt(prompt, CAT, empty_combo_accepts=False)
    assert node_errors["1"]["errors"][0]["details"] == "ckpt_name: 'mine.safetensors' not in []"


def test_required_input_missing():
    prompt = graph()
    del prompt["1"]["inputs"]["height"]
    _, _, _, node_errors = validate_prompt(prompt, CAT)
    assert node_errors["1"]["errors"] == [{"type": "required_input_missing",
                                           "message": "Required input is missing", "details": "height",
                                           "extra_info": {"input_name": "height"}}]


def test_an_optional_input_may_be_missing():
    prompt = _stitched()
    assert "image2" not in prompt["2"]["inputs"]
    assert validate_prompt(prompt, CAT)[0] is True


def test_unknown_class_rejects_the_whole_prompt_even_where_no_output_reaches():
    prompt = graph()
    prompt["2"]["class_type"] = "NoSuchNode"
    expected = (False, {"type": "invalid_prompt",
                        "message": "Cannot execute because node NoSuchNode does not exist.",
                        "details": "Node ID '#2'", "extra_info": {}}, [], {})
    assert validate_prompt(prompt, CAT) == expected
    unreachable = graph()
    unreachable["9"] = {"class_type": "NoSuchNode", "inputs": {}}
    assert validate_prompt(unreachable, CAT)[1]["details"] == "Node ID '#9'"


def test_an_override_on_a_node_not_in_the_graph_makes_a_node_without_a_class():
    prompt = with_value("77", "seed", 5)
    assert validate_prompt(prompt, CAT) == (False, {
        "type": "invalid_prompt",
        "message": "Cannot execute because a node is missing the class_type property.",
        "details": "Node ID '#77'", "extra_info": {}}, [], {})


def test_a_link_to_an_output_of_another_type_is_a_return_type_mismatch():
    _, _, _, node_errors = validate_prompt(with_value("5", "image1", ["4", 1]), CAT)
    assert node_errors["5"]["errors"] == [{
        "type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
        "details": "image1, received_type(MASK) mismatch input_type(IMAGE)",
        "extra_info": {"input_name": "image1", "input_config": ["IMAGE", {}], "received_type": "MASK",
                       "linked_node": ["4", 1]}}]


def test_a_link_to_a_missing_node_is_an_exception_during_inner_validation():
    ok, error, outputs, node_errors = validate_prompt(with_value("2", "image", ["99", 0]), CAT)
    assert (ok, error, outputs) == (True, None, ["6"])  # output 6 does not use node 2
    assert list(node_errors) == ["2"]
    (entry,) = node_errors["2"]["errors"]
    assert entry["type"] == "exception_during_inner_validation"
    assert entry["message"] == "Exception when validating inner node"
    assert entry["details"] == "'99'"
    info = entry["extra_info"]
    assert (info["input_name"], info["input_config"], info["exception_message"], info["exception_type"],
            info["linked_node"]) == ("images", ["IMAGE", {}], "'99'", "KeyError", ["2", 0])
    assert isinstance(info["traceback"], list) and info["traceback"]
    assert node_errors["2"]["dependent_outputs"] == ["3"]


def test_a_link_to_a_missing_slot_fails_the_same_way():
    _, _, _, node_errors = validate_prompt(with_value("2", "image", ["1", 5]), CAT)
    info = node_errors["2"]["errors"][0]["extra_info"]
    assert (info["exception_type"], info["exception_message"]) == ("IndexError", "tuple index out of range")


def test_an_output_node_with_a_dangling_link_fails_its_own_validation():
    ok, error, outputs, node_errors = validate_prompt(with_value("3", "images", ["99", 0]), CAT)
    assert (ok, outputs) == (True, ["6"])
    (entry,) = node_errors["3"]["errors"]
    assert (entry["type"], entry["message"], entry["details"]) == (
        "exception_during_validation", "Exception when validating node", "'99'")
    assert entry["extra_info"]["exception_type"] == "KeyError"


def test_a_literal_where_a_link_is_expected_passes_validation_and_fails_when_run():
    prompt = with_value("5", "image2", "not an image")
    assert validate_prompt(prompt, CAT) == (True, None, ["3", "6"], {})
    failure = run_time_failure(prompt, CAT, ["3", "6"])
    assert failure is not None and (failure["node_id"], failure["node_name"]) == ("5", "ImageBlend")
    assert run_time_failure(graph(), CAT, ["3", "6"]) is None


def test_a_bad_list_is_a_bad_linked_input():
    _, _, _, node_errors = validate_prompt(with_value("2", "image", ["1", 0, 1]), CAT)
    assert node_errors["2"]["errors"] == [{
        "type": "bad_linked_input",
        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": "image",
        "extra_info": {"input_name": "image", "input_config": ["IMAGE", {}], "received_value": ["1", 0, 1]}}]


def test_an_input_the_node_does_not_declare_is_ignored():
    assert validate_prompt(with_value("1", "nosuch", "anything"), CAT)[0] is True


@pytest.mark.parametrize(("name", "value"), [
    ("width", 63.9),  # a float for an INT is truncated: 63
    ("width", 16384.7),  # truncated to 16384, the maximum: accepted
    ("batch_size", True),  # true for an INT is 1
    ("width", "72"),  # integer text converts
    ("width", " 72 "),
])
def test_values_are_converted_not_type_checked(name, value):
    assert validate_prompt(with_value("1", name, value), CAT)[0:3] == (True, None, ["3", "6"])


def test_any_non_empty_text_for_a_boolean_is_true_and_anything_goes_for_a_string():
    assert validate_prompt(_stitched(match_image_size="false"), CAT)[0] is True
    for value in (None, True, 12, 1.5):
        prompt = with_value("3", "filename_prefix", value)
        assert validate_prompt(prompt, CAT)[0:3] == (True, None, ["3", "6"])


def test_the_range_check_sees_the_converted_value():
    _, _, _, node_errors = validate_prompt(with_value("1", "width", "99999"), CAT)
    (entry,) = node_errors["1"]["errors"]
    assert entry["message"] == "Value 99999 bigger than max of 16384"
    assert entry["extra_info"]["received_value"] == 99999
    _, _, _, node_errors = validate_prompt(with_value("1", "width", 16385.2), CAT)
    assert node_errors["1"]["errors"][0]["message"] == "Value 16385 bigger than max of 16384"


@pytest.mark.parametrize(("value", "shown", "reason"), [
    ("abc", "abc", "invalid literal for int() with base 10: 'abc'"),
    ("7.5", "7.5", "invalid literal for int() with base 10: '7.5'"),
    (None, "None", "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"),
])
def test_a_value_that_does_not_convert_is_an_invalid_input_type(value, shown, reason):
    _, _, _, node_errors = validate_prompt(with_value("1", "width", value), CAT)
    assert node_errors["1"]["errors"] == [{
        "type": "invalid_input_type", "message": "Failed to convert an input value to a INT value",
        "details": f"width, {shown}, {reason}",
        "extra_info": {"input_name": "width", "input_config": EMPTY_IMAGE_WIDTH, "received_value": value,
                       "exception_message": reason}}]


def test_float_conversion_failure():
    _, _, _, node_errors = validate_prompt(with_value("5", "blend_factor", "half"), CAT)
    (entry,) = node_errors["5"]["errors"]
    assert entry["message"] == "Failed to convert an input value to a FLOAT value"
    assert entry["details"] == "blend_factor, half, could not convert string to float: 'half'"


def test_every_error_of_a_node_is_listed():
    prompt = with_value("1", "width", 0)
    prompt["1"]["inputs"]["height"] = "tall"
    del prompt["1"]["inputs"]["batch_size"]
    errors = validate_prompt(prompt, CAT)[3]["1"]["errors"]
    assert [e["type"] for e in errors] == ["value_smaller_than_min", "invalid_input_type",
                                           "required_input_missing"]


# -- shapes ------------------------------------------------------------------------------------


def test_details_list_the_errors_of_the_output_nodes_themselves():
    prompt = with_value("3", "images", ["4", 1])
    del prompt["6"]["inputs"]["images"]
    ok, error, outputs, node_errors = validate_prompt(prompt, CAT)
    assert (ok, outputs) == (False, [])
    assert error == {"type": "prompt_outputs_failed_validation",
                     "message": "Prompt outputs failed validation",
                     "details": "Return type mismatch between linked nodes: images, received_type(MASK) "
                                "mismatch input_type(IMAGE)\nRequired input is missing: images",
                     "extra_info": {}}
    assert {k: v["dependent_outputs"] for k, v in node_errors.items()} == {"3": ["3"], "6": ["6"]}


def test_dependent_outputs_list_only_the_outputs_that_depend_on_the_node():
    prompt = with_value("2", "upscale_method", "nosuch")
    prompt["5"]["inputs"]["blend_mode"] = "nosuch"
    _, error, _, node_errors = validate_prompt(prompt, CAT)
    assert error == FAILED  # the failing nodes are upstream of the outputs
    assert {k: v["dependent_outputs"] for k, v in node_errors.items()} == {"2": ["3"], "5": ["6"]}
    for entry in node_errors.values():
        assert list(entry) == ["errors", "dependent_outputs", "class_type"]
    shared = validate_prompt(with_value("1", "color", -1), CAT)[3]
    assert shared["1"]["dependent_outputs"] == ["3", "6"]


def test_a_prompt_without_output_nodes():
    prompt = {"1": graph()["1"]}
    no_outputs = {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                  "extra_info": {}}
    assert validate_prompt(prompt, CAT) == (False, no_outputs, [], {})


def test_the_prompt_is_not_changed():
    prompt = with_value("1", "width", "72")
    before = copy.deepcopy(prompt)
    validate_prompt(prompt, CAT)
    assert prompt == before


def test_the_433_body_and_comfyuis_own_answers():
    ok, error, outputs, node_errors = validate_prompt(with_value("1", "width", 999999), CAT)
    body = rh_433_body(error, node_errors)
    assert list(body) == ["code", "msg", "data"] and body["code"] == 433
    assert body["msg"] == "VALIDATE_PROMPT_FAILED" and list(body["data"]) == ["promptTips"]
    tips_text = body["data"]["promptTips"]
    assert tips_text.startswith('{"result": false, "error": {"type": ')  # Python-style JSON text
    assert json.loads(tips_text) == {"result": False, "error": error, "outputs_to_execute": [],
                                     "node_errors": node_errors}
    assert comfy_answer(ok, error, node_errors) == (400, {"error": error, "node_errors": node_errors})
    assert comfy_answer(True, None, {}, prompt_id="p-1", number=3) == (
        200, {"prompt_id": "p-1", "number": 3, "node_errors": {}})


def test_the_simulator_does_not_share_code_with_preflight():
    code = ("import sys, pipeline.sim.comfy as c; c.core_catalogue(); "
            "print(sorted(m for m in sys.modules if m in ('pipeline.catalogue', 'pipeline.nodecheck')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
