"""The fault matrix: every simulator fault alone at 5 % and 20 %, then all together, over a 40-row
run. Each run must end (exit 0 or 1) and every row's final state must agree with the simulator's
audit: no row created twice, SUBMIT_UNKNOWN only where a create's answer was really lost.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
from conftest import canonical, fast_settings, read_results, write_manifest
from test_download import server  # noqa: F401  (the loopback file server fixture)

from pipeline.batch import ManifestArgs, run_batch
from pipeline.client import RetryPolicy
from pipeline.sim import Faults
from pipeline.sim.config import AFTER_WORK_MODES

ROWS = 40
ROWS_ALL_TOGETHER = 100
# A create whose answer never arrived whole and usable: the client cannot know whether the task
# exists. Every HTTP 5xx counts, 503 included: a gateway may answer it after the work was done.
UNKNOWN_FAULTS = ("drop_connection", "garbage_body", "lost_create", "http_5xx", "oversized",
                  "gzip_bomb", "deep_json")
# After-work answers that still carry the task id: the row knows its task (a stall or trickle
# shorter than the request deadline, as SHAPES sets them, delivers the whole answer late).
CARRY_TASK_ID = ("after_work:code_500_task", "after_work:code_null", "after_work:code_text",
                 "after_work:stall", "after_work:trickle")
# Rate faults take a probability; the others take their own unit.
RATE_FAULTS = ("http_5xx", "drop_connection", "garbage_body", "slow_answer", "task_failure",
               "lost_create", "create_813", "after_work", "trickle", "oversized", "gzip_bomb",
               "deep_json", "nan_counts", "control_chars", "newline_task_id")
# Units and shapes for the hostile answers, small enough for a test: an oversized answer just past
# the client's 8 MiB cap, a bomb that inflates past it, answers trickled at 2 ms a byte, stalls
# shorter than the request deadline.
SHAPES = dict(slow_answer_s=0.02, stall_s=0.3, trickle_interval_s=0.002,
              oversized_bytes=9 * 2**20, gzip_bomb_bytes=16 * 2**20)
NOT_SWEPT = ("routes", "slow_answer_s", "after_work_modes", "stall_s", "trickle_interval_s",
             "oversized_bytes", "gzip_bomb_bytes", "deep_json_depth", "nan_counts_style",
             "latency_s", "latency_jitter_s")  # a network round trip: the last case below has one


# A redirect stops the run by design (every later create would be redirected too):
# tests/test_money_truth.py covers it; here the run must go on to its end.
MATRIX_AFTER_WORK_MODES = tuple(m for m in AFTER_WORK_MODES if m != "redirect")


def _faults(name: str, level: float) -> Faults:
    if name == "after_work":
        return Faults(after_work=level, after_work_modes=MATRIX_AFTER_WORK_MODES, **SHAPES)
    if name in RATE_FAULTS:
        return Faults(**{name: level}, **SHAPES)
    if name == "poll_rate_limit_per_s":
        return Faults(poll_rate_limit_per_s=40 if level < 0.1 else 10)  # calls per real second
    if name == "status_outputs_lag_s":
        # simulated seconds (1000 per real second here): long enough for a poll to land in it
        return Faults(status_outputs_lag_s=300 if level < 0.1 else 1000)
    raise AssertionError(name)


PER_REQUEST = ("http_5xx", "drop_connection", "garbage_body", "slow_answer", "trickle",
               "oversized", "gzip_bomb", "deep_json", "control_chars")
FAULT_NAMES = {name: name for name in RATE_FAULTS} | {
    "poll_rate_limit_per_s": "poll_rate_limit", "status_outputs_lag_s": "status_outputs_lag"}

ALL_TOGETHER = Faults(http_5xx=0.03, drop_connection=0.03, garbage_body=0.03, slow_answer=0.03,
                      task_failure=0.05, lost_create=0.03, create_813=0.03, after_work=0.03,
                      trickle=0.03, oversized=0.03, gzip_bomb=0.03, deep_json=0.03,
                      nan_counts=0.05, control_chars=0.05, newline_task_id=0.05,
                      poll_rate_limit_per_s=20, status_outputs_lag_s=300,
                      after_work_modes=MATRIX_AFTER_WORK_MODES, **SHAPES)

CASES = [pytest.param(_faults(f.name, level), id=f"{f.name}-{int(level * 100)}%")
         for f in dataclasses.fields(Faults)
         if f.name not in NOT_SWEPT
         for level in (0.05, 0.20)]
CASES.append(pytest.param(ALL_TOGETHER, id="all-together"))
# The same on the v2 read path (auto), where status_outputs_lag_s (a v1 outputs quirk) cannot land
CASES.append(pytest.param(dataclasses.replace(ALL_TOGETHER, status_outputs_lag_s=0.0),
                          id="all-together-v2-reads"))
# Everything at once again, every answer 20-40 ms away, as a real service is.
CASES.append(pytest.param(dataclasses.replace(ALL_TOGETHER, latency_s=0.02, latency_jitter_s=0.02),
                          id="all-together-at-a-distance"))


def fast_policy() -> RetryPolicy:
    """The production policy's shape, with waits short enough for a test."""
    return RetryPolicy(max_attempts=6, max_total_s=20.0, initial_wait_s=0.01, max_wait_s=0.05,
                       retry_after_cap_s=0.05)


def _unusable(fault: str | None) -> bool:
    """The create's answer said nothing usable about the task (so the row is SUBMIT_UNKNOWN)."""
    tags = (fault or "").split("+")
    if any(tag in CARRY_TASK_ID for tag in tags):
        return False
    return any(tag in UNKNOWN_FAULTS or tag.startswith("after_work:") for tag in tags)


def _unknown_create(request: dict[str, Any]) -> bool:
    return _unusable(request["fault"])


def check_against_audit(sim: Any, records: list[dict[str, Any]]) -> Counter[str]:
    """Assert every row's final state agrees with what the simulator saw; return the counts."""
    tasks = sim.audit.tasks()
    by_id = {t["taskId"]: t for t in tasks}
    assert sim.audit.duplicate_creates() == {}, "a row was created twice"
    counts = Counter(r["status"] for r in records)
    assert set(counts) <= {"SUCCESS", "FAILED", "SUBMIT_UNKNOWN"}, counts
    claimed: set[str] = set()
    unknown_signatures = set()
    for record in records:
        status, task_id = record["status"], record["taskId"]
        if status == "SUBMIT_UNKNOWN":
            assert task_id is None, record
            unknown_signatures.add(canonical(record["nodeInfoList"]))
            continue
        assert task_id in by_id, f"{record['row_id']}: {status} with task {task_id} unknown to sim"
        task = by_id[task_id]
        claimed.add(task_id)
        assert canonical(task["nodeInfoList"]) == canonical(record["nodeInfoList"])
        assert task["status"] == status, (record, task)
        if status == "SUCCESS":
            assert record["fileUrls"] and record["outputs"]
        else:
            assert record["error_code"] == 805, record
            assert task["planned_outcome"] == "FAILED"
            assert record["failedReason"]
    # every task the simulator accepted belongs to a row that knows it, or to a row left
    # SUBMIT_UNKNOWN because the create's answer was lost
    for task in tasks:
        if task["taskId"] not in claimed:
            assert _unusable("+".join(task["faults"])), task
            assert canonical(task["nodeInfoList"]) in unknown_signatures, task
    creates = sim.audit.requests("create")
    lost_answers = [r for r in creates if _unknown_create(r)]
    assert counts["SUBMIT_UNKNOWN"] == len(lost_answers), (counts, lost_answers)
    return counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("faults", CASES)
def test_fault_matrix(faults, make_sim, api_key, tmp_path):
    # everything at once: enough rows that a fault drawn at 3 % per request is drawn at all (a
    # run makes about 2.2 requests a row; at 40 rows a 2 % fault missed every draw 1 run in 8)
    rows = ROWS_ALL_TOGETHER if sum(1 for n in PER_REQUEST if getattr(faults, n)) > 1 else ROWS
    sim = make_sim(concurrency=10, seed=7, faults=faults, task_duration_s=(5.0, 20.0))
    manifest = write_manifest(tmp_path / "m.csv", rows)
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
                        # status_outputs_lag_s is a v1 /outputs quirk: read where it lands
                        fast_settings(sim, api_key, concurrency=10,
                                      api="v1" if faults.status_outputs_lag_s else "auto"),
                        policy=fast_policy(),
                        handle_signals=False)
    assert summary.exit_code in (0, 1), summary
    records = read_results(tmp_path / "run")
    assert [r["row"] for r in records] == list(range(1, rows + 1))
    counts = check_against_audit(sim, records)
    assert summary.exit_code == (0 if counts == Counter(SUCCESS=rows) else 1)
    if not faults.task_failure:
        assert counts["FAILED"] == 0, counts
    injected = Counter(name for r in sim.audit.faults() for name in r["fault"].split("+"))
    injected.update(name for t in sim.audit.tasks() for name in t["faults"])
    injected.update(name.split(":")[0] for name in list(injected) if ":" in name)
    for name, audit_name in FAULT_NAMES.items():
        # at 5 % a fault drawn once per task may miss all 40 by chance; per-request ones may not
        sure = getattr(faults, name) >= 0.2 or name in PER_REQUEST or name not in RATE_FAULTS
        if getattr(faults, name) and sure:
            assert injected[audit_name] > 0, f"{name} was never injected: {injected}"
    if not any(getattr(faults, name) for name in (*UNKNOWN_FAULTS, "after_work")):
        assert counts["SUBMIT_UNKNOWN"] == 0, counts


# -- files: what tests/test_download.py does not cover yet ------------------------------------


def test_an_html_page_served_for_a_png_output_is_not_saved_as_the_file(tmp_path, server):  # noqa: F811
    from test_download import files, make_run, out, run

    page = b"<html><body><h1>Please sign in</h1></body></html>"
    url = server.serve_bytes("/login", page, content_type="text/html; charset=utf-8")
    store = make_run(tmp_path, [[out(url)]])
    try:
        run(store)
        row = files(store)[(0, 0)]
        assert row["status"] in ("REFUSED", "FAILED"), dict(row)
        assert not (store.run_dir / "files" / "r0_9_0.png").exists()
    finally:
        store.close()
