"""Manifests that load: formats, bindings, types, ids, duplicates, output manifests."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import load_manifest

WF = "1904136902449209346"


def _nli(row):
    return {(i["nodeId"], i["fieldName"]): i["fieldValue"] for i in row.node_info_list}


def test_csv_columns_named_node_field_are_sent_with_their_types(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        f"workflowId,6.text,3.seed,3.cfg,57:35.text,note\n"
        f"{WF},a cat,7,7.5,hello,keep me\n{WF},a dog,8,6,bye,\n",
        encoding="utf-8",
    )
    manifest = load_manifest(path)
    assert [r.number for r in manifest.rows] == [1, 2]
    assert _nli(manifest.rows[0]) == {
        ("6", "text"): "a cat", ("3", "seed"): 7, ("3", "cfg"): 7.5, ("57:35", "text"): "hello",
    }
    assert isinstance(_nli(manifest.rows[1])[("3", "cfg")], float)  # "6" in a float column
    assert manifest.bound == {"6.text": "6.text", "3.seed": "3.seed", "3.cfg": "3.cfg",
                              "57:35.text": "57:35.text"}
    assert manifest.unbound == ["note"]
    assert manifest.rows[0].inputs["note"] == "keep me"


def test_bind_option_and_workflow_id_option(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("prompt,seed\na cat,1\na dog,2\n", encoding="utf-8")
    manifest = load_manifest(path, binds=["prompt=6.text", "seed=3.seed"], workflow_id=WF)
    assert [r.workflow_id for r in manifest.rows] == [WF, WF]
    assert _nli(manifest.rows[1]) == {("6", "text"): "a dog", ("3", "seed"): 2}


def test_json_object_with_bindings_and_defaults(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({
        "workflowId": WF,
        "bindings": {"prompt": "6.text"},
        "defaults": {"3.steps": 25},
        "rows": [{"prompt": "a", "3.seed": 1}, {"prompt": "b", "3.seed": 2, "3.steps": 30}],
    }), encoding="utf-8")
    rows = load_manifest(path).rows
    assert _nli(rows[0]) == {("6", "text"): "a", ("3", "seed"): 1, ("3", "steps"): 25}
    assert _nli(rows[1])[("3", "steps")] == 30


def test_jsonl_and_parquet_keep_value_types(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        json.dumps({"workflowId": WF, "6.text": "42", "3.seed": 3, "3.cfg": 7.0}) + "\n",
        encoding="utf-8",
    )
    row = load_manifest(jsonl).rows[0]
    assert _nli(row) == {("6", "text"): "42", ("3", "seed"): 3, ("3", "cfg"): 7.0}
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"workflowId": [WF], "6.text": ["x"], "3.seed": [5]}), parquet)
    assert _nli(load_manifest(parquet).rows[0]) == {("6", "text"): "x", ("3", "seed"): 5}


def test_derived_row_ids_are_stable_and_independent_of_column_order(tmp_path):
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text(f"workflowId,6.text,3.seed\n{WF},a cat,1\n", encoding="utf-8")
    b.write_text(f"3.seed,6.text,workflowId\n1,a cat,{WF}\n", encoding="utf-8")
    first, second = load_manifest(a), load_manifest(b)
    assert first.rows[0].row_id == second.rows[0].row_id
    assert first.rows[0].row_id.startswith("r") and len(first.rows[0].row_id) == 17
    assert load_manifest(a).fingerprint == first.fingerprint


def test_identical_rows_are_refused_unless_kept_on_purpose(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"workflowId,6.text,3.seed\n{WF},a,1\n{WF},a,1\n{WF},b,1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"row 2: sends the same workflow, node inputs and options"):
        load_manifest(path)
    kept = load_manifest(path, allow_duplicates=True)
    ids = [r.row_id for r in kept.rows]
    assert ids[1] == ids[0] + "-2" and len(set(ids)) == 3
    assert kept.duplicates == [(2, 1)]


def test_every_problem_in_the_file_is_reported_at_once(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "workflowId,6.text,row_id\n0,a,x\n" + f"{WF},,y\n" + f"{WF},c,x\n", encoding="utf-8"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    text = str(info.value)
    assert "3 problems" in text
    assert 'row 1, column "workflowId"' in text
    assert 'row 2, column "6.text": is empty' in text
    assert 'row 3, column "row_id"' in text


def test_output_manifest_reloads_exactly_what_was_sent(tmp_path):
    record = {
        "row": 1, "row_id": "keep-me", "workflowId": WF, "inputs": {"6.text": "shown", "n": 1},
        "options": {"instanceType": "plus"},
        "nodeInfoList": [{"nodeId": "6", "fieldName": "text", "fieldValue": "sent"}],
        "status": "SUCCESS", "taskId": "1", "fileUrls": [], "outputs": [], "error": None,
    }
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    row = load_manifest(path).rows[0]
    assert row.row_id == "keep-me"
    assert list(row.node_info_list) == [{"nodeId": "6", "fieldName": "text", "fieldValue": "sent"}]
    assert row.options == {"instanceType": "plus"}
    assert row.inputs["6.text"] == "shown"  # metadata now, not sent
