"""Manifest rules at the library level: schemas, typing, the fast paths, and what they must equal."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from pipeline.errors import InputError, ManifestError, SchemaError
from pipeline.manifest import Row, content_key, load_manifest, parse_binding
from pipeline.manifest.content import _ENC, _enc_scalar
from pipeline.manifest.rows import _fast_row

WF = "1904136902449209346"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _schema(tmp_path, schema):
    return _write(tmp_path, "user.schema.json", json.dumps(schema))


def _problems(excinfo):
    return [str(p) for p in excinfo.value.problems]


def test_parse_binding_splits_at_the_first_dot_and_names_the_fix():
    assert parse_binding("seed=3.seed") == ("seed", "3", "seed")
    assert parse_binding(" p = 57:35.text ") == ("p", "57:35", "text")
    assert parse_binding("x=4.a.b") == ("x", "4", "a.b")
    for bad in ("seed=3", "seed", "=3.seed", "seed=.seed", "seed=3."):
        with pytest.raises(InputError, match=r"is not COLUMN=NODE\.FIELD: write e\.g\. --bind seed=3\.seed"):
            parse_binding(bad)


def test_a_bad_workflow_id_option_is_refused(tmp_path):
    path = _write(tmp_path, "m.csv", "6.text\na\n")
    with pytest.raises(InputError, match="--workflow-id '0' is not a workflow id"):
        load_manifest(path, workflow_id="0")


def test_a_user_schema_rejects_a_value_with_row_column_value_and_fix(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,3.steps\n{WF},a,5\n{WF},b,0\n")
    schema = _schema(tmp_path, {"properties": {"3.steps": {"type": "integer", "minimum": 1},
                                               "6.text": {"maxLength": 3}}})
    with pytest.raises(ManifestError) as info:
        load_manifest(path, schema_path=schema)
    assert _problems(info) == ['row 2, column "3.steps": 0 is less than the minimum 1: use 1 or more']


def test_schema_string_type_keeps_digits_as_text_and_integer_accepts_7_0(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,3.seed\n{WF},42,7.0\n{WF},007,8\n")
    schema = _schema(tmp_path, {"properties": {"6.text": {"type": "string"},
                                               "3.seed": {"type": "integer"}}})
    rows = load_manifest(path, schema_path=schema).rows
    assert [r.inputs["6.text"] for r in rows] == ["42", "007"]
    assert [r.inputs["3.seed"] for r in rows] == [7, 8]
    assert all(type(r.inputs["3.seed"]) is int for r in rows)


def test_undeclared_columns_are_inferred_over_the_whole_column(tmp_path):
    path = _write(tmp_path, "m.csv", "workflowId,6.text,9.a,9.b,9.c,9.d,note\n"
                  f"{WF},x,1,1,true,01,\n{WF},y,2,2.5,FALSE,2,n\n")
    rows = load_manifest(path).rows
    assert [r.inputs["9.a"] for r in rows] == [1, 2]
    assert [r.inputs["9.b"] for r in rows] == [1.0, 2.5]
    assert [r.inputs["9.c"] for r in rows] == [True, False]
    assert [r.inputs["9.d"] for r in rows] == ["01", "2"]  # a leading zero keeps the column text
    assert [r.inputs["note"] for r in rows] == [None, "n"]


def test_a_bound_column_uses_the_type_declared_for_its_target(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,prompt,seed\n{WF},a,1\n{WF},b,2.5\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path, binds=["prompt=6.text", "seed=3.seed"])
    assert _problems(info) == ['row 2, column "seed": \'2.5\' is not a whole number (3.seed takes '
                               "whole numbers): write digits only, e.g. 42"]


def test_a_json_float_seed_fed_through_bindings_is_caught_by_the_item_rule(tmp_path):
    path = _write(tmp_path, "m.json", json.dumps({"workflowId": WF, "bindings": {"s": "3.seed"},
                                                  "rows": [{"s": 1}, {"s": 2.5}]}))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert _problems(info) == ['row 2, column "s": 2.5 is not a whole number (the schema requires it): '
                               "write digits only, e.g. 42"]


def test_per_kind_validation_still_names_every_bad_row(tmp_path):
    rows = [{"workflowId": WF, "6.text": f"p{i}", "note": "x"} for i in range(500)]
    rows[123]["note"] = {"nested": 1}
    rows[400]["note"] = [1]
    path = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [p.row for p in info.value.problems] == [124, 401]
    assert "is not a single value" in str(info.value)


def test_a_schema_that_does_not_decompose_is_applied_row_by_row(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,3.seed\n{WF},a,1\n{WF},b,2\n")
    schema = _schema(tmp_path, {"if": {"properties": {"6.text": {"const": "b"}}},
                                "then": {"properties": {"3.seed": {"maximum": 1}}}})
    with pytest.raises(ManifestError) as info:
        load_manifest(path, schema_path=schema)
    assert _problems(info) == ['row 2, column "3.seed": 2 is more than the maximum 1: use 1 or less']


def test_a_required_column_missing_everywhere_is_one_problem(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text\n{WF},a\n{WF},b\n")
    schema = _schema(tmp_path, {"required": ["6.text", "7.text"]})
    with pytest.raises(ManifestError) as info:
        load_manifest(path, schema_path=schema)
    assert _problems(info) == ['column "7.text": is missing from every row: add this column (the '
                               "schema requires it)"]


@pytest.mark.parametrize(("text", "expected"), [
    ("{", "is not valid JSON"),
    ('{"type": "objekt"}', "is not a valid JSON Schema (draft 2020-12) at type: 'objekt' is not "
                           "valid"),
])
def test_a_broken_user_schema_names_the_file_and_why(tmp_path, text, expected):
    schema = _write(tmp_path, "broken.schema.json", text)
    path = _write(tmp_path, "m.csv", f"workflowId,6.text\n{WF},a\n")
    with pytest.raises(SchemaError, match=re.escape(expected)) as info:
        load_manifest(path, schema_path=schema)
    assert "broken.schema.json" in str(info.value)


def test_very_deep_json_is_a_problem_not_a_crash(tmp_path):
    depth = 200_000
    path = _write(tmp_path, "deep.json", "[" * depth + "]" * depth)
    with pytest.raises(ManifestError, match="nested more than 32 levels deep"):
        load_manifest(path)
    jsonl = _write(tmp_path, "deep.jsonl", '{"a": ' + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(ManifestError, match="nested more than 32 levels deep"):
        load_manifest(jsonl)


def test_derived_ids_equal_the_documented_content_key(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,3.seed,3.cfg,instanceType\n"
                  f'{WF},"é ""q""\n🙂",7,7.5,plus\n')
    row = load_manifest(path).rows[0]
    assert row.row_id == "r" + content_key(WF, row.node_info_list, row.options)[:16]


def test_defaults_fill_empty_cells_and_send_constant_inputs(tmp_path):
    path = _write(tmp_path, "m.json", json.dumps({
        "workflowId": WF, "bindings": {"p": "6.text"}, "defaults": {"p": "fallback", "3.steps": 20},
        "rows": [{"p": "a", "3.seed": 1}, {"p": None, "3.seed": 2}, {"3.seed": 3}],
    }))
    rows = load_manifest(path).rows
    assert [r.node_info_list[0]["fieldValue"] for r in rows] == ["a", "fallback", "fallback"]
    assert [r.inputs["p"] for r in rows] == ["a", "fallback", "fallback"]
    assert all(r.node_info_list[-1] == {"nodeId": "3", "fieldName": "steps", "fieldValue": 20}
               for r in rows)


def test_an_output_csv_reloads_the_recorded_requests(tmp_path):
    nli = [{"nodeId": "6", "fieldName": "text", "fieldValue": "=sent"},
           {"nodeId": "3", "fieldName": "seed", "fieldValue": 5}]
    header = "row,row_id,workflowId,inputs.6.text,status,taskId,nodeInfoList,options,error\n"
    line = (f'1,keep-1,{WF},"\'=sent",SUCCESS,99,"{json.dumps(nli).replace(chr(34), chr(34) * 2)}",'
            '"{""retainSeconds"": 60}",\n')
    path = _write(tmp_path, "results.csv", header + line)
    manifest = load_manifest(path)
    row = manifest.rows[0]
    assert (row.row_id, row.workflow_id, list(row.node_info_list)) == ("keep-1", WF, nli)
    assert row.options == {"retainSeconds": 60}
    assert manifest.bound == {} and manifest.unbound == ["6.text"]


def test_rows_built_by_the_fast_path_are_ordinary_frozen_rows():
    row = _fast_row(0, 1, "r1", WF, (), {"a": 1}, {})
    assert type(row) is Row and row == Row(0, 1, "r1", WF, (), {"a": 1}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.row_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize("value", ["a \"q\" \\ é 🙂 \u202e\n", "", 0, -5, 2**70, 7.0, 1e-7, 1e300,
                                   True, False])
def test_the_scalar_encoder_matches_the_json_encoder(value):
    assert _enc_scalar(value) == _ENC(value)
    assert not isinstance(value, float) or math.isfinite(value)
