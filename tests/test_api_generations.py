"""One client over both API generations, over real HTTP against the simulator: the same manifest
gives the same output manifest on v1 and on v2, a v2-only key runs end to end under auto, and
money-billed workflows are counted and budgeted exactly."""

from __future__ import annotations

import pytest
from conftest import fast_settings, read_results, write_manifest
from test_faults import fast_policy

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.sim import AccountConfig

# What differs by endpoint by design: ids and URLs the service made, times, the raw outputs
# list (v1 repeats the cost on each file), and v2's own codes inside failedReason.
ENDPOINT_FIELDS = ("taskId", "fileUrls", "outputs", "submitted_at", "finished_at", "failedReason",
                   "files")


def _run(sim, api_key, tmp_path, name, rows=16, **settings):
    manifest = write_manifest(tmp_path / "m.csv", rows)
    notices: list[str] = []
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / name,
                        fast_settings(sim, api_key, **settings), policy=fast_policy(),
                        handle_signals=False, on_notice=notices.append)
    return summary, read_results(tmp_path / name), notices


def _comparable(record):
    out = {k: v for k, v in record.items() if k not in ENDPOINT_FIELDS}
    reason = record["failedReason"] or {}
    out["failure"] = (reason.get("exception_type"), reason.get("node_id"))
    return out


def test_the_same_manifest_gives_the_same_output_manifest_on_v1_and_on_v2(make_sim, api_key,
                                                                          tmp_path):
    by_api = {}
    for api in ("v1", "v2"):
        sim = make_sim(seed=5, failure_rate=0.3, task_duration_s=(7.0, 13.0),
                       coins_per_second=1.0)
        summary, records, _ = _run(sim, api_key, tmp_path, api, concurrency=1, api=api)
        routes = {r["route"] for r in sim.audit.requests()}
        if api == "v2":
            assert "v2_run_workflow" in routes and "create" not in routes
            assert "outputs" not in routes
        else:
            assert "create" in routes and "v2_run_workflow" not in routes
            # v1 reports no cost for a failed task: v2 query is asked for that, and only that
            queries = [r for r in sim.audit.requests() if r["route"] == "v2_query"]
            assert len(queries) == sum(r["status"] == "FAILED" for r in records)
        assert sum(r["coins"] for r in records) == sim.audit.ledger_total() == summary.coins
        by_api[api] = [_comparable(r) for r in records]
    assert {r["status"] for r in by_api["v1"]} == {"SUCCESS", "FAILED"}
    assert by_api["v1"] == by_api["v2"]


@pytest.mark.parametrize("gone", ["412", "404"])
def test_a_v2_only_key_runs_end_to_end_under_auto_and_says_so_once(gone, make_sim, api_key,
                                                                    tmp_path):
    sim = make_sim(accounts=[AccountConfig(key=api_key, v1_task_routes=gone, concurrency=50)])
    summary, records, notices = _run(sim, api_key, tmp_path, "run", concurrency=4)
    assert summary.exit_code == 0, summary
    assert {r["status"] for r in records} == {"SUCCESS"}
    said = [n for n in notices if n.startswith("RunningHub API")]
    assert said == ["RunningHub API: this key's v1 task routes are gone (412 / HTTP 404 on a v1 "
                    "read); creates and reads on v2"]
    log = (tmp_path / "run" / "rhbatch.log").read_text(encoding="utf-8")
    assert log.count("v1 task routes are gone") == 1
    creates = [r for r in sim.audit.requests() if r["route"] in ("create", "v2_run_workflow")]
    assert {r["route"] for r in creates} == {"v2_run_workflow"} and len(creates) == 16


def test_auto_creates_on_v1_and_reads_with_v2_query(make_sim, api_key, tmp_path):
    sim = make_sim()
    summary, records, notices = _run(sim, api_key, tmp_path, "run", concurrency=4)
    assert summary.exit_code == 0
    assert "RunningHub API: creates on v1, reads with v2 query (usage and money included)" in notices
    routes = [r["route"] for r in sim.audit.requests()]
    assert routes.count("create") == 16 and "v2_query" in routes and "outputs" in routes  # probe
    assert routes.count("outputs") == 1  # only the v1 probe before the first create
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        assert store.get_meta("api") == "auto"
    finally:
        store.close()


@pytest.mark.parametrize("api,parent_usage", [("auto", "children"), ("v2", "total"),
                                              ("v1", "children")])
def test_money_billed_workflows_are_counted_exactly_and_max_money_holds(api, parent_usage,
                                                                        make_sim, api_key,
                                                                        tmp_path):
    from pipeline.sim import TEXT2IMG_WORKFLOW_ID
    from pipeline.sim.config import WorkflowBilling

    sim = make_sim(seed=6, failure_rate=0.2, task_duration_s=(7.0, 13.0), workflow_billing={
        TEXT2IMG_WORKFLOW_ID: WorkflowBilling(billing="money", money_per_second=0.014,
                                              child_tasks=2, parent_usage=parent_usage)})
    manifest = write_manifest(tmp_path / "m.csv", 30)
    summary = run_batch(ManifestArgs(manifest, preflight=False), tmp_path / "run",
                        fast_settings(sim, api_key, concurrency=5, api=api),
                        policy=fast_policy(), handle_signals=False, max_money=1.0)
    records = read_results(tmp_path / "run")
    ledger = sim.audit.money_ledger()
    assert summary.exit_code == 3 and "--max-money 1" in summary.stopped
    assert 0.5 < sim.audit.money_total() <= 1.0
    assert {r["coins"] for r in records if r["taskId"]} == {None}  # money only, never "0 coins"
    for record in records:
        if record["taskId"]:
            spent = (record["money"] or 0) + (record["thirdPartyMoney"] or 0)
            assert spent == pytest.approx(ledger[record["taskId"]], abs=1e-9), record
    assert summary.spending.all_money == pytest.approx(sim.audit.money_total(), abs=1e-9)
