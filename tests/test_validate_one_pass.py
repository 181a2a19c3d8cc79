"""Issue #13: `validate` (and `run`, before it sends anything) reports schema, binding and
preflight problems in one pass, capped per kind with a count of the rest; rows are duplicates only
when they would send the same request; columns that feed no node are named (a warning, or with
--strict a refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, TEXT2IMG

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "pipeline" / "sim" / "workflows" / "text2img.json"
NO_FIELD = "node 3 (KSampler) has no field \"sampler\": did you mean 'sampler_name'?"
NOT_WHOLE = "is not a whole number (3.seed takes whole numbers): write digits only, e.g. 42"


def invoke(args: list[str], env: dict[str, str | None] | None = None):
    base: dict[str, str | None] = {"RUNNINGHUB_API_KEY": None, "RUNNINGHUB_BASE_URL": None}
    base.update(env or {})
    return CliRunner().invoke(cli, [str(a) for a in args], env=base)


def sim_env(sim, key: str) -> dict[str, str | None]:
    return {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}


def sent(sim) -> list[dict]:
    """Requests other than reads of the workflow's API JSON (which preflight needs)."""
    return [r for r in sim.audit.requests() if r["route"] != "get_json_api_format"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[str]]:
    """A manifest wrong in every way at once, and the options that make it so."""
    manifest = write(tmp_path / "m.csv", (
        "workflowId,6.text,3.seed,3.cfg,3.sampler\n"
        f"{TEXT2IMG},a cat,abc,7.5,euler\n"
        f"{TEXT2IMG},a dog,2,-1,euler\n"
        f"{TEXT2IMG},a cow,3,7.5,euler\n"))
    schema = write(tmp_path / "s.json", json.dumps(
        {"type": "object", "properties": {"3.cfg": {"type": "number", "minimum": 0},
                                          "3.seed": {"type": "integer"}}}))
    return manifest, ["--schema", str(schema), "--bind", "prompt=6.text"]


def mixed_error(manifest: Path) -> str:
    return (
        f"Error: {manifest}: 6 problems, nothing was submitted:\n"
        '  column "prompt": is bound to 6.text but there is no such column; the columns are: '
        "6.text, 3.seed, 3.cfg, 3.sampler\n"
        f"  row 1, column \"3.seed\": 'abc' {NOT_WHOLE}\n"
        '  row 2, column "3.cfg": -1.0 is less than the minimum 0: use 0 or more\n'
        f'  row 1, column "3.sampler": {NO_FIELD}\n'
        f'  row 2, column "3.sampler": {NO_FIELD}\n'
        f'  row 3, column "3.sampler": {NO_FIELD}\n'
    )


def test_validate_reports_binding_schema_and_preflight_problems_in_one_pass(mixed):
    manifest, options = mixed
    result = invoke(["validate", manifest, "--workflow-json", WORKFLOW, *options])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == mixed_error(manifest)


def test_validate_fetches_the_workflow_to_preflight_a_manifest_with_schema_problems(
        mixed, make_sim, api_key):
    manifest, options = mixed
    sim = make_sim()
    result = invoke(["validate", manifest, *options], sim_env(sim, api_key))
    assert result.exit_code == 2
    assert result.stderr == mixed_error(manifest)
    assert [r["route"] for r in sim.audit.requests()] == ["get_json_api_format"]


def test_run_refuses_with_the_same_full_list_before_sending_anything(mixed, make_sim, api_key,
                                                                     tmp_path):
    manifest, options = mixed
    sim = make_sim()
    out = tmp_path / "run"
    result = invoke(["run", manifest, "--out", out, "-q", *FAST_FLAGS, *options],
                    sim_env(sim, api_key))
    assert result.exit_code == 2
    assert result.stderr == mixed_error(manifest)
    assert sent(sim) == []
    # fixing the file and running again starts clean: not even the workflow cache is left
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}


def test_rows_invalid_in_different_ways_are_not_duplicates_of_each_other(tmp_path):
    manifest = write(tmp_path / "m.csv", (
        "workflowId,6.text,3.seed,nodeInfoList\n"
        f'{TEXT2IMG},a cat,abc,\n'
        f'{TEXT2IMG},a cat,xyz,\n'
        f'{TEXT2IMG},a cat,1,"[{{""nodeId"": ""3""}}]"\n'
        f'{TEXT2IMG},a cat,1,"[{{""nodeId"": ""4""}}]"\n'
        "12x,a cow,2,\n"
        "0,a cow,2,\n"
        f"{TEXT2IMG},a bird,5,\n"
        f"{TEXT2IMG},a bird,5,\n"))
    result = invoke(["validate", manifest, "--no-preflight"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {manifest}: 7 problems, nothing was submitted:\n"
        f"  row 1, column \"3.seed\": 'abc' {NOT_WHOLE}\n"
        f"  row 2, column \"3.seed\": 'xyz' {NOT_WHOLE}\n"
        '  row 5, column "workflowId": \'12x\' is not a workflow id: use the digits from the '
        "workflow's URL, e.g. 1904136902449209346 (not 0, and as text in JSON)\n"
        '  row 6, column "workflowId": \'0\' is not a workflow id: use the digits from the '
        "workflow's URL, e.g. 1904136902449209346 (not 0, and as text in JSON)\n"
        '  row 3, column "nodeInfoList": item 1 lacks fieldName, fieldValue: each item needs '
        "nodeId, fieldName and fieldValue\n"
        '  row 4, column "nodeInfoList": item 1 lacks fieldName, fieldValue: each item needs '
        "nodeId, fieldName and fieldValue\n"
        "  row 8: sends the same workflow, node inputs and options as row 7 (ComfyUI may return "
        "a cached result for an identical graph): remove it, change a value such as the seed, or "
        "pass --allow-duplicates\n"
    )


def test_each_kind_is_capped_with_a_count_of_the_rest(tmp_path):
    rows = "".join(f"{TEXT2IMG},p{i},x{i},euler\n" for i in range(1, 61))
    manifest = write(tmp_path / "m.csv", "workflowId,6.text,3.seed,3.sampler\n" + rows)
    result = invoke(["validate", manifest, "--workflow-json", WORKFLOW])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {manifest}: 120 problems, nothing was submitted:"
    assert lines[1:] == [
        *(f"  row {i}, column \"3.seed\": 'x{i}' {NOT_WHOLE}" for i in range(1, 51)),
        "  ... and 10 more value problems",
        *(f'  row {i}, column "3.sampler": {NO_FIELD}' for i in range(1, 51)),
        "  ... and 10 more preflight problems",
    ]


UNSENT = ("columns that feed no node are not sent: cfg (did you mean 3.cfg?), note; to send one, "
          "bind it with --bind COLUMN=NODE.FIELD or rename it to NODE.FIELD (--strict refuses "
          "such columns)")


@pytest.fixture
def unsent(tmp_path: Path) -> Path:
    return write(tmp_path / "m.csv", (
        "workflowId,6.text,3.seed,cfg,note\n"
        f"{TEXT2IMG},a cat,1,4.5,first\n"
        f"{TEXT2IMG},a dog,2,4.5,second\n"))


def test_validate_names_the_columns_that_feed_no_node_and_the_input_they_probably_meant(unsent):
    result = invoke(["validate", unsent, "--workflow-json", WORKFLOW])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{unsent}: 2 rows OK, workflow {TEXT2IMG}\n"
        "  preflight: every node id, field and value type matches the workflow\n"
        "  catalogue: rhbatch core nodes (29 classes): 2 fields checked against the node "
        "catalogue (4 values)\n"
        "  6.text -> 6.text\n"
        "  3.seed -> 3.seed\n"
        f"  warning: {UNSENT}\n"
    )


def test_run_warns_about_the_columns_that_feed_no_node(unsent, make_sim, api_key, tmp_path):
    sim = make_sim()
    result = invoke(["run", unsent, "--out", tmp_path / "run", "-q", *FAST_FLAGS],
                    sim_env(sim, api_key))
    assert result.exit_code == 0, result.output
    assert f"Warning: {UNSENT}\n" in result.stderr
    sent_fields = {(i["nodeId"], i["fieldName"]) for t in sim.audit.tasks()
                   for i in t["nodeInfoList"]}
    assert sent_fields == {("6", "text"), ("3", "seed")}  # cfg was indeed never sent
    dry = invoke(["run", unsent, "--out", tmp_path / "dry", "--dry-run"])
    assert dry.exit_code == 0
    assert dry.stderr == (f"Warning: {UNSENT.replace(' (did you mean 3.cfg?)', '')}\n"
                          "Dry run: 2 request bodies printed, nothing sent.\n")


def strict_error(manifest: Path, cfg_target: str = "NODE.FIELD") -> str:
    return (
        f"Error: {manifest}: 2 problems, nothing was submitted:\n"
        '  column "cfg": feeds no node, so it would never be sent (--strict refuses it): bind it '
        f"with --bind cfg={cfg_target}, or rename the column to {cfg_target}\n"
        '  column "note": feeds no node, so it would never be sent (--strict refuses it): bind '
        "it with --bind note=NODE.FIELD, or rename the column to NODE.FIELD\n"
    )


def test_strict_validate_refuses_columns_that_feed_no_node(unsent):
    result = invoke(["validate", unsent, "--workflow-json", WORKFLOW, "--strict"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == strict_error(unsent, "3.cfg")
    offline = invoke(["validate", unsent, "--no-preflight", "--strict"])
    assert offline.exit_code == 2
    assert offline.stderr == strict_error(unsent)
    bound = invoke(["validate", unsent, "--no-preflight", "--strict", "--bind", "cfg=3.cfg",
                    "--bind", "note=9.filename_prefix"])
    assert bound.exit_code == 0, bound.output


def test_strict_run_refuses_columns_that_feed_no_node(unsent, make_sim, api_key, tmp_path):
    sim = make_sim()
    result = invoke(["run", unsent, "--out", tmp_path / "run", "-q", "--strict", *FAST_FLAGS],
                    sim_env(sim, api_key))
    assert result.exit_code == 2
    assert result.stderr == strict_error(unsent, "3.cfg")
    assert sent(sim) == []
    dry = invoke(["run", unsent, "--out", tmp_path / "dry", "--dry-run", "--strict"])
    assert dry.exit_code == 2
    assert dry.stdout == "" and dry.stderr == strict_error(unsent)
