"""Tests for pipeline/sweep.py: spec checking, expansion order, ids, seeds, duplicates, files."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import sweep
from pipeline.errors import InputError, StorageError, SweepError
from pipeline.sweep import SweepResult, count_rows, expand_sweep, iter_rows, load_spec

DATA = Path(__file__).parent / "data" / "sweeps"
ROOT = Path(__file__).resolve().parent.parent
WF = "1904136902449209346"


# --------------------------------------------------------------------------------------------------
# helpers


def spec_of(axes: Any, **extra: Any) -> dict[str, Any]:
    return {"workflowId": WF, "axes": axes, **extra}


def rows_of(spec: dict[str, Any], base_dir: Path | None = None) -> list[dict[str, Any]]:
    return list(iter_rows(spec, base_dir=base_dir))


def write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(content), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def error_of(spec: Any, base_dir: Path | None = None) -> str:
    with pytest.raises(SweepError) as exc:
        count_rows(spec, base_dir=base_dir)
    return str(exc.value)


def documented_row_id(row: dict[str, Any], bound_columns: list[str]) -> str:
    """The id formula from the module docstring, written independently of the fast encoder."""
    content = {"workflowId": row["workflowId"], **{c: row[c] for c in bound_columns}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "s" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the example specs


def test_basic_spec_expands_in_product_order() -> None:
    spec = load_spec(DATA / "basic.yaml")
    assert count_rows(spec) == 24
    rows = rows_of(spec)
    assert len(rows) == 24
    assert list(rows[0]) == [
        "row_id",
        "workflowId",
        "6.text",
        "3.cfg",
        "3.sampler_name",
        "3.seed",
        "3.steps",
        "study",
    ]
    prompts = ["a red fox in snow", "a lighthouse at dusk", 'a bowl of ramen, "steaming"']
    pairs = [(5.0, "euler"), (7.5, "dpmpp_2m")]
    expected = [
        (p, cfg, sampler, seed) for p, (cfg, sampler), seed in itertools.product(prompts, pairs, range(4))
    ]
    got = [(r["6.text"], r["3.cfg"], r["3.sampler_name"], r["3.seed"]) for r in rows]
    assert got == expected
    assert {r["workflowId"] for r in rows} == {WF}
    assert {r["3.steps"] for r in rows} == {20}
    assert {r["study"] for r in rows} == {"basic"}
    assert all(isinstance(r["3.seed"], int) and isinstance(r["3.cfg"], float) for r in rows)


def test_the_example_spec_and_the_readme_sweep_send_every_axis() -> None:
    example = load_spec(ROOT / "manifests" / "sweep_example.yaml")
    rows = rows_of(example)
    assert len(rows) == 24  # as the README says
    assert list(rows[0]) == ["row_id", "workflowId", "6.text", "3.cfg", "3.sampler_name", "3.seed",
                             "3.steps"]  # every column is a node input: nothing left unsent
    assert {(r["3.cfg"], r["3.sampler_name"]) for r in rows} == {(5.0, "euler"), (7.5, "dpmpp_2m")}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## A five-line sweep", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = yaml.safe_load(block)
    assert "sampler" in json.dumps(spec["axes"])
    assert count_rows(spec, base_dir=ROOT / "manifests") == 4 * 2 * 1000  # every axis is bound


def test_an_axis_or_constant_that_feeds_no_node_is_an_error_naming_both_fixes() -> None:
    spec = spec_of(
        {"product": [{"prompt": ["a cat"]}, {"zip": [{"cfg": [5.0, 7.5]}, {"sampler": ["euler", "dpm"]}]}]},
        bindings={"prompt": "6.text", "cfg": "3.cfg"},
        constants={"study": "cfg"},
    )
    assert error_of(spec) == (
        "sweep spec: 2 problems:\n"
        "  axes.product[1].zip[1].sampler: 'sampler' is neither bound to a node input nor listed "
        "under metadata, so its values would never be sent; bind it (bindings: {sampler: "
        '"NODE.FIELD"}; rhbatch inspect lists the workflow\'s inputs), or add metadata: [sampler] '
        "to keep it as a column that is not sent\n"
        "  constants.study: 'study' is neither bound to a node input nor listed under metadata, so "
        "its values would never be sent; bind it (bindings: {study: \"NODE.FIELD\"}; rhbatch "
        "inspect lists the workflow's inputs), or add metadata: [study] to keep it as a column "
        "that is not sent"
    )
    kept = rows_of({**spec, "metadata": ["sampler", "study"]})
    assert list(kept[0]) == ["row_id", "workflowId", "6.text", "3.cfg", "sampler", "study"]
    sent = rows_of({**spec, "bindings": {**spec["bindings"], "sampler": "3.sampler_name",
                                          "study": "9.filename_prefix"}})
    assert list(sent[0]) == ["row_id", "workflowId", "6.text", "3.cfg", "3.sampler_name",
                             "9.filename_prefix"]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("study", "metadata: expected a list of names, got a string; write e.g. metadata: [study]"),
        (["nope", "study"], "metadata[0]: \"nope\" names no axis or constant; list the names to "
                            "keep as columns that are not sent, or remove it"),
        (["study", "6.text"], "metadata[1]: '6.text' is bound to 6.text, so it is sent; remove it "
                              "from metadata, or remove its binding"),
        (["study", "study"], "metadata[1]: 'study' is listed twice; keep one"),
    ],
)
def test_metadata_names_must_be_unsent_axes_or_constants(metadata: Any, message: str) -> None:
    spec = spec_of({"6.text": ["a"]}, constants={"study": "x"}, metadata=metadata)
    assert error_of(spec) == f"sweep spec: {message}"


def test_nested_json_spec_with_csv_columns_linspace_and_derived_seed() -> None:
    spec = load_spec(DATA / "nested.json")
    rows = rows_of(spec)
    assert count_rows(spec) == len(rows) == 18
    assert rows[0]["workflowId"] == WF  # an unquoted number is read as the id string
    subjects = [("a cat, sleeping", "blurry", 0.8), ("a dog", "", 1.0), ("a bird", "low quality", 1.2)]
    inner = list(itertools.product([0.5, 0.75, 1.0], [20, 30]))
    expected = [
        (s, n, w, d, st, take)
        for (s, n, w), ((d, st), take) in itertools.product(subjects, zip(inner, range(6), strict=True))
    ]
    got = [
        (r["6.text"], r["7.text"], r["10.strength"], r["3.denoise"], r["3.steps"], r["take"]) for r in rows
    ]
    assert got == expected
    assert all(0 <= r["57:35.seed"] < 2**32 for r in rows)
    assert list(rows[0])[-2:] == ["take", "batch"]  # unbound names last, axes before constants


def test_load_spec_makes_file_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(DATA / "basic.yaml")
    assert spec["axes"]["product"][0]["prompt"]["file"] == str((DATA / "prompts.txt").resolve())
    monkeypatch.chdir(tmp_path)  # the loaded dict still works from anywhere
    assert count_rows(spec) == 24


def test_relative_files_resolve_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("x\ny\n", encoding="utf-8")
    spec = spec_of({"6.text": {"file": "p.txt"}})
    assert [r["6.text"] for r in rows_of(spec, base_dir=tmp_path)] == ["x", "y"]


# --------------------------------------------------------------------------------------------------
# axis kinds


@pytest.mark.parametrize(
    ("source", "values"),
    [
        ([1, 2, 3], [1, 2, 3]),
        (["a", "b"], ["a", "b"]),
        ([True, False], [True, False]),
        (7, [7]),
        ("only", ["only"]),
        ({"range": [0, 3]}, [0, 1, 2]),
        ({"range": [10, 0, -4]}, [10, 6, 2]),
        ({"range": [0, 10, 3]}, [0, 3, 6, 9]),
        ({"linspace": [5, 9, 5]}, [5.0, 6.0, 7.0, 8.0, 9.0]),
        ({"linspace": [0, 1, 4]}, [0.0, 0.333333333333, 0.666666666667, 1.0]),
        ({"linspace": [0.1, 0.3, 3]}, [0.1, 0.2, 0.3]),
        ({"linspace": [2.5, 9, 1]}, [2.5]),
        ([5, 7.5], [5.0, 7.5]),  # ints and floats mix into floats
    ],
)
def test_leaf_sources(source: Any, values: list[Any]) -> None:
    rows = rows_of(spec_of({"3.x": source}))
    got = [r["3.x"] for r in rows]
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]


def test_text_file_axis_skips_blank_lines_and_strips(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("\ufeffone\r\n\r\n   \n  two  \nthree", encoding="utf-8")
    rows = rows_of(spec_of({"6.text": {"file": "p.txt"}}), base_dir=tmp_path)
    assert [r["6.text"] for r in rows] == ["one", "two", "three"]


def test_typed_file_axis(tmp_path: Path) -> None:
    (tmp_path / "seeds.txt").write_text("7\n42\n", encoding="utf-8")
    (tmp_path / "t.csv").write_text("cfg,name\n4.5,a\n6,b\n", encoding="utf-8")
    spec = spec_of(
        {
            "zip": [
                {"3.seed": {"file": "seeds.txt", "type": "integer"}},
                {"3.cfg": {"file": "t.csv", "column": "cfg", "type": "number"}},
            ]
        }
    )
    rows = rows_of(spec, base_dir=tmp_path)
    assert [(r["3.seed"], r["3.cfg"]) for r in rows] == [(7, 4.5), (42, 6.0)]


def test_csv_columns_zip_row_by_row_and_keep_empty_cells() -> None:
    spec = load_spec(DATA / "nested.json")
    negatives = [r["7.text"] for r in rows_of(spec)][::6]
    assert negatives == ["blurry", "", "low quality"]


# --------------------------------------------------------------------------------------------------
# combinators


def test_product_last_axis_varies_fastest() -> None:
    spec = spec_of({"product": [{"1.a": [1, 2]}, {"1.b": ["x", "y", "z"]}, {"1.c": [True, False]}]})
    got = [(r["1.a"], r["1.b"], r["1.c"]) for r in rows_of(spec)]
    assert got == list(itertools.product([1, 2], ["x", "y", "z"], [True, False]))
    assert count_rows(spec) == 12


def test_zip_advances_together() -> None:
    spec = spec_of({"zip": [{"1.a": [1, 2, 3]}, {"1.b": ["x", "y", "z"]}]})
    assert [(r["1.a"], r["1.b"]) for r in rows_of(spec)] == [(1, "x"), (2, "y"), (3, "z")]


def test_nested_products_flatten_and_nest_to_any_depth() -> None:
    flat = spec_of({"product": [{"1.a": [1, 2]}, {"1.b": [3, 4]}, {"1.c": [5, 6]}]})
    nested = spec_of({"product": [{"1.a": [1, 2]}, {"product": [{"1.b": [3, 4]}, {"1.c": [5, 6]}]}]})
    assert rows_of(flat) == rows_of(nested)
    deep = spec_of(
        {
            "zip": [
                {"product": [{"1.a": [1, 2]}, {"zip": [{"1.b": [3, 4]}, {"1.c": [5, 6]}]}]},
                {"zip": [{"1.d": {"range": [0, 4]}}, {"product": [{"1.e": "k"}, {"1.f": [7, 8, 9, 10]}]}]},
            ]
        }
    )
    got = [tuple(r[f"1.{k}"] for k in "abcdef") for r in rows_of(deep)]
    assert got == [
        (1, 3, 5, 0, "k", 7),
        (1, 4, 6, 1, "k", 8),
        (2, 3, 5, 2, "k", 9),
        (2, 4, 6, 3, "k", 10),
    ]


def test_large_product_members_are_regenerated_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_of({"product": [{"1.a": [1, 2]}, {"1.b": {"range": [0, 3]}}, {"1.c": [8, 9]}]})
    expected = rows_of(spec)
    monkeypatch.setattr(sweep, "MATERIALIZE_MAX_ROWS", 2)
    assert rows_of(spec) == expected


def test_count_rows_is_exact_without_expanding() -> None:
    huge = spec_of(
        {"product": [{"1.a": {"range": [0, 10**6]}}, {"1.b": {"range": [0, 10**6]}}]},
    )
    start = time.perf_counter()
    assert count_rows(huge) == 10**12
    first = next(iter_rows(huge))  # and iteration is lazy
    assert time.perf_counter() - start < 1
    assert (first["1.a"], first["1.b"]) == (0, 0)


# --------------------------------------------------------------------------------------------------
# columns, types, row ids


def test_columns_order_bindings_then_self_bound_then_metadata() -> None:
    spec = spec_of(
        {"zip": [{"label": ["a", "b"]}, {"cfg": [5.0, 6.0]}, {"9.x": [1, 2]}]},
        bindings={"seed": "3.seed", "cfg": "3.cfg"},
        constants={"note": "n", "seed": 1},
        metadata=["label", "note"],
    )
    assert list(rows_of(spec)[0]) == ["row_id", "workflowId", "3.seed", "3.cfg", "9.x", "label", "note"]


def test_row_id_matches_the_documented_formula() -> None:
    spec = load_spec(DATA / "basic.yaml")
    bound = ["6.text", "3.cfg", "3.sampler_name", "3.seed", "3.steps"]
    for row in rows_of(spec):
        assert row["row_id"] == documented_row_id(row, bound)
        assert len(row["row_id"]) == 17 and row["row_id"][0] == "s"


def test_row_ids_depend_on_bound_content_only() -> None:
    """Reordering axes, renaming names bound to the same input and adding metadata keep the ids."""
    a = spec_of(
        {"product": [{"prompt": ["a cat", "a dog"]}, {"zip": [{"cfg": [5.0, 7.0]}, {"s": ["x", "y"]}]}]},
        bindings={"prompt": "6.text", "cfg": "3.cfg", "s": "3.sampler_name"},
    )
    b = spec_of(
        {
            "product": [
                {"zip": [{"3.sampler_name": ["x", "y"]}, {"guidance": [5.0, 7.0]}, {"tag": ["l", "h"]}]},
                {"6.text": ["a cat", "a dog"]},
            ]
        },
        bindings={"guidance": "3.cfg"},
        constants={"who": "me"},
        metadata=["tag", "who"],
    )
    rows_a, rows_b = rows_of(a), rows_of(b)
    assert [r["row_id"] for r in rows_a] != [r["row_id"] for r in rows_b]  # the order differs...
    by_id_b = {r["row_id"]: r for r in rows_b}
    assert set(by_id_b) == {r["row_id"] for r in rows_a}  # ...the ids do not
    for row in rows_a:
        other = by_id_b[row["row_id"]]
        assert {k: other[k] for k in row} == row


def test_row_ids_change_with_workflow_and_type() -> None:
    base = rows_of(spec_of({"3.cfg": [5]}))[0]["row_id"]
    assert rows_of(spec_of({"3.cfg": [5.0]}))[0]["row_id"] != base  # 5 and 5.0 differ
    assert rows_of({"workflowId": "1", "axes": {"3.cfg": [5]}})[0]["row_id"] != base


def test_iter_rows_is_deterministic() -> None:
    spec = load_spec(DATA / "nested.json")
    assert rows_of(spec) == rows_of(load_spec(DATA / "nested.json"))


# --------------------------------------------------------------------------------------------------
# derived seeds


def test_derived_seeds_are_deterministic_distinct_and_in_range() -> None:
    spec = spec_of(
        {"product": [{"prompt": ["a", "b", "c"]}, {"cfg": [1.0, 2.0, 3.0]}]},
        bindings={"prompt": "6.text", "cfg": "3.cfg", "seed": "3.seed"},
        derive_seed="seed",
    )
    seeds = [r["3.seed"] for r in rows_of(spec)]
    assert seeds == [r["3.seed"] for r in rows_of(spec)]
    assert len(set(seeds)) == 9
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    # documented formula: sha256("rhbatch-seed\0" + salt + "\0" + canonical of the other values)
    row = rows_of(spec)[0]
    others = {"workflowId": WF, "6.text": row["6.text"], "3.cfg": row["3.cfg"]}
    canonical = json.dumps(others, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(b"rhbatch-seed\0\0" + canonical.encode()).digest()
    assert row["3.seed"] == int.from_bytes(digest[:4], "big")
    assert row["row_id"] == documented_row_id(row, ["6.text", "3.cfg", "3.seed"])


def test_derived_seed_follows_content_not_position_and_salt_rerolls() -> None:
    def seeds(axes: Any, **kw: Any) -> dict[str, int]:
        spec = spec_of(axes, bindings={"seed": "3.seed"}, derive_seed=kw.get("derive", "seed"))
        return {r["6.text"]: r["3.seed"] for r in rows_of(spec)}

    forward = seeds({"6.text": ["a", "b", "c"]})
    assert seeds({"6.text": ["c", "a", "b"]}) == forward
    salted = seeds({"6.text": ["a", "b", "c"]}, derive={"name": "seed", "salt": "take-2"})
    assert salted.keys() == forward.keys()
    assert all(salted[k] != forward[k] for k in forward)


# --------------------------------------------------------------------------------------------------
# duplicates


def test_duplicate_value_in_a_file_axis_is_rejected() -> None:
    with pytest.raises(SweepError) as exc:
        load_spec(DATA / "broken_duplicate.yaml")
    assert str(exc.value) == (
        f'{DATA / "broken_duplicate.yaml"}: axes.product[0].prompt: duplicate value "a cat" '
        "(prompts_dup.txt lines 1 and 3); remove one, or set allow_duplicates: true"
    )


@pytest.mark.parametrize(
    ("axes", "bindings", "message"),
    [
        (
            {"product": [{"3.seed": [1, 2, 1]}, {"6.text": ["a", "b"]}]},
            {},
            'axes.product[0]["3.seed"]: duplicate value 1 (items 0 and 2); remove one, or set '
            "allow_duplicates: true",
        ),
        (
            {"zip": [{"6.text": ["a", "b", "a"]}, {"3.cfg": [5.0, 7.0, 5.0]}]},
            {},
            'axes.zip: rows 0 and 2 of this zip have the same values (6.text="a", 3.cfg=5.0), '
            "which would submit the same task twice; remove one, or set allow_duplicates: true",
        ),
        (
            {"product": [{"6.text": ["a", "b"]}, {"take": [1, 2, 3]}]},
            {},
            "axes.product[1].take: 'take' is not bound to a node input, so its 3 values would "
            "repeat every row unchanged; bind it (bindings: {take: NODE.FIELD}), zip it with a "
            "bound axis, or set allow_duplicates: true",
        ),
        (
            {"zip": [{"label": ["a", "b"]}, {"note": ["x", "y"]}]},
            {},
            "axes.zip: none of label, note is bound, so this zip of 2 rows repeats every row; "
            "bind one of them, or set allow_duplicates: true",
        ),
    ],
)
def test_duplicates_are_rejected(axes: Any, bindings: dict[str, str], message: str) -> None:
    metadata = [n for n in ("take", "label", "note") if n in json.dumps(axes)]  # kept unsent
    assert error_of(spec_of(axes, bindings=bindings, metadata=metadata)) == f"sweep spec: {message}"


def test_repeats_inside_a_zip_member_are_fine() -> None:
    spec = spec_of({"zip": [{"6.text": ["a", "a", "b"]}, {"3.cfg": [5.0, 7.0, 5.0]}]})
    assert count_rows(spec) == 3


def test_allow_duplicates_suffixes_ids_and_rerolls_derived_seeds() -> None:
    spec = spec_of(
        {"product": [{"6.text": ["a", "b", "a"]}, {"take": [1, 2]}]},
        allow_duplicates=True,
        metadata=["take"],
    )
    ids = [r["row_id"] for r in rows_of(spec)]
    base_a, base_b = ids[0], ids[2]
    assert ids == [base_a, base_a + "-2", base_b, base_b + "-2", base_a + "-3", base_a + "-4"]

    seeded = dict(spec, bindings={"seed": "3.seed"}, derive_seed="seed")
    rows = rows_of(seeded)
    assert [r["row_id"][-2:] for r in rows][1::2] == ["-2", "-2", "-4"]
    seeds_of_a = [r["3.seed"] for r in rows if r["6.text"] == "a"]
    assert len(set(seeds_of_a)) == 4  # every occurrence gets its own seed
    first = rows_of(spec_of({"6.text": ["a"]}, bindings={"seed": "3.seed"}, derive_seed="seed"))
    assert rows[0]["3.seed"] == first[0]["3.seed"]  # the first occurrence keeps the plain seed


# --------------------------------------------------------------------------------------------------
# errors, each with its path and fix


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            ["not", "a", "mapping"],
            "a sweep spec is a mapping with workflowId and axes, got a list",
        ),
        (
            {"axes": {"6.text": ["a"]}},
            "missing required key 'workflowId'; add e.g. workflowId: \"1904136902449209346\"",
        ),
        (
            {"workflowId": WF, "axes": {"6.text": ["a"]}, "seed": "derive"},
            "seed: unknown key 'seed' (did you mean 'derive_seed'?); allowed keys here: version, "
            "description, workflowId, bindings, constants, axes, derive_seed, allow_duplicates, "
            "metadata",
        ),
        (
            spec_of({"6.text": ["a"]}, bindngs={}),
            "bindngs: unknown key 'bindngs' (did you mean 'bindings'?); allowed keys here: "
            "version, description, workflowId, bindings, constants, axes, derive_seed, "
            "allow_duplicates, metadata",
        ),
        (
            {"workflowId": 1.5, "axes": {"6.text": ["a"]}},
            "workflowId: expected the workflow id as a string, got a number; write e.g. "
            'workflowId: "1904136902449209346"',
        ),
        (
            spec_of({"6.text": ["a"]}, version=2),
            "version: unsupported version 2; use version: 1",
        ),
        (
            spec_of({"6.text": ["a"]}, allow_duplicates="yes"),
            "allow_duplicates: expected true or false, got a string",
        ),
        (
            spec_of({"6.text": ["a"], "3.seed": [1]}),
            "axes: an axis has exactly one key, got 2 (6.text, 3.seed); to combine them write "
            "product: [{a: ...}, {b: ...}] or zip: [{a: ...}, {b: ...}]",
        ),
        (
            spec_of([{"6.text": ["a"]}]),
            "axes: an axis is a mapping with one key, such as {cfg: [5, 7]}, {product: [...]} "
            "or {zip: [...]}; got a list",
        ),
        (
            spec_of({"product": {"6.text": ["a"]}}),
            "axes.product: expected a list of axes, got a mapping; write product: [{a: [1, 2]}, {b: [x, y]}]",
        ),
        (spec_of({"zip": []}), "axes.zip: empty zip; list at least one axis"),
        (
            spec_of({"product": [{"6.text": []}]}),
            'axes.product[0]["6.text"]: empty axis; give at least one value',
        ),
        (
            spec_of({"product": [{"6.text": None}]}),
            'axes.product[0]["6.text"]: no values (null); give a list, one value, '
            "{range: ...}, {linspace: ...} or {file: ...}",
        ),
        (
            spec_of({"product": [{"6.text": ["a", None, ["b"]]}]}),
            "2 problems:\n"
            '  axes.product[0]["6.text"][1]: values are strings, numbers or booleans, got null\n'
            '  axes.product[0]["6.text"][2]: values are strings, numbers or booleans, got a list',
        ),
        (
            spec_of({"product": [{"3.seed": [1, "two"]}]}),
            'axes.product[0]["3.seed"]: values mix integers and strings; a column has one type '
            "(quote the numbers to make them all strings)",
        ),
        (
            spec_of({"6.text": ["yes", False]}),
            'axes["6.text"]: values mix booleans and strings; a column has one type (YAML reads '
            "unquoted yes/no/on/off/true/false as booleans: quote them)",
        ),
        (
            spec_of({"3.seed": [2**64]}),
            'axes["3.seed"][0]: 18446744073709551616 does not fit in 64 bits; use a value below 2**63',
        ),
        (
            spec_of({"3.seed": {"range": [0, 1.5]}}),
            'axes["3.seed"].range: expected [start, stop] or [start, stop, step] of integers, got '
            "[0, 1.5]; for floats use {linspace: [a, b, n]}",
        ),
        (
            spec_of({"3.seed": {"range": [5, 5]}}),
            'axes["3.seed"].range: range(5, 5, 1) is empty; stop must be greater than start '
            "(stop is excluded)",
        ),
        (
            spec_of({"3.seed": {"range": [0, 5, 0]}}),
            'axes["3.seed"].range: step is 0; use a positive step (or a negative one with start > stop)',
        ),
        (
            spec_of({"3.cfg": {"linspace": [1, 2]}}),
            'axes["3.cfg"].linspace: expected [a, b, n] (two numbers and a count), got [1, 2]',
        ),
        (
            spec_of({"3.cfg": {"linspace": [1, 2, 0]}}),
            'axes["3.cfg"].linspace: n is 0; give at least 1 value',
        ),
        (
            spec_of({"3.cfg": {"range": [0, 2], "file": "x.txt"}}),
            'axes["3.cfg"]: an axis source has exactly one of range, linspace or file (got range, '
            "file); e.g. {range: [0, 10]}, {linspace: [5.0, 9.0, 5]} or {file: prompts.txt}",
        ),
        (
            spec_of({"3.cfg": {"range": [0, 2], "step": 1}}),
            "axes[\"3.cfg\"].step: unknown key 'step'; allowed keys here: range",
        ),
        (
            spec_of({"3.cfg": {"file": "c.txt", "type": "float"}}),
            'axes["3.cfg"].type: unknown type "float"; use one of string, integer, number',
        ),
        (
            spec_of({"product": [{"zip": [{"cfg": [5.0, 7.0]}]}, {"cfg": [1.0]}]}),
            "axes.product[1].cfg: 'cfg' is already defined at axes.product[0].zip[0].cfg; each "
            "name can appear once: rename one of them",
        ),
        (
            spec_of({"cfg": [5.0]}, constants={"cfg": 5.0}),
            "constants.cfg: 'cfg' is already defined at axes.cfg; each name can appear once: "
            "rename one of them",
        ),
        (
            spec_of({"row_id": ["a"]}),
            "axes.row_id: 'row_id' is reserved; choose another name",
        ),
        (
            spec_of({"6.": ["a"]}),
            "axes[\"6.\"]: '6.' has a '.' but is not NODE.FIELD; write NODE.FIELD (e.g. 6.text) "
            "or use a name without '.'",
        ),
        (
            spec_of({"cfg": [5.0]}, bindings={"cfg": "3cfg"}),
            "bindings.cfg: \"3cfg\" is not NODE.FIELD; write the node id, a '.', and the input "
            'name, e.g. cfg: "3.cfg"',
        ),
        (
            spec_of({"cfg": [5.0]}, bindings={"cfg": "3.cfg", "steps": "3.steps"}),
            "bindings.steps: 'steps' names no axis or constant; add an axis or constant called "
            "'steps', or remove the binding",
        ),
        (
            spec_of({"zip": [{"a": [1, 2]}, {"b": [3, 4]}]}, bindings={"a": "3.cfg", "b": "3.cfg"}),
            "bindings.b: 3.cfg is already fed by 'a'; a node input takes one value per row: bind "
            "one name to it",
        ),
        (
            spec_of({"zip": [{"a": [1, 2]}, {"3.cfg": [3, 4]}]}, bindings={"a": "3.cfg"}),
            "axes.zip[1][\"3.cfg\"]: 3.cfg is also fed by 'a' in bindings; keep one of them",
        ),
        (
            spec_of({"6.text": ["a"]}, constants={"steps": [20, 30]}),
            "constants.steps: a constant is one string, number or boolean, got a list; to vary "
            "it, move it to axes",
        ),
        (
            spec_of({"6.text": ["a"]}, derive_seed="seed"),
            "derive_seed: 'seed' is not bound to a node input; add bindings: "
            '{seed: "NODE.seed"} (e.g. "3.seed")',
        ),
        (
            spec_of({"6.text": ["a"]}, derive_seed={"salt": "x"}),
            "derive_seed: missing 'name'; write derive_seed: {name: seed}",
        ),
        (
            spec_of({"3.seed": [1]}, derive_seed="3.seed"),
            "derive_seed: '3.seed' is already defined at axes[\"3.seed\"]; each name can appear "
            "once: rename one of them",
        ),
    ],
)
def test_spec_errors(spec: Any, message: str) -> None:
    assert error_of(spec) == f"sweep spec: {message}"


def test_zip_length_mismatch_from_file() -> None:
    with pytest.raises(SweepError) as exc:
        load_spec(DATA / "broken_zip_lengths.yaml")
    assert str(exc.value) == (
        f"{DATA / 'broken_zip_lengths.yaml'}: axes.product[1].zip: zip members have different "
        "lengths (cfg: 2, sampler: 3); give every member the same number of values, or use product"
    )


def test_zip_length_mismatch_names_nested_members() -> None:
    spec = spec_of({"zip": [{"product": [{"1.a": [1, 2]}, {"1.b": [1, 2]}]}, {"1.c": [1, 2, 3]}]})
    assert error_of(spec) == (
        "sweep spec: axes.zip: zip members have different lengths (product of 1.a/1.b: 4, 1.c: 3); "
        "give every member the same number of values, or use product"
    )


def test_every_problem_is_reported_at_once() -> None:
    path = DATA / "broken_many.yaml"
    with pytest.raises(SweepError) as exc:
        load_spec(path)
    assert str(exc.value) == (
        f"{path}: 5 problems:\n"
        "  seeds: unknown key 'seeds' (did you mean 'derive_seed'?); allowed keys here: version, "
        "description, workflowId, bindings, constants, axes, derive_seed, allow_duplicates, "
        "metadata\n"
        f"  axes.product[0].prompt.file: missing_prompts.txt not found (looked for "
        f"{DATA / 'missing_prompts.txt'}); file paths are relative to the spec file\n"
        "  axes.product[1].cfg: empty axis; give at least one value\n"
        "  bindings.cfg: \"3cfg\" is not NODE.FIELD; write the node id, a '.', and the input "
        'name, e.g. cfg: "3.cfg"\n'
        "  bindings.steps: 'steps' names no axis or constant; add an axis or constant called "
        "'steps', or remove the binding"
    )
    assert isinstance(exc.value, InputError) and exc.value.exit_code == 2


def test_file_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "t.csv").write_text("a,b\n1,x\nnope,y\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))

    def err(source: dict[str, Any]) -> str:
        return error_of(spec_of({"3.x": source}), base_dir=tmp_path)

    assert err({"file": "empty.txt"}) == (
        'sweep spec: axes["3.x"].file: empty.txt has no values (no non-empty lines); add one value per line'
    )
    assert err({"file": "t.csv", "column": "c"}) == (
        "sweep spec: axes[\"3.x\"].column: no column 'c' in t.csv (columns: a, b)"
    )
    assert err({"file": "t.csv", "column": "a", "type": "integer"}) == (
        'sweep spec: axes["3.x"].file: t.csv line 3: "nope" is not an integer; fix the value or drop the type'
    )
    assert err({"file": "latin.txt"}).startswith(
        'sweep spec: axes["3.x"].file: latin.txt is not UTF-8 text ('
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workflowId: '1'\nbindings: {a: '1.a'}\nbindings: {b: '1.b'}\naxes: {1.a: [1]}\n",
            "line 3 column 1: invalid YAML: duplicate key 'bindings'; keep one of them",
        ),
        (
            "workflowId: '1'\naxes: [unclosed\n",
            "line 3 column 1: invalid YAML: expected ',' or ']', but got '<stream end>'",
        ),
    ],
)
def test_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "s.yaml", text)
    with pytest.raises(SweepError) as exc:
        load_spec(path)
    assert str(exc.value) == f"{path}: {message}"


def test_json_errors(tmp_path: Path) -> None:
    dup = write(tmp_path, "d.json", '{"workflowId": "1", "workflowId": "2", "axes": {}}')
    with pytest.raises(SweepError, match="duplicate key 'workflowId'; keep one of them"):
        load_spec(dup)
    bad = write(tmp_path, "b.json", '{"workflowId": "1",}')
    with pytest.raises(SweepError) as exc:
        load_spec(bad)
    assert str(exc.value) == (
        f"{bad}: line 1 column 20: invalid JSON: Expecting property name enclosed in double quotes"
    )
    with pytest.raises(SweepError) as exc:
        load_spec(tmp_path / "nope.yaml")
    assert str(exc.value) == f"{tmp_path / 'nope.yaml'}: sweep spec not found; check the path"


# --------------------------------------------------------------------------------------------------
# the JSON Schema agrees with the checks


def test_schema_is_valid_and_accepts_the_examples() -> None:
    schema = json.loads((ROOT / "schemas" / "sweep.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in ("basic.yaml", "nested.json", "broken_zip_lengths.yaml", "broken_duplicate.yaml"):
        validator.validate(yaml.safe_load((DATA / name).read_text(encoding="utf-8")))
    broken = yaml.safe_load((DATA / "broken_many.yaml").read_text(encoding="utf-8"))
    messages = sorted(e.message for e in validator.iter_errors(broken))
    assert any("'seeds' was unexpected" in m for m in messages)
    for bad in (
        spec_of({"6.text": ["a"], "3.seed": [1]}),
        spec_of({"6.text": []}),
        spec_of({"6.text": {"range": [0, 1.5]}}),
        spec_of({"cfg": [1.0]}, bindings={"cfg": "3cfg"}),
        spec_of({"row_id": ["a"]}),
    ):
        assert not validator.is_valid(bad), bad


# --------------------------------------------------------------------------------------------------
# writing files


def expand_all(tmp_path: Path, spec: Path, stem: str = "m") -> dict[str, SweepResult]:
    return {ext: expand_sweep(spec, tmp_path / f"{stem}.{ext}") for ext in ("csv", "jsonl", "parquet")}


def _nested_without_empty_cells(tmp_path: Path) -> Path:
    """nested.json with its subjects.csv's one empty cell filled: a CSV manifest cannot hold an
    empty value in a bound column (its validate reads the empty cell as missing)."""
    shutil.copy(DATA / "nested.json", tmp_path / "nested.json")
    text = (DATA / "subjects.csv").read_text(encoding="utf-8")
    assert "a dog,,1.0" in text
    (tmp_path / "subjects.csv").write_text(text.replace("a dog,,1.0", "a dog,ugly,1.0"), encoding="utf-8")
    return tmp_path / "nested.json"


def test_three_formats_readable_by_pandas_with_types(tmp_path: Path) -> None:
    spec = _nested_without_empty_cells(tmp_path)
    results = expand_all(tmp_path, spec)
    expected = rows_of(load_spec(spec))
    columns = list(expected[0])
    for result in results.values():
        assert result.rows == 18 and result.columns == columns

    frames = {
        "csv": pd.read_csv(tmp_path / "m.csv", dtype={"workflowId": str}, keep_default_na=False),
        "jsonl": pd.read_json(tmp_path / "m.jsonl", lines=True, dtype={"workflowId": str}),
        "parquet": pd.read_parquet(tmp_path / "m.parquet"),
    }
    for fmt, df in frames.items():
        assert list(df.columns) == columns, fmt
        assert df["57:35.seed"].dtype == "int64", fmt
        assert df["3.steps"].dtype == "int64", fmt
        assert df["take"].dtype == "int64", fmt
        assert df["3.denoise"].dtype == "float64", fmt
        assert df["10.strength"].dtype == "float64", fmt
        assert pd.api.types.is_string_dtype(df["6.text"]), fmt
        assert pd.api.types.is_string_dtype(df["row_id"]), fmt
        assert df.to_dict("records") == expected, fmt

    schema = pq.read_schema(tmp_path / "m.parquet")
    assert str(schema.field("workflowId").type) == "string"
    assert str(schema.field("57:35.seed").type) == "int64"


def test_csv_and_jsonl_text(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "s.yaml",
        spec_of(
            {"zip": [{"6.text": ['say "hi",\nthen é', "plain"]}, {"1.on": [True, False]}]},
            constants={"3.cfg": 7.0},
        ),
    )
    expand_sweep(spec, tmp_path / "m.csv")
    expand_sweep(spec, tmp_path / "m.jsonl")
    rows = rows_of(load_spec(spec))
    ids = [r["row_id"] for r in rows]
    assert (tmp_path / "m.csv").read_text(encoding="utf-8") == (
        "row_id,workflowId,6.text,1.on,3.cfg\n"
        f'{ids[0]},{WF},"say ""hi"",\nthen é",true,7.0\n'
        f"{ids[1]},{WF},plain,false,7.0\n"
    )
    lines = (tmp_path / "m.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r, ensure_ascii=False) for r in rows]
    assert pd.read_csv(tmp_path / "m.csv")["1.on"].dtype == "bool"


def test_object_encoder_matches_json_dumps() -> None:
    tricky = ["", "é ü 中文 🎉", 'q"uote\\back', "tab\tnl\nnul\x00\x1f\u2028", "</script>"]
    floats = [0.1, 1e-7, 1e22, -0.0, 123456789.123, 5.0]
    for s, f, i, b in zip(tricky, floats, [0, -1, 2**63 - 1, 7, 8], [True, False] * 3, strict=False):
        row = (s, f, i, b)
        keys = ["k\u00e9", 'a"b', "3.cfg", "z"]
        encode = sweep._object_encoder(
            keys, range(4), [str, float, int, bool], {}, item_sep=", ", key_sep=": "
        )
        assert encode(row) == json.dumps(dict(zip(keys, row, strict=True)), ensure_ascii=False)


def test_reexpansion_is_byte_identical(tmp_path: Path) -> None:
    first = expand_all(tmp_path, DATA / "basic.yaml", "a")
    second = expand_all(tmp_path, DATA / "basic.yaml", "b")
    for ext in ("csv", "jsonl"):
        assert first[ext].path.read_bytes() == second[ext].path.read_bytes()
    assert pq.read_table(first["parquet"].path).equals(pq.read_table(second["parquet"].path))


def test_max_rows_refusal_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.csv"
    with pytest.raises(SweepError) as exc:
        expand_sweep(DATA / "basic.yaml", out, max_rows=10)
    assert str(exc.value) == (
        f"{DATA / 'basic.yaml'}: the sweep expands to 24 rows, more than the limit of 10; "
        "pass --max-rows 24 (or --yes) to write them"
    )
    assert not (tmp_path / "out").exists()
    assert expand_sweep(DATA / "basic.yaml", out, max_rows=10, force=True).rows == 24
    assert expand_sweep(DATA / "basic.yaml", out, max_rows=24).rows == 24


def test_unknown_output_format(tmp_path: Path) -> None:
    with pytest.raises(SweepError) as exc:
        expand_sweep(DATA / "basic.yaml", tmp_path / "m.xlsx")
    assert str(exc.value) == (
        f"{tmp_path / 'm.xlsx'}: unknown manifest format '.xlsx'; name the output .csv, .jsonl or .parquet"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str
) -> None:
    out = tmp_path / f"m.{ext}"
    out.write_bytes(b"old")
    real = sweep._iter_tuples

    def broken(plan: Any) -> Any:
        rows = real(plan)
        yield next(rows)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep, "_iter_tuples", broken)
    with pytest.raises(StorageError) as exc:
        expand_sweep(DATA / "basic.yaml", out)
    assert str(exc.value) == f"{out}: cannot write the manifest: No space left on device"
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_progress_is_reported(tmp_path: Path) -> None:
    seen: list[int] = []
    expand_sweep(DATA / "basic.yaml", tmp_path / "m.csv", progress=seen.append)
    assert seen[-1] == 24


def test_spec_files_relative_to_the_spec_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(DATA / "basic.yaml", tmp_path / "basic.yaml")
    shutil.copy(DATA / "prompts.txt", tmp_path / "prompts.txt")
    monkeypatch.chdir(DATA.parent)
    assert expand_sweep(tmp_path / "basic.yaml", tmp_path / "m.jsonl").rows == 24


# --------------------------------------------------------------------------------------------------
# streaming


def _peak_mb_expanding(tmp_path: Path, rows: int) -> float:
    """Peak RSS of a fresh process that expands ``rows`` rows (400 prompts x rows/400 seeds)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(400)), encoding="utf-8")
    spec = write(
        tmp_path,
        f"big{rows}.yaml",
        spec_of(
            {"product": [{"prompt": {"file": "p.txt"}}, {"seed": {"range": [0, rows // 400]}}]},
            bindings={"prompt": "6.text", "seed": "3.seed"},
            constants={"3.steps": 20},
        ),
    )
    # VmHWM, not getrusage: Linux carries ru_maxrss over fork+exec, so the child would report
    # this pytest process's own peak (pandas and pyarrow are loaded here).
    code = (
        "import json, sys\n"
        "from pipeline.sweep import expand_sweep\n"
        "r = expand_sweep(sys.argv[1], sys.argv[2], max_rows=sys.maxsize)\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(json.dumps({'rows': r.rows, 'peak_mb': int(status.split()[0]) / 1024}))\n"
    )
    out = tmp_path / f"big{rows}.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(spec), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert report["rows"] == rows
    with out.open(encoding="utf-8") as fh:
        assert sum(1 for _ in fh) == rows
    return float(report["peak_mb"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_200k_rows_stream_in_bounded_memory(tmp_path: Path) -> None:
    """Memory must not grow with the row count: holding 200k rows would add ~30 MB."""
    small = _peak_mb_expanding(tmp_path, 20_000)
    big = _peak_mb_expanding(tmp_path, 200_000)
    assert big - small < 8, f"peak RSS {small:.0f} MB for 20k rows, {big:.0f} MB for 200k"
