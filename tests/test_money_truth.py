"""Money truth over real HTTP: a create the service answered badly *after* making the task is never
sent again, every coin the simulator billed is in the output manifest, and every budget holds."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import canonical, fast_settings, read_results, write_manifest
from test_faults import fast_policy

from pipeline import runner as runner_mod
from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.retry import Selection, retry_rows
from pipeline.sim import Faults
from pipeline.sim.config import AFTER_WORK_MODES

# After-work answers that still carry the task id: the create is known to have made that task.
CARRY_TASK_ID = {"code_500_task", "code_null", "code_text"}
STOPS_THE_RUN = {"redirect"}


def _run(sim, api_key, manifest, run_dir, **options):
    values = {"concurrency": 4, "request_deadline_s": 1.0, **options.pop("settings", {})}
    settings = fast_settings(sim, api_key, **values)
    return run_batch(ManifestArgs(manifest, preflight=False), run_dir, settings,
                     policy=fast_policy(), handle_signals=False, **options)


def _after_work_creates(sim):
    return [r for r in sim.audit.requests() if r["route"] in ("create", "v2_run_workflow")
            and "after_work" in (r["fault"] or "")]


def check_rows_against_audit(sim, records):
    """Row by row: each task the simulator made belongs to the row that holds its id, or to a row
    left SUBMIT_UNKNOWN whose create it was; no row was created twice."""
    assert sim.audit.duplicate_creates() == {}, "a row was created twice"
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    claimed = {r["taskId"] for r in records if r["taskId"]}
    assert claimed <= set(tasks)
    unknown = {canonical(r["nodeInfoList"]) for r in records if r["status"] == "SUBMIT_UNKNOWN"}
    for task_id, task in tasks.items():
        if task_id not in claimed:
            assert canonical(task["nodeInfoList"]) in unknown, task
            assert any(f.startswith("after_work:") or f == "lost_create" for f in task["faults"])
    for record in records:
        if record["taskId"]:
            assert canonical(tasks[record["taskId"]]["nodeInfoList"]) == canonical(
                record["nodeInfoList"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("api", ["auto", "v2"])  # creates on v1 /task/openapi/create, or on v2
@pytest.mark.parametrize("mode", AFTER_WORK_MODES)
def test_a_create_answered_badly_after_the_work_is_never_sent_again(mode, api, make_sim, api_key,
                                                                    tmp_path):
    sim = make_sim(seed=3, faults=Faults(after_work=0.34, after_work_modes=(mode,), stall_s=3.0,
                                         trickle_interval_s=0.3))
    manifest = write_manifest(tmp_path / "m.csv", 12)
    summary = _run(sim, api_key, manifest, tmp_path / "run", settings={"api": api})
    routes = {r["route"] for r in sim.audit.requests()}
    assert ("v2_run_workflow" in routes) == (api == "v2") and ("create" in routes) == (api != "v2")
    records = read_results(tmp_path / "run")
    check_rows_against_audit(sim, records)
    hit = _after_work_creates(sim)
    assert hit, "the fault was never injected"
    by_signature = {canonical(r["nodeInfoList"]): r for r in records}
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    for request in hit:
        row = by_signature[canonical(tasks[request["task_id"]]["nodeInfoList"])]
        if mode in CARRY_TASK_ID:
            assert row["taskId"] == request["task_id"] and row["status"] == "SUCCESS", row
        else:
            assert row["status"] == "SUBMIT_UNKNOWN" and row["taskId"] is None, row
            assert row["attempts"] == 1
    counts = Counter(r["status"] for r in records)
    if mode in STOPS_THE_RUN:
        assert summary.exit_code == 3 and "RUNNINGHUB_BASE_URL" in summary.stopped
        assert counts["SUBMIT_UNKNOWN"] == 1
    elif mode in CARRY_TASK_ID:
        assert counts == Counter(SUCCESS=12)
    else:
        assert counts["SUBMIT_UNKNOWN"] == len(hit)
        assert counts["SUCCESS"] == 12 - len(hit)


@pytest.mark.timeout(120)
def test_webhooks_reconcile_unknown_creates_to_their_tasks_without_a_second_create(
        make_sim, api_key, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "RECONCILE_WAIT_MIN_S", 10.0)
    modes = ("http_503", "drop", "code_500", "truncated", "garbage", "http_502")
    sim = make_sim(seed=4, faults=Faults(after_work=0.3, after_work_modes=modes))
    manifest = write_manifest(tmp_path / "m.csv", 20)
    summary = _run(sim, api_key, manifest, tmp_path / "run", webhook_listen="127.0.0.1:0")
    records = read_results(tmp_path / "run")
    hit = _after_work_creates(sim)
    assert len(hit) >= 3
    check_rows_against_audit(sim, records)
    assert Counter(r["status"] for r in records) == Counter(SUCCESS=20), summary
    assert summary.reconciled == {"webhook": len(hit)}
    assert sorted(r["taskId"] for r in records if r["reconciled"] == "webhook") == sorted(
        r["task_id"] for r in hit)
    assert len(sim.audit.tasks()) == 20


def test_every_coin_billed_is_in_the_output_manifest_failed_tasks_included(make_sim, api_key,
                                                                          tmp_path):
    sim = make_sim(seed=8, failure_rate=0.3, task_duration_s=(7.0, 13.0), coins_per_second=1.0)
    manifest = write_manifest(tmp_path / "m.csv", 40)
    summary = _run(sim, api_key, manifest, tmp_path / "run", settings={"concurrency": 10})
    records = read_results(tmp_path / "run")
    ledger = sim.audit.ledger()
    statuses = Counter(r["status"] for r in records)
    assert statuses["FAILED"] >= 5 and statuses["SUCCESS"] >= 20, statuses
    for record in records:
        assert record["coins"] == ledger[record["taskId"]], record
    assert len(set(ledger.values())) > 3  # costs really vary
    assert sum(r["coins"] for r in records) == sim.audit.ledger_total() == summary.coins
    failed = summary.spending.by_status["FAILED"]
    assert failed["coins"] == sum(ledger[r["taskId"]] for r in records if r["status"] == "FAILED")
    assert failed["coins"] > 0 and summary.spending.unpriced == 0
    from pipeline.report import build_report

    page = build_report(tmp_path / "run").read_text(encoding="utf-8")
    billed = page.split("<h3>Billed by outcome</h3>", 1)[1].split("</table>", 1)[0]
    assert f'<td class="s-FAILED">FAILED</td><td class="num">{int(failed["coins"]):,}</td>' in billed


def _budget_round(make_sim, api_key, tmp_path, seed):
    sim = make_sim(seed=seed, failure_rate=0.3, task_duration_s=(7.0, 13.0),
                   coins_per_second=1.0)
    manifest = write_manifest(tmp_path / f"m{seed}.csv", 30)
    run_dir = tmp_path / f"run{seed}"
    first = _run(sim, api_key, manifest, run_dir, max_coins=100, settings={"concurrency": 6})
    assert first.exit_code == 3 and "--max-coins 100" in first.stopped
    assert sim.audit.ledger_total() <= 100 and first.coins == sim.audit.ledger_total()
    resumed = _run(sim, api_key, manifest, run_dir, max_coins=200, settings={"concurrency": 6})
    assert sim.audit.ledger_total() <= 200 and resumed.coins == sim.audit.ledger_total()
    # a retry without --max-coins keeps the run's limit of 200
    notices: list[str] = []
    plan, retried = retry_rows(run_dir, fast_settings(sim, api_key, concurrency=6,
                                                      request_deadline_s=1.0),
                               Selection(), policy=fast_policy(), handle_signals=False,
                               on_notice=notices.append)
    assert "--max-coins 200 kept from the run's earlier start" in notices
    assert retried is not None and sim.audit.ledger_total() <= 200
    assert retried.coins == sim.audit.ledger_total()
    # a row was created once per attempt it made, and only retried rows made a second one
    attempts = {canonical(r["nodeInfoList"]): r["attempts"] for r in read_results(run_dir)}
    for signature, creates in sim.audit.creates_by_signature().items():
        node_info = signature.split("|", 1)[1]
        assert attempts[node_info] == creates, (signature, creates)
    return sim.audit.ledger_total()


@pytest.mark.timeout(300)
def test_max_coins_holds_in_a_run_its_resume_and_a_retry_over_twenty_seeds(make_sim, api_key,
                                                                          tmp_path):
    totals = [_budget_round(make_sim, api_key, tmp_path, seed) for seed in range(20)]
    assert max(totals) <= 200 and min(totals) >= 100  # the limit is used, not just kept


def test_retry_submits_only_the_rows_it_names_and_says_what_it_leaves(make_sim, api_key,
                                                                     tmp_path):
    sim = make_sim(seed=2, failure_rate=0.5, task_duration_s=10.0, coins_per_second=0.2)
    manifest = write_manifest(tmp_path / "m.csv", 20)
    run_dir = tmp_path / "run"
    first = _run(sim, api_key, manifest, run_dir, max_coins=15)
    counts = first.counts
    assert counts[st.PENDING] > 0 and counts[st.FAILED] > 0, counts
    before = len(sim.audit.tasks())
    notices: list[str] = []
    settings = fast_settings(sim, api_key, concurrency=4, request_deadline_s=1.0)
    plan, _ = retry_rows(run_dir, settings, Selection(), dry_run=True)
    assert [r["status"] for r in plan.rows] == ["FAILED"] * counts[st.FAILED]
    assert plan.expected_coins == pytest.approx(
        first.coins / (counts[st.SUCCESS] + counts[st.FAILED]) * counts[st.FAILED])
    assert len(sim.audit.tasks()) == before  # a dry run sends nothing
    plan, summary = retry_rows(run_dir, settings, Selection(), policy=fast_policy(),
                               handle_signals=False, on_notice=notices.append, max_coins=1000)
    assert summary is not None
    assert len(sim.audit.tasks()) == before + len(plan.rows)
    assert summary.counts[st.PENDING] == counts[st.PENDING]
    assert any(f"{counts[st.PENDING]} row(s) are still PENDING" in n for n in notices)
    assert "--max-coins is now 1000 (this run had 15)" in notices


def test_a_433_keeps_comfyuis_node_errors_and_says_what_to_fix(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "row_id,workflowId,nodeInfoList\n"
        'good,1904136902449209346,"[{""nodeId"":""6"",""fieldName"":""text"",""fieldValue"":""x""}]"\n'
        'bad,1904136902449209346,"[{""nodeId"":""5"",""fieldName"":""width"",""fieldValue"":999999}]"\n',
        encoding="utf-8")
    _run(sim, api_key, manifest, tmp_path / "run")
    by_id = {r["row_id"]: r for r in read_results(tmp_path / "run")}
    bad = by_id["bad"]
    assert bad["status"] == "FAILED" and bad["error_code"] == 433
    errors = bad["failedReason"]["node_errors"]
    assert errors and errors[0]["node_id"] == "5" and errors[0]["class_type"] == "EmptyLatentImage"
    assert errors[0]["input_name"] == "width" and errors[0]["type"] == "value_bigger_than_max"
    assert bad["error"].startswith("433 VALIDATE_PROMPT_FAILED: node 5 (EmptyLatentImage) input "
                                   "width: ")
    assert by_id["good"]["status"] == "SUCCESS"


def test_an_unknown_attempt_resubmitted_on_consent_still_counts_at_its_expected_cost(tmp_path):
    from conftest import explicit_row

    store = st.RunStore.open(tmp_path / "run", create=True)
    try:
        store.insert_rows([explicit_row(1, ("3", "seed", 1)), explicit_row(2, ("3", "seed", 2))])
        store.mark_submitting(0)
        store.mark_unknown(0, "create answered HTTP 503")
        assert store.spending().unknown_attempts == 0  # still SUBMIT_UNKNOWN, counted as such
        store.requeue([0])  # `retry --unknown --accept-double-pay`
        spending = store.spending()
        assert spending.unknown_attempts == 1 and store.counts()[st.SUBMIT_UNKNOWN] == 0
    finally:
        store.close()
