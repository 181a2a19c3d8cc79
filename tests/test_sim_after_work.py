"""After-work faults: the create is processed, its task created, started and billed, and then the
answer fails in one of ``AFTER_WORK_MODES``; plus the billing truth a client reconciles against."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import SIM_CREATE as CREATE

from pipeline.errors import ConfigError
from pipeline.sim import (
    AFTER_WORK_MODES,
    DEFAULT_WEBAPP_ID,
    AccountConfig,
    Faults,
    SimConfig,
    Simulator,
)
from pipeline.sim.server import SHUTDOWN_TIMEOUT_S
from pipeline.sim.testing import SimClient

DURATION_S = 10.0  # frozen_sim: queue delay 1 s, then 10 s of GPU time at 0.2 coins/s
COINS = math.ceil(DURATION_S * 0.2)
STALL_S = 0.3
TRICKLE_S = 0.002





def _after(mode: str, **more: Any) -> Faults:
    return Faults(after_work=1.0, after_work_modes=(mode,), stall_s=STALL_S,
                  trickle_interval_s=TRICKLE_S, **more)


def _raw_post(sim: Simulator, path: str, body: dict[str, Any], *, timeout_s: float = 5.0
              ) -> tuple[bytes, list[bytes]]:
    """POST over a bare socket; (everything received until the server closed, the recv chunks)."""
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    chunks: list[bytes] = []
    with socket.create_connection((sim.host, sim.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), chunks


def _split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _check_task_behind_the_fault(sim: Simulator, api: SimClient, mode: str) -> str:
    """The task exists with its fault, runs, and is billed at its end; returns its id."""
    [task] = sim.audit.tasks()
    assert task["faults"] == [f"after_work:{mode}"]
    assert task["coins"] is None and task["status"] in ("QUEUED", "RUNNING")
    [record] = sim.audit.requests("create")
    assert record["fault"] == f"after_work:{mode}" and record["task_id"] == task["taskId"]
    sim.advance(20)
    [task] = sim.audit.tasks()
    assert task["status"] == "SUCCESS" and task["coins"] == COINS
    assert sim.audit.ledger() == {task["taskId"]: COINS} and sim.audit.ledger_total() == COINS
    assert api.outputs(task["taskId"])["code"] == 0  # a real task, polls answer normally
    return str(task["taskId"])


@pytest.mark.parametrize("mode", [m for m in AFTER_WORK_MODES if m.startswith("http_")])
def test_http_status_after_work_is_an_nginx_page_and_the_task_is_billed(fault_sim, key, mode):
    sim, api = fault_sim(_after(mode))
    response = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    status = int(mode.removeprefix("http_"))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert f"<title>{status} " in response.text and "<center>nginx</center>" in response.text
    task_id = _check_task_behind_the_fault(sim, api, mode)
    assert task_id not in response.text
    assert sim.audit.requests("create")[0]["status_http"] == status


ENVELOPES: dict[str, tuple[Any, str, bool]] = {  # mode -> (code, msg, data carries the task)
    "code_500": (500, "UNKNOWN_ERROR", False),
    "code_500_task": (500, "UNKNOWN_ERROR", True),
    "code_1005": (1005, "server error", False),
    "code_null": (None, "success", True),
    "code_text": ("0.0", "success", True),
    "code_unknown": (999, "error", False),
}


@pytest.mark.parametrize("mode", list(ENVELOPES))
def test_envelope_after_work_has_the_promised_code_and_data(fault_sim, key, mode):
    code, msg, with_task = ENVELOPES[mode]
    sim, api = fault_sim(_after(mode))
    response = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"code", "msg", "data"}
    assert answer["code"] == code and type(answer["code"]) is type(code)
    assert answer["msg"] == msg
    task_id = _check_task_behind_the_fault(sim, api, mode)
    if with_task:
        assert answer["data"]["taskId"] == task_id and answer["data"]["clientId"]
    else:
        assert answer["data"] is None
    audited = sim.audit.requests("create")[0]
    assert audited["status_http"] == 200
    assert audited["code"] == (code if isinstance(code, int) else None)


def test_redirect_after_work_is_a_302_to_the_base_url_with_no_body(fault_sim, key):
    sim, api = fault_sim(_after("redirect"))
    response = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    assert response.status_code == 302
    assert response.headers["location"] == sim.base_url + "/"
    assert response.content == b"" and response.headers["content-length"] == "0"
    _check_task_behind_the_fault(sim, api, "redirect")


def test_truncated_after_work_announces_the_whole_body_and_sends_half(fault_sim, key):
    sim, api = fault_sim(_after("truncated"))
    raw, _ = _raw_post(sim, "/task/openapi/create", {"apiKey": key, **CREATE})
    status, headers, body = _split(raw)
    assert status == 200 and headers["content-type"].startswith("application/json")
    announced = int(headers["content-length"])
    assert len(body) == announced // 2 and body.startswith(b'{"code":0,"msg":"success"')
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(httpx.RemoteProtocolError):  # as a client library sees it
        sim.set_faults(_after("truncated"))
        api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE}).read()
    sim.set_faults(Faults())
    [first, second] = sim.audit.tasks()
    assert first["faults"] == second["faults"] == ["after_work:truncated"]
    sim.advance(20)
    assert sim.audit.ledger_total() == 2 * COINS


def test_garbage_after_work_is_http_200_that_is_not_json(fault_sim, key):
    sim, api = fault_sim(_after("garbage"))
    response = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    _check_task_behind_the_fault(sim, api, "garbage")


def test_drop_after_work_closes_the_socket_with_no_answer(fault_sim, key):
    sim, api = fault_sim(_after("drop"))
    raw, _ = _raw_post(sim, "/task/openapi/create", {"apiKey": key, **CREATE})
    assert raw == b""
    _check_task_behind_the_fault(sim, api, "drop")
    assert sim.audit.requests("create")[0]["status_http"] is None


def test_stall_after_work_holds_the_normal_answer(fault_sim, key):
    sim, api = fault_sim(_after("stall"))
    began = time.monotonic()
    answer = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE}).json()
    assert time.monotonic() - began >= STALL_S
    assert answer["code"] == 0
    assert answer["data"]["taskId"] == _check_task_behind_the_fault(sim, api, "stall")
    sim.set_faults(_after("stall"))
    with httpx.Client(base_url=sim.base_url, timeout=STALL_S / 3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    assert len(sim.audit.tasks()) == 2  # the create the client gave up on exists and will be billed


def test_trickle_after_work_sends_the_normal_answer_one_byte_at_a_time(fault_sim, key):
    sim, api = fault_sim(_after("trickle"))
    began = time.monotonic()
    raw, chunks = _raw_post(sim, "/task/openapi/create", {"apiKey": key, **CREATE})
    status, headers, body = _split(raw)
    assert status == 200 and int(headers["content-length"]) == len(body)
    assert time.monotonic() - began >= (len(body) - 1) * TRICKLE_S
    assert len(chunks) > len(body) // 8  # many tiny segments, not one answer
    answer = json.loads(body)
    assert answer["code"] == 0
    assert answer["data"]["taskId"] == _check_task_behind_the_fault(sim, api, "trickle")


def test_after_work_applies_to_ai_app_runs_and_not_to_refused_creates(fault_sim, key):
    sim, api = fault_sim(Faults(after_work=1.0, after_work_modes=("code_500",)))
    answer = api.post("/task/openapi/ai-app/run", {"webappId": DEFAULT_WEBAPP_ID, "nodeInfoList": []})
    assert answer == {"code": 500, "msg": "UNKNOWN_ERROR", "data": None}
    [task] = sim.audit.tasks()
    assert task["webapp_id"] == DEFAULT_WEBAPP_ID and task["faults"] == ["after_work:code_500"]
    assert api.post("/task/openapi/create", {"workflowId": "42"})["code"] == 380  # no task: no fault
    assert api.account()["code"] == 0  # not a create: no fault
    assert [r["fault"] for r in sim.audit.requests()] == ["after_work:code_500", None, None]


def test_after_work_respects_routes(fault_sim, key):
    sim, api = fault_sim(Faults(after_work=1.0, routes=("ai_app_run",)))
    assert api.create()["code"] == 0
    assert sim.audit.tasks()[0]["faults"] == []


def test_all_modes_are_drawn_when_none_are_named(fault_sim, key):
    sim, _api = fault_sim(Faults(after_work=1.0, stall_s=0.0, trickle_interval_s=0.0),
                      accounts=[AccountConfig(key=key, concurrency=1000)])
    with httpx.Client(base_url=sim.base_url, timeout=5.0, follow_redirects=False) as http:
        for seed in range(150):
            body = {"apiKey": key, **CREATE, "nodeInfoList": [
                {"nodeId": "3", "fieldName": "seed", "fieldValue": seed}]}
            try:
                http.post("/task/openapi/create", json=body).read()
            except httpx.HTTPError:
                pass
    tasks = sim.audit.tasks()
    assert len(tasks) == 150
    seen = {t["faults"][0].removeprefix("after_work:") for t in tasks}
    assert seen == set(AFTER_WORK_MODES)


def test_after_work_rate_is_a_rate_and_reproducible(key):
    def trace(seed: int) -> list[list[str]]:
        config = SimConfig(seed=seed, time_scale=1e-9, accounts=[AccountConfig(key=key, concurrency=500)],
                           faults=Faults(after_work=0.3, after_work_modes=("code_500", "code_1005")))
        with Simulator(config) as sim, SimClient(sim, key) as api:
            for i in range(60):
                api.create([("3", "seed", i)])
            return [t["faults"] for t in sim.audit.tasks()]

    first = trace(1)
    assert first == trace(1)
    hit = [f for f in first if f]
    assert 5 < len(hit) < 35 and {f[0] for f in hit} == {"after_work:code_500", "after_work:code_1005"}


@pytest.mark.parametrize("faults", [
    Faults(after_work=1.0, after_work_modes=("stall",), stall_s=60.0),
    Faults(after_work=1.0, after_work_modes=("trickle",), trickle_interval_s=60.0),
    Faults(slow_answer=1.0, slow_answer_s=60.0),
], ids=["stall", "trickle", "slow_answer"])
def test_close_does_not_wait_for_held_answers(key, faults):
    sim = Simulator(SimConfig(time_scale=1e-9, accounts=[AccountConfig(key=key)], faults=faults))
    sim.start()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with httpx.Client(base_url=sim.base_url, timeout=30.0) as http:
                http.post("/task/openapi/create", json={"apiKey": key, **CREATE}).read()
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 5
    while not sim.audit.requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    began = time.monotonic()
    sim.close()
    assert time.monotonic() - began < SHUTDOWN_TIMEOUT_S
    thread.join(5)
    assert not thread.is_alive() and errors  # the client saw the connection end, not an answer


# -- billing truth (runninghub-api.md section 7.4) ------------------------------------------------


def _usage(api: SimClient, task_id: str) -> dict[str, Any]:
    return api.post("/openapi/v2/query", {"taskId": task_id}, key_field=None, bearer=True)


def test_failed_and_cancelled_tasks_are_billed_for_the_runtime_they_used(fault_sim, key):
    sim, api = fault_sim(Faults(), failure_rate=1.0, task_duration_s=60.0)
    failed = api.task_id([("3", "seed", 1)])
    sim.set_faults(Faults())
    sim.advance(100)
    [task] = sim.audit.tasks()
    used = task["ended_at"] - task["started_at"]
    assert 2.0 <= used <= 10.0 and task["status"] == "FAILED"
    assert task["coins"] == math.ceil(used * 0.2 - 1e-9) > 0
    query = _usage(api, failed)
    assert query["status"] == "FAILED"
    assert query["usage"] == {"consumeCoins": str(task["coins"]), "consumeMoney": None,
                              "taskCostTime": str(round(used)), "thirdPartyConsumeMoney": None}
    assert query["failedReason"]["exception_type"] == "torch.OutOfMemoryError"
    assert query["failedReason"]["node_id"] and query["errorCode"] == "1000"


def test_cancel_bills_the_seconds_run_so_far(fault_sim, key):
    sim, api = fault_sim(Faults(), task_duration_s=100.0)
    running = api.task_id([("3", "seed", 1)])
    waiting = api.task_id([("3", "seed", 2)])
    sim.advance(1 + 16)  # both started at 1 and have run 16 s of their 100
    assert api.cancel(running)["code"] == 0
    coins = {t["taskId"]: t["coins"] for t in sim.audit.tasks()}
    assert coins[running] == math.ceil(16 * 0.2) == 4
    query = _usage(api, running)
    assert query["status"] == "CANCEL" and query["usage"]["consumeCoins"] == "4"
    assert query["usage"]["taskCostTime"] == "16"
    assert query["failedReason"]["exception_type"] == "TaskCancelled"
    assert coins[waiting] is None  # still running: not billed yet
    assert sim.audit.ledger() == {running: 4}


def test_v2_usage_of_a_success_is_the_exact_billed_coins(fault_sim, key):
    sim, api = fault_sim(Faults())
    task_id = api.task_id()
    assert _usage(api, task_id)["usage"] is None  # not ended: no usage yet
    sim.advance(20)
    query = _usage(api, task_id)
    assert query["status"] == "SUCCESS" and query["failedReason"] is None
    assert query["usage"] == {"consumeCoins": str(COINS), "consumeMoney": None,
                              "taskCostTime": str(int(DURATION_S)), "thirdPartyConsumeMoney": None}
    assert api.outputs(task_id)["data"][0]["consumeCoins"] == str(COINS)


def test_costs_vary_with_runtime_and_the_ledger_adds_up(fault_sim, key):
    sim, api = fault_sim(Faults(), task_duration_s=(10.0, 300.0), failure_rate=0.3,
                     accounts=[AccountConfig(key=key, concurrency=100, coins=100_000)])
    ids = [api.task_id([("3", "seed", i)]) for i in range(30)]
    api.cancel(ids[0])  # in its queue delay: nothing ran, nothing billed
    sim.advance(400)
    tasks = sim.audit.tasks()
    for task in tasks:
        used = task["ended_at"] - task["started_at"]
        assert task["coins"] == (math.ceil(used * 0.2 - 1e-9) if used > 0 else 0)
    assert tasks[0]["coins"] == 0 and tasks[0]["status"] == "CANCEL"
    assert len({t["coins"] for t in tasks}) > 10  # prices follow the runtime
    assert {t["status"] for t in tasks} == {"SUCCESS", "FAILED", "CANCEL"}
    ledger = sim.audit.ledger()
    assert set(ledger) == set(ids) and sim.audit.ledger_total() == sum(t["coins"] for t in tasks)
    account = sim.account(key)
    assert account.billed_coins == sim.audit.ledger_total() == 100_000 - account.coins


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["after_work", "trickle", "oversized", "gzip_bomb", "deep_json",
                                  "nan_counts", "control_chars", "newline_task_id"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True])
def test_new_rates_must_be_between_0_and_1(name, value):
    with pytest.raises(ConfigError, match=f"{name} must be between 0 and 1"):
        Faults(**{name: value}).validate()


def test_unknown_after_work_modes_are_refused_with_the_valid_ones_named():
    with pytest.raises(ConfigError, match="unknown after_work mode.*'http_418'") as caught:
        Faults(after_work=0.1, after_work_modes=("code_500", "http_418")).validate()
    assert all(mode in str(caught.value) for mode in AFTER_WORK_MODES)
    with pytest.raises(ConfigError, match="non-empty"):
        Faults(after_work_modes=()).validate()
    with pytest.raises(ConfigError, match="valid modes"):
        SimConfig.from_dict({"faults": {"after_work_modes": "stall"}})


@pytest.mark.parametrize("field, value", [
    ("stall_s", -1), ("trickle_interval_s", -0.5), ("oversized_bytes", 10), ("gzip_bomb_bytes", 1.5),
    ("deep_json_depth", 0), ("nan_counts_style", "float"),
])
def test_new_sizes_and_styles_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        Faults(**{field: value}).validate()


def test_the_new_keys_load_from_yaml(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text(
        "faults:\n"
        "  after_work: 0.02\n"
        "  after_work_modes: [http_502, code_500_task, drop, stall]\n"
        "  stall_s: 30\n"
        "  trickle: 0.01\n"
        "  trickle_interval_s: 1.0\n"
        "  oversized: 0.001\n"
        "  oversized_bytes: 209715200\n"
        "  gzip_bomb: 0.001\n"
        "  gzip_bomb_bytes: 1073741824\n"
        "  deep_json: 0.001\n"
        "  deep_json_depth: 100000\n"
        "  nan_counts: 0.05\n"
        "  nan_counts_style: both\n"
        "  control_chars: 0.05\n"
        "  newline_task_id: 0.01\n",
        encoding="utf-8",
    )
    faults = SimConfig.from_file(path).faults
    assert faults.after_work_modes == ("http_502", "code_500_task", "drop", "stall")
    assert faults.modes() == faults.after_work_modes and Faults().modes() == AFTER_WORK_MODES
    assert (faults.oversized_bytes, faults.gzip_bomb_bytes, faults.deep_json_depth) == (
        200 * 2**20, 2**30, 100_000)
    assert faults.newline_task_id == 0.01 and faults.nan_counts_style == "both"
