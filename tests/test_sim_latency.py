"""``Faults.latency_s``: a real-time network round trip on every answer, waited out side by side."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import SIM_CREATE as CREATE

from pipeline.errors import ConfigError
from pipeline.sim import AccountConfig, Faults, SimConfig, Simulator

LATENCY_S = 0.2


async def _timed_posts(base_url: str, path: str, body: dict[str, Any], n: int
                       ) -> tuple[float, list[float], list[dict[str, Any]]]:
    """Send ``n`` POSTs at once: (wall time of the batch, each one's time, each one's answer)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as http:
        async def one() -> tuple[float, dict[str, Any]]:
            began = time.monotonic()
            response = await http.post(path, json=body)
            return time.monotonic() - began, response.json()

        began = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(n)))
        return time.monotonic() - began, [t for t, _ in results], [a for _, a in results]


def _timed(api: Any, path: str, body: dict[str, Any]) -> tuple[float, httpx.Response]:
    began = time.monotonic()
    response = api.http.post(path, json=body)
    return time.monotonic() - began, response


def test_twenty_concurrent_requests_each_wait_the_round_trip_side_by_side(fault_sim, key):
    sim, _api = fault_sim(Faults(latency_s=LATENCY_S))
    total, each, answers = asyncio.run(
        _timed_posts(sim.base_url, "/uc/openapi/accountStatus", {"apikey": key}, 20))
    assert [a["code"] for a in answers] == [0] * 20
    assert min(each) >= LATENCY_S
    assert total < 20 * LATENCY_S / 2, f"20 requests took {total:.3f} s: they did not overlap"
    assert len(sim.audit.requests("account_status")) == 20


@pytest.mark.parametrize("time_scale", [1e-9, 1.0, 1000.0])
def test_latency_is_real_seconds_whatever_the_simulated_clock(make_sim, key, time_scale):
    sim = make_sim(time_scale=time_scale, faults=Faults(latency_s=LATENCY_S))
    with httpx.Client(base_url=sim.base_url, timeout=10.0) as http:
        began = time.monotonic()
        answer = http.post("/task/openapi/create", json={"apiKey": key, **CREATE}).json()
        took = time.monotonic() - began
    assert answer["code"] == 0
    assert LATENCY_S <= took < LATENCY_S + 1.0


def test_advancing_the_clock_does_not_cut_a_round_trip_short(fault_sim, key):
    sim, api = fault_sim(Faults(latency_s=LATENCY_S))
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(
        _timed(api, "/uc/openapi/accountStatus", {"apikey": key})[0]))
    worker.start()
    sim.advance(10**6)
    worker.join(5)
    assert result and result[0] >= LATENCY_S


def test_the_request_is_processed_before_its_answer_travels(fault_sim, key):
    """The task exists while the create's answer is still on its way back."""
    sim, api = fault_sim(Faults(latency_s=1.0))
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(
        api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})))
    worker.start()
    deadline = time.monotonic() + 5
    while not sim.audit.tasks() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.audit.tasks() and worker.is_alive() and not answers
    worker.join(5)
    assert answers[0].json()["data"]["taskId"] == sim.audit.tasks()[0]["taskId"]


def test_jitter_adds_up_to_latency_jitter_s(fault_sim, key):
    sim, api = fault_sim(Faults(latency_s=0.05, latency_jitter_s=0.1))
    times = [_timed(api, "/uc/openapi/accountStatus", {"apikey": key})[0] for _ in range(8)]
    assert min(times) >= 0.05
    assert max(times) < 0.05 + 0.1 + 0.5
    assert max(times) - min(times) > 0.005, times  # drawn, not one fixed figure


def test_the_jitter_never_shifts_the_other_faults(key):
    """Same seed, with and without jitter: the same requests hit ``http_5xx``."""
    def statuses(jitter: float) -> list[int]:
        config = SimConfig(accounts=[AccountConfig(key=key)], time_scale=1e-9, seed=4,
                           faults=Faults(http_5xx=0.5, latency_jitter_s=jitter))
        with Simulator(config) as sim, httpx.Client(base_url=sim.base_url, timeout=5.0) as http:
            return [http.post("/uc/openapi/accountStatus", json={"apikey": key}).status_code
                    for _ in range(12)]

    without, with_jitter = statuses(0.0), statuses(0.01)
    assert without == with_jitter
    assert 200 in without and set(without) - {200}


def test_pre_fault_answers_wait_the_round_trip_too(fault_sim, key):
    sim, api = fault_sim(Faults(http_5xx=1.0, latency_s=LATENCY_S))
    took, response = _timed(api, "/task/openapi/create", {"apiKey": key, **CREATE})
    assert response.status_code in (500, 502, 503) and took >= LATENCY_S
    assert sim.audit.tasks() == []


def test_routes_scope_the_latency_and_files_are_not_delayed_by_default(fault_sim, key):
    sim, api = fault_sim(Faults(latency_s=LATENCY_S, routes=("create",)))
    fast, status = _timed(api, "/uc/openapi/accountStatus", {"apikey": key})
    slow, created = _timed(api, "/task/openapi/create", {"apiKey": key, **CREATE})
    assert status.json()["code"] == 0 and fast < LATENCY_S
    assert created.json()["code"] == 0 and slow >= LATENCY_S

    sim.set_faults(Faults(latency_s=LATENCY_S))  # every API route, not the file downloads
    sim.advance(100)
    task_id = created.json()["data"]["taskId"]
    outputs_took, outputs = _timed(api, "/task/openapi/outputs", {"apiKey": key, "taskId": task_id})
    assert outputs_took >= LATENCY_S
    url = outputs.json()["data"][0]["fileUrl"]
    began = time.monotonic()
    png = api.http.get(url)
    assert png.status_code == 200 and time.monotonic() - began < LATENCY_S


def test_close_cuts_a_long_round_trip_short(fault_sim, key):
    sim, api = fault_sim(Faults(latency_s=60.0))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            api.http.post("/uc/openapi/accountStatus", json={"apikey": key})
        except httpx.HTTPError as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 5
    while not sim.audit.requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    sim.close()
    assert time.monotonic() - began < 3.0
    worker.join(5)
    assert not worker.is_alive() and errors


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan"), "0.2", True])
def test_a_bad_latency_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"latency_s must be a number >= 0 \(real seconds\)"):
        Faults(latency_s=value).validate()
    with pytest.raises(ConfigError, match="latency_jitter_s must be a number >= 0"):
        Faults(latency_jitter_s=value).validate()


def test_latency_from_a_config_file(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("faults: {latency_s: 0.05, latency_jitter_s: 0.01}\n", encoding="utf-8")
    assert SimConfig.from_file(path).faults == Faults(latency_s=0.05, latency_jitter_s=0.01)
