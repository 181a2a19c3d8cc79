"""Client edge cases that need exact control of the wire: httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
import secrets

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
