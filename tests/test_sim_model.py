"""Simulated time, billing, expiry, determinism, audit and configuration of the simulator."""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.sim import (
    TEXT2IMG_WORKFLOW_ID,
    AccountConfig,
    Faults,
    SimConfig,
    Simulator,
    signature,
)
from pipeline.sim.testing import SimClient

Starter = Callable[..., tuple[Simulator, SimClient]]


@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    return frozen_sim


def test_tasks_run_on_the_scaled_clock_and_counts_stay_truthful(start, key):
    # time scale 20: the first task needs >= 0.5 real s, so the ninth create surely meets 8 live
    sim, api = start(time_scale=20.0, task_duration_s=(10.0, 30.0), queue_delay_s=(0.0, 2.0),
                     accounts=[AccountConfig(key=key, concurrency=8)])
    ids = [api.task_id([("3", "seed", i)]) for i in range(8)]
    assert api.create([("3", "seed", 99)])["code"] == 421
    live = int(api.account()["data"]["currentTaskCounts"])
    assert 0 < live <= 8
    answers = [api.wait_outputs(t) for t in ids]  # 10-32 simulated s = at most 1.6 real s
    assert [a["code"] for a in answers] == [0] * 8
    assert api.account()["data"]["currentTaskCounts"] == "0"
    assert sim.account(key).live == 0 and sim.account(key).running == 0
    assert {t["status"] for t in sim.audit.tasks()} == {"SUCCESS"}


def test_billing_per_gpu_second_until_the_balance_runs_out(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, coins=10)], coins_per_second=0.25,
                     task_duration_s=14.0)
    first = api.task_id()
    sim.advance(16)
    [item] = api.outputs(first)["data"]
    assert item["consumeCoins"] == "4" and item["taskCostTime"] == "14"  # ceil(14 x 0.25)
    assert api.account()["data"]["remainCoins"] == "6"
    second, third = api.task_id(), api.task_id()
    sim.advance(16)
    assert api.account()["data"]["remainCoins"] == "-2"
    assert api.create()["code"] == 414
    assert sim.account(key).billed_coins == 12
    assert [t["coins"] for t in sim.audit.tasks()] == [4, 4, 4]
    assert {second, third} <= {t["taskId"] for t in sim.audit.tasks()}


def test_output_files_expire_then_records_are_purged(start):
    sim, api = start(file_ttl_s=100.0, retention_s=1000.0)
    task_id = api.task_id()
    sim.advance(12)
    url = api.outputs(task_id)["data"][0]["fileUrl"]
    assert api.http.get(url).status_code == 200
    assert api.http.get(url.replace("9_0", "8_0")).status_code == 404
    assert api.http.get(url.replace("9_0.png", "9_1.png")).status_code == 404
    sim.advance(100)
    expired = api.http.get(url)
    assert expired.status_code == 403 and b"AccessDenied" in expired.content
    assert api.outputs(task_id)["code"] == 0  # the record outlives the file
    sim.advance(1000)
    assert api.outputs(task_id)["code"] == 807
    assert api.status(task_id)["code"] == 807
    assert api.cancel(task_id)["code"] == 807
    assert api.http.get(url).status_code == 404
    assert sim.audit.tasks()[0]["status"] == "SUCCESS"  # the audit keeps everything


def _png_for(key: str, seed: int, nodes: list[tuple[str, str, Any]], **extra: Any) -> tuple[str, bytes]:
    config = SimConfig(seed=seed, time_scale=1e-9, queue_delay_s=0.0, task_duration_s=5.0,
                       accounts=[AccountConfig(key=key)])
    with Simulator(config) as sim, SimClient(sim, key) as api:
        task_id = api.task_id(nodes, **extra)
        sim.advance(6)
        url = api.outputs(task_id)["data"][0]["fileUrl"]
        return task_id, api.http.get(url).content


def test_outputs_are_deterministic_pngs_of_the_inputs(key):
    nodes = [("6", "text", "a red fox"), ("3", "seed", 42)]
    first_id, first = _png_for(key, 0, nodes)
    again_id, again = _png_for(key, 0, nodes)
    assert first_id == again_id  # task ids come from the seeded RNG too
    assert first == again
    other_sim_id, same_inputs = _png_for(key, 1, nodes)
    assert other_sim_id != first_id and same_inputs == first  # pixels depend on the inputs only
    _, other_seed = _png_for(key, 0, [("6", "text", "a red fox"), ("3", "seed", 43)])
    assert other_seed != first
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert "prompt" in image.info  # addMetadata defaults to true
    other = Image.open(io.BytesIO(other_seed))
    assert image.tobytes() != other.tobytes()
    _, bare = _png_for(key, 0, nodes, addMetadata=False)
    assert "prompt" not in Image.open(io.BytesIO(bare)).info
    assert Image.open(io.BytesIO(bare)).tobytes() == image.tobytes()


def test_audit_records_requests_tasks_and_never_the_key(start, key, tmp_path):
    sim, api = start()
    first = api.task_id([("3", "seed", 1)])
    api.task_id([("3", "seed", 1)])  # the same inputs paid twice
    api.task_id([("3", "seed", 2)])
    api.outputs(first)
    api.post("/uc/openapi/accountStatus", key_field="apikey", key="wrong")
    requests = sim.audit.requests()
    assert [r["route"] for r in requests] == ["create"] * 3 + ["outputs", "account_status"]
    assert set(requests[0]) == {"t", "method", "path", "route", "key_fp", "status_http", "code",
                                "task_id", "fault"}
    assert requests[0]["key_fp"] == sim.account(key).key_fp and len(requests[0]["key_fp"]) == 8
    assert requests[3] | {"t": 0} == {"t": 0, "method": "POST", "path": "/task/openapi/outputs",
                                      "route": "outputs", "key_fp": requests[0]["key_fp"],
                                      "status_http": 200, "code": 813, "task_id": first, "fault": None}
    assert requests[4]["code"] == 412
    assert sim.audit.codes("create") == {0: 3}
    by_sig = sim.audit.creates_by_signature()
    dup = signature(TEXT2IMG_WORKFLOW_ID, [{"nodeId": "3", "fieldName": "seed", "fieldValue": 1}])
    assert by_sig[dup] == 2 and sim.audit.duplicate_creates() == {dup: 2}
    path = sim.audit.dump_jsonl(tmp_path / "audit.jsonl")
    text = path.read_text(encoding="utf-8")
    assert key not in text
    kinds = [json.loads(line)["kind"] for line in text.splitlines()]
    assert kinds.count("request") == 5 and kinds.count("task") == 3


def test_open_accounts_accept_any_well_formed_key_as_normal_with_concurrency_1():
    config = SimConfig(open_accounts=True, time_scale=1e-9)
    with Simulator(config) as sim, SimClient(sim, secrets.token_hex(16)) as api:
        status = api.account()
        assert status["data"]["apiType"] == "NORMAL"
        assert api.create()["code"] == 0
        assert api.create()["code"] == 421
        assert api.post("/uc/openapi/accountStatus", key="not-a-key", key_field="apikey")["code"] == 412


def test_simulator_stops_cleanly_and_releases_its_port(key):
    sim = Simulator(SimConfig(accounts=[AccountConfig(key=key)]))
    with sim:
        url = sim.base_url
        assert httpx.post(f"{url}/uc/openapi/accountStatus", json={"apikey": key}).json()["code"] == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/uc/openapi/accountStatus", json={"apikey": key}, timeout=1.0)
    sim.close()  # closing twice is harmless


def test_advance_moves_the_clock_forward_only(start):
    sim, _ = start()
    before = sim.now()
    sim.advance(3600)
    assert sim.now() >= before + 3600
    with pytest.raises(ValueError):
        sim.advance(-1)


def test_add_workflow_and_webapp_at_runtime(start):
    sim, api = start()
    sim.add_workflow("555", {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                    "color": 0}},
        "2": {"class_type": "SaveVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
    sim.add_webapp("777", "555")
    task_id = api.task_id([("2", "fps", 12)], workflow_id="555")
    sim.advance(12)
    assert [i["nodeId"] for i in api.outputs(task_id)["data"]] == ["2", "3"]
    answer = api.post("/task/openapi/ai-app/run", {"webappId": "777", "nodeInfoList": []})
    assert answer["code"] == 0
    with pytest.raises(ConfigError, match="class_type"):
        sim.add_workflow("556", {"1": {"inputs": {}}})
    with pytest.raises(ConfigError, match="unknown workflow"):
        sim.add_webapp("778", "404")


def test_config_from_yaml_and_json_files(tmp_path, key):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    }))
    (tmp_path / "sim.yaml").write_text(
        "seed: 3\ntime_scale: 50\ntask_duration_s: [1, 2]\nqueue_delay_s: 0.5\n"
        f"accounts:\n  - {{key: {key}, api_type: EXCLUSIVE, concurrency: 2, coins: 5}}\n"
        "faults: {http_5xx: 0.1, routes: [create]}\n"
        "workflows: {'123': wf.json}\nwebapps: {'9': '123'}\n",
        encoding="utf-8",
    )
    config = SimConfig.from_file(tmp_path / "sim.yaml")
    assert config.seed == 3 and config.time_scale == 50 and config.task_duration_s == (1.0, 2.0)
    assert config.accounts[0].api_type == "EXCLUSIVE" and config.accounts[0].coins == 5
    assert config.faults == Faults(http_5xx=0.1, routes=("create",))
    assert key not in repr(config)
    with Simulator(config) as sim, SimClient(sim, key) as api:
        prompt = api.post("/api/openapi/getJsonApiFormat", {"workflowId": "123"})  # not a fault route
        assert json.loads(prompt["data"]["prompt"])["1"]["class_type"] == "SaveImage"
        answer = api.post("/task/openapi/ai-app/run", {"webappId": "9", "nodeInfoList": []})
        assert answer["code"] == 0
    (tmp_path / "sim.json").write_text(json.dumps({"open_accounts": True, "faults": {}}))
    assert SimConfig.from_file(tmp_path / "sim.json").open_accounts is True


@pytest.mark.parametrize("text,message", [
    ("colour: red\n", "unknown key(s) 'colour'; valid keys: seed"),
    ("faults: {http_500: 0.1}\n", "faults: unknown key(s) 'http_500'"),
    ("accounts: [{key: abc, tier: gold}]\n", "accounts[0]: unknown key(s) 'tier'"),
    ("time_scale: 0\n", "time_scale must be > 0"),
    ("task_duration_s: [5, 1]\n", "task_duration_s must satisfy"),
    ("accounts: [{key: abc, api_type: PREMIUM}]\n", "api_type 'PREMIUM' is not one of"),
    ("faults: {drop_connection: 1.5}\n", "drop_connection must be between 0 and 1"),
    ("seed: [unclosed\n", "not valid yaml"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "sim.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        SimConfig.from_file(path)
    assert message in str(info.value)


def test_many_idle_tasks_cost_nothing(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, concurrency=100000)], time_scale=1e-9)
    service = sim.service
    account = sim.account(key)
    began = time.perf_counter()
    with sim.lock:  # drive the model directly: 20 000 accepted tasks
        from pipeline.sim.model import Task

        workflow = service.workflows[TEXT2IMG_WORKFLOW_ID]
        for i in range(20000):
            task = Task(service.new_task_id(), service.new_client_id(), account, TEXT2IMG_WORKFLOW_ID,
                        workflow, [], str(i), sim.now(), 1.0, 10.0 + i % 7, False)
            service.tasks[task.task_id] = task
            service.task_list.append(task)
            account.start(task, sim.now())
    assert api.account()["data"]["currentTaskCounts"] == "20000"
    sim.advance(100)
    assert api.account()["data"]["currentTaskCounts"] == "0"
    assert time.perf_counter() - began < 5.0
