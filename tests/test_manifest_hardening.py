"""Issue #12, odd inputs: line separators inside JSONL strings, repeated JSON keys and --bind,
integer ranges, NaN, paths that are not files, control characters in messages, and what a sweep
writes passing validate. The small bad files live in ``tests/data/bad`` (see test_bad_input.py);
these tests build what a file cannot hold (a FIFO, exact boundaries) in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, TEXT2IMG, read_results

from pipeline.cli import cli
from pipeline.errors import InputError, ManifestError, SweepError
from pipeline.manifest import check_manifest_path, column_problems, load_manifest, read_file_bytes
from pipeline.sweep import expand_sweep

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "tests" / "data" / "sweeps"
BAD = ROOT / "tests" / "data" / "bad"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # any but "\n"
# Every break str.splitlines() knows besides "\n" and "\r\n".
SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _problems(info: pytest.ExceptionInfo[ManifestError]) -> list[str]:
    return [str(p) for p in info.value.problems]


def _validate(*args: str) -> object:
    return CliRunner().invoke(cli, ["validate", *args, "--no-preflight"])


# -- 1. JSONL is split at "\n" only ------------------------------------------------------------


def test_jsonl_keeps_every_other_line_break_inside_its_strings(tmp_path):
    texts = [f"before{sep}after" for sep in SEPARATORS]
    lines = [json.dumps({"workflowId": TEXT2IMG, "6.text": t, "3.seed": i}, ensure_ascii=False)
             for i, t in enumerate(texts)]
    for line, sep in zip(lines, SEPARATORS, strict=True):
        if sep not in "\x0b\x0c\x1c\x1d\x1e\r":  # json.dumps escapes the C0 controls itself
            assert sep in line
    path = _write(tmp_path, "m.jsonl", "\r\n".join(lines) + "\r\n")  # CRLF line ends are fine too
    rows = load_manifest(path).rows
    assert [r.inputs["6.text"] for r in rows] == texts
    assert [r.number for r in rows] == list(range(1, len(texts) + 1))


def test_raw_separators_in_a_jsonl_string_are_text_and_the_line_numbers_count_newlines(tmp_path):
    # U+2028/U+2029/U+0085 are legal raw inside JSON strings (the C0 ones are not)
    raw = f'{{"workflowId": "{TEXT2IMG}", "6.text": "a\u2028b\u2029c\x85d"}}'
    path = _write(tmp_path, "m.jsonl", raw + "\n\n" + '{"workflowId": 1,}\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert _problems(info) == [
        "row 2: line 3 is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 18 (char 17)): write one complete JSON object per line"]
    path.write_text(raw + "\n", encoding="utf-8")
    assert load_manifest(path).rows[0].inputs["6.text"] == "a\u2028b\u2029c\x85d"


def test_a_runs_own_results_jsonl_reproduces_it_with_separators_in_the_prompts(make_sim, api_key,
                                                                                 tmp_path):
    sim = make_sim()
    env = {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": sim.base_url}
    prompts = [f"a cat{sep}on a mat" for sep in SEPARATORS]
    manifest = _write(tmp_path, "m.jsonl", "".join(
        json.dumps({"workflowId": TEXT2IMG, "6.text": p, "3.seed": i}, ensure_ascii=False) + "\n"
        for i, p in enumerate(prompts)))
    first, second = tmp_path / "first", tmp_path / "second"
    for source, out in ((manifest, first), (first / "results.jsonl", second)):
        result = CliRunner().invoke(cli, ["run", str(source), "--out", str(out), "-q", "--concurrency",
                                          "5", *FAST_FLAGS], env=env)
        assert result.exit_code == 0, result.output
    sent = [t["nodeInfoList"] for t in sim.audit.tasks()]
    assert len(sent) == 2 * len(prompts)
    for run in (first, second):
        records = read_results(run)
        assert [r["nodeInfoList"][0]["fieldValue"] for r in records] == prompts
    assert [r["row_id"] for r in read_results(first)] == [r["row_id"] for r in read_results(second)]
    assert sorted(map(json.dumps, sent[:len(prompts)])) == sorted(map(json.dumps, sent[len(prompts):]))


# -- 2. repeated JSON keys -------------------------------------------------------------------


def test_every_repeated_key_is_reported_with_its_row(tmp_path):
    path = _write(tmp_path, "m.jsonl", "\n".join([
        f'{{"workflowId": "{TEXT2IMG}", "6.text": "a", "6.text": "b", "3.seed": 1, "3.seed": 2}}',
        f'{{"workflowId": "{TEXT2IMG}", "6.text": "c"}}',
        f'{{"workflowId": "{TEXT2IMG}", "6.text": "d", "options": {{"retainSeconds": 60, '
        '"retainSeconds": 90}}',
    ]) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    keep = "keep one of them (JSON would keep only the last one, silently)"
    assert _problems(info) == [
        f'row 1, column "6.text": appears more than once in this row: {keep}',
        f'row 1, column "3.seed": appears more than once in this row: {keep}',
        f"row 3, column \"options\": has the key 'retainSeconds' more than once: {keep}",
    ]


def test_a_repeated_top_level_key_of_a_json_manifest_is_refused(tmp_path):
    path = _write(tmp_path, "m.json", f'{{"workflowId": "1", "workflowId": "{TEXT2IMG}", '
                                      '"rows": [{"6.text": "a"}]}')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert _problems(info) == ['column "workflowId": appears more than once in the file\'s top-level '
                               "object: keep one of them (JSON would keep only the last one, silently)"]


def test_the_same_key_in_different_objects_is_fine(tmp_path):
    path = _write(tmp_path, "m.json", json.dumps([
        {"workflowId": TEXT2IMG, "nodeInfoList": [
            {"nodeId": "6", "fieldName": "text", "fieldValue": "a"},
            {"nodeId": "3", "fieldName": "seed", "fieldValue": 1}]}]))
    assert len(load_manifest(path).rows[0].node_info_list) == 2


# -- 3. --bind ---------------------------------------------------------------------------------


def test_the_same_bind_given_twice_is_harmless(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,prompt\n{TEXT2IMG},a cat\n")
    manifest = load_manifest(path, binds=["prompt=6.text", "prompt=6.text"])
    assert manifest.bound == {"prompt": "6.text"}


def test_a_bind_with_a_control_character_is_refused_and_shown_escaped(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,prompt\n{TEXT2IMG},a cat\n")
    with pytest.raises(InputError) as info:
        load_manifest(path, binds=["prompt=6.te\x1bxt"])
    assert str(info.value).startswith("--bind 'prompt=6.te\\x1bxt' is not COLUMN=NODE.FIELD: write e.g.")


# -- 4. integers and NaN -----------------------------------------------------------------------


@pytest.mark.parametrize(("column", "good", "bad"), [
    ("3.seed", [0, 2**64 - 1], [-1, 2**64]),
    ("5.noise_seed", [0, 2**64 - 1], [-1, 2**64]),
    ("3.steps", [-(2**63), 2**63 - 1], [-(2**63) - 1, 2**63]),
    ("note", [-(2**63), 2**63 - 1], [2**63]),  # metadata too: it goes to results.parquet
])
def test_integer_ranges_in_csv_and_jsonl(tmp_path, column, good, bad):
    for value in good:
        csv_path = _write(tmp_path, "ok.csv", f"workflowId,6.text,{column}\n{TEXT2IMG},a,{value}\n")
        jsonl_path = _write(tmp_path, "ok.jsonl", json.dumps({"workflowId": TEXT2IMG, "6.text": "a",
                                                              column: value}) + "\n")
        for path in (csv_path, jsonl_path):
            assert load_manifest(path).rows[0].inputs[column] == value
    for value in bad:
        path = _write(tmp_path, "bad.jsonl", json.dumps({"workflowId": TEXT2IMG, "6.text": "a",
                                                         column: value}) + "\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        (problem,) = _problems(info)
        assert problem.startswith(f'row 1, column "{column}": {value} is outside ')
        assert problem.endswith(": use a seed in that range, e.g. 42" if "seed" in column
                                else ": use a smaller number")


def test_a_bound_seed_column_and_nodeinfolist_items_have_the_seed_range(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,s\n{TEXT2IMG},a,{2**64 - 1}\n{TEXT2IMG},b,{2**64}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path, binds=["s=3.seed"])
    assert _problems(info) == [
        "row 2, column \"s\": '18446744073709551616' is outside the seed range 0 to "
        "18446744073709551615 (2**64-1, ComfyUI's largest seed): use a seed in that range, e.g. 42"]


def test_nan_and_inf_words_in_a_text_column_stay_text(tmp_path):
    path = _write(tmp_path, "m.csv", f"workflowId,6.text,note\n{TEXT2IMG},nan,inf\n{TEXT2IMG},Infinity,x\n")
    rows = load_manifest(path).rows
    assert [r.inputs["6.text"] for r in rows] == ["nan", "Infinity"]


def test_a_nan_in_a_json_metadata_column_reads_as_empty(tmp_path):
    path = _write(tmp_path, "m.jsonl", f'{{"workflowId": "{TEXT2IMG}", "6.text": "a", "score": NaN}}\n')
    assert load_manifest(path).rows[0].inputs["score"] is None


@pytest.mark.parametrize(("field", "value", "fix"), [
    ("3.seed", '"12"', 'remove the quotes (write 12, not "12")'),
    ("3.seed", '"7.0"', 'remove the quotes (write 7, not "7.0")'),
    ("3.cfg", '"7.5"', 'remove the quotes (write 7.5, not "7.5")'),
    ("addMetadata", '"true"', 'remove the quotes (write true, not "true")'),
    ("3.seed", '"twelve"', "write digits only, e.g. 42"),
])
def test_a_number_or_boolean_in_quotes_gets_remove_the_quotes(tmp_path, field, value, fix):
    path = _write(tmp_path, "m.jsonl", f'{{"workflowId": "{TEXT2IMG}", "6.text": "a", "{field}": {value}}}\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = _problems(info)
    assert problem.startswith(f'row 1, column "{field}": ') and problem.endswith(f": {fix}")


def test_each_row_of_a_bad_kind_shows_its_own_value(tmp_path):
    rows = [{"workflowId": TEXT2IMG, "6.text": "a", "3.seed": "one"},
            {"workflowId": TEXT2IMG, "6.text": "b", "3.seed": "two"}]
    path = _write(tmp_path, "m.json", json.dumps(rows))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [p.split(":")[1] for p in _problems(info)] == [" 'one' is not a whole number (the schema "
                                                          "requires it)", " 'two' is not a whole "
                                                          "number (the schema requires it)"]


# -- 5. paths that are not files ---------------------------------------------------------------


def test_a_directory_is_refused_by_the_library_and_the_cli(tmp_path):
    folder = tmp_path / "m.csv"
    folder.mkdir()
    with pytest.raises(InputError, match=r"m\.csv is a directory, not a manifest file: name the "
                                         r"manifest file inside it$"):
        load_manifest(folder)
    result = _validate(str(folder))
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_a_fifo_is_refused_at_once_without_opening_it(tmp_path):
    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"m\.csv is a named pipe \(FIFO\), not a manifest file: "
                                         r"write the manifest to a file and name that file"):
        load_manifest(fifo)
    with pytest.raises(InputError, match="is a named pipe"):
        read_file_bytes(fifo)  # opened without blocking, refused on the open file
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(fifo), "--no-preflight"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "is a named pipe (FIFO), not a manifest file" in result.stderr


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(InputError, match=r"is a socket, not a manifest file"):
            check_manifest_path(path)


def test_dev_zero_is_refused_at_once_with_exit_2():
    with pytest.raises(InputError, match=r"^/dev/zero is a device, not a manifest file: name a "
                                         r"manifest file$"):
        load_manifest("/dev/zero")
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", "/dev/zero", "--no-preflight"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == ("Error: /dev/zero is a device, not a manifest file: name a manifest "
                             "file\n")


def test_a_missing_file_names_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: no such file: check the path$"):
        load_manifest(tmp_path / "nope.csv")


def test_a_sweep_spec_or_values_file_that_is_a_device_or_fifo_is_refused(tmp_path):
    with pytest.raises(SweepError, match=r"^/dev/zero is a device, not a sweep spec file"):
        expand_sweep("/dev/zero", tmp_path / "m.csv")
    os.mkfifo(tmp_path / "prompts.txt")
    spec = _write(tmp_path, "s.yaml", f'workflowId: "{TEXT2IMG}"\naxes:\n  6.text: {{file: prompts.txt}}\n')
    with pytest.raises(SweepError, match=r"axes\[\"6\.text\"\]\.file: .*prompts\.txt is a named pipe "
                                         r"\(FIFO\), not a values file"):
        expand_sweep(spec, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


# -- 6. control characters are shown escaped ---------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x07", "\x7f", "\x85", "\u2028", "\u2029", "\x0c"])
def test_a_control_character_in_a_header_or_value_is_shown_escaped(tmp_path, char):
    escaped = char.encode("unicode_escape").decode("ascii")
    path = _write(tmp_path, "m.csv", f'workflowId,6.text,3.s{char}eed\n{TEXT2IMG},"x{char}",1\n'
                                     f"{TEXT2IMG},b,2\n")
    result = _validate(str(path))
    assert result.exit_code == 2
    assert f'column "3.s{escaped}eed": the name holds a control character' in result.stderr
    assert RAW_CONTROL.search(result.stderr) is None, repr(result.stderr)
    path = _write(tmp_path, "v.csv", f'workflowId,6.text,3.seed\n{TEXT2IMG},"x{char}",one\n')
    result = _validate(str(path))
    assert result.exit_code == 2 and RAW_CONTROL.search(result.stderr) is None, repr(result.stderr)


def test_a_sweep_message_shows_control_characters_escaped(tmp_path):
    spec = _write(tmp_path, "s.yaml", f'workflowId: "{TEXT2IMG}"\naxes:\n  "6.text\\u2028x": [a]\n')
    result = CliRunner().invoke(cli, ["sweep", str(spec), "-o", str(tmp_path / "m.csv")])
    assert result.exit_code == 2
    assert RAW_CONTROL.search(result.stderr) is None, repr(result.stderr)
    assert "\\u2028" in result.stderr


# -- 8. what sweep writes, validate accepts ----------------------------------------------------

ALL_SPECS = sorted([*SWEEPS.glob("*.yaml"), *SWEEPS.glob("*.json"), ROOT / "manifests" / "sweep_example.yaml",
                    *BAD.glob("sweep_*.yaml")])
# Specs that are meant to be refused (broken_* and the bad corpus), and the one good spec whose
# empty CSV cell (subjects.csv line 3) a .csv manifest cannot hold.
REFUSED = {("nested.json", "csv"): "subjects.csv line 3"}


def _meant_to_be_bad(spec: Path) -> bool:
    return spec.name.startswith("broken_") or spec.parent == BAD


def test_every_spec_is_covered():
    assert {"basic.yaml", "nested.json", "sweep_example.yaml", "broken_many.yaml",
            "sweep_formula_csv.yaml"} <= {s.name for s in ALL_SPECS}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda p: p.name)
def test_what_sweep_writes_passes_validate_unchanged(tmp_path, spec, fmt):
    out = tmp_path / f"m.{fmt}"
    result = CliRunner().invoke(cli, ["sweep", str(spec), "-o", str(out)])
    expected_refusal = REFUSED.get((spec.name, fmt))
    if _meant_to_be_bad(spec) and not (spec.name == "sweep_formula_csv.yaml" and fmt != "csv") \
            and not (spec.name == "sweep_empty_prompt_csv.yaml" and fmt != "csv") \
            or expected_refusal:
        assert result.exit_code == 2, result.output
        assert result.stderr.count("Error: ") == 1 and not out.exists()
        assert expected_refusal is None or expected_refusal in result.stderr
        assert list(tmp_path.iterdir()) == []  # no temporary file left
        return
    assert result.exit_code == 0, result.output
    checked = _validate(str(out))
    assert checked.exit_code == 0, checked.output
    assert "rows OK" in checked.stdout


TRICKY = {
    "workflowId": TEXT2IMG,
    "bindings": {"prompt": "6.text", "seed": "3.seed", "cfg": "3.cfg", "flag": "9.on",
                 "label": "9.label"},
    "constants": {"note": "=not sent, so fine", "big": 2**63 - 1},
    "metadata": ["note", "big"],
    "axes": {"product": [
        {"prompt": ["+x", "-x", "@x", "@no_suffix", " lead", "tab\there", "a\u2028b", "quote \"q\"",
                    "comma, semi; pipe|", "é 🐈 قطة", "42", "true"]},
        {"zip": [{"seed": [0, 2**63 - 1]}, {"cfg": [5, 7.5]}, {"flag": [True, False]},
                 {"label": ["007", "0"]}]},
    ]},
}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_tricky_but_valid_values_are_written_so_validate_accepts_them(tmp_path, fmt):
    spec = _write(tmp_path, "s.json", json.dumps(TRICKY, ensure_ascii=False))
    result = expand_sweep(spec, tmp_path / f"m.{fmt}")
    assert result.rows == 24
    manifest = load_manifest(tmp_path / f"m.{fmt}")
    assert len(manifest.rows) == 24
    texts = {r.inputs["6.text"] for r in manifest.rows}
    # a CSV reads "42" and "true" in a text column back as text, since the column holds other text
    assert texts == set(TRICKY["axes"]["product"][0]["prompt"])
    seeds = {r.inputs["3.seed"] for r in manifest.rows}
    assert seeds == {0, 2**63 - 1}


def test_a_spec_with_no_bound_name_is_refused_as_validate_would(tmp_path):
    spec = _write(tmp_path, "s.yaml", f'workflowId: "{TEXT2IMG}"\naxes:\n  note: [only metadata]\n')
    with pytest.raises(SweepError, match="rhbatch validate would refuse the .jsonl manifest: no column "
                                         "sends a node input"):
        expand_sweep(spec, tmp_path / "m.jsonl")


def test_allow_duplicates_without_derive_seed_needs_allow_duplicates_again(tmp_path):
    spec = _write(tmp_path, "s.yaml", f'workflowId: "{TEXT2IMG}"\nallow_duplicates: true\n'
                                      'axes:\n  6.text: [a, a]\n')
    expand_sweep(spec, tmp_path / "m.csv")
    assert _validate(str(tmp_path / "m.csv")).exit_code == 2
    checked = _validate(str(tmp_path / "m.csv"), "--allow-duplicates")
    assert checked.exit_code == 0, checked.output


# -- the loader's judgement, for manifest writers ----------------------------------------------


def test_column_problems_names_the_position_of_each_bad_value():
    columns = [("6.text", ["a", "=b", ""]), ("3.seed", [1, -1]), ("note", ["x"])]
    typed = {(p.row, p.column) for p in column_problems(columns, text=False)}
    assert typed == {(2, "3.seed")}
    text = {(p.row, p.column) for p in column_problems(columns, text=True)}
    assert text == {(2, "3.seed"), (2, "6.text"), (3, "6.text")}
    assert [str(p) for p in column_problems([("3.seed", ["x", 2])], text=False)] == [
        "row 1, column \"3.seed\": 'x' is not a whole number (the schema requires it): write digits "
        "only, e.g. 42"]
    assert column_problems([("6.text", ["a"]), ("3.seed", [True])], text=True)[0].row == 1
    assert column_problems([("6.text", ["a"])], text=True) == []
    assert [p.row for p in column_problems([("note", ["a"])], text=False)] == [None]
