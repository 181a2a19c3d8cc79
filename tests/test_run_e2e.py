"""End to end over real HTTP: the pipeline against the simulator on loopback."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import canonical, fast_settings, read_results, write_manifest

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.errors import ManifestChangedError


def _run(sim, key, manifest, out, preflight=True, **overrides):
    return run_batch(ManifestArgs(manifest, preflight=preflight), out,
                     fast_settings(sim, key, **overrides), handle_signals=False)


def test_500_rows_at_concurrency_20_all_succeed_and_match_the_audit(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=20)
    manifest = write_manifest(tmp_path / "m.csv", 500)
    summary = _run(sim, api_key, manifest, tmp_path / "run", concurrency=20)
    assert summary.exit_code == 0
    assert summary.counts[st.SUCCESS] == 500
    results = read_results(tmp_path / "run")
    assert [r["row"] for r in results] == list(range(1, 501))
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    assert len(tasks) == 500
    for record in results:
        task = tasks[record["taskId"]]
        assert canonical(task["nodeInfoList"]) == canonical(record["nodeInfoList"])
        assert record["fileUrls"] and all(u.startswith(sim.base_url) for u in record["fileUrls"])
        assert record["status"] == "SUCCESS" and record["coins"] > 0
    # the values were sent with their types: seed an int, cfg a float
    sent = {i["fieldName"]: i["fieldValue"] for i in results[7]["nodeInfoList"]}
    assert sent == {"text": "prompt number 0", "seed": 7, "cfg": 7.0}


def test_capacity_answers_shrink_the_window_and_never_fail_rows(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=3, api_type="NORMAL")
    manifest = write_manifest(tmp_path / "m.csv", 40)
    summary = _run(sim, api_key, manifest, tmp_path / "run", concurrency=10)
    assert summary.counts[st.SUCCESS] == 40 and summary.exit_code == 0
    codes = Counter(r["code"] for r in sim.audit.requests() if r["route"] == "create")
    assert codes[0] == 40
    assert len(sim.audit.tasks()) == 40


def test_task_failures_are_recorded_with_failed_reason(make_sim, api_key, tmp_path):
    sim = make_sim(failure_rate=0.3, seed=3)
    manifest = write_manifest(tmp_path / "m.csv", 60)
    summary = _run(sim, api_key, manifest, tmp_path / "run")
    assert summary.exit_code == 1
    failed = [r for r in read_results(tmp_path / "run") if r["status"] == "FAILED"]
    sim_failed = {t["taskId"] for t in sim.audit.tasks() if t["status"] == "FAILED"}
    assert failed and {r["taskId"] for r in failed} == sim_failed
    for record in failed:
        assert record["error_code"] == 805
        assert record["failedReason"]["exception_type"]
        assert record["error"]


def test_empty_balance_stops_with_exit_3_and_resumes_after_top_up(make_sim, api_key, tmp_path):
    sim = make_sim(coins=0)
    manifest = write_manifest(tmp_path / "m.csv", 10)
    summary = _run(sim, api_key, manifest, tmp_path / "run")
    assert summary.exit_code == 3
    assert "414" in summary.stopped and "top up" in summary.stopped
    assert summary.counts[st.PENDING] == 10
    assert sim.audit.tasks() == []
    sim.account(api_key).coins = 10**6
    summary = _run(sim, api_key, manifest, tmp_path / "run")
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 10
    assert len(sim.audit.tasks()) == 10


def test_bad_key_stops_before_any_create(make_sim, api_key, tmp_path):
    import secrets

    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 5)
    from pipeline.errors import RunFatalError

    # the preflight's workflow fetch is the first call, and it stops the run
    with pytest.raises(RunFatalError, match="412 TOKEN_INVALID: check RUNNINGHUB_API_KEY") as info:
        _run(sim, secrets.token_hex(16), manifest, tmp_path / "run")
    assert info.value.exit_code == 3
    # without preflight, the account check before the first create stops it the same way
    summary = _run(sim, secrets.token_hex(16), manifest, tmp_path / "run2", preflight=False)
    assert summary.exit_code == 3 and "RUNNINGHUB_API_KEY" in summary.stopped
    assert not [r for r in sim.audit.requests() if r["route"] == "create"]


def test_row_fatal_codes_fail_the_row_and_the_rest_go_on(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "row_id,workflowId,nodeInfoList\n"
        'a,1904136902449209346,"[{""nodeId"":""6"",""fieldName"":""text"",""fieldValue"":""x""}]"\n'
        'b,1904136902449209346,"[{""nodeId"":""99"",""fieldName"":""text"",""fieldValue"":""x""}]"\n'
        'c,1904136902449209346,"[{""nodeId"":""5"",""fieldName"":""width"",""fieldValue"":999999}]"\n'
        'd,1904136902449209346,"[{""nodeId"":""3"",""fieldName"":""seed"",""fieldValue"":2}]"\n'
        'e,1904136902449209346,"[{""nodeId"":""6"",""fieldName"":""clip"",""fieldValue"":""x""}]"\n',
        encoding="utf-8",
    )
    # preflight would refuse these rows before sending; switched off, the service's answers count
    summary = _run(sim, api_key, manifest, tmp_path / "run", preflight=False)
    by_id = {r["row_id"]: r for r in read_results(tmp_path / "run")}
    assert summary.exit_code == 1
    assert by_id["a"]["status"] == by_id["d"]["status"] == "SUCCESS"
    assert by_id["b"]["status"] == "FAILED" and by_id["b"]["error_code"] == 803
    assert by_id["c"]["status"] == "FAILED" and by_id["c"]["error_code"] == 433  # ComfyUI: > max
    # a literal on a link input passes ComfyUI's validation and fails when the task runs (billed)
    assert by_id["e"]["status"] == "FAILED" and by_id["e"]["error_code"] == 805
    assert by_id["e"]["taskId"]
    assert len(sim.audit.tasks()) == 3


def test_resume_polls_known_tasks_and_never_resubmits(make_sim, api_key, tmp_path):
    sim = make_sim(time_scale=100.0)
    manifest = write_manifest(tmp_path / "m.csv", 30)
    run_dir = tmp_path / "run"
    # first run: stop as soon as some tasks are in flight (as Ctrl-C would)
    from pipeline import runner as runner_mod

    original = runner_mod.Runner._submit
    submitted = []

    async def submit_then_stop(self, row):
        await original(self, row)
        submitted.append(row["idx"])
        if len(submitted) == 8:
            self.stop()

    runner_mod.Runner._submit = submit_then_stop
    try:
        first = _run(sim, api_key, manifest, run_dir, concurrency=8)
    finally:
        runner_mod.Runner._submit = original
    assert first.exit_code == 3 and first.stopped == "interrupted"
    live = first.counts[st.QUEUED] + first.counts[st.RUNNING]
    assert live + first.counts[st.SUCCESS] + first.counts[st.FAILED] == 8
    assert first.counts[st.PENDING] == 22
    second = _run(sim, api_key, manifest, run_dir, concurrency=8)
    assert second.exit_code == 0 and second.counts[st.SUCCESS] == 30
    created = Counter(canonical(t["nodeInfoList"]) for t in sim.audit.tasks())
    assert len(created) == 30 and set(created.values()) == {1}


def test_a_changed_manifest_is_refused(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 5)
    _run(sim, api_key, manifest, tmp_path / "run")
    other = write_manifest(tmp_path / "other.csv", 6)
    with pytest.raises(ManifestChangedError, match="use a new --out directory"):
        _run(sim, api_key, other, tmp_path / "run")


def test_output_manifest_reproduces_the_same_tasks(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 12)
    _run(sim, api_key, manifest, tmp_path / "run1")
    first = [canonical(t["nodeInfoList"]) for t in sim.audit.tasks()]
    summary = _run(sim, api_key, tmp_path / "run1" / "results.jsonl", tmp_path / "run2")
    assert summary.counts[st.SUCCESS] == 12
    second = [canonical(t["nodeInfoList"]) for t in sim.audit.tasks()][12:]
    assert sorted(first) == sorted(second)
    again = read_results(tmp_path / "run2")
    original = read_results(tmp_path / "run1")
    assert [r["row_id"] for r in again] == [r["row_id"] for r in original]
    assert [json.dumps(r["nodeInfoList"]) for r in again] == [
        json.dumps(r["nodeInfoList"]) for r in original
    ]


def test_preflight_refuses_wrong_rows_before_any_create(make_sim, api_key, tmp_path):
    from pipeline.errors import ManifestError

    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "workflowId,6.txt,3.seed,6.clip\n1904136902449209346,a cat,1,x\n"
        "1904136902449209346,a dog,2,y\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestError) as info:
        _run(sim, api_key, manifest, tmp_path / "run")
    text = str(info.value)
    assert 'row 1, column "6.txt"' in text and "did you mean" in text and "text" in text
    assert 'column "6.clip"' in text and "link" in text
    assert [r for r in sim.audit.requests() if r["route"] == "create"] == []
    assert not (tmp_path / "run" / "state.db").exists()


def test_budget_stops_before_passing_max_coins_and_resumes(make_sim, api_key, tmp_path):
    sim = make_sim(task_duration_s=20.0, queue_delay_s=0.0, coins_per_second=0.2)
    manifest = write_manifest(tmp_path / "m.csv", 20)
    settings = fast_settings(sim, api_key, concurrency=5)
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", settings, handle_signals=False,
                        max_coins=30)
    assert summary.exit_code == 3 and "--max-coins 30" in summary.stopped
    billed = sim.account(api_key).billed_coins
    assert billed <= 30 and summary.coins == billed
    assert summary.counts[st.SUCCESS] == 7  # 4 coins each: an eighth would make 32
    assert summary.counts[st.PENDING] == 13
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", settings, handle_signals=False,
                        max_coins=1000)
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 20
    assert len(sim.audit.tasks()) == 20


def test_reproducing_warns_when_the_workflow_changed_since(make_sim, api_key, tmp_path):
    import copy

    from pipeline.sim import TEXT2IMG_WORKFLOW_ID
    from pipeline.workflows import load_workflow_file

    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 4)
    _run(sim, api_key, manifest, tmp_path / "run1")
    warnings: list[str] = []
    settings = fast_settings(sim, api_key)
    source = tmp_path / "run1" / "results.jsonl"
    run_batch(ManifestArgs(source), tmp_path / "same", settings, handle_signals=False,
              on_warning=warnings.append)
    assert warnings == []
    original = load_workflow_file(
        __import__("pathlib").Path(__file__).parents[1] / "pipeline" / "sim" / "workflows"
        / "text2img.json"
    )
    changed = copy.deepcopy(original)
    changed["5"]["inputs"]["width"] = 768
    sim.add_workflow(TEXT2IMG_WORKFLOW_ID, changed)
    run_batch(ManifestArgs(source), tmp_path / "drift", settings, handle_signals=False,
              on_warning=warnings.append)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"workflow {TEXT2IMG_WORKFLOW_ID} changed since ")
    assert "the reproduction may not match the original outputs" in warnings[0]


def test_a_failing_service_stops_the_run_instead_of_piling_up_unknown_rows(
    make_sim, api_key, tmp_path
):
    from pipeline.runner import UNKNOWN_STREAK_STOP
    from pipeline.sim import Faults

    sim = make_sim(faults=Faults(drop_connection=1.0, routes=("create",)))
    manifest = write_manifest(tmp_path / "m.csv", 40)
    summary = _run(sim, api_key, manifest, tmp_path / "run", preflight=False)
    assert summary.exit_code == 3
    assert summary.stopped.startswith("RunningHub is failing: ")
    assert summary.counts[st.SUBMIT_UNKNOWN] == UNKNOWN_STREAK_STOP
    assert summary.counts[st.PENDING] == 40 - UNKNOWN_STREAK_STOP
    assert sim.audit.tasks() == []  # the dropped creates never reached the service


def test_a_second_interrupt_stops_at_once_and_leaves_the_row_in_doubt_unknown(
    make_sim, api_key, tmp_path
):
    import asyncio

    from pipeline.client import RunningHubClient
    from pipeline.manifest import load_manifest
    from pipeline.runner import Runner
    from pipeline.sim import Faults

    # every create is answered only after 30 real seconds: the first Ctrl-C would wait for it
    sim = make_sim(faults=Faults(slow_answer=1.0, slow_answer_s=30.0, routes=("create",)))
    manifest = write_manifest(tmp_path / "m.csv", 3)
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows(load_manifest(manifest).rows)
    settings = fast_settings(sim, api_key)

    async def scenario():
        async with RunningHubClient(settings) as client:
            runner = Runner(store, client, settings)
            task = asyncio.create_task(runner.run())
            while store.counts()[st.SUBMITTING] == 0:
                await asyncio.sleep(0.01)
            runner.stop()  # first Ctrl-C: would wait for the answer
            await asyncio.sleep(0.2)
            assert not task.done()
            runner.stop()  # second Ctrl-C: at once
            return await asyncio.wait_for(task, 5.0)

    try:
        summary = asyncio.run(scenario())
        assert summary.exit_code == 3 and summary.stopped == "interrupted"
        assert summary.counts[st.SUBMIT_UNKNOWN] == 1 and summary.counts[st.PENDING] == 2
        assert summary.counts[st.SUBMITTING] == 0
        row = next(r for r in store.iter_rows() if r["status"] == st.SUBMIT_UNKNOWN)
        assert "stopped while this row's create request was in flight" in row["error"]
    finally:
        store.close()


def test_a_run_refuses_to_resume_without_the_key_that_holds_its_tasks(make_sim, api_key,
                                                                       tmp_path):
    """Tasks (here creates in doubt) belong to the key that sent them: a resume with another key
    only is refused, naming that key, and sends nothing; once nothing is left on a key, a run may
    go on with another."""
    import secrets

    from pipeline.errors import StateError
    from pipeline.sim import AccountConfig, Faults

    other = secrets.token_hex(16)
    accounts = [AccountConfig(key=api_key, api_type="SHARED", concurrency=5),
                AccountConfig(key=other, api_type="SHARED", concurrency=5)]
    sim = make_sim(accounts=accounts, faults=Faults(lost_create=1.0, routes=["create"]))
    manifest = write_manifest(tmp_path / "m.csv", 4)
    summary = _run(sim, api_key, manifest, tmp_path / "run")
    assert summary.counts[st.SUBMIT_UNKNOWN] == 4
    creates = len(sim.audit.tasks())
    with pytest.raises(StateError, match=r"key key \(fingerprint [0-9a-f]{12}\) still has 4 "
                                         r"task\(s\) live or in doubt"):
        _run(sim, other, manifest, tmp_path / "run")
    assert len(sim.audit.tasks()) == creates
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert api_key.encode() not in data and other.encode() not in data
    done = make_sim(accounts=[AccountConfig(key=api_key, concurrency=5),
                              AccountConfig(key=other, concurrency=5)])
    _run(done, api_key, write_manifest(tmp_path / "n.csv", 3), tmp_path / "done")
    again = _run(done, other, tmp_path / "n.csv", tmp_path / "done")
    assert again.exit_code == 0 and again.counts[st.SUCCESS] == 3


def test_the_account_is_read_faster_only_when_many_tasks_end_often():
    from pipeline.runner import ACCOUNT_CALLS_PER_TASK, account_poll_interval

    # 50 tasks of 30 s end 5/3 times a second: half a call per task is a read every 1.2 s
    assert account_poll_interval(2.0, 30.0, 50) == pytest.approx(1.2)
    assert 1 / 1.2 / (50 / 30.0) == pytest.approx(ACCOUNT_CALLS_PER_TASK)
    # few or long tasks: the configured interval; nothing known yet: the configured interval
    assert account_poll_interval(2.0, 30.0, 5) == 2.0
    assert account_poll_interval(2.0, 600.0, 50) == 2.0
    assert account_poll_interval(2.0, None, 50) == 2.0
    assert account_poll_interval(2.0, 30.0, 0) == 2.0
    # a thousand short tasks: never faster than a quarter of the configured interval
    assert account_poll_interval(2.0, 10.0, 1000) == 0.5
    assert account_poll_interval(0.01, 1.0, 1000) == 0.0025


def test_the_window_learns_a_one_slot_key_at_once_and_a_resume_starts_there(make_sim, api_key,
                                                                           tmp_path):
    sim = make_sim(concurrency=1, task_duration_s=5.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 24)
    # v1 only: no queue/status to say the key's limit, so it is learnt from a capacity answer
    settings = fast_settings(sim, api_key, concurrency=8, capacity_backoff_s=5.0,
                             max_capacity_backoff_s=10.0, api="v1")
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", settings, handle_signals=False)
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 24
    refused = [r for r in sim.audit.requests("create") if r["code"] == 421]
    assert len(refused) <= 2, len(refused)  # not one capacity answer (and a pause) per row
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        assert store.get_meta("learnt_limit") == 1
    finally:
        store.close()
    # a resume (here: a retry of every row) starts from the learnt limit: no capacity answer
    from pipeline.retry import Selection, retry_rows

    before = len(refused)
    retry_rows(tmp_path / "run", settings, Selection(statuses=("SUCCESS",)),
               handle_signals=False)
    refused = [r for r in sim.audit.requests("create") if r["code"] == 421]
    assert len(refused) == before


def test_with_v2_the_window_starts_at_the_keys_concurrent_limit(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=3, task_duration_s=5.0, queue_delay_s=0.0, time_scale=10.0)
    manifest = write_manifest(tmp_path / "m.csv", 12)
    # no --concurrency: the key's own limit (queue/status concurrentLimit) is the window
    from pipeline.config import resolve_settings

    base = fast_settings(sim, api_key)
    settings = resolve_settings(api_key=api_key, base_url=sim.base_url, env={},
                                poll_interval_s=base.poll_interval_s,
                                account_poll_interval_s=base.account_poll_interval_s,
                                max_poll_interval_s=base.max_poll_interval_s)
    assert not settings.concurrency_given
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", settings, handle_signals=False)
    assert summary.exit_code == 0 and summary.capacity_answers == 0
    spans = [(t["created_at"], t["ended_at"]) for t in sim.audit.tasks()]
    most = max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)
    assert most == 3  # three in flight at once (the key's limit), not --concurrency's default 1
    assert [r["route"] for r in sim.audit.requests()].count("v2_queue_status") == 1


@pytest.mark.parametrize("rows_stored", [0, 3])
def test_a_creation_killed_before_it_was_recorded_starts_again(make_sim, api_key, tmp_path,
                                                              rows_stored):
    """A kill between making state.db and recording the manifest's facts leaves a store no row of
    which was sent: the same command starts the run again instead of calling it another manifest."""
    from pipeline.manifest import load_manifest

    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 5)
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows(list(load_manifest(manifest).rows)[:rows_stored])
    store.close()
    summary = _run(sim, api_key, manifest, tmp_path / "run")
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 5
    assert len(sim.audit.tasks()) == 5


def test_a_run_with_a_row_sent_is_never_started_again(make_sim, api_key, tmp_path):
    from pipeline.manifest import load_manifest

    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 5)
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows(load_manifest(manifest).rows)
    store.mark_submitting(0)  # a create may have left: this store must be kept
    store.close()
    with pytest.raises(ManifestChangedError):
        _run(sim, api_key, manifest, tmp_path / "run")
    assert (tmp_path / "run" / "state.db").exists() and not sim.audit.tasks()
