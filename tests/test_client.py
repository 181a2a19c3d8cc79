"""Client edge cases that need exact control of the wire: httpx.MockTransport."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import secrets
import struct

import httpx
import pytest
from conftest import no_sleep

from pipeline.client import RetryPolicy, RunningHubClient, build_payload
from pipeline.config import resolve_settings
from pipeline.errors import (
    CapacityError,
    RowFatalError,
    RunFatalError,
    SubmitUnknownError,
    TaskGoneError,
    TransientApiError,
)

KEY = secrets.token_hex(16)


def make_client(handler, attempts: int = 4) -> RunningHubClient:
    settings = resolve_settings(api_key=KEY, base_url="http://rh.test", env={})
    policy = RetryPolicy(max_attempts=attempts, sleep=no_sleep)
    return RunningHubClient(settings, policy=policy, transport=httpx.MockTransport(handler))


def run(coro):
    return asyncio.run(coro)


def ok(data, code=0, msg="success"):
    return httpx.Response(200, json={"code": code, "msg": msg, "data": data})


async def _call(handler, method, *args, attempts=4):
    async with make_client(handler, attempts) as client:
        result = await getattr(client, method)(*args)
        return result, client.requests_sent


def test_create_sends_key_in_body_and_header_and_keeps_task_id_as_string():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers["Authorization"]
        seen["path"] = request.url.path
        return ok({"taskId": "1910246754753896450", "taskStatus": "QUEUED", "netWssUrl": None,
                   "clientId": "e8", "promptTips": '{"result": true, "node_errors": {}}'})

    body = build_payload("1904136902449209346", [{"nodeId": "3", "fieldName": "seed",
                                                   "fieldValue": 5}], {"instanceType": "plus"})
    submitted, sent = run(_call(handler, "create", body))
    assert submitted.task_id == "1910246754753896450"
    assert submitted.status == "QUEUED"
    assert submitted.prompt_tips == {"result": True, "node_errors": {}}
    assert seen["body"]["apiKey"] == KEY and seen["auth"] == f"Bearer {KEY}"
    assert seen["body"]["instanceType"] == "plus"
    assert seen["path"] == "/task/openapi/create"
    assert sent == 1


def test_create_is_never_resent_after_a_read_timeout():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(SubmitUnknownError) as info:
        run(_call(handler, "create", {"workflowId": "1"}))
    assert len(calls) == 1
    assert KEY not in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 504])
def test_create_is_not_resent_after_a_server_error(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, text="<html>bad gateway</html>")

    with pytest.raises(SubmitUnknownError):
        run(_call(handler, "create", {"workflowId": "1"}))
    assert len(calls) == 1


def test_create_is_not_resent_after_a_garbage_body():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(200, text="<html>oops")

    with pytest.raises(SubmitUnknownError):
        run(_call(handler, "create", {"workflowId": "1"}))
    assert len(calls) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_create_is_not_resent_after_429_or_503_since_a_gateway_may_answer_after_the_work(status):
    # A 429 or 503 proves nothing: the service behind a gateway may have made the task first.
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, headers={"Retry-After": "1"}, text="busy")

    with pytest.raises(SubmitUnknownError) as info:
        run(_call(handler, "create", {"workflowId": "1"}))
    assert len(calls) == 1
    assert f"HTTP {status}" in str(info.value)


def test_create_is_retried_when_the_connection_could_not_be_made():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return ok({"taskId": "77", "taskStatus": "QUEUED"})

    submitted, _ = run(_call(handler, "create", {"workflowId": "1"}))
    assert submitted.task_id == "77" and len(calls) == 2


def test_create_with_813_and_a_task_id_is_accepted():
    def handler(request):
        return ok({"taskId": "99"}, code=813, msg="APIKEY_TASK_IS_QUEUED")

    submitted, _ = run(_call(handler, "create", {"workflowId": "1"}))
    assert submitted.task_id == "99" and submitted.status == "QUEUED"


@pytest.mark.parametrize(
    ("code", "exc"),
    [(421, CapacityError), (415, CapacityError), (1520, CapacityError), (814, CapacityError),
     (803, RowFatalError), (433, RowFatalError), (301, RowFatalError), (380, RowFatalError),
     (412, RunFatalError), (414, RunFatalError), (416, RunFatalError), (801, RunFatalError),
     (806, RunFatalError), (812, RunFatalError)],
)
def test_create_business_codes_are_classified_and_not_retried(code, exc):
    calls = []

    def handler(request):
        calls.append(1)
        return ok(None, code=code, msg="X")

    with pytest.raises(exc) as info:
        run(_call(handler, "create", {"workflowId": "1"}))
    assert info.value.code == code
    assert len(calls) == 1
    assert str(code) in str(info.value)


def test_run_fatal_message_names_the_fix():
    def handler(request):
        return ok(None, code=412, msg="TOKEN_INVALID")

    with pytest.raises(RunFatalError) as info:
        run(_call(handler, "create", {"workflowId": "1"}))
    assert str(info.value) == (
        "RunningHub create answered 412 TOKEN_INVALID: check RUNNINGHUB_API_KEY and "
        "RUNNINGHUB_BASE_URL (a .cn key only works on runninghub.cn)"
    )


@pytest.mark.parametrize(
    ("answer", "state"),
    [((813, None), "QUEUED"), ((804, {"netWssUrl": "wss://x"}), "RUNNING"), ((0, None), "RUNNING")],
)
def test_outputs_states(answer, state):
    code, data = answer

    def handler(request):
        return ok(data, code=code)

    result, _ = run(_call(handler, "outputs", "1"))
    assert result.state == state


def test_outputs_success_parses_string_numbers_and_keeps_null_costs():
    def handler(request):
        return ok([
            {"fileUrl": "http://f/1.png", "fileType": "png", "taskCostTime": "67", "nodeId": "9",
             "consumeCoins": "14", "consumeMoney": None},
            {"fileUrl": "http://f/2.png", "fileType": "png", "taskCostTime": "67", "nodeId": 12,
             "consumeCoins": None},
        ])

    result, _ = run(_call(handler, "outputs", "1"))
    assert result.state == "SUCCESS"
    assert [o["nodeId"] for o in result.outputs] == ["9", "12"]
    assert result.outputs[0]["taskCostTime"] == 67.0 and result.outputs[0]["consumeCoins"] == 14.0
    assert result.outputs[1]["consumeCoins"] is None
    assert result.outputs[0]["consumeMoney"] is None


def test_outputs_failure_decodes_traceback_string():
    reason = {"node_name": "KSampler", "node_id": "3", "exception_type": "torch.OutOfMemoryError",
              "exception_message": "CUDA out of memory", "traceback": '["  File a", "  File b"]'}

    def handler(request):
        return ok({"failedReason": reason}, code=805, msg="APIKEY_TASK_STATUS_ERROR")

    result, _ = run(_call(handler, "outputs", "1"))
    assert result.state == "FAILED"
    assert result.failed_reason["traceback"] == ["  File a", "  File b"]
    assert result.failed_reason["exception_type"] == "torch.OutOfMemoryError"


def test_outputs_unknown_task_is_gone():
    def handler(request):
        return ok(None, code=807, msg="APIKEY_TASK_NOT_FOUND")

    with pytest.raises(TaskGoneError):
        run(_call(handler, "outputs", "1"))


def test_polls_retry_transient_failures_up_to_the_policy_bound():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.RemoteProtocolError("dropped", request=request)

    with pytest.raises(TransientApiError):
        run(_call(handler, "outputs", "1", attempts=3))
    assert len(calls) == 3


def test_polls_retry_rate_limit_1003_then_succeed():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return ok(None, code=1003, msg="rate limited")
        return ok(None, code=804)

    result, _ = run(_call(handler, "outputs", "1"))
    assert result.state == "RUNNING" and len(calls) == 2


def test_account_status_sends_lowercase_apikey_and_parses_strings_and_ints():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return ok({"remainCoins": "177814", "currentTaskCounts": "2", "remainMoney": None,
                       "currency": None, "apiType": "NORMAL"})
        return ok({"remainCoins": 5, "currentTaskCounts": 0, "apiType": "SHARED"})

    async def both():
        async with make_client(handler) as client:
            return await client.account_status(), await client.account_status()

    first, second = run(both())
    assert bodies[0]["apikey"] == KEY and "apiKey" not in bodies[0]
    assert first.remain_coins == 177814 and first.current_task_counts == 2
    assert first.api_type == "NORMAL" and first.remain_money is None
    assert second.current_task_counts == 0 and second.remain_coins == 5


def test_workflow_json_is_decoded_twice():
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}

    def handler(request):
        return ok({"prompt": json.dumps(prompt)}, msg="SUCCESS")

    result, _ = run(_call(handler, "workflow_json", "190"))
    assert result == prompt


def test_retry_policy_waits_honour_retry_after_within_cap():
    policy = RetryPolicy(retry_after_cap_s=5.0)
    exc = TransientApiError("x")
    exc.retry_after_s = 120  # type: ignore[attr-defined]
    assert policy.wait_s(1, exc) == 5.0
    plain = TransientApiError("y")
    assert 0 <= policy.wait_s(3, plain) <= policy.initial_wait_s * 4


def test_key_never_in_error_text_on_transport_failure():
    def handler(request):
        raise httpx.ReadError(f"broken while sending {request.content.decode()}", request=request)

    with pytest.raises(TransientApiError) as info:
        run(_call(handler, "outputs", "1", attempts=1))
    assert KEY not in str(info.value)


def test_the_retry_loop_is_bounded_by_attempts_and_total_time_and_retries_only_what_it_names():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> None:
        calls = {"n": 0}

        async def flaky() -> str:
            calls["n"] += 1
            if calls["n"] < 3:
                raise TransientApiError("try again")
            return "answer"

        policy = RetryPolicy(max_attempts=5, initial_wait_s=0.01, max_wait_s=0.01, sleep=sleep)
        transient = lambda exc: isinstance(exc, TransientApiError)  # noqa: E731
        assert await policy.call(flaky, transient, "poll") == "answer"
        assert calls["n"] == 3 and len(waits) == 2  # two retries, each after a wait

        calls["n"] = -100  # fails every time: the policy's attempts are the bound
        with pytest.raises(TransientApiError):
            await policy.call(flaky, transient, "poll")
        assert calls["n"] == -95

        async def refused() -> str:
            calls["n"] += 1
            raise RunFatalError("bad key")

        calls["n"] = 0
        with pytest.raises(RunFatalError):  # not named transient: raised at once, as it is
            await policy.call(refused, transient, "poll")
        assert calls["n"] == 1

        timed = RetryPolicy(max_attempts=100, max_total_s=0.0, sleep=sleep)
        calls["n"] = -100
        with pytest.raises(TransientApiError):  # the total time bound: no second attempt
            await timed.call(flaky, transient, "poll")
        assert calls["n"] == -99

    run(go())


def test_json_calls_on_the_aiohttp_stack_build_no_httpx_request(monkeypatch):
    """The hot path (creates, polls, account reads) goes straight to aiohttp's pool."""
    from pipeline.sim import AccountConfig, SimConfig, Simulator

    def no_httpx(*args, **kwargs):
        raise AssertionError("an httpx request was built on the hot path")

    with Simulator(SimConfig(accounts=[AccountConfig(key=KEY)], time_scale=1e-9)) as sim:
        settings = resolve_settings(api_key=KEY, base_url=sim.base_url, env={},
                                    http_transport="aiohttp")
        monkeypatch.setattr(httpx.AsyncClient, "build_request", no_httpx)

        async def go() -> None:
            async with RunningHubClient(settings, policy=RetryPolicy(max_attempts=1)) as rh:
                made = await rh.create(build_payload("1904136902449209346", [
                    {"nodeId": "3", "fieldName": "seed", "fieldValue": 1}]))
                assert (await rh.poll(made.task_id)).state in ("QUEUED", "RUNNING")
                assert (await rh.account_status()).current_task_counts == 1
                assert rh.requests_sent >= 3

        run(go())


# -- JSON on the hot path: orjson where installed, always the standard library's answer ----------

def _canonical(value):
    """``value`` as a flat list of typed tokens (1 and 1.0, 0.0 and -0.0 differ here), without
    recursion, so a body nested as deep as a parser allows compares too."""
    tokens, todo = [], [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            tokens.append(("dict", len(item)))
            for k, v in reversed(list(item.items())):
                todo += [v, ("key", k)]
        elif isinstance(item, list):
            tokens.append(("list", len(item)))
            todo += reversed(item)
        elif isinstance(item, tuple) and item[:1] == ("key",):
            tokens.append(item)
        else:
            tokens.append((type(item).__name__, repr(item)))
    return tokens


def _random_value(rng, depth=0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        edge = [0, -1, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64,
                -(2**64), 10**19, -(10**19) + 1, 10**30]
        return rng.choice(edge + [rng.randrange(-(2**70), 2**70)])
    if kind == 1:
        bits = rng.getrandbits(64)
        value = struct.unpack("<d", struct.pack("<Q", bits))[0]
        return value if math.isfinite(value) else rng.choice([0.1, -0.0, 5e-324, 1.7976931348623157e308])
    if kind == 2:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 32), 0x2028,
                                       rng.randrange(0x80, 0xD7FF), rng.randrange(0x10000, 0x10FFFF)]))
                       for _ in range(rng.randrange(8)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return str(rng.randrange(10**25))  # digits in a string: task ids, seeds
    if kind in (6, 7):
        return {f"k{rng.randrange(5)}": _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


EDGE_BODIES = [
    b'{"code":0,"msg":"success","data":{"taskId":1904136902449209346,"taskStatus":"QUEUED"}}',
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808",
    b"-9223372036854775809", b"123456789012345678901234567890", b"1.00000000000000000000001",
    b"1e400", b"-1e400", b"1e-400", b"5e-324", b"1E2", b"-0", b"-0.0", b"[NaN]", b"[Infinity]",
    b"[-Infinity]", b'{"a":1,"a":2}', b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\u00e9\\u2028\\ud83d\\ude00"',
    b'\xef\xbb\xbf{"a":1}', '{"a":1}'.encode("utf-16"), '{"a":1}'.encode("utf-32"),
    b'{"a":"\xff"}', b'{"a":"\x01"}', b' \t\n{}\r\n', b"", b" ", b'{"a":1}x', b"01", b"1.",
    b".5", b"[1,]", b"{'a':1}", b"[" * 3000 + b"]" * 3000, b"[" * 1000 + b"]" * 1000,
    b"[" * 500 + b"]" * 500, b'{"a":[1,2,{"b":null}]}', b"true", b"nul", b'"\\x41"',
]


def test_answers_read_exactly_as_the_standard_library_reads_them():
    from pipeline import client as module

    pytest.importorskip("orjson")
    assert module._orjson is not None  # the fast path is the one under test
    rng = random.Random(18)
    bodies = list(EDGE_BODIES)
    for _ in range(3000):
        text = json.dumps(_random_value(rng), ensure_ascii=rng.random() < 0.3).encode()
        bodies.append(text)
        if text and rng.random() < 0.3:  # a damaged copy: cut short or with a stray byte
            cut = rng.randrange(len(text))
            bodies.append(text[:cut] if rng.random() < 0.5 else
                          text[:cut] + bytes([rng.randrange(256)]) + text[cut:])
    for body in bodies:
        expected = module._parse_json_stdlib(body)
        got = module.parse_json(body)
        assert (got is module.NOT_JSON) == (expected is module.NOT_JSON), body[:80]
        if expected is not module.NOT_JSON:
            assert _canonical(got) == _canonical(expected), body[:80]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            continue
        expected = module._parse_json_stdlib(text)
        got = module.parse_json(text)
        assert (got is module.NOT_JSON) == (expected is module.NOT_JSON), text[:80]
        if expected is not module.NOT_JSON:
            assert _canonical(got) == _canonical(expected), text[:80]


def test_request_bodies_encode_the_same_values_and_refuse_what_the_standard_library_refuses():
    from pipeline import client as module

    pytest.importorskip("orjson")
    assert module._orjson is not None

    class Text(str):
        pass

    def stdlib(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    rng = random.Random(18)
    values = [_random_value(rng) for _ in range(3000)] + [
        {"apiKey": KEY, "taskId": "1910246754753896450"}, {"seed": float("nan")},
        [float("inf")], {"a": [None, float("-inf")]}, {1: "int key"}, {"big": 2**64},
        {"text": Text("a str subclass")}, {"s": "\ud800"}, {"t": (1, 2)}, [[[[]]]] * 3,
        {"bytes": b"raw"}, {"set": {1}}, {"deep": functools.reduce(lambda v, _: [v], range(300), 0)},
    ]
    for value in values:
        try:
            expected = stdlib(value)
        except (ValueError, TypeError, RecursionError) as exc:
            with pytest.raises(type(exc)):
                module.dump_json(value)
            continue
        got = module.dump_json(value)
        assert _canonical(json.loads(got)) == _canonical(json.loads(expected)), value
    assert module.dump_json({"apiKey": "k", "taskId": "1"}) == b'{"apiKey":"k","taskId":"1"}'


def test_without_orjson_the_standard_library_reads_and_writes_the_same(monkeypatch):
    from pipeline import client as module

    monkeypatch.setattr(module, "_orjson", None)  # a platform without an orjson wheel
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        return ok({"taskId": 1910246754753896450123, "taskStatus": "QUEUED"})

    body = build_payload("1904136902449209346", [{"nodeId": "3", "fieldName": "seed",
                                                   "fieldValue": 2**64}])
    submitted, _ = run(_call(handler, "create", body))
    assert submitted.task_id == "1910246754753896450123"  # exact, past 64 bits
    assert seen["body"]["nodeInfoList"][0]["fieldValue"] == 2**64
    assert module.parse_json(b"[NaN]") is module.NOT_JSON
    with pytest.raises(ValueError):
        module.dump_json({"seed": float("nan")})
    assert module.dump_json({"a": "é"}) == '{"a":"é"}'.encode()
