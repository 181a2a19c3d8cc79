"""Every injected fault, as an httpx client sees it, and its trace in the audit."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from conftest import SIM_CREATE as CREATE

from pipeline.errors import ConfigError
from pipeline.sim import AccountConfig, Faults, SimConfig, Simulator


def _body(key: str) -> dict[str, Any]:
    return {"apiKey": key, **CREATE}


def test_drop_connection_closes_the_socket_before_anything_happens(fault_sim, key):
    sim, api = fault_sim(Faults(drop_connection=1.0))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        api.http.post("/task/openapi/create", json=_body(key))
    assert sim.audit.tasks() == []
    [record] = sim.audit.requests()
    assert record["fault"] == "drop_connection" and record["status_http"] is None
    assert record["code"] is None and record["route"] == "create"


def test_garbage_body_is_http_200_that_is_not_json_and_nothing_is_processed(fault_sim, key):
    sim, api = fault_sim(Faults(garbage_body=1.0))
    response = api.http.post("/task/openapi/create", json=_body(key))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    assert sim.audit.tasks() == []
    assert sim.audit.requests()[0]["fault"] == "garbage_body"


def test_http_5xx_answers_an_html_page_and_nothing_is_processed(fault_sim, key):
    sim, api = fault_sim(Faults(http_5xx=1.0))
    statuses = set()
    for _ in range(12):
        response = api.http.post("/task/openapi/create", json=_body(key))
        statuses.add(response.status_code)
        assert response.headers["content-type"].startswith("text/html")
        assert "<html>" in response.text
    assert statuses <= {500, 502, 503} and len(statuses) >= 2
    assert sim.audit.tasks() == []
    assert {r["fault"] for r in sim.audit.requests()} == {"http_5xx"}
    assert {r["status_http"] for r in sim.audit.requests()} == statuses


def test_slow_answer_is_processed_and_delayed(fault_sim, key):
    sim, api = fault_sim(Faults(slow_answer=1.0, slow_answer_s=0.4))
    began = time.monotonic()
    answer = api.http.post("/task/openapi/create", json=_body(key)).json()
    assert time.monotonic() - began >= 0.4
    assert answer["code"] == 0
    with httpx.Client(base_url=sim.base_url, timeout=0.1) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/task/openapi/create", json=_body(key))
    assert len(sim.audit.tasks()) == 2  # the timed-out create was processed too
    assert {r["fault"] for r in sim.audit.requests()} == {"slow_answer"}


def test_lost_create_makes_the_task_then_drops_the_answer(fault_sim, key):
    sim, api = fault_sim(Faults(lost_create=1.0))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        api.http.post("/task/openapi/create", json=_body(key))
    [task] = sim.audit.tasks()
    assert task["faults"] == ["lost_create"]
    [record] = sim.audit.requests()
    assert record["code"] == 0 and record["task_id"] == task["taskId"]
    assert record["status_http"] is None and record["fault"] == "lost_create"
    # other routes are untouched by lost_create
    assert api.outputs(task["taskId"])["code"] == 813


def test_create_813_answers_queued_with_the_task_id_and_the_task_exists(fault_sim, key):
    sim, api = fault_sim(Faults(create_813=1.0))
    answer = api.http.post("/task/openapi/create", json=_body(key)).json()
    assert answer["code"] == 813 and answer["msg"] == "APIKEY_TASK_IS_QUEUED"
    task_id = answer["data"]["taskId"]
    assert [t["taskId"] for t in sim.audit.tasks()] == [task_id]
    sim.advance(20)
    assert api.outputs(task_id)["code"] == 0
    assert sim.audit.requests()[0]["fault"] == "create_813"


def test_task_failure_fault_fails_accepted_tasks(fault_sim, key):
    sim, api = fault_sim(Faults(task_failure=1.0))
    task_id = api.task_id()
    sim.advance(20)
    assert api.outputs(task_id)["code"] == 805
    [task] = sim.audit.tasks()
    assert task["status"] == "FAILED" and task["faults"] == ["task_failure"]


def test_poll_rate_limit_answers_1003_beyond_the_rate(fault_sim, key):
    sim, api = fault_sim(Faults(poll_rate_limit_per_s=5))
    task_id = api.task_id()
    codes = [api.outputs(task_id)["code"] for _ in range(12)]
    assert codes[:5] == [813] * 5 and 1003 in codes[5:]
    assert api.account()["code"] == 1003
    assert api.create()["code"] == 0  # creates are not polls
    limited = [r for r in sim.audit.requests() if r["code"] == 1003]
    assert limited and {r["fault"] for r in limited} == {"poll_rate_limit"}
    time.sleep(1.05)
    assert api.outputs(task_id)["code"] == 813


def test_status_outputs_lag_reports_success_before_outputs_are_ready(fault_sim, key):
    sim, api = fault_sim(Faults(status_outputs_lag_s=10.0))
    task_id = api.task_id()
    sim.advance(12)  # ended at 11
    assert api.status(task_id)["data"] == "SUCCESS"
    lagging = api.outputs(task_id)
    assert lagging["code"] == 804
    sim.advance(10)
    assert api.outputs(task_id)["code"] == 0
    assert [r["fault"] for r in sim.audit.requests("outputs")] == ["status_outputs_lag", None]


def test_faults_apply_only_to_the_configured_routes_and_never_to_files_by_default(fault_sim, key):
    sim, api = fault_sim(Faults(http_5xx=1.0, routes=("outputs",)))
    task_id = api.task_id()
    sim.advance(20)
    assert api.http.post("/task/openapi/outputs", json={"apiKey": key, "taskId": task_id}).status_code >= 500
    assert api.status(task_id)["data"] == "SUCCESS"
    sim.set_faults(Faults(drop_connection=1.0))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        api.http.post("/task/openapi/status", json={"apiKey": key, "taskId": task_id})
    image = api.http.get(f"/files/{task_id}/9_0.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_set_faults_switches_at_runtime(fault_sim, key):
    sim, api = fault_sim(Faults())
    assert api.create()["code"] == 0
    sim.set_faults(Faults(garbage_body=1.0))
    assert api.http.post("/task/openapi/create", json=_body(key)).content.startswith(b'{"code":0')
    sim.set_faults(Faults())
    assert api.create()["code"] == 0
    assert len(sim.audit.tasks()) == 2
    assert sim.faults == Faults()
    with pytest.raises(ConfigError, match="between 0 and 1"):
        sim.set_faults(Faults(http_5xx=2.0))
    with pytest.raises(ConfigError, match="unknown route"):
        sim.set_faults(Faults(http_5xx=0.1, routes=("creat",)))


def _fault_trace(key: str, seed: int) -> list[Any]:
    faults = Faults(http_5xx=0.2, garbage_body=0.2, drop_connection=0.1)
    with Simulator(SimConfig(seed=seed, time_scale=1e-9, accounts=[AccountConfig(key=key)],
                             faults=faults)) as sim, httpx.Client(base_url=sim.base_url) as http:
        for _ in range(40):
            try:
                http.post("/uc/openapi/accountStatus", json={"apikey": key})
            except httpx.HTTPError:
                pass
        return [(r["fault"], r["status_http"]) for r in sim.audit.requests()]


def test_fault_draws_are_reproducible_under_a_seed(key):
    first = _fault_trace(key, seed=4)
    assert first == _fault_trace(key, seed=4)
    assert first != _fault_trace(key, seed=5)
    kinds = {f for f, _ in first}
    assert {"http_5xx", "garbage_body", None} <= kinds


def test_a_client_that_vanishes_mid_body_is_not_a_server_error(fault_sim, key, caplog):
    import logging
    import socket

    sim, api = fault_sim(Faults())
    host, port = sim.base_url.removeprefix("http://").split(":")
    with caplog.at_level(logging.ERROR), socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /task/openapi/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 500\r\n\r\n{\"apiKey\": ")
        time.sleep(0.05)
    time.sleep(0.1)
    assert api.create()["code"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(sim.audit.tasks()) == 1
