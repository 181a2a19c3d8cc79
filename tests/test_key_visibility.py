"""Issue #17, visibility: a run on several keys shows rows, coins, money, capacity waits and
retirements per key label in ``status``, the end-of-run summary and the HTML report; a run on one
key shows none of it. Real SQLite run directories; the report is built by ``build_report``."""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fast_settings, write_manifest
from test_faults import fast_policy

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.cli import cli
from pipeline.config import Secret, key_fingerprint
from pipeline.costs import Cost
from pipeline.keys import PoolKey
from pipeline.pool import KeyOutcome
from pipeline.progress import key_summary_lines, key_table_lines
from pipeline.report import build_report
from pipeline.sim import AccountConfig
from pipeline.status import KeyRow, key_breakdown, key_breakdown_of, key_records, run_status
from tests.test_store import FakeRow

REVOKED = "802 APIKEY_UNAUTHORIZED: revoked <b>now</b>"


def new_fp() -> str:
    return key_fingerprint(secrets.token_hex(16))


def make_store(run_dir: Path, n: int) -> st.RunStore:
    store = st.RunStore.open(run_dir, create=True)
    store.insert_rows(FakeRow(i, f"r{i}", i + 1, inputs={"3.seed": i}) for i in range(n))
    return store


def succeed(store: st.RunStore, idx: int, key_fp: str | None, coins: float,
            money: float | None = None) -> None:
    store.mark_submitting(idx, None, key_fp)
    store.mark_submitted(idx, f"19000000000000000{idx:02d}", st.RUNNING, 1000.0 + idx)
    store.mark_success(idx, [], 1100.0 + idx, Cost(coins=coins, money=money))


def fail(store: st.RunStore, idx: int, key_fp: str | None, coins: float) -> None:
    store.mark_submitting(idx, None, key_fp)
    store.mark_submitted(idx, f"19000000000000001{idx:02d}", st.RUNNING, 1000.0 + idx)
    store.mark_failed(idx, code=805, error="OOM", at=1100.0 + idx, cost=Cost(coins=coins))


@dataclass
class ThreeKeys:
    run_dir: Path
    a: str  # studio-a: 3 done (one with money), 1 running, and an earlier failed attempt of row 5
    b: str  # studio-b: retired; 1 done, 1 failed, 1 unknown
    c: str  # a key the meta does not name: 1 done


@pytest.fixture
def three_keys(tmp_path: Path) -> ThreeKeys:
    a, b, c = new_fp(), new_fp(), new_fp()
    run_dir = tmp_path / "run"
    store = make_store(run_dir, 10)
    store.set_meta(keys={a: {"label": "studio-a", "max": 20, "max_coins": None, "max_money": None,
                             "api": "v1", "retired": None},
                         b: {"label": "studio-b", "max": None, "max_coins": 5000.0,
                             "max_money": None, "api": "v2", "retired": REVOKED}})
    succeed(store, 0, a, 6.0, money=0.5)
    succeed(store, 1, a, 7.0)
    succeed(store, 2, a, 8.0)
    store.mark_submitting(3, None, a)
    store.mark_submitted(3, "1900000000000000003", st.RUNNING, 1003.0)
    succeed(store, 4, b, 10.0)
    fail(store, 5, a, 3.0)  # first attempt on studio-a, billed 3, then retried on studio-b
    store.requeue([5])
    fail(store, 5, b, 2.0)
    store.mark_submitting(6, None, b)
    store.mark_unknown(6, "no answer")
    succeed(store, 7, c, 100.0)
    store.close()  # rows 8 and 9 stay PENDING: sent with no key
    return ThreeKeys(run_dir, a, b, c)


def as_tuples(keys: list[KeyRow]) -> list[tuple]:
    return [(k.label, k.fingerprint, k.rows, k.holding, k.coins, k.money, k.unpriced, k.retired,
             k.api) for k in keys]


def test_breakdown_counts_rows_and_every_attempt_on_the_key_that_made_it(three_keys):
    t = three_keys
    assert as_tuples(key_breakdown_of(t.run_dir)) == [
        ("studio-a", t.a, {"SUCCESS": 3, "RUNNING": 1}, 1, 24.0, 0.5, 0, None, "v1"),
        ("studio-b", t.b, {"SUCCESS": 1, "FAILED": 1, "SUBMIT_UNKNOWN": 1}, 1, 12.0, 0.0, 0,
         REVOKED, "v2"),
        (f"fp:{t.c[:8]}", t.c, {"SUCCESS": 1}, 0, 100.0, 0.0, 0, None, None),
    ]
    assert run_status(t.run_dir).keys == key_breakdown_of(t.run_dir)
    records = key_records(key_breakdown_of(t.run_dir))
    assert json.loads(json.dumps(records))[1] == {
        "label": "studio-b", "fingerprint": t.b, "rows": {"SUCCESS": 1, "FAILED": 1,
                                                          "SUBMIT_UNKNOWN": 1},
        "holding": 1, "coins": 12.0, "money": 0.0, "unpriced": 0, "retired": REVOKED, "api": "v2"}


def test_status_table_has_one_line_per_key(three_keys):
    t = three_keys
    assert key_table_lines(key_breakdown_of(t.run_dir)) == [
        "keys:",
        "  key          done  failed  unknown  live  coins  money  retired",
        "  studio-a        3       0        0     1     24    0.5  -",
        f"  studio-b        1       1        1     0     12      0  {REVOKED}",
        f"  fp:{t.c[:8]}     1       0        0     0    100      0  -",
    ]


def test_status_command_prints_the_key_table_and_json(three_keys):
    t = three_keys
    result = CliRunner().invoke(cli, ["status", str(t.run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("  keys:")
    assert lines[start + 2].split() == ["studio-a", "3", "0", "0", "1", "24", "0.5", "-"]
    assert lines[start + 3].split()[:7] == ["studio-b", "1", "1", "1", "0", "12", "0"]
    result = CliRunner().invoke(cli, ["status", str(t.run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(k["label"], k["coins"], k["retired"]) for k in data["keys"]] == [
        ("studio-a", 24.0, None), ("studio-b", 12.0, REVOKED), (f"fp:{t.c[:8]}", 100.0, None)]


def test_summary_lines_join_this_invocation_with_the_run(three_keys):
    t = three_keys
    outcomes = [KeyOutcome("studio-a", t.a, created=4, capacity_answers=3, capacity_wait_s=12.5,
                           window=20),
                KeyOutcome("studio-b", t.b, created=2, capacity_answers=0, capacity_wait_s=0.0,
                           window=1, retired=REVOKED)]
    assert key_summary_lines(outcomes, key_breakdown_of(t.run_dir)) == [
        "Keys:",
        "  studio-a: 4 created this run; its rows: 3 succeeded, 0 failed, 1 live; 24 coins, "
        "0.5 money; 3 capacity answers (12.5 s waited)",
        "  studio-b: 2 created this run; its rows: 1 succeeded, 1 failed, 1 unknown; 12 coins; "
        f"0 capacity answers (0.0 s waited); retired: {REVOKED}",
        f"  fp:{t.c[:8]}: not used this run; its rows: 1 succeeded, 0 failed; 100 coins",
    ]


def test_a_run_on_two_keys_shows_what_each_key_did(make_sim, tmp_path):
    """End to end on the simulator: the second key is revoked after 3 creates; each key's line
    says the creates the service recorded for it, and the revoked key says it was retired."""
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    sim = make_sim(seed=5, accounts=[AccountConfig(key=a, concurrency=2),
                                     AccountConfig(key=b, concurrency=2, revoke_after_creates=3)])
    run_dir = tmp_path / "run"
    summary = run_batch(ManifestArgs(write_manifest(tmp_path / "m.csv", 12), preflight=False),
                        run_dir, fast_settings(sim, a, concurrency=4, request_deadline_s=1.0),
                        policy=fast_policy(), handle_signals=False,
                        keys=(PoolKey(Secret(a), "studio-a"), PoolKey(Secret(b), "studio-b")))
    fa, fb = key_fingerprint(a), key_fingerprint(b)
    accepted = [r for r in sim.audit.requests() if r["route"] in ("create", "v2_run_workflow")
                and r["code"] == 0]
    created = Counter({fa[:8]: fa, fb[:8]: fb}[r["key_fp"]] for r in accepted)  # 8 hex digits
    assert created[fb] == 3 and created[fa] == 12 - 3
    keys = key_breakdown_of(run_dir)
    assert [(k.label, k.fingerprint, sum(k.rows.values())) for k in keys] == [
        ("studio-a", fa, created[fa]), ("studio-b", fb, 3)]
    assert keys[0].retired is None and keys[1].retired
    lines = key_summary_lines(summary.keys, keys)
    assert lines[0] == "Keys:" and len(lines) == 3
    assert lines[1].startswith(f"  studio-a: {created[fa]} created this run; its rows: ")
    assert lines[2].startswith("  studio-b: 3 created this run; its rows: ")
    assert lines[2].endswith(f"; retired: {keys[1].retired}") and "retired" not in lines[1]
    for text in (*lines, *key_table_lines(keys)):
        assert a not in text and b not in text


def key_section_rows(page: str) -> list[list[str]]:
    section = re.search(r'<section id="keys"><h2>Keys</h2>(.*?)</section>', page, re.S)
    assert section is not None
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr)
            for tr in re.findall(r"<tr>(.*?)</tr>", section.group(1), re.S)]


def test_report_has_a_keys_section_with_escaped_text(three_keys):
    t = three_keys
    page = build_report(t.run_dir).read_text(encoding="utf-8")
    assert key_section_rows(page) == [
        ["key", "done", "failed", "unknown", "live", "coins", "money", "retired"],
        ["studio-a", "3", "0", "0", "1", "24", "0.5", "-"],
        ["studio-b", "1", "1", "1", "0", "12", "0",
         "802 APIKEY_UNAUTHORIZED: revoked &lt;b&gt;now&lt;/b&gt;"],
        [f"fp:{t.c[:8]}", "1", "0", "0", "0", "100", "0", "-"],
    ]
    assert "<b>now</b>" not in page


def test_an_old_runs_rows_belong_to_its_recorded_key(tmp_path):
    """Rows made before key pools (no fingerprint) count for the run's ``key_fingerprint``: the
    labelled key when the run, resumed on a pool, names it."""
    a, b = new_fp(), new_fp()
    store = make_store(tmp_path / "run", 6)
    store.set_meta(key_fingerprint=a)
    succeed(store, 0, None, 5.0)
    fail(store, 1, None, 1.0)
    store.set_meta(keys={a: {"label": "studio-a"}, b: {"label": "studio-b"}})
    succeed(store, 2, a, 7.0)
    succeed(store, 3, b, 9.0)
    assert as_tuples(key_breakdown(store)) == [
        ("studio-a", a, {"SUCCESS": 2, "FAILED": 1}, 0, 13.0, 0.0, 0, None, None),
        ("studio-b", b, {"SUCCESS": 1}, 0, 9.0, 0.0, 0, None, None),
    ]
    store.close()


def test_an_old_run_on_a_new_key_shows_both(tmp_path):
    old, new = new_fp(), new_fp()
    store = make_store(tmp_path / "run", 4)
    store.set_meta(key_fingerprint=old)
    succeed(store, 0, None, 5.0)
    store.set_meta(keys={new: {"label": "key-1"}})
    succeed(store, 1, new, 2.0)
    assert [(k.label, k.fingerprint, k.rows, k.coins) for k in key_breakdown(store)] == [
        ("key-1", new, {"SUCCESS": 1}, 2.0), ("key", old, {"SUCCESS": 1}, 5.0)]
    store.close()


def single_key_run(run_dir: Path, *, pooled: bool) -> str:
    fp = new_fp()
    store = make_store(run_dir, 4)
    store.set_meta(key_fingerprint=fp)
    if pooled:
        store.set_meta(keys={fp: {"label": "key", "api": "v1", "retired": None}})
    succeed(store, 0, fp if pooled else None, 5.0)
    fail(store, 1, fp if pooled else None, 1.0)
    store.close()
    return fp


@pytest.mark.parametrize("pooled", [False, True], ids=["old-run", "one-key-pool"])
def test_a_run_on_one_key_shows_no_key_table(tmp_path, pooled):
    run_dir = tmp_path / "run"
    fp = single_key_run(run_dir, pooled=pooled)
    keys = key_breakdown_of(run_dir)
    assert [(k.label, k.fingerprint, k.rows, k.coins) for k in keys] == [
        ("key", fp, {"SUCCESS": 1, "FAILED": 1}, 6.0)]
    assert key_table_lines(keys) == []
    assert key_summary_lines([KeyOutcome("key", fp, created=2)], keys) == []
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert 'id="keys"' not in page and "<h2>Keys</h2>" not in page
    result = CliRunner().invoke(cli, ["status", str(run_dir)])
    assert result.exit_code == 0 and "keys:" not in result.output
    result = CliRunner().invoke(cli, ["status", str(run_dir), "--json"])
    assert result.exit_code == 0 and "keys" not in json.loads(result.output)


def test_a_run_not_started_knows_no_key(tmp_path):
    store = make_store(tmp_path / "run", 3)
    assert key_breakdown(store) == []
    store.close()
