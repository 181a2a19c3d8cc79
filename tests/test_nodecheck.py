"""Preflight's checks against the node catalogue: per value, per workflow and over rows, with the
exact messages, and agreement with the simulator's own ComfyUI validation on the same overrides."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline import nodecheck as nc
from pipeline.catalogue import Catalogue, catalogue_from, load_catalogue
from pipeline.errors import Problem
from pipeline.sim import comfy

ROOT = Path(__file__).resolve().parent.parent
TEXT2IMG = json.loads((ROOT / "pipeline" / "sim" / "workflows" / "text2img.json").read_text("utf-8"))
CAT = load_catalogue()


def spec(node: str, name: str, catalogue: Catalogue = CAT):
    found = catalogue.input(node, name)
    assert found is not None
    return found


def finding(node: str, name: str, value: Any, node_id: str = "5") -> nc.Finding | None:
    return nc.check_value(spec(node, name), value, node_id=node_id)


def text(node: str, name: str, value: Any, node_id: str = "5") -> str:
    found = finding(node, name, value, node_id)
    assert found is not None
    return f"{found.severity}: {found.text}"


# -- one value --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [512, 16, 16384, 512.0, "512", " 64 "])
def test_values_comfyui_takes_as_meant(value):
    assert finding("EmptyLatentImage", "width", value) is None


def test_range():
    assert text("EmptyLatentImage", "width", 99999) == (
        "error: 99999 is more than 16384, the maximum of width in node 5 (EmptyLatentImage): "
        "use a value from 16 to 16384")
    assert text("EmptyLatentImage", "width", 8) == (
        "error: 8 is less than 16, the minimum of width in node 5 (EmptyLatentImage): "
        "use a value from 16 to 16384")
    assert text("KSampler", "cfg", 150, "3") == (
        "error: 150 is more than 100.0, the maximum of cfg in node 3 (KSampler): use a value from "
        "0.0 to 100.0")
    assert text("KSampler", "steps", "0", "3") == (
        "error: '0' is less than 1, the minimum of steps in node 3 (KSampler): use a value from 1 to 10000")
    found = finding("EmptyLatentImage", "width", 99999)
    assert (found.code, found.node_id, found.input_name) == ("value_bigger_than_max", "5", "width")


def test_the_seed_range_is_the_full_64_bits():
    assert finding("KSampler", "seed", 2**64 - 1, "3") is None
    assert finding("KSampler", "seed", 2**64, "3").code == "value_bigger_than_max"
    assert finding("KSampler", "seed", -1, "3").code == "value_smaller_than_min"


def test_silent_conversions_are_warnings():
    assert text("EmptyLatentImage", "batch_size", 2.5) == (
        "warning: 2.5 is not a whole number: ComfyUI would truncate it to 2 for batch_size in node 5 "
        "(EmptyLatentImage): write a whole number")
    assert text("EmptyLatentImage", "batch_size", True) == (
        "warning: true would be sent to batch_size in node 5 (EmptyLatentImage) as 1: "
        "write a whole number from 1 to 4096")
    assert text("ImageStitch", "match_image_size", "false", "2") == (
        "warning: 'false' would be read as true by match_image_size in node 2 (ImageStitch) (ComfyUI reads "
        "any non-empty text as true): write true or false without quotes")
    assert text("CLIPTextEncode", "text", True, "6") == (
        "warning: true would arrive in text in node 6 (CLIPTextEncode) as the text 'True': "
        "quote it if that text is meant")
    assert finding("CLIPTextEncode", "text", None, "6").code == "converted"
    for fine in ("a cat", 1990, 1.5):
        assert finding("CLIPTextEncode", "text", fine, "6") is None
    for fine in (True, False, 0, 1, "true", "yes"):
        assert finding("ImageStitch", "match_image_size", fine, "2") is None


def test_truncation_into_the_range_is_an_error():
    assert text("EmptyLatentImage", "width", 15.5) == (
        "error: 15.5 (truncated to 15) is less than 16, the minimum of width in node 5 (EmptyLatentImage): "
        "use a value from 16 to 16384")


@pytest.mark.parametrize(("value", "says"), [
    ("abc", "'abc' is not an integer (INT input width in node 5 (EmptyLatentImage))"),
    ("7.5", "'7.5' is not an integer (INT input width in node 5 (EmptyLatentImage))"),
    (None, "null cannot be converted for width in node 5 (EmptyLatentImage)"),
])
def test_values_comfyui_cannot_convert_are_errors(value, says):
    assert text("EmptyLatentImage", "width", value) == f"error: {says}: write a whole number from 16 to 16384"
    assert finding("EmptyLatentImage", "width", value).code == "invalid_input_type"


def test_float_text():
    assert finding("KSampler", "cfg", "7.5", "3") is None
    assert text("KSampler", "cfg", "high", "3") == (
        "error: 'high' is not a number (FLOAT input cfg in node 3 (KSampler)): write a number from "
        "0.0 to 100.0")
    assert finding("KSampler", "cfg", "nan", "3").code == "not_a_number"


def test_off_step_integers_are_info():
    found = finding("EmptyLatentImage", "width", 500)
    assert (found.severity, found.code) == ("info", "off_step")
    assert found.text == ("500 is not a multiple of 8, the step of width in node 5 (EmptyLatentImage): "
                          "ComfyUI does not check it, but the node may round it")
    assert finding("ImageScale", "width", 501) is None  # step 1


def test_legacy_combo_with_did_you_mean():
    assert text("KSampler", "sampler_name", "eulr", "3") == (
        "error: 'eulr' is not an option of sampler_name in node 3 (KSampler): did you mean 'euler'?")
    assert text("KSampler", "scheduler", "Karras", "3") == (
        "error: 'Karras' is not an option of scheduler in node 3 (KSampler): did you mean 'karras'?")
    assert text("ImageScale", "upscale_method", "zzz", "2") == (
        "error: 'zzz' is not an option of upscale_method in node 2 (ImageScale): choose one of "
        "nearest-exact, bilinear, area, bicubic, lanczos")
    assert text("KSampler", "sampler_name", "qqqq", "3").endswith(
        "choose one of euler, euler_cfg_pp, euler_ancestral, euler_ancestral_cfg_pp, heun, heunpp2, dpm_2, "
        "dpm_2_ancestral, ... (42 options)")
    assert finding("KSampler", "sampler_name", "dpmpp_2m", "3") is None


def test_v3_combo_fails_after_billing():
    assert text("ImageStitch", "direction", "diagonal", "2") == (
        "error: 'diagonal' is not an option of direction in node 2 (ImageStitch) (ComfyUI checks it only "
        "when the task runs, so the row would fail after it is billed): choose one of right, down, left, up")


def test_a_number_for_a_text_combo():
    options = catalogue_from({"N": {"input": {"required": {"size": [["512", "768"], {}]}}, "output": []}})
    found = nc.check_value(spec("N", "size", options), 512, node_id="1")
    assert found is not None and found.text == (
        "512 is not an option of size in node 1 (N): write it as the text '512'")


def test_what_cannot_be_checked():
    assert nc.compile_check(spec("CheckpointLoaderSimple", "ckpt_name")) == nc.NOT_KNOWN_OPTIONS
    assert nc.compile_check(spec("LoadImage", "image")) == nc.NOT_KNOWN_OPTIONS
    assert finding("CheckpointLoaderSimple", "ckpt_name", "anything.safetensors") is None
    wild = catalogue_from({"W": {"input": {"required": {"any": ["*"], "odd": [7]}}, "output": []}})
    assert nc.compile_check(spec("W", "any", wild)) == nc.NOT_KNOWN_TYPE
    assert nc.compile_check(spec("W", "odd", wild)) == nc.NOT_KNOWN_TYPE


def test_a_value_on_a_link_only_input():
    assert text("SaveImage", "images", "cat.png", "9") == (
        "error: a value cannot feed images in node 9 (SaveImage), an input of type IMAGE: only a link from "
        "another node "
        "can: the task would fail when it runs; bind a field that takes a value instead")
    assert finding("SaveImage", "images", ["8", 0], "9") is None


def test_a_finding_is_a_preflight_problem():
    found = nc.check_value(spec("EmptyLatentImage", "width"), 99999, node_id="5", row=3, column="width")
    assert found.problem() == Problem(3, "width", found.text)
    assert str(found).startswith('row 3, column "width": 99999 is more than 16384')


# -- rows -------------------------------------------------------------------------------------


def rows(*values: list[tuple[str, str, Any]], workflow_id: str = "wf") -> list[SimpleNamespace]:
    return [SimpleNamespace(number=i, workflow_id=workflow_id,
                            node_info_list=[{"nodeId": n, "fieldName": f, "fieldValue": v}
                                            for n, f, v in row])
            for i, row in enumerate(values, 1)]


def test_check_rows_names_rows_and_columns_and_counts_coverage():
    wf = copy.deepcopy(TEXT2IMG)
    wf["12"] = {"class_type": "MyCustomNode", "inputs": {"strength": 1.0, "image": ["8", 0]}}
    wf["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "c"}}
    data = rows(
        [("5", "width", 512), ("3", "sampler_name", "euler"), ("12", "strength", 2.0),
         ("4", "ckpt_name", "a")],
        [("5", "width", 99999), ("3", "sampler_name", "eulr"), ("12", "strength", 3.0),
         ("4", "ckpt_name", "b")],
        [("5", "width", 7.5), ("99", "seed", 1), ("3", "nosuch", 1)],
    )
    report = nc.check_rows(data, {"wf": wf}, CAT, bound={"W": "5.width"})
    assert [str(f) for f in report.findings] == [
        'row 2, column "W": 99999 is more than 16384, the maximum of width in node 5 (EmptyLatentImage): '
        "use a value from 16 to 16384",
        "row 2, column \"3.sampler_name\": 'eulr' is not an option of sampler_name in node 3 (KSampler): "
        "did you mean 'euler'?",
        'row 3, column "W": 7.5 (truncated to 7) is less than 16, the minimum of width in node 5 '
        "(EmptyLatentImage): use a value from 16 to 16384",
    ]
    assert report.totals == {"error": 3, "warning": 0, "info": 0} and report.total == 3
    assert [p.row for p in report.problems()] == [2, 2, 3]
    assert report.checked_fields == {("wf", "5.width"), ("wf", "3.sampler_name")}
    assert report.unchecked_fields == {("wf", "12.strength"): nc.NOT_KNOWN_CLASS,
                                       ("wf", "4.ckpt_name"): nc.NOT_KNOWN_OPTIONS}
    assert (report.values_checked, report.values_unchecked) == (5, 4)
    assert report.coverage() == (
        "2 fields checked against the node catalogue (5 values); 2 not checkable: "
        "12.strength (the node's class is not known here), 4.ckpt_name (its options (models, files) are "
        "not known here)")


def test_check_rows_lists_up_to_the_limit_and_counts_the_rest():
    data = rows(*[[("5", "width", 99999), ("5", "height", 2.5)] for _ in range(10)])
    report = nc.check_rows(data, {"wf": TEXT2IMG}, CAT, limit=4)
    assert len(report.findings) == 4 and report.unlisted == 16
    assert report.totals == {"error": 20, "warning": 0, "info": 0}


def test_values_on_a_node_no_output_depends_on_are_not_checked():
    wf = copy.deepcopy(TEXT2IMG)
    wf["20"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}}
    report = nc.check_rows(rows([("20", "width", 99999)]), {"wf": wf}, CAT)
    assert report.findings == [] and report.unchecked_fields == {("wf", "20.width"): nc.NOT_VALIDATED}


def test_targets_preflight_reports_are_left_to_preflight():
    report = nc.check_rows(rows([("5", "width", 99999)], workflow_id="other"), {"wf": TEXT2IMG}, CAT)
    assert report.findings == [] and report.values_checked == report.values_unchecked == 0
    # a missing node or field (803), and a link ("cannot be overridden"), are preflight's to report
    report = nc.check_rows(rows([("99", "width", 1), ("5", "nosuch", 1), ("9", "images", "a.png")]),
                           {"wf": TEXT2IMG}, CAT)
    assert report.findings == [] and not report.checked_fields and not report.unchecked_fields


def test_a_big_sweep_reports_every_bad_row():
    samplers = spec("KSampler", "sampler_name").options
    data = rows(*[[("5", "width", 99999 if i % 10 == 0 else 512),
                   ("3", "sampler_name", f"bad_{i % 97}" if i % 10 == 1 else samplers[i % len(samplers)]),
                   ("3", "cfg", 7.5)] for i in range(20_000)])
    report = nc.check_rows(data, {"wf": TEXT2IMG}, CAT, limit=10**6)
    assert report.totals["error"] == 4000 and len(report.findings) == 4000
    assert {f.row for f in report.findings} == {i + 1 for i in range(20_000) if i % 10 in (0, 1)}
    assert report.values_checked == 60_000


# -- the workflow -----------------------------------------------------------------------------


def workflow_findings(wf: dict[str, Any], targets: tuple[str, ...] = ("5.width",), **kw: Any) -> list[str]:
    return [f"{f.severity} {f.code}: {f.text}" for f in nc.check_workflow(wf, CAT, workflow_id="wf",
                                                                           targets=targets, **kw).findings]


def test_a_good_workflow_has_nothing_to_say():
    assert workflow_findings(TEXT2IMG) == []
    report = nc.check_workflow(TEXT2IMG, CAT, workflow_id="wf")
    assert (report.known_nodes, report.unknown_nodes, report.outputs) == (7, [], ["9"])


def test_unknown_classes_are_not_known_here_never_errors():
    wf = copy.deepcopy(TEXT2IMG)
    wf["8"]["class_type"] = "MyVAEDecode"
    assert workflow_findings(wf) == [
        "info unknown_class: node 8 (MyVAEDecode) is not known here: its fields are not checked; pass "
        "--object-info FILE saved from a server that has it"]


def test_missing_required_input_and_bad_links():
    wf = copy.deepcopy(TEXT2IMG)
    del wf["5"]["inputs"]["height"]
    wf["8"]["inputs"]["vae"] = ["4", 1]
    wf["6"]["inputs"]["clip"] = ["99", 0]
    wf["7"]["inputs"]["clip"] = ["4", 7]
    assert workflow_findings(wf, ()) == [
        "error required_input_missing: node 5 (EmptyLatentImage) lacks its required input "
        "\"height\": connect "
        "or set it in ComfyUI and export the workflow again",
        "error exception_during_inner_validation: clip in node 6 (CLIPTextEncode) is linked to node "
        "99, which "
        "is not in the workflow: connect it in ComfyUI and export the workflow again",
        "error exception_during_inner_validation: clip in node 7 (CLIPTextEncode) is linked to output 7 of "
        "node 4 (CheckpointLoaderSimple), which has 3 outputs: connect it in ComfyUI and export the workflow "
        "again",
        "error return_type_mismatch: vae in node 8 (VAEDecode) takes VAE but is linked to output 1 of node 4 "
        "(CheckpointLoaderSimple), a CLIP: connect an output of the right type in ComfyUI and export the "
        "workflow again",
    ]


def test_the_workflows_own_values_unless_a_column_sets_them():
    wf = copy.deepcopy(TEXT2IMG)
    wf["3"]["inputs"]["sampler_name"] = "eulr"
    wf["5"]["inputs"]["width"] = 99999
    assert workflow_findings(wf, ("5.width",), bound={"W": "5.width"}) == [
        "error value_not_in_list: the workflow's own value: 'eulr' is not an option of sampler_name "
        "in node 3 "
        "(KSampler): change it in the workflow (did you mean 'euler'?) or bind 3.sampler_name to a column"]
    found = nc.check_workflow(wf, CAT, targets=()).findings
    assert [(f.column, f.code) for f in found] == [("3.sampler_name", "value_not_in_list"),
                                                   ("5.width", "value_bigger_than_max")]


@pytest.mark.parametrize(("received", "expected", "fits"), [
    ("IMAGE", "IMAGE", True), ("MASK", "IMAGE", False), ("*", "IMAGE", True), ("LATENT", "*", True),
    ("IMAGE,MASK", "MASK", True), ("IMAGE, MASK", "LATENT,MASK", True), ("IMAGE,MASK", "LATENT", False),
    (["a", "b"], "COMBO", True), (["a"], ["b"], True), ("COMBO", ["a"], True), ("INT", "COMBO", False),
    (["a"], "STRING", False),
])
def test_which_link_types_fit(received, expected, fits):
    assert nc.types_match(received, expected) is fits
    prompt = {"1": {"class_type": "Src", "inputs": {}},
              "2": {"class_type": "Dst", "inputs": {"x": ["1", 0]}}}
    classes = {"Src": {"input": {}, "output": [received]},
               "Dst": {"input": {"required": {"x": [expected, {}]}}, "output": [], "output_node": True}}
    ok, _, _, node_errors = comfy.validate_prompt(prompt, classes)
    assert ok is fits  # the simulator agrees
    assert ("2" in node_errors) is not fits


def test_a_workflow_value_where_only_a_link_can_be():
    wf = copy.deepcopy(TEXT2IMG)
    wf["9"]["inputs"]["images"] = "cat.png"  # nothing feeds 9 now: only it is looked at
    assert [(f.code, f.node_id, f.input_name) for f in nc.check_workflow(wf, CAT).findings] == [
        ("literal_on_link", "9", "images")]
    wf = copy.deepcopy(TEXT2IMG)
    wf["8"]["inputs"]["samples"] = ["3", 0, 1]
    assert [(f.code, f.node_id, f.input_name) for f in nc.check_workflow(wf, CAT).findings] == [
        ("bad_linked_input", "8", "samples")]


def test_only_nodes_an_output_depends_on_are_looked_at():
    wf = copy.deepcopy(TEXT2IMG)
    wf["20"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 99999}}
    assert workflow_findings(wf, ("5.width", "20.batch_size")) == [
        "warning not_reached: node 20 (EmptyLatentImage) feeds no output, so ComfyUI never runs it and "
        "batch_size changes nothing: bind a field of a node that an output depends on"]


def test_outputs_no_bound_field_reaches_are_info():
    wf = copy.deepcopy(TEXT2IMG)
    wf["10"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    assert workflow_findings(wf, ("5.width",)) == [
        "info output_not_reached: output node 11 (PreviewImage) depends on no bound field: every row gives "
        "the same result there"]


def test_a_workflow_without_outputs_and_a_node_without_class():
    wf = {k: v for k, v in copy.deepcopy(TEXT2IMG).items() if k != "9"}
    wf["1"] = {"inputs": {}}
    assert workflow_findings(wf, ()) == [
        "error missing_class_type: node 1 of workflow wf has no class_type: export the workflow again in API "
        "format",
        "error prompt_no_outputs: workflow wf has no output node (SaveImage, PreviewImage ...): ComfyUI "
        "rejects a prompt without outputs: add one and export the workflow again"]


# -- the same verdict as the simulator ----------------------------------------------------------

CASES = [
    ("5", "width", 512), ("5", "width", 99999), ("5", "width", 8), ("5", "width", "640"),
    ("5", "width", "abc"), ("5", "width", 15.5), ("5", "batch_size", 2.5), ("5", "batch_size", True),
    ("3", "steps", 0), ("3", "steps", "7.5"), ("3", "cfg", 150.0), ("3", "cfg", "7.5"), ("3", "cfg", "x"),
    ("3", "seed", 2**64), ("3", "seed", -5), ("3", "seed", 12345), ("3", "denoise", 1.01),
    ("3", "sampler_name", "eulr"), ("3", "sampler_name", "dpmpp_2m"), ("3", "scheduler", "Karras"),
    ("3", "scheduler", "karras"), ("4", "ckpt_name", "whatever.safetensors"), ("6", "text", None),
    ("6", "text", True), ("9", "filename_prefix", 7),
]


@pytest.mark.parametrize(("node", "name", "value"), CASES)
def test_preflight_flags_an_error_exactly_when_the_service_would_fail_the_row(node, name, value):
    prompt = copy.deepcopy(TEXT2IMG)
    prompt[node]["inputs"][name] = value
    ok, _, outputs, node_errors = comfy.validate_prompt(prompt, comfy.core_catalogue())
    fails = not ok or bool(node_errors) or comfy.run_time_failure(prompt, comfy.core_catalogue(),
                                                                  outputs) is not None
    report = nc.check_rows(rows([(node, name, value)]), {"wf": TEXT2IMG}, CAT)
    assert (report.totals["error"] > 0) == fails
