"""Broken manifests and sweep specs are refused with exit 2, a message naming row, column and fix,
and not one request to RunningHub; valid exotic text goes through byte for byte.

The corpus lives in ``tests/data/bad/`` (small files) and ``tests/data/good/``; big files are
generated into ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEXT2IMG, read_results

from pipeline.cli import cli

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
GOOD = DATA / "good"
MIB = 1 << 20


def _env(sim, key: str) -> dict[str, str]:
    return {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}


def _args(args: list[str]) -> list[str]:
    return [a.replace("{bad}", str(BAD)) for a in args]


# (file in tests/data/bad, extra CLI args, substrings the message must contain)
MANIFESTS: list[tuple[str, list[str], list[str]]] = [
    ("empty.csv", [], ["1 problem, nothing was submitted",
                       "the file is empty: add a header line and at least one row"]),
    ("header_only.csv", [], ["the file has a header but no rows: add at least one row"]),
    ("ragged.csv", [], [
        "row 2: (line 3) has 4 cells but the header has 3: fix the row or quote cells that "
        "contain ','",
        "row 3: (line 4) has 2 cells but the header has 3", "2 problems"]),
    ("unclosed_quote.csv", [], ["row 1: (line 3) unexpected end of data: check the quotes"]),
    ("latin1.csv", [], ["line 2: byte 0xe9 is not UTF-8; re-save the file as UTF-8 (in a "
                        "spreadsheet: Save As, CSV UTF-8)"]),
    ("duplicate_header.csv", [], ['column "6.text": the column appears twice in the header: '
                                  "rename one"]),
    ("empty_header_name.csv", [], ["the header has an empty column name: name every column"]),
    ("duplicate_row_id.csv", [], ['row 2, column "row_id": (line 3) \'r1\' is also the id of row 1: '
                                  "row ids must be unique"]),
    ("duplicate_content.csv", [], [
        "row 3: (line 4) sends the same workflow and node inputs as row 1",
        "remove it, or pass --allow-duplicates to keep it on purpose"]),
    ("missing_workflow_id.csv", [], ['row 1, column "workflowId": (line 2) has no workflow id: '
                                     "add a workflowId column or pass --workflow-id"]),
    ("workflow_id_zero.csv", [], ['row 1, column "workflowId": (line 2) \'0\' is not a workflow '
                                  "id: use the digits from the workflow's URL"]),
    ("workflow_id_not_digits.csv", [], ['row 1, column "workflowId": (line 2) \'abc123\' is not a '
                                        "workflow id: use the digits"]),
    ("float_seed.csv", ["--schema", "{bad}/seed_integer.schema.json"], [
        'row 2, column "3.seed": (line 3) \'12.5\' is not a whole number: write digits only, '
        "e.g. 42"]),
    ("float_seed.json", ["--schema", "{bad}/seed_integer.schema.json"], [
        'row 1, column "3.seed": 12.5 is not of type integer: change the value, or the '
        "schema's type for this column"]),
    ("nan_seed.json", [], ['row 1, column "3.seed": is NaN: write a number']),
    ("wrong_type_cfg.csv", ["--schema", "{bad}/cfg_number.schema.json"], [
        'row 1, column "3.cfg": (line 2) \'seven\' is not a number: write e.g. 7.5']),
    ("formula_cell.csv", [], [
        'row 1, column "6.text": (line 2) \'=HYPERLINK("http://x")\' starts with "=" like a '
        "spreadsheet formula saved without its value: in the spreadsheet paste values only and "
        'save again, or write literal text starting with "=" in a JSON or JSONL manifest']),
    ("json_string.json", [], ["the JSON is a string; expected an array of row objects or an "
                              'object with "rows"']),
    ("json_object_no_rows.json", [], ['a JSON manifest object needs "rows": a list of row objects']),
    ("json_unknown_key.json", [], ["unknown top-level key(s) colums: allowed are workflowId, "
                                   "bindings, defaults, rows"]),
    ("json_bindings_not_strings.json", [], ['"bindings" must map column names to "NODE.FIELD" '
                                            "strings"]),
    ("json_row_not_object.json", [], ["row 2: is a number (42), not an object of column values: "
                                      'write each row as {"column": value, ...}']),
    ("deeply_nested.json", [], ["the JSON is nested too deeply: a row is a flat object of column "
                                "values"]),
    ("jsonl_bad_line.jsonl", [], ["row 2: (line 2) not valid JSON: Expecting property name"]),
    ("jsonl_empty.jsonl", [], ["the file has no rows: write one JSON object per line"]),
    ("jsonl_nested_value.jsonl", [], [
        'row 1, column "6.text": {"nested": "value"} is not a single value: node inputs take '
        "text, numbers or true/false"]),
    ("plain.csv", ["--bind", "seed=3"], [
        "--bind 'seed=3' is not COLUMN=NODE.FIELD: write e.g. --bind seed=3.seed"]),
    ("plain.csv", ["--bind", "nosuch=3.seed"], [
        'column "nosuch": --bind names a column that does not exist; columns are: workflowId, '
        "6.text, 3.seed"]),
    ("base_for_bind.csv", ["--bind", "3.seed=6.text"], [
        'column "3.seed": feeds 6.text, which column \'6.text\' already feeds: bind each input '
        "once"]),
    ("bind_pair.csv", ["--bind", "workflowId=6.text"], [
        'column "workflowId": is a reserved column', "cannot be bound to a node input: rename the "
        "column in the file"]),
    ("needs_bind.csv", [], ["row 1: (line 2) sends no node inputs: add NODE.FIELD columns, --bind, "
                            "or a nodeInfoList"]),
    ("empty_bound_cell.csv", [], [
        'row 2, column "6.text": (line 3) is empty, so 6.text has no value to send: fill it in '
        "(or give a default)", "1 problem,"]),
    ("nli_invalid_json.csv", [], [
        'row 1, column "nodeInfoList": (line 2) is not valid JSON (Expecting \',\' delimiter): '
        'write a list like [{"nodeId": "6"', "1 problem,"]),
    ("nli_missing_fieldname.csv", [], [
        'row 1, column "nodeInfoList": (line 2) item 1 lacks fieldName: each item needs nodeId, '
        "fieldName and fieldValue", "1 problem,"]),
    ("nli_not_list.csv", [], ['row 1, column "nodeInfoList": (line 2) must be a list of {nodeId, '
                              "fieldName, fieldValue}"]),
    ("column_and_nli.csv", [], ['row 1, column "6.text": (line 2) is set both by a column and by '
                                "nodeInfoList: keep one"]),
    ("bad_row_id.csv", [], ['row 1, column "row_id": (line 2) \'row one/1\' may only use letters, '
                            "digits and . _ : - (at most 128): rename it"]),
    ("bad_instance_type.csv", [], ['row 1, column "instanceType": (line 2) \'huge\' is not one of '
                                   '"default", "plus", "ultra": change the value to one the '
                                   "schema allows"]),
    ("retain_out_of_range.csv", [], ['row 1, column "retainSeconds": (line 2) 5000 breaks maximum '
                                     "180"]),
    ("options_not_json.csv", [], ['row 1, column "options": (line 2) is not JSON: write an object '
                                  'like {"instanceType": "plus"}']),
    ("not_parquet.parquet", [], ["not a readable Parquet file"]),
    ("unknown_extension.txt", [], ["unknown manifest format '.txt': use .csv, .tsv, .json, .jsonl "
                                   "or .parquet"]),
    ("plain.csv", ["--schema", "{bad}/not_json.schema.json"], [
        "not_json.schema.json is not valid JSON: Expecting property name"]),
    ("plain.csv", ["--schema", "{bad}/invalid.schema.json"], [
        "invalid.schema.json is not a valid JSON Schema at type: 'objekt' is not valid"]),
]

# The ones also pushed through `run --out` against a simulator.
RUN_SUBSET = {"ragged.csv", "duplicate_row_id.csv", "float_seed.csv", "nan_seed.json",
              "formula_cell.csv", "nli_invalid_json.csv", "column_and_nli.csv", "bind_pair.csv",
              "latin1.csv", "jsonl_nested_value.jsonl"}

SWEEPS: list[tuple[str, list[str]]] = [
    ("sweep_unknown_key.yaml", ["seeds: unknown key 'seeds' (did you mean 'derive_seed'?); allowed "
                                "keys here: version, description, workflowId"]),
    ("sweep_zip_mismatch.yaml", ["axes.zip: zip members have different lengths (cfg: 2, sampler: "
                                 "3); give every member the same number of values, or use "
                                 "product"]),
    ("sweep_missing_file.yaml", ["axes.prompt.file: no_such_prompts.txt not found (looked for ",
                                 "file paths are relative to the spec file"]),
    ("sweep_bad_yaml.yaml", ["line 4 column 1: invalid YAML"]),
    ("sweep_no_workflow.yaml", ["missing required key 'workflowId'; add e.g. workflowId: "]),
    ("sweep_duplicate_value.yaml", ["axes.seed: duplicate value 1 (items 0 and 2); remove one, or "
                                    "set allow_duplicates: true"]),
]


def _id(case: tuple[str, list[str], list[str]]) -> str:
    name, args, _ = case
    return name + ("[" + " ".join(args).replace("{bad}/", "") + "]" if args else "")


def test_the_corpus_is_big_enough():
    assert len(MANIFESTS) + len(SWEEPS) >= 30
    for name, _, _ in MANIFESTS:
        assert (BAD / name).is_file(), name


@pytest.mark.parametrize("case", MANIFESTS, ids=[_id(c) for c in MANIFESTS])
def test_validate_refuses_a_bad_manifest_with_exit_2_and_sends_nothing(case, make_sim, api_key):
    name, args, expected = case
    sim = make_sim()
    result = CliRunner().invoke(cli, ["validate", str(BAD / name), *_args(args)],
                                env=_env(sim, api_key))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: "), result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert result.stdout == ""
    assert sim.audit.requests() == []


RUN_CASES = [c for c in MANIFESTS if c[0] in RUN_SUBSET]


@pytest.mark.parametrize("case", RUN_CASES, ids=[_id(c) for c in RUN_CASES])
def test_run_refuses_a_bad_manifest_before_any_request(case, make_sim, api_key, tmp_path):
    name, args, expected = case
    sim = make_sim()
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(BAD / name), "--out", str(out), "-q",
                                      *_args(args)], env=_env(sim, api_key))
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert "nothing was submitted" in result.stderr or "--bind" in result.stderr
    assert sim.audit.requests() == []
    assert not (out / "state.db").exists()  # fixing the file and running again starts clean


@pytest.mark.parametrize("case", SWEEPS, ids=[c[0] for c in SWEEPS])
def test_sweep_refuses_a_bad_spec_with_exit_2(case, tmp_path):
    from pipeline.errors import SweepError
    from pipeline.sweep import expand_sweep

    name, expected = case
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(cli, ["sweep", str(BAD / name), "-o", str(out)])
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert not out.exists()
    with pytest.raises(SweepError) as info:
        expand_sweep(BAD / name, out)
    assert expected[0] in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# -- generated big inputs -------------------------------------------------------------------


def test_a_prompt_over_1_mib_is_refused_in_csv_and_jsonl(make_sim, api_key, tmp_path):
    sim = make_sim()
    big = "x" * MIB + "y"
    csv_path = tmp_path / "big.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["workflowId", "6.text"], [TEXT2IMG, "small"], [TEXT2IMG, big]])
    jsonl_path = tmp_path / "big.jsonl"
    jsonl_path.write_text(json.dumps({"workflowId": TEXT2IMG, "6.text": big}) + "\n",
                          encoding="utf-8")
    for path, where in ((csv_path, 'row 2, column "6.text": (line 3) the cell holds'),
                        (jsonl_path, 'row 1, column "6.text": the value holds')):
        result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / path.stem),
                                          "-q"], env=_env(sim, api_key))
        assert result.exit_code == 2, result.output
        assert where in result.stderr
        assert f"{MIB + 1} bytes; the limit is {MIB} (1 MiB): shorten it" in result.stderr
    # multi-byte text is measured in bytes, not characters
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps({"workflowId": TEXT2IMG, "6.text": "é" * (MIB // 2 + 1)},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(wide)])
    assert result.exit_code == 2 and f"{MIB + 2} bytes" in result.stderr
    assert sim.audit.requests() == []


def test_every_problem_of_a_big_file_is_reported_at_once(tmp_path):
    path = tmp_path / "many.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workflowId", "6.text", "3.seed"])
        for i in range(5000):
            writer.writerow([TEXT2IMG if i % 1000 else "12x", f"p{i}", i])
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert "5 problems, nothing was submitted" in result.stderr
    for row in (1, 1001, 2001, 3001, 4001):
        assert f'row {row}, column "workflowId": (line {row + 1}) \'12x\'' in result.stderr


# -- good input goes through unchanged ------------------------------------------------------


@pytest.mark.parametrize("name", ["semicolon.csv", "tab.csv", "tab.tsv", "comma_bom.csv"])
def test_other_delimiters_and_a_bom_read_the_same_rows(name):
    from pipeline.manifest import load_manifest

    rows = load_manifest(GOOD / name).rows
    assert [list(r.node_info_list) for r in rows] == [
        [{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat, sitting"},
         {"nodeId": "3", "fieldName": "seed", "fieldValue": 1},
         {"nodeId": "3", "fieldName": "cfg", "fieldValue": 7.5}],
        [{"nodeId": "6", "fieldName": "text", "fieldValue": "a dog"},
         {"nodeId": "3", "fieldName": "seed", "fieldValue": 2},
         {"nodeId": "3", "fieldName": "cfg", "fieldValue": 6.0}],
    ]
    result = CliRunner().invoke(cli, ["validate", str(GOOD / name), "--no-preflight"])
    assert result.exit_code == 0, result.output
    assert "2 rows OK" in result.stdout


def _expected_texts(path: Path) -> dict[str, str]:
    """row_id -> 6.text, read independently of rhbatch."""
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            return {r["row_id"]: r["6.text"] for r in csv.DictReader(fh)}
    with path.open(encoding="utf-8") as fh:
        return {r["row_id"]: r["6.text"] for r in map(json.loads, fh)}


def _round_trip(sim, key: str, manifest: Path, out: Path) -> None:
    result = CliRunner().invoke(
        cli, ["run", str(manifest), "--out", str(out), "-q", "--concurrency", "5",
              "--poll-interval", "0.05", "--account-poll-interval", "0.01"],
        env=_env(sim, key))
    assert result.exit_code == 0, result.output
    expected = _expected_texts(manifest)
    sent = {}
    for task in sim.audit.tasks():
        items = {(i["nodeId"], i["fieldName"]): i["fieldValue"] for i in task["nodeInfoList"]}
        sent[items[("6", "text")]] = task["taskId"]
    records = {r["row_id"]: r for r in read_results(out)}
    assert set(records) == set(expected)
    for row_id, text in expected.items():
        record = records[row_id]
        assert record["status"] == "SUCCESS"
        assert text in sent, f"{row_id}: the simulator never received {text[:40]!r}"
        assert record["taskId"] == sent[text]
        value = {(i["nodeId"], i["fieldName"]): i["fieldValue"] for i in record["nodeInfoList"]}
        assert value[("6", "text")].encode("utf-8") == text.encode("utf-8")
        assert record["inputs"]["6.text"].encode("utf-8") == text.encode("utf-8")


@pytest.mark.parametrize("name", ["exotic.csv", "exotic.jsonl"])
def test_exotic_text_round_trips_byte_for_byte(name, make_sim, api_key, tmp_path):
    sim = make_sim()
    _round_trip(sim, api_key, GOOD / name, tmp_path / "run")


def test_a_1_mb_prompt_round_trips_byte_for_byte(make_sim, api_key, tmp_path):
    sim = make_sim()
    unit = "a cat 🐈 قطة\n\"q\", "
    text = unit * (1_000_000 // len(unit.encode("utf-8")))
    assert 990_000 < len(text.encode("utf-8")) <= MIB
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["row_id", "workflowId", "6.text", "3.seed"],
                                  ["big", TEXT2IMG, text, 1], ["small", TEXT2IMG, "small", 2]])
    _round_trip(sim, api_key, path, tmp_path / "run")
