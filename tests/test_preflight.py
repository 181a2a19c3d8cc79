"""Pre-flight checks of nodeInfoList against API-format workflows (tests/data/workflows)."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import explicit_row, no_sleep

from pipeline.client import RetryPolicy, RunningHubClient
from pipeline.config import resolve_settings
from pipeline.errors import InputError, Problem, RowFatalError
from pipeline.preflight import (
    Field,
    check_rows,
    describe_workflow,
    fields_to_json,
    format_fields,
    node_sort_key,
    targets_named,
)
from pipeline.workflows import WorkflowCache, fetch_workflows, load_workflow_file, workflow_hash

DATA = Path(__file__).parent / "data" / "workflows"
T2I = "1904136902449209346"
I2I = "1904136902449209347"


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict[str, Any]]:
    return {
        T2I: load_workflow_file(DATA / "text2img.json"),
        I2I: load_workflow_file(DATA / "img2img.json"),
    }


def row(number: int, *overrides: tuple[str, str, Any], workflow_id: str = T2I) -> Any:
    return explicit_row(number, *overrides, workflow_id=workflow_id)


def problems_of(workflows: dict[str, Any], *overrides: tuple[str, str, Any]) -> list[str]:
    return [str(p) for p in check_rows([row(1, *overrides)], workflows)]


# -- nodes, fields, links ----------------------------------------------------------------------


def test_valid_rows_have_no_problems(workflows):
    rows = [
        row(1, ("6", "text", "a dog"), ("3", "seed", 7), ("3", "cfg", 7.5), ("5", "width", 768)),
        row(2, ("10", "image", "api/abc.png"), ("3", "denoise", 0.4), workflow_id=I2I),
        row(3, ("57:35", "enabled", False), ("57:35", "mode", "fast"), ("10", "scale_by", 2)),
    ]
    problems = check_rows(rows, workflows)
    assert problems == [] and problems.total == 0


def test_unknown_node_suggests_the_node_that_has_the_field(workflows):
    assert problems_of(workflows, ("99", "seed", 1)) == [
        'row 1, column "99.seed": node 99 is not in workflow 1904136902449209346 (bypassed and '
        "muted nodes are left out of it): did you mean 3.seed (KSampler)? run `rhbatch inspect "
        "1904136902449209346` to list its fields"
    ]


def test_unknown_node_suggests_near_ids_and_titles(workflows):
    [by_id] = problems_of(workflows, ("1", "nothing", 1))
    assert "did you mean node 10 (Upscale Latent By)?" in by_id
    [by_title] = problems_of(workflows, ("Positive Prompt", "nothing", 1))
    assert "did you mean node 6 (Positive Prompt) or node 7 (Negative Prompt)?" in by_title


def test_unknown_field_lists_the_nodes_fields(workflows):
    # the classic: `prompt` where CLIPTextEncode calls it `text`
    assert problems_of(workflows, ("6", "prompt", "a dog")) == [
        'row 1, column "6.prompt": node 6 (Positive Prompt) has no field "prompt": its fields are text'
    ]


def test_unknown_field_did_you_mean(workflows):
    assert problems_of(workflows, ("3", "sed", 1)) == [
        'row 1, column "3.sed": node 3 (KSampler) has no field "sed": did you mean \'seed\'?'
    ]
    assert problems_of(workflows, ("6", "seed", 1)) == [
        'row 1, column "6.seed": node 6 (Positive Prompt) has no field "seed": did you mean '
        "3.seed (KSampler)?"
    ]


def test_link_fields_cannot_be_overridden(workflows):
    assert problems_of(workflows, ("6", "clip", "x")) == [
        'row 1, column "6.clip": 6.clip is a link to node 4, it cannot be overridden; fields of '
        "node 6 that can be set: text"
    ]


# -- value types ---------------------------------------------------------------------------------

GOOD = [
    ("3", "seed", 5),
    ("3", "seed", 5.0),
    ("3", "seed", "18446744073709551615"),
    ("3", "seed", " 42 "),
    ("3", "steps", "30"),
    ("3", "cfg", 7),
    ("3", "cfg", 7.5),
    ("3", "cfg", "7.5"),
    ("3", "denoise", 0.55),  # literal 1 in the JSON, a float input all the same
    ("57:35", "amount", 2.5),  # an int literal of an unknown input may be a float widget
    ("57:35", "amount", "2.5"),
    ("57:35", "enabled", True),
    ("57:35", "enabled", 0),
    ("6", "text", "a cat"),
    ("6", "text", 1990),  # a CSV cell 1990 arrives as a number; ComfyUI applies str()
    ("6", "text", 2.5),
    ("57:35", "mode", "anything"),
    ("57:35", "mode", 3),
]


@pytest.mark.parametrize("override", GOOD, ids=[f"{n}.{f}={v!r}" for n, f, v in GOOD])
def test_values_that_fit(workflows, override):
    assert problems_of(workflows, override) == []


BAD = [
    (("3", "seed", "abc"), "'abc' is not an integer (3.seed is an integer input, now 156680208700286)"),
    (("3", "seed", "7.0"), "'7.0' is not an integer (3.seed is an integer input, now 156680208700286)"),
    (("3", "steps", 7.5), "7.5 is not a whole number (3.steps is an integer input, now 20)"),
    (
        ("5", "width", True),
        "a true/false value for 5.width is an integer input, now 512: write a whole number",
    ),
    (("3", "cfg", "fast"), "'fast' is not a number (3.cfg is a number input, now 8)"),
    (("3", "cfg", float("nan")), "nan is not a finite number (3.cfg is a number input, now 8)"),
    (("3", "cfg", "inf"), "'inf' is not a number (3.cfg is a number input, now 8)"),
    (("3", "cfg", False), "a true/false value for 3.cfg is a number input, now 8: write a number"),
    (("57:35", "amount", "lots"), "'lots' is not a number (57:35.amount is an integer input, now 3)"),
    (
        ("57:35", "enabled", "false"),
        "text for 57:35.enabled is a true/false input, now true: write true or false without quotes "
        "(ComfyUI reads any non-empty text, even 'false', as true)",
    ),
    (("57:35", "enabled", 2), "2 is not true or false (57:35.enabled is a true/false input, now true)"),
    (
        ("57:35", "enabled", 0.5),
        "a number for 57:35.enabled is a true/false input, now true: write true or false",
    ),
    (
        ("6", "text", True),
        "a true/false value for 6.text is a text input, now 'a photo of a cat': it would arrive as "
        "the text 'True'; quote it",
    ),
    (("6", "text", None), "null cannot be sent as a fieldValue: 6.text needs text, a number or true/false"),
    (
        ("3", "seed", [1, 2]),
        "a list cannot be sent as a fieldValue: 3.seed needs text, a number or true/false",
    ),
]


@pytest.mark.parametrize("override,message", BAD, ids=[f"{o[0]}.{o[1]}={o[2]!r}" for o, _ in BAD])
def test_values_that_do_not_fit(workflows, override, message):
    node, fieldname, _ = override
    assert problems_of(workflows, override) == [f'row 1, column "{node}.{fieldname}": {message}']


def test_value_checks_run_per_value_not_per_type(workflows):
    rows = [row(i, ("3", "seed", v)) for i, v in enumerate(["1", "x", "2", "y"], start=1)]
    assert [(p.row, p.column) for p in check_rows(rows, workflows)] == [(2, "3.seed"), (4, "3.seed")]


# -- workflows, columns, limits ------------------------------------------------------------------


def test_missing_workflow_is_one_problem_that_says_how_to_provide_it(workflows):
    rows = [row(i, ("3", "seed", "x"), workflow_id="42") for i in range(1, 8)]
    rows.append(row(8, ("3", "seed", "x")))
    problems = check_rows(rows, workflows)
    assert [str(p) for p in problems] == [
        'row 1, column "workflowId": workflow 42 is not available to check 7 rows (1, 2, 3, 4, 5 ...): '
        "pass --workflow-json FILE (its API-format JSON, from getJsonApiFormat or ComfyUI's Export "
        "(API)) or run with network access so rhbatch can fetch it",
        "row 8, column \"3.seed\": 'x' is not an integer (3.seed is an integer input, now 156680208700286)",
    ]


def test_problems_name_the_column_the_user_wrote(workflows):
    rows = [row(3, ("6", "prompt", "a"), ("3", "seed", "x"))]
    problems = check_rows(rows, workflows, bound={"my prompt": "6.prompt", "seed": "3.seed"})
    assert [(p.row, p.column) for p in problems] == [(3, "my prompt"), (3, "seed")]


def test_listing_stops_at_the_limit_but_counts_everything(workflows):
    rows = [row(i, ("3", "seed", "x"), ("99", "x", 1)) for i in range(1, 501)]
    problems = check_rows(rows, workflows, limit=10)
    assert len(problems) == 10 and problems.total == 1000 and problems.unlisted == 990
    assert problems[0] == Problem(1, "3.seed", problems[0].message)


def test_two_hundred_thousand_rows_complete(workflows):
    """A sanity check, not a timing assertion (1M rows x 4 fields take about 2.5 s)."""
    rows = [
        row(i, ("6", "text", f"prompt {i // 10}"), ("3", "seed", i), ("3", "cfg", 7.5), ("5", "width", "512"))
        for i in range(1, 200_001)
    ]
    rows[-1] = row(200_000, ("3", "seed", "nope"))
    problems = check_rows(rows, workflows)
    assert problems.total == 1 and problems[0].row == 200_000


# -- describe and format ----------------------------------------------------------------------


def test_describe_sorts_nodes_numerically_and_marks_links(workflows):
    fields = describe_workflow(workflows[T2I])
    assert list(dict.fromkeys(f.node_id for f in fields)) == [
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
        "57:35",
    ]
    by_target = {f.target: f for f in fields}
    assert by_target["3.cfg"] == Field("3", "KSampler", "KSampler", "cfg", 8, "float")
    assert by_target["3.seed"].kind == "int"
    assert by_target["6.clip"].kind == "link" and not by_target["6.clip"].bindable
    assert by_target["57:35.enabled"].kind == "bool"
    assert by_target["57:35.mode"].kind == "other"
    assert [f.name for f in fields if f.node_id == "5"] == ["batch_size", "height", "width"]
    assert sorted(["10", "2", "57:35", "57:4", "a"], key=node_sort_key) == ["2", "10", "57:4", "57:35", "a"]


def test_format_fields_is_an_aligned_table():
    fields = [
        Field("3", "KSampler", "KSampler", "seed", 5, "int"),
        Field("6", "CLIPTextEncode", "Positive Prompt", "clip", ["4", 1], "link"),
        Field("6", "CLIPTextEncode", "Positive Prompt", "text", "x" * 100, "str"),
    ]
    assert format_fields(fields).splitlines() == [
        "NODE  CLASS           TITLE            FIELD  VALUE                                     KIND",
        "3     KSampler        -                seed   5                                         int",
        "6     CLIPTextEncode  Positive Prompt  clip   -> node 4.1                               "
        "link (not bindable)",
        '6     CLIPTextEncode  Positive Prompt  text   "' + "x" * 38 + "…  str",
    ]


def test_fields_to_json(workflows):
    out = {d["target"]: d for d in fields_to_json(describe_workflow(workflows[T2I]))}
    assert out["6.clip"] == {
        "nodeId": "6",
        "classType": "CLIPTextEncode",
        "title": "Positive Prompt",
        "fieldName": "clip",
        "target": "6.clip",
        "value": {"node": "4", "output": 1},
        "kind": "link",
        "bindable": False,
    }
    assert out["3.seed"]["value"] == 156680208700286 and out["3.seed"]["bindable"] is True
    json.dumps(list(out.values()))


# -- hash, cache, files -------------------------------------------------------------------------


def test_hash_ignores_key_order_and_sees_values():
    a = {"3": {"class_type": "K", "inputs": {"seed": 1, "cfg": 8}}}
    b = {"3": {"inputs": {"cfg": 8, "seed": 1}, "class_type": "K"}}
    assert workflow_hash(a) == workflow_hash(b)
    assert len(workflow_hash(a)) == 64
    assert workflow_hash(a) != workflow_hash({"3": {"class_type": "K", "inputs": {"seed": 2, "cfg": 8}}})


def test_cache_round_trip(tmp_path, workflows):
    cache = WorkflowCache(tmp_path / "wf")
    assert cache.get(T2I) is None
    digest = cache.put(T2I, workflows[T2I])
    assert digest == workflow_hash(workflows[T2I])
    again = WorkflowCache(tmp_path / "wf")
    assert again.get(T2I) == workflows[T2I]
    record = json.loads((tmp_path / "wf" / f"{T2I}.json").read_text())
    assert record["workflowId"] == T2I and record["sha256"] == digest
    assert isinstance(record["fetched_at"], float)
    (tmp_path / "wf" / f"{I2I}.json").write_text("{broken")
    assert again.get(I2I) is None
    with pytest.raises(InputError, match="cannot name a cache file"):
        cache.put("../evil", {})


def _envelope_client(calls: list[str], answers: dict[str, Any]) -> RunningHubClient:
    def handler(request: httpx.Request) -> httpx.Response:
        wid = json.loads(request.content)["workflowId"]
        calls.append(wid)
        if wid not in answers:
            return httpx.Response(200, json={"code": 380, "msg": "WORKFLOW_NOT_EXISTS", "data": None})
        prompt = json.dumps(answers[wid])
        return httpx.Response(200, json={"code": 0, "msg": "SUCCESS", "data": {"prompt": prompt}})

    settings = resolve_settings(api_key=secrets.token_hex(16), base_url="http://rh.test", env={})
    return RunningHubClient(
        settings, policy=RetryPolicy(max_attempts=2, sleep=no_sleep), transport=httpx.MockTransport(handler)
    )


def test_fetch_workflows_once_per_id_and_cache_first(tmp_path, workflows):
    calls: list[str] = []
    cache = WorkflowCache(tmp_path)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with _envelope_client(calls, workflows) as client:
            first = await fetch_workflows(client, [T2I, I2I, T2I], cache)
            second = await fetch_workflows(client, [T2I, I2I], cache)
            return first, second

    first, second = asyncio.run(go())
    assert sorted(calls) == sorted([T2I, I2I])
    assert first == second == workflows and list(first) == [T2I, I2I]


def test_fetch_names_an_unknown_workflow(tmp_path):
    async def go() -> None:
        async with _envelope_client([], {}) as client:
            await fetch_workflows(client, ["777"], None)

    with pytest.raises(RowFatalError, match=r"^workflow 777: RunningHub getJsonApiFormat answered 380"):
        asyncio.run(go())


def test_load_workflow_file_shapes(tmp_path, workflows):
    api = workflows[I2I]
    shapes = {
        "bare.json": api,
        "envelope.json": {"code": 0, "msg": "SUCCESS", "data": {"prompt": json.dumps(api)}},
        "wrapper.json": {"prompt": api, "client_id": "abc"},
        "wrapper_str.json": {"prompt": json.dumps(api)},
    }
    for name, content in shapes.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert load_workflow_file(tmp_path / name) == api, name


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not JSON"),
        (json.dumps({"nodes": [], "links": [], "version": 0.4}), "this is a ComfyUI UI workflow"),
        (
            json.dumps({"code": 412, "msg": "TOKEN_INVALID", "data": None}),
            "getJsonApiFormat answer with code 412",
        ),
        (json.dumps({"3": {"inputs": {}}}), "not an API-format workflow"),
        (json.dumps([1, 2]), "not an API-format workflow"),
    ],
)
def test_load_workflow_file_explains_the_fix(tmp_path, content, message):
    path = tmp_path / "wf.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_workflow_file(path)
    assert "Export (API)" in str(info.value) or "fetch it again" in str(info.value)


def test_load_workflow_file_missing(tmp_path):
    with pytest.raises(InputError, match="no such file: check the --workflow-json path"):
        load_workflow_file(tmp_path / "nope.json")


def test_a_column_that_feeds_no_node_is_matched_to_the_inputs_it_probably_meant(workflows):
    t2i = [workflows[T2I]]
    assert targets_named("cfg", t2i) == ["3.cfg"]
    assert targets_named("CFG", t2i) == ["3.cfg"]  # any case
    assert targets_named("KSampler.seed", t2i) == ["3.seed"]  # the part after the last dot
    assert targets_named("text", t2i) == ["6.text", "7.text"]  # at most two, in node order
    assert targets_named("model", t2i) == []  # a link is not bindable
    assert targets_named("note", t2i) == []


def test_the_catalogue_adds_ranges_combos_and_required_inputs_to_preflight():
    """Every out-of-range width, every bad sampler name and the workflow's missing required input
    are reported at once, by row and column with the fix; a cell preflight already refused is not
    reported twice."""
    from pipeline.catalogue import load_catalogue
    from pipeline.preflight import check_rows, check_with_catalogue
    from pipeline.resources import sim_workflow_path

    api = json.loads(sim_workflow_path("text2img.json").read_text("utf-8"))
    wid = "1904136902449209346"
    broken = json.loads(json.dumps(api))
    del broken["3"]["inputs"]["steps"]  # a required input of KSampler
    rows = [explicit_row(1, ("5", "width", 99999), ("3", "sampler_name", "euler_a")),
            explicit_row(2, ("5", "width", 512), ("3", "sampler_name", "euler")),
            explicit_row(3, ("5", "width", "wide"), ("3", "sampler_name", "dpmpp_2m")),
            explicit_row(4, ("5", "width", 8), ("3", "sampler_name", "euler"), workflow_id="77")]
    bound = {"w": "5.width", "sampler": "3.sampler_name"}
    workflows = {wid: api, "77": broken}
    own = check_rows(rows, workflows, bound=bound)
    found = check_with_catalogue(rows, workflows, load_catalogue(), bound=bound, already=own)
    by_cell = {(p.row, p.column): p.message for p in found.problems}
    assert (1, "w") in by_cell and "16384" in by_cell[(1, "w")]
    assert (1, "sampler") in by_cell and "euler_ancestral" in by_cell[(1, "sampler")]
    assert (4, "w") in by_cell and "16" in by_cell[(4, "w")]  # below EmptyLatentImage's min of 16
    assert not [c for c in by_cell if c[0] == 2]
    assert (3, "w") in {(p.row, p.column) for p in own} and (3, "w") not in by_cell
    workflow_problems = [p for p in found.problems if p.row is None]
    assert len(workflow_problems) == 1 and "steps" in workflow_problems[0].message
    assert "77" in workflow_problems[0].message
    assert "checked against the node catalogue" in found.coverage
