"""Broken manifests and sweep specs are refused with exit 2, a message naming row, column and fix,
and not one request to RunningHub; valid exotic text goes through byte for byte.

The corpus lives in ``tests/data/bad/`` (small files) and ``tests/data/good/``; big files are
generated into ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEXT2IMG, read_results

from pipeline.cli import cli

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
GOOD = DATA / "good"
MIB = 1 << 20
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # shown escaped, never raw


def _env(sim, key: str) -> dict[str, str]:
    return {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}


def _sent(sim) -> list[dict]:
    """Every request but reads of the workflow's API JSON (free: validate and run fetch it to
    check the rows against the workflow in the same pass as the schema)."""
    return [r for r in sim.audit.requests() if r["route"] != "get_json_api_format"]


def _args(args: list[str]) -> list[str]:
    return [a.replace("{bad}", str(BAD)) for a in args]


# (file in tests/data/bad, extra CLI args, substrings the message must contain)
MANIFESTS: list[tuple[str, list[str], list[str]]] = [
    ("empty.csv", [], ["1 problem, nothing was submitted",
                       "the file is empty: write a header line (e.g. workflowId,6.text,3.seed) and "
                       "at least one row"]),
    ("header_only.csv", [], ["the file has a header but no rows: add at least one row under the "
                             "header"]),
    ("ragged.csv", [], [
        "row 2: has 4 cells but the header has 3 (CSV line 3): fix the row, or quote cells that "
        "contain ','",
        "row 3: has 2 cells but the header has 3 (CSV line 4)", "2 problems"]),
    ("unclosed_quote.csv", [], ["row 1: unexpected end of data (CSV line 3): a quote is not "
                                "closed; check the quotes from this row on"]),
    ("latin1.csv", [], ["line 2 has bytes that are not UTF-8 (e9 2c 31 0a): re-save the file as "
                        "UTF-8 (in a spreadsheet: Save As > CSV UTF-8)"]),
    ("duplicate_header.csv", [], ['column "6.text": appears twice in the header: rename one of '
                                  "them"]),
    ("empty_header_name.csv", [], ["column 2 has no name in the header: name it"]),
    ("duplicate_row_id.csv", [], ['row 2, column "row_id": \'r1\' is also the id of row 1: row '
                                  "ids must be unique"]),
    ("duplicate_content.csv", [], [
        "row 3: sends the same workflow, node inputs and options as row 1",
        "remove it, change a value such as the seed, or pass --allow-duplicates"]),
    ("missing_workflow_id.csv", [], [
        'column "workflowId": no row has a workflow id: add a workflowId column, give "workflowId" '
        "in a JSON manifest, or pass --workflow-id ID"]),
    ("workflow_id_zero.csv", [], ['row 1, column "workflowId": \'0\' is not a workflow id: use '
                                  "the digits from the workflow's URL, e.g. 1904136902449209346"]),
    ("workflow_id_not_digits.csv", [], ['row 1, column "workflowId": \'abc123\' is not a '
                                        "workflow id: use the digits"]),
    ("float_seed.csv", ["--schema", "{bad}/seed_integer.schema.json"], [
        'row 2, column "3.seed": \'12.5\' is not a whole number (3.seed takes whole numbers): '
        "write digits only, e.g. 42"]),
    ("float_seed.json", ["--schema", "{bad}/seed_integer.schema.json"], [
        'row 1, column "3.seed": 12.5 is not a whole number (the schema requires it): write '
        "digits only, e.g. 42"]),
    ("nan_seed.json", [], ['row 1, column "3.seed": is NaN (an empty cell?): write a number']),
    ("wrong_type_cfg.csv", ["--schema", "{bad}/cfg_number.schema.json"], [
        'row 1, column "3.cfg": \'seven\' is not a number (3.cfg takes numbers): write e.g. 7.5']),
    ("formula_cell.csv", [], [
        'row 1, column "6.text": \'=HYPERLINK("http://x")\' starts with "="']),
    ("json_string.json", [], ["the JSON is 'just a string'; expected an array of row objects, or "
                              'an object {"workflowId": ...']),
    ("json_object_no_rows.json", [], ['the JSON object has no "rows" list; expected an array of '
                                      "row objects"]),
    ("json_unknown_key.json", [], ["unknown top-level key(s) 'colums': allowed are workflowId, "
                                   "bindings, defaults, rows, description"]),
    ("json_bindings_not_strings.json", [], ['column "prompt": bindings: 6 is not "NODE.FIELD": '
                                            'write e.g. "6.text"']),
    ("json_row_not_object.json", [], ["row 2: is 42, not an object of column values: write "
                                      '{"column": value, ...}']),
    ("deeply_nested.json", [], ["the JSON is nested more than 32 levels deep: a row is a flat "
                                "object of column values"]),
    ("jsonl_bad_line.jsonl", [], ["row 2: line 2 is not valid JSON (Expecting property name",
                                  "write one complete JSON object per line"]),
    ("jsonl_empty.jsonl", [], ["the file has no rows: write one JSON object per line"]),
    ("jsonl_nested_value.jsonl", [], [
        'row 1, column "6.text": {"nested": "value"} is not a single value: 6.text takes text, '
        "a number or true/false"]),
    ("plain.csv", ["--bind", "seed=3"], [
        "--bind 'seed=3' is not COLUMN=NODE.FIELD: write e.g. --bind seed=3.seed"]),
    ("plain.csv", ["--bind", "nosuch=3.seed"], [
        'column "nosuch": is bound to 3.seed but there is no such column; the columns are: '
        "6.text, 3.seed"]),
    ("base_for_bind.csv", ["--bind", "3.seed=6.text"], [
        'column "3.seed": feeds 6.text, which column \'6.text\' feeds already: bind each node '
        "input once"]),
    ("bind_pair.csv", ["--bind", "workflowId=6.text"], [
        'column "workflowId": is a reserved column']),
    ("needs_bind.csv", [], ["no column sends a node input: name columns NODE.FIELD (e.g. 6.text), "
                            "bind one with --bind COLUMN=NODE.FIELD (columns: prompt, seed)"]),
    ("empty_bound_cell.csv", [], [
        'row 2, column "6.text": is empty, so 6.text has no value to send: fill it in',
        "1 problem,"]),
    ("nli_invalid_json.csv", [], [
        'row 1, column "nodeInfoList": is not valid JSON (Expecting \',\' delimiter at character '
        '56): write a list like [{"nodeId": "6"', "1 problem,"]),
    ("nli_missing_fieldname.csv", [], [
        'row 1, column "nodeInfoList": item 1 lacks fieldName: each item needs nodeId, '
        "fieldName and fieldValue", "1 problem,"]),
    ("nli_not_list.csv", [], ['row 1, column "nodeInfoList": {"nodeId": "6"} is not a list: write '
                              "a list like"]),
    ("column_and_nli.csv", [], ['row 1, column "6.text": sets 6.text, which this row\'s '
                                "nodeInfoList sets too: keep one of them"]),
    ("bad_row_id.csv", [], ['row 1, column "row_id": \'row one/1\' is not a valid row id: use 1 '
                            "to 128 letters, digits, '.', '_', ':' or '-'"]),
    ("bad_instance_type.csv", [], ['row 1, column "instanceType": \'huge\' is not one of '
                                   "'default', 'plus', 'ultra': use one of these"]),
    ("retain_out_of_range.csv", [], ['row 1, column "retainSeconds": 5000 is more than the maximum '
                                     "180: use 180 or less"]),
    ("options_not_json.csv", [], ['row 1, column "options": \'{instanceType: plus}\' is not JSON: '
                                  'write an object like {"instanceType": "plus"}']),
    ("not_parquet.parquet", [], ["not a readable Parquet file (", "re-export it, or use CSV or "
                                 "JSONL"]),
    ("unknown_extension.txt", [], ["unknown manifest format '.txt': name the file .csv, .tsv, "
                                   ".json, .jsonl, .ndjson or .parquet"]),
    ("plain.csv", ["--schema", "{bad}/not_json.schema.json"], [
        "not_json.schema.json is not valid JSON (Expecting property name",
        "fix the JSON syntax"]),
    ("plain.csv", ["--schema", "{bad}/invalid.schema.json"], [
        "invalid.schema.json is not a valid JSON Schema (draft 2020-12) at type: 'objekt' is not "
        "valid"]),
]

# Issue #12, odd inputs: each is refused with its row, column and fix, and also run (below).
ODD_INPUTS: list[tuple[str, list[str], list[str]]] = [
    # a key given twice in one JSON object (JSON would keep the last one silently)
    ("jsonl_duplicate_key.jsonl", [], [
        'row 2, column "6.text": appears more than once in this row: keep one of them (JSON would '
        "keep only the last one, silently)", "1 problem,"]),
    ("json_duplicate_key.json", [], [
        'row 1, column "3.seed": appears more than once in this row: keep one of them']),
    ("json_duplicate_binding.json", [], [
        'column "bindings.prompt": is given more than once: keep one of them (JSON would keep only '
        "the last one, silently)"]),
    ("json_duplicate_nested_key.json", [], [
        "row 1, column \"nodeInfoList\": has the key 'fieldValue' more than once: keep one of them"]),
    ("nli_duplicate_key.csv", [], [
        "row 1, column \"nodeInfoList\": has the key 'nodeId' more than once: keep one of them"]),
    ("options_duplicate_key.csv", [], [
        "row 1, column \"options\": has the key 'retainSeconds' more than once: keep one of them"]),
    # integers: a seed is 0 to 2**64-1, any other integer fits in 64 bits
    ("seed_2_70.csv", [], [
        "row 2, column \"3.seed\": '1180591620717411303424' is outside the seed range 0 to "
        "18446744073709551615 (2**64-1, ComfyUI's largest seed): use a seed in that range, e.g. 42",
        "1 problem,"]),
    ("seed_negative.csv", [], [
        "row 1, column \"3.seed\": '-1' is outside the seed range 0 to 18446744073709551615"]),
    ("seed_2_70.json", [], [
        'row 1, column "3.seed": 1180591620717411303424 is outside the seed range 0 to '
        "18446744073709551615"]),
    ("noise_seed_negative.jsonl", [], [
        'row 1, column "10.noise_seed": -5 is outside the seed range 0 to 18446744073709551615 '
        "(2**64-1, ComfyUI's largest seed): use a seed in that range"]),
    ("int64_overflow.csv", [], [
        "row 1, column \"9.count\": '9223372036854775808' is outside -2**63 to 2**63-1 "
        "(-9223372036854775808 to 9223372036854775807), the widest integer RunningHub and a Parquet "
        "manifest carry: use a smaller number"]),
    ("nli_seed_too_big.json", [], [
        'row 1, column "nodeInfoList": item 1 (3.seed): 18446744073709551616 is outside the seed '
        "range 0 to 18446744073709551615"]),
    ("seed_5000_digits.csv", [], [  # was a crash: Python will not convert 5000 digits
        "row 1, column \"3.seed\": '99999999999999999999999999999999999999999999999999999999"
        "9...' is outside the seed range 0 to 18446744073709551615"]),
    ("defaults_seed_too_big.json", [], [
        'column "defaults.3.seed": 18446744073709551616 is outside the seed range 0 to '
        "18446744073709551615"]),
    ("seed_float_huge.json", [], [
        'row 1, column "3.seed": 1e+300 is outside the seed range 0 to 18446744073709551615']),
    # NaN and infinity cannot be sent as strict JSON
    ("cfg_nan.csv", [], [
        "row 2, column \"3.cfg\": 'nan' is not a finite number (3.cfg takes numbers, and NaN or "
        "infinity cannot be sent as JSON): write a number, e.g. 7.5", "1 problem,"]),
    ("float_column_inf.csv", [], [
        "row 2, column \"9.strength\": 'inf' is not a finite number (9.strength takes numbers, and "
        "NaN or infinity cannot be sent as JSON): write a number, e.g. 7.5"]),
    ("json_infinity_cfg.json", [], ['row 1, column "3.cfg": is -Infinity (an empty cell?): write a '
                                    "number"]),
    ("json_nan_nli.json", [], ['row 1, column "nodeInfoList": item 1 (3.cfg) has fieldValue NaN: '
                               "send text, a number or true/false"]),
    # a number in quotes
    ("seed_quoted.json", [], [
        "row 1, column \"3.seed\": '12' is not a whole number (the schema requires it): remove the "
        'quotes (write 12, not "12")']),
    ("cfg_quoted.jsonl", [], [
        "row 1, column \"3.cfg\": '7.5' is not a number (the schema requires it): remove the quotes "
        '(write 7.5, not "7.5")']),
    # control characters are shown escaped, never raw
    ("nul_header.csv", [], [
        'column "3.se\\x00ed": the name holds a control character: retype the name, with letters, '
        "digits and punctuation only"]),
    ("escape_in_json_key.jsonl", [], [
        'column "6.te\\x1b[2Jxt": the name holds a control character: retype the name']),
    ("utf16_no_bom.csv", [], ["the file is UTF-16 text, not UTF-8: re-save it as UTF-8 (in a "
                              "spreadsheet: Save As > CSV UTF-8)"]),
    # --bind
    ("bind_twice.csv", ["--bind", "prompt=6.text", "--bind", "prompt=7.text"], [
        'column "prompt": --bind prompt=6.text and --bind prompt=7.text both bind this column, and a '
        "column feeds one node input: keep one --bind (to send one value to two inputs, copy the "
        "column under another name and bind the copy)"]),
    ("bind_target_is_column.csv", ["--bind", "prompt=6.text"], [
        'column "6.text": feeds 6.text, which column \'prompt\' feeds already: bind each node input '
        "once"]),
    ("two_columns_one_target.csv", ["--bind", "prompt=6.text", "--bind", "subject=6.text"], [
        'column "subject": feeds 6.text, which column \'prompt\' feeds already: bind each node '
        "input once"]),
]
MANIFESTS += ODD_INPUTS

# The ones also pushed through `run --out` against a simulator.
RUN_SUBSET = {"ragged.csv", "duplicate_row_id.csv", "float_seed.csv", "nan_seed.json",
              "formula_cell.csv", "nli_invalid_json.csv", "column_and_nli.csv", "bind_pair.csv",
              "latin1.csv", "jsonl_nested_value.jsonl", *(c[0] for c in ODD_INPUTS)}

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

# Issue #12: what `rhbatch validate` would refuse in the written manifest is a spec error.
ODD_SWEEPS: list[tuple[str, list[str]]] = [
    ("sweep_workflow_not_digits.yaml", [
        'workflowId: "12ab" is not a workflow id; use the digits from the workflow\'s URL, e.g. '
        'workflowId: "1904136902449209346" (not 0)']),
    ("sweep_formula_csv.yaml", [
        'axes.prompt[1]: rhbatch validate would refuse this value in the .csv manifest (column '
        '"6.text": \'=1+1\' starts with "=": a spreadsheet formula was saved instead of its value;',
        "; or write the sweep to .jsonl or .parquet, which keep the value as it is"]),
    ("sweep_empty_prompt_csv.yaml", [
        'axes.prompt[1]: rhbatch validate would refuse this value in the .csv manifest (column '
        '"6.text": is empty, so 6.text has no value to send:',
        "; or write the sweep to .jsonl or .parquet, which keep the value as it is"]),
    ("sweep_seed_negative.yaml", [
        'axes.seed.range: rhbatch validate would refuse this value in the .csv manifest (column '
        '"3.seed": -2 is outside the seed range 0 to 18446744073709551615 (2**64-1, ComfyUI\'s '
        "largest seed): use a seed in that range, e.g. 42)"]),
    ("sweep_seed_text.yaml", [
        'axes.seed[0]: rhbatch validate would refuse this value in the .csv manifest (column '
        '"3.seed": \'one\' is not a whole number (the schema requires it): write digits only',
        "axes.seed[1]: rhbatch validate would refuse this value in the .csv manifest (column "
        '"3.seed": \'two\' is not a whole number']),
    ("sweep_node_not_digits.yaml", [
        'bindings.prompt: "clip.text": the node id "clip" is not digits (like 6 or 57:35), so the '
        "manifest would keep this column as metadata and never send it; use the node's id"]),
    ("sweep_option_name.yaml", [
        "constants.instanceType: 'instanceType' is reserved: a manifest reads a column "
        "'instanceType' as a task option, not as metadata; choose another name"]),
    ("sweep_control_name.yaml", [
        'axes["6.te\\u0007xt"]: the name "6.te\\u0007xt" holds a control character; names become '
        "column names in the manifest: use letters, digits and punctuation only"]),
]
SWEEPS += ODD_SWEEPS


def _values(case):
    return case.values if hasattr(case, "values") else case


def _id(case) -> str:
    name, args, _ = _values(case)
    return name + ("[" + " ".join(args).replace("{bad}/", "") + "]" if args else "")


def _cases(cases):
    """Each case as one parameter, keeping its xfail mark."""
    out = []
    for case in cases:
        marks = case.marks if hasattr(case, "marks") else ()
        out.append(pytest.param(_values(case), marks=marks, id=_id(case)))
    return out


def test_the_corpus_is_big_enough():
    assert len(MANIFESTS) + len(SWEEPS) >= 30
    assert len(ODD_INPUTS) + len(ODD_SWEEPS) >= 20
    for case in MANIFESTS:
        assert (BAD / _values(case)[0]).is_file(), case
    for name, _ in SWEEPS:
        assert (BAD / name).is_file(), name


@pytest.mark.parametrize("case", _cases(MANIFESTS))
def test_validate_refuses_a_bad_manifest_with_exit_2_and_sends_nothing(case, make_sim, api_key):
    name, args, expected = case
    sim = make_sim()
    result = CliRunner().invoke(cli, ["validate", str(BAD / name), *_args(args)],
                                env=_env(sim, api_key))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: "), result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert RAW_CONTROL.search(result.stderr) is None, repr(result.stderr)
    assert result.stdout == ""
    assert _sent(sim) == []


RUN_CASES = [c for c in MANIFESTS if _values(c)[0] in RUN_SUBSET]


@pytest.mark.parametrize("case", _cases(RUN_CASES))
def test_run_refuses_a_bad_manifest_before_any_request(case, make_sim, api_key, tmp_path):
    name, args, expected = case
    sim = make_sim()
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(BAD / name), "--out", str(out), "-q",
                                      *_args(args)], env=_env(sim, api_key))
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert "nothing was submitted" in result.stderr
    assert _sent(sim) == []
    assert_no_state_left(out)


def assert_no_state_left(out: Path) -> None:
    """Fixing the file and running again starts clean: no state.db, no results, no log. (run
    takes its lock in DIR before it reads the manifest, so DIR and its .lock may exist.)"""
    assert not (out / "state.db").exists()
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}, list(out.iterdir())


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
    for path, row in ((csv_path, 2), (jsonl_path, 1)):
        result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / path.stem),
                                          "-q"], env=_env(sim, api_key))
        assert result.exit_code == 2, result.output
        assert (f'row {row}, column "6.text": holds {MIB + 1:,} bytes, more than the {MIB:,}-byte '
                "(1 MiB) limit for one value: shorten it") in result.stderr
    # multi-byte text is measured in bytes, not characters
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps({"workflowId": TEXT2IMG, "6.text": "é" * (MIB // 2 + 1)},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(wide)])
    assert result.exit_code == 2 and f"holds {MIB + 2:,} bytes" in result.stderr
    assert _sent(sim) == []


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
        assert f'row {row}, column "workflowId": \'12x\' is not a workflow id' in result.stderr


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
        # a 1 MB cell is past csv's default field limit (rhbatch's loader raises its own and puts
        # the process-wide limit back: so must this reader)
        limit = csv.field_size_limit(1 << 24)
        try:
            with path.open(encoding="utf-8", newline="") as fh:
                return {r["row_id"]: r["6.text"] for r in csv.DictReader(fh)}
        finally:
            csv.field_size_limit(limit)
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
