"""Manifests that load: formats, bindings, types, ids, duplicates, output manifests."""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import Row, cells, load_manifest, read, text_inputs, workflow_ids

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


# -- reading CSV: pyarrow where it reads exactly as csv does, csv everywhere else -------------

CSV_HEADER = f"workflowId,6.text,3.seed,3.cfg\n{WF},"
CSV_SHAPES = {  # name -> (file bytes, read by pyarrow)
    "plain": (f"{CSV_HEADER}a cat,1,7.5\n{WF},a dog,2,7\n", True),
    "quoted delimiters and doubled quotes": (
        f'{CSV_HEADER}"a, ""cat""",1,7.5\n{WF},"",2,7\n{WF},"""",3,7\n', True),
    "CRLF line ends": (f"{CSV_HEADER}a cat,1,7.5\r\n{WF},a dog,2,7\r\n", True),
    "a BOM": ("\ufeff" + f"{CSV_HEADER}a cat,1,7.5\n", True),
    "trailing blank lines": (f"{CSV_HEADER}a cat,1,7.5\n{WF},a dog,2,7\n\n\r\n", True),
    "a trailing delimiter on every line": (
        f"workflowId,6.text,3.seed,\n{WF},a cat,1,\n{WF},a dog,2,\n", True),
    "semicolons": (f"workflowId;6.text;3.seed\n{WF};a, cat;1\n", True),
    "a quoted header": (f'"workflowId","6.text","3.seed"\n"{WF}","a cat","1"\n', True),
    "no newline at the end": (f"{CSV_HEADER}a cat,1,7.5", True),
    "a blank line between rows": (f"{CSV_HEADER}a cat,1,7.5\n\n{WF},a dog,2,x\n", False),
    "a cell over two lines": (f'{CSV_HEADER}"a\ncat",1,7.5\n{WF},a dog,2,x\n', False),
    "text after a closing quote": (f'{CSV_HEADER}"a,"cat,1,7.5\n', False),
    "a quote inside a cell": (f'{CSV_HEADER}a "cat",1,7.5\n', False),
    "a line of delimiters only": (f"{CSV_HEADER}a cat,1,7.5\n,,,\n{WF},a dog,x,7\n", False),
    "a row with a cell too many": (f"{CSV_HEADER}a cat,1,7.5,9\n", False),
    "lone CR line ends after the header": (f"{CSV_HEADER}a cat,1,7.5\r{WF},a dog,2,7\r", True),
    "lone CR line ends": (f"{CSV_HEADER}a cat,1,7.5\r{WF},a dog,2,7\r".replace("\n", "\r"), False),
    "an unclosed quote": (f'{CSV_HEADER}"a cat,1,7.5\n{WF},a dog,2,7\n', False),
    "a nameless column with a value": (f"workflowId,6.text,\n{WF},a cat,1\n", False),
    "a repeated column name": (f"workflowId,6.text,6.text\n{WF},a,b\n", False),
    "a leading blank line": (f"\n{CSV_HEADER}a cat,1,7.5\n", False),
    "no rows": ("workflowId,6.text\n", False),
}


def _outcome(path, **kwargs):
    """What loading ``path`` gives, as plain data: every row and the manifest, or the error."""
    try:
        manifest = load_manifest(path, **kwargs)
    except ManifestError as exc:
        rows = [dataclasses.astuple(r) for r in exc.manifest.rows] \
            if getattr(exc, "manifest", None) is not None else None
        return "error", str(exc), rows
    return ("ok", [dataclasses.astuple(r) for r in manifest.rows], manifest.fingerprint,
            manifest.bound, manifest.unbound, manifest.duplicates)


@pytest.mark.parametrize("name", CSV_SHAPES)
def test_pyarrow_reads_a_csv_exactly_as_the_csv_module_does(tmp_path, monkeypatch, name):
    text, by_arrow = CSV_SHAPES[name]
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode("utf-8"))
    assert (read._read_csv_arrow(path.read_bytes(), None) is not None) is by_arrow
    first = _outcome(path)
    monkeypatch.setattr(read, "_read_csv_arrow", lambda data, delimiter: None)
    assert _outcome(path) == first


MANY = cells.VECTOR_MIN_DISTINCT + 10


@pytest.mark.parametrize(("name", "seed"), [
    ("plain", str),
    ("a negative seed", lambda i: str(i - 5)),
    ("an empty cell", lambda i: "" if i == 7 else str(i)),
    ("a seed past 2**64-1", lambda i: str(2**64 + i) if i == 3 else str(i)),
    ("a leading zero", lambda i: "07" if i == 7 else str(i)),
    ("a plus sign", lambda i: f"+{i}" if i == 2 else str(i)),
    ("a 7.0", lambda i: f"{i}.0" if i == 9 else str(i)),
])
def test_a_column_of_many_integers_is_typed_as_one_value_at_a_time(tmp_path, monkeypatch, name, seed):
    path = tmp_path / "m.csv"
    path.write_text("workflowId,6.text,3.seed,count\n" + "".join(
        f"{WF},a cat,{seed(i)},{seed(i)}\n" for i in range(MANY)), encoding="utf-8")
    typed_by_arrow: dict[str | None, bool] = {}
    plain = cells._plain_integers

    def spy(column, field_name):
        result = plain(column, field_name)
        typed_by_arrow[field_name] = result is not None
        return result

    monkeypatch.setattr(cells, "_plain_integers", spy)
    first = _outcome(path)
    by_arrow = name in ("plain", "a negative seed", "an empty cell")
    assert typed_by_arrow == {"text": False, "seed": by_arrow, None: by_arrow}
    monkeypatch.setattr(cells, "_plain_integers", lambda *args: None)
    assert _outcome(path) == first


def test_loading_leaves_the_collector_and_the_csv_field_limit_as_they_were(tmp_path):
    long_cell = "x" * (csv.field_size_limit() + 1)  # over csv's default limit: loads all the same
    good = tmp_path / "good.csv"  # the blank line makes the csv module read it
    good.write_text(f"{CSV_HEADER}{long_cell},1,7.5\n\n{WF},a dog,2,7\n", encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text(f'{CSV_HEADER}"{long_cell},1,7.5\n', encoding="utf-8")
    limit = csv.field_size_limit()
    try:
        for collecting in (True, False):
            (gc.enable if collecting else gc.disable)()
            assert load_manifest(good).rows[0].inputs["6.text"] == long_cell
            assert (gc.isenabled(), csv.field_size_limit()) == (collecting, limit)
            with pytest.raises(ManifestError, match="a quote is not closed"):
                load_manifest(bad)
            assert (gc.isenabled(), csv.field_size_limit()) == (collecting, limit)
    finally:
        gc.enable()


def test_rows_are_a_sequence_of_rows_made_when_read(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"{CSV_HEADER}a cat,1,7.5\n{WF},a dog,2,7\n{WF},a cow,3,7\n", encoding="utf-8")
    rows = load_manifest(path).rows
    listed = list(rows)
    assert len(rows) == 3 and [type(r) for r in listed] == [Row] * 3
    assert rows == listed and listed == rows
    assert rows[-1] == listed[2] and rows[1:] == listed[1:] and rows[::2] == listed[::2]
    assert [r.number for r in rows] == [1, 2, 3]
    with pytest.raises(IndexError):
        rows[3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].row_id = "x"  # type: ignore[misc]


def _text_items(rows):
    """Every text item the rows send, as iterating them gives it: (number, position, wf, item)."""
    return sorted((r.number, p, r.workflow_id, json.dumps(i)) for r in rows
                  for p, i in enumerate(r.node_info_list) if isinstance(i["fieldValue"], str))


def test_text_inputs_and_workflow_ids_read_the_columns_as_the_rows_would(tmp_path):
    other = "1904136902449209347"
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"workflowId": WF, "6.text": "a cat", "3.seed": 1, "7.image": "@cat.png"},
        {"workflowId": other, "6.text": "a cat", "3.seed": 2, "7.image": "@cat.png"},
        {"workflowId": WF, "6.text": "a dog", "3.seed": 3, "7.image": "@dog.png",
         "nodeInfoList": [{"nodeId": "9", "fieldName": "name", "fieldValue": "x"}]},
        {"workflowId": WF, "6.text": "a cow", "3.seed": math.nan, "7.image": "@cow.png"},
    ]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    checkable = info.value.manifest.rows  # row 4 without its unreadable seed
    assert [len(r.node_info_list) for r in checkable] == [3, 3, 4, 2]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"{CSV_HEADER}a cat,1,7.5\n{other},a cat,2,7.5\n{WF},a dog,3,7.5\n",
                        encoding="utf-8")
    for rows in (checkable, load_manifest(csv_path).rows):
        got = sorted((n, p, w, json.dumps(i)) for w, i, numbers, p in text_inputs(rows)
                     for n in numbers)
        assert got == _text_items(rows) == _text_items(list(rows))
        assert workflow_ids(rows) == workflow_ids(list(rows)) == sorted({WF, other})
    assert [numbers for w, i, numbers, p in text_inputs(load_manifest(csv_path).rows)
            if i["fieldValue"] == "a cat"] == [[1], [2]]  # one per workflow
