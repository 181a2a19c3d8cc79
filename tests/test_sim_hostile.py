"""Hostile answers (issue #12): the request is processed, then answered in a shape meant to break the
client: trickled, oversized, a gzip bomb, deeply nested, NaN counts, terminal escapes, newline ids.
Each test reads the raw bytes and headers, streaming where the body is big."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from conftest import SIM_CREATE as CREATE

from pipeline.sim import (
    CONTROL_INJECTION,
    FORGED_LOG_LINE,
    AccountConfig,
    Faults,
    SimConfig,
    Simulator,
)
from pipeline.sim.server import SHUTDOWN_TIMEOUT_S, gzip_bomb

BOMB_HEAD = b'{"code":0,"msg":"success","data":null'





def _stream(sim: Simulator, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, int, bytes, bytes]:
    """POST and read the body as it arrives on the wire (not decoded): (headers, size, first 64 KiB,
    last 64 KiB)."""
    size, first, last = 0, b"", b""
    with httpx.Client(base_url=sim.base_url, timeout=10.0) as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw(1 << 20):
                if len(first) < 65536:
                    first += chunk[: 65536 - len(first)]
                size += len(chunk)
                last = (last + chunk)[-65536:]
            return response.headers, size, first, last


# -- trickle ------------------------------------------------------------------------------------


def test_trickle_sends_the_real_answer_one_byte_per_interval(fault_sim, key):
    sim, api = fault_sim(Faults())
    task_id = api.task_id()
    normal = api.http.post("/task/openapi/status", json={"apiKey": key, "taskId": task_id}).content
    sim.set_faults(Faults(trickle=1.0, trickle_interval_s=0.01, routes=("status",)))
    payload = json.dumps({"apiKey": key, "taskId": task_id}).encode()
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        sock.sendall(b"POST /task/openapi/status HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        while chunk := sock.recv(65536):
            arrivals.append((time.monotonic(), chunk))
    raw = b"".join(c for _, c in arrivals)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == normal and b"Content-Length: %d" % len(normal) in head
    assert arrivals[-1][0] - arrivals[0][0] >= (len(normal) - 1) * 0.01
    assert len(arrivals) > len(normal) // 2
    assert [r["fault"] for r in sim.audit.requests("status")] == [None, "trickle"]
    assert api.account()["code"] == 0  # other routes answer at once


# -- oversized ----------------------------------------------------------------------------------


def test_oversized_is_the_real_envelope_padded_to_the_configured_size(fault_sim, key):
    sim, api = fault_sim(Faults(oversized=1.0, oversized_bytes=3 * 2**20 + 7, routes=("account_status",)))
    assert len(api.http.post("/task/openapi/status", json={"apiKey": key, "taskId": "1"}).content) < 100
    headers, size, first, last = _stream(sim, "/uc/openapi/accountStatus", {"apikey": key})
    assert int(headers["content-length"]) == size == 3 * 2**20 + 7
    assert headers["content-type"].startswith("application/json")
    assert first.startswith(b'{"code":0,"msg":"successxxxx')
    assert b'xxxx","data":{"remainCoins":' in last and last.endswith(b"}")
    answer = api.http.post("/uc/openapi/accountStatus", json={"apikey": key}).json()  # small enough
    assert answer["code"] == 0 and answer["msg"].startswith("success")
    assert len(answer["msg"]) > 3 * 2**20 - 200
    assert answer["data"]["apiType"] == "SHARED" and answer["data"]["currentTaskCounts"] == "0"
    assert {r["fault"] for r in sim.audit.requests("account_status")} == {"oversized"}


def test_an_oversized_create_answer_still_made_the_task(fault_sim, key):
    sim, api = fault_sim(Faults(oversized=1.0, oversized_bytes=100_000))
    response = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE})
    assert len(response.content) == 100_000
    answer = response.json()
    [task] = sim.audit.tasks()
    assert answer["code"] == 0 and answer["data"]["taskId"] == task["taskId"]
    assert task["faults"] == ["oversized"]


def test_oversized_at_its_default_size_is_streamed(fault_sim, key):
    sim, _api = fault_sim(Faults(oversized=1.0, routes=("account_status",)))
    with _peak_rss() as peak:
        headers, size, first, _last = _stream(sim, "/uc/openapi/accountStatus", {"apikey": key})
    assert int(headers["content-length"]) == size == 200 * 2**20
    assert first.startswith(b'{"code":0,"msg":"success')
    assert peak() < 64 * 2**20  # neither side held the 200 MiB


# -- gzip bomb ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 1000, 2**20 + len(BOMB_HEAD) + 1, 3 * 2**20 + 12345])
def test_gzip_bomb_inflates_to_exactly_its_size_as_valid_json(size):
    raw = gzip_bomb(size)
    inflated = zlib.decompress(raw, 31)
    assert len(inflated) == size and inflated.startswith(BOMB_HEAD) and inflated.endswith(b"}")
    assert json.loads(inflated) == {"code": 0, "msg": "success", "data": None}
    assert struct.unpack("<I", raw[-4:])[0] == size
    assert gzip_bomb(size) is raw  # built once per size


def test_gzip_bomb_is_a_small_gzip_body_that_inflates_big(fault_sim, key):
    sim, api = fault_sim(Faults(gzip_bomb=1.0, gzip_bomb_bytes=8 * 2**20, routes=("outputs",)))
    task_id = api.task_id()
    headers, size, first, _last = _stream(sim, "/task/openapi/outputs", {"apiKey": key, "taskId": task_id})
    assert headers["content-encoding"] == "gzip" and int(headers["content-length"]) == size < 20_000
    inflate = zlib.decompressobj(31)
    assert inflate.decompress(first, 4096).startswith(BOMB_HEAD)
    response = api.http.post("/task/openapi/outputs", json={"apiKey": key, "taskId": task_id})
    assert len(response.content) == 8 * 2**20  # what a client that inflates everything holds
    [create, *polls] = sim.audit.requests()
    assert create["fault"] is None and {r["fault"] for r in polls} == {"gzip_bomb"}
    assert {r["code"] for r in polls} == {0}


def test_gzip_bomb_at_its_default_size_is_small_and_the_simulator_stays_small(fault_sim, key):
    sim, _api = fault_sim(Faults(gzip_bomb=1.0, routes=("account_status",)))
    with _peak_rss() as peak:
        headers, size, first, last = _stream(sim, "/uc/openapi/accountStatus", {"apikey": key})
    assert headers["content-encoding"] == "gzip" and size == int(headers["content-length"]) < 2 * 2**20
    assert struct.unpack("<I", last[-4:])[0] == 2**30  # gzip's ISIZE: it inflates to 1 GiB
    assert zlib.decompressobj(31).decompress(first, 4096).startswith(BOMB_HEAD)
    assert peak() < 64 * 2**20


@contextmanager
def _peak_rss() -> Iterator[Callable[[], int]]:
    """How far this process's resident set rose above its start while the block ran (bytes)."""
    def rss(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(field)

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    base = rss("VmRSS")
    peaks = [base]
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        exact = True
    except OSError:
        exact = False
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peaks.append(rss("VmRSS"))

    sampler = None if exact else threading.Thread(target=sample, daemon=True)
    if sampler is not None:
        sampler.start()
    result: list[int] = []
    try:
        yield lambda: result[0]
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        result.append((rss("VmHWM") if exact else max(peaks)) - base)


# -- deep JSON ----------------------------------------------------------------------------------


def test_deep_json_nests_data_to_the_configured_depth(fault_sim, key):
    sim, api = fault_sim(Faults(deep_json=1.0, routes=("account_status",)))
    raw = api.http.post("/uc/openapi/accountStatus", json={"apikey": key}).content
    prefix = b'{"code":0,"msg":"success","data":'
    assert raw == prefix + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):
        json.loads(raw)
    sim.set_faults(Faults(deep_json=1.0, deep_json_depth=3))
    answer = api.http.post("/task/openapi/create", json={"apiKey": key, **CREATE}).json()
    assert answer == {"code": 0, "msg": "success", "data": [[[]]]}
    [task] = sim.audit.tasks()  # the create was processed: a task the client has no id for
    assert task["faults"] == ["deep_json"]


# -- NaN counts ---------------------------------------------------------------------------------


def test_nan_counts_as_a_string(fault_sim, key):
    sim, api = fault_sim(Faults(nan_counts=1.0, nan_counts_style="string"))
    data = api.account()["data"]
    assert data["currentTaskCounts"] == "NaN" and data["remainCoins"] == "Infinity"
    assert data["apiType"] == "SHARED"
    assert api.create()["code"] == 0  # other routes untouched
    assert sim.audit.requests("account_status")[0]["fault"] == "nan_counts"


def test_nan_counts_as_a_bare_token_and_in_turn(fault_sim, key):
    sim, api = fault_sim(Faults(nan_counts=1.0, nan_counts_style="token"))
    raw = api.http.post("/uc/openapi/accountStatus", json={"apikey": key}).content
    assert b'"currentTaskCounts":NaN' in raw and b'"remainCoins":"Infinity"' in raw
    assert math.isnan(json.loads(raw)["data"]["currentTaskCounts"])
    sim.set_faults(Faults(nan_counts=1.0))  # style "both"
    raws = [api.http.post("/uc/openapi/accountStatus", json={"apikey": key}).content for _ in range(4)]
    assert [b'"currentTaskCounts":NaN' in r for r in raws] == [False, True, False, True]
    assert [b'"currentTaskCounts":"NaN"' in r for r in raws] == [True, False, True, False]


def test_nan_counts_leave_errors_alone(fault_sim, key):
    sim, api = fault_sim(Faults(nan_counts=1.0))
    assert api.post("/uc/openapi/accountStatus", key_field="apikey", key="x" * 32) == {
        "code": 412, "msg": "TOKEN_INVALID", "data": None}


# -- control characters -------------------------------------------------------------------------


def _injected(text: str) -> bool:
    return (text.endswith(CONTROL_INJECTION) and "\x1b]0;pwned\x07" in text and "\x1b[2J" in text
            and "\rOK\n" in text and "\n" + FORGED_LOG_LINE in text)


def test_control_chars_reach_every_text_the_service_writes(fault_sim, key):
    sim, api = fault_sim(Faults(), failure_rate=1.0)
    failed = api.task_id()
    sim.advance(20)
    sim.set_faults(Faults(control_chars=1.0))
    account = api.account()
    assert _injected(account["msg"]) and account["data"]["remainCoins"]
    raw = api.http.post("/task/openapi/outputs", json={"apiKey": key, "taskId": failed}).content
    assert b"\x1b" not in raw and b"\\u001b" in raw  # escaped on the wire, raw once decoded
    answer = json.loads(raw)
    assert answer["code"] == 805 and _injected(answer["msg"])
    reason = answer["data"]["failedReason"]
    assert _injected(reason["exception_message"]) and _injected(reason["node_name"])
    frames = json.loads(reason["traceback"])  # still a stringified list
    assert frames[-1] == CONTROL_INJECTION and len(frames) == 3
    query = api.post("/openapi/v2/query", {"taskId": failed}, key_field=None, bearer=True)
    assert _injected(query["errorMessage"]) and _injected(query["failedReason"]["exception_message"])
    assert _injected(api.post("/task/openapi/status", {"taskId": "1"})["msg"])  # errors too


def test_control_chars_in_output_file_types(fault_sim, key):
    sim, api = fault_sim(Faults())
    task_id = api.task_id()
    sim.advance(20)
    sim.set_faults(Faults(control_chars=1.0, routes=("outputs", "v2_query")))
    [item] = api.outputs(task_id)["data"]
    assert _injected(item["fileType"]) and item["fileType"].startswith("png")
    [result] = api.post("/openapi/v2/query", {"taskId": task_id}, key_field=None, bearer=True)["results"]
    assert _injected(result["outputType"])
    assert api.outputs(task_id)["data"][0]["fileType"] != "png"  # every time, not only once
    sim.set_faults(Faults())
    assert api.outputs(task_id)["data"][0]["fileType"] == "png"  # the stored answer is untouched


# -- newline task ids ---------------------------------------------------------------------------


def test_newline_task_id_is_stored_and_accepted_exactly(fault_sim, key):
    sim, api = fault_sim(Faults(newline_task_id=1.0))
    created = api.create()
    task_id = created["data"]["taskId"]
    digits, newline, forged = task_id.partition("\n")
    assert digits.isdigit() and len(digits) == 19 and newline and forged == FORGED_LOG_LINE
    [task] = sim.audit.tasks()
    assert task["taskId"] == task_id and task["faults"] == ["newline_task_id"]
    assert sim.audit.requests("create")[0]["fault"] == "newline_task_id"
    sim.set_faults(Faults())
    assert api.status(task_id) == {"code": 0, "msg": "success", "data": "QUEUED"}
    assert api.status(digits)["code"] == 807  # only the exact id names the task
    sim.advance(20)
    [item] = api.outputs(task_id)["data"]
    assert "\n" not in item["fileUrl"] and task_id in unquote(item["fileUrl"])
    png = api.http.get(item["fileUrl"].removeprefix(sim.base_url))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    query = api.post("/openapi/v2/query", {"taskId": task_id}, key_field=None, bearer=True)
    assert query["taskId"] == task_id and query["status"] == "SUCCESS" and query["usage"]["consumeCoins"]
    sim.set_faults(Faults(newline_task_id=1.0))
    other = api.create()["data"]["taskId"]
    assert "\n" in other and api.cancel(other)["code"] == 0
    assert api.post("/openapi/v2/query", {"taskId": other}, key_field=None, bearer=True)["status"] == "CANCEL"
    assert set(sim.audit.ledger()) == {task_id, other}


# -- where and how often ------------------------------------------------------------------------


def test_hostile_faults_follow_routes_and_spare_files_by_default(fault_sim, key):
    sim, api = fault_sim(Faults(deep_json=1.0, control_chars=1.0, routes=("status",)))
    task_id = api.task_id()
    assert api.account()["msg"] == "success"
    status = api.http.post("/task/openapi/status", json={"apiKey": key, "taskId": task_id}).content
    assert status.count(b"[") == 100_000
    sim.advance(20)
    sim.set_faults(Faults(deep_json=1.0, oversized=0.0, control_chars=1.0))
    image = api.http.get(f"/files/{task_id}/9_0.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert [r["fault"] for r in sim.audit.requests("files")] == [None]


def test_shape_faults_are_one_exclusive_draw(fault_sim, key):
    sim, api = fault_sim(Faults(trickle=0.5, trickle_interval_s=0.0, oversized=0.5, oversized_bytes=4096,
                            routes=("account_status",)))
    for _ in range(30):
        assert api.http.post("/uc/openapi/accountStatus", json={"apikey": key}).json()["code"] == 0
    seen = [r["fault"] for r in sim.audit.requests()]
    assert set(seen) == {"trickle", "oversized"}


def test_no_draw_without_a_rate_keeps_old_seeds_reproducible(key):
    def trace(faults: Faults) -> list[Any]:
        config = SimConfig(seed=9, time_scale=1e-9, accounts=[AccountConfig(key=key)], faults=faults)
        with Simulator(config) as sim, httpx.Client(base_url=sim.base_url) as http:
            for _ in range(30):
                try:
                    http.post("/uc/openapi/accountStatus", json={"apikey": key})
                except httpx.HTTPError:
                    pass
            return [r["fault"] for r in sim.audit.requests()]

    old = Faults(http_5xx=0.2, garbage_body=0.2, slow_answer=0.1, slow_answer_s=0.0)
    assert trace(old) == trace(Faults(**{**vars(old), "oversized_bytes": 100, "stall_s": 1.0}))


@pytest.mark.parametrize("faults", [
    Faults(trickle=1.0, trickle_interval_s=60.0),
    Faults(oversized=1.0),
], ids=["trickle", "oversized-unread"])
def test_close_aborts_answers_still_being_sent(key, faults):
    sim = Simulator(SimConfig(time_scale=1e-9, accounts=[AccountConfig(key=key)], faults=faults))
    sim.start()
    payload = json.dumps({"apikey": key}).encode()
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /uc/openapi/accountStatus HTTP/1.1\r\nHost: sim\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 5
        while not sim.audit.requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # the answer is under way and never read
        began = time.monotonic()
        sim.close()
        assert time.monotonic() - began < SHUTDOWN_TIMEOUT_S
