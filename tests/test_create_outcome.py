"""The one create-outcome rule: every line of its table, by example, and the README prints it."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import secrets
from pathlib import Path

import httpx
import pytest
from conftest import no_sleep

from pipeline.client import (
    API_MAX_BYTES,
    CREATE_RULES,
    CreateOutcome,
    RetryPolicy,
    RunningHubClient,
    create_rule,
)
from pipeline.config import resolve_settings
from pipeline.errors import (
    ApiConnectionError,
    CapacityError,
    RowFatalError,
    RunFatalError,
    SubmitUnknownError,
)

KEY = secrets.token_hex(16)
README = Path(__file__).resolve().parent.parent / "README.md"
TASK = {"taskId": "1910246754753896450", "taskStatus": "QUEUED", "clientId": "e8",
        "promptTips": '{"result": true, "node_errors": {}}'}


def envelope(code, data=None, status=200, msg="x"):
    return lambda request: httpx.Response(status, json={"code": code, "msg": msg, "data": data})


def raw(status, body=b"", headers=None):
    return lambda request: httpx.Response(status, content=body, headers=headers or {})


def raises(exc):
    def handler(request):
        raise exc(request)
    return handler


# (handler, the rule index expected to decide, the exception create raises or None for created)
EXAMPLES = [
    (raises(lambda r: httpx.ConnectError("refused", request=r)), 0, None),
    (raises(lambda r: httpx.ConnectTimeout("connect", request=r)), 0, None),
    (raises(lambda r: httpx.PoolTimeout("pool", request=r)), 0, None),
    (envelope(0, TASK), 1, None),
    (envelope(813, TASK), 1, None),
    (envelope(500, TASK), 1, None),
    (envelope(None, TASK), 1, None),
    (envelope("0.0", TASK), 1, None),
    (envelope(421, TASK), 1, None),
    (envelope(0, {**TASK, "taskId": 1910246754753896450}), 1, None),
    (envelope(0, TASK, status=503), 1, None),
    (envelope(421), 2, CapacityError),
    (envelope(1520), 2, CapacityError),
    (envelope(421, status=429), 2, CapacityError),
    (envelope(803, {"nodeId": "3"}), 3, RowFatalError),
    (envelope(433, {"promptTips": "{}"}), 3, RowFatalError),
    (envelope(414), 4, RunFatalError),
    (envelope(412, status=500), 4, RunFatalError),
    (envelope(0, None), 5, SubmitUnknownError),
    (envelope(0, {"taskId": ""}), 5, SubmitUnknownError),
    (envelope(500), 5, SubmitUnknownError),
    (envelope(1005), 5, SubmitUnknownError),
    (envelope(1013), 5, SubmitUnknownError),
    (envelope(805, {"failedReason": {}}), 5, SubmitUnknownError),
    (envelope(999), 5, SubmitUnknownError),
    (envelope(None), 5, SubmitUnknownError),
    (envelope("0.0"), 5, SubmitUnknownError),
    (envelope(True), 5, SubmitUnknownError),
    (raw(429, b"slow down"), 6, SubmitUnknownError),
    (raw(503, b"<html>503</html>"), 6, SubmitUnknownError),
    (raw(500, b"<html>500</html>"), 6, SubmitUnknownError),
    (raw(502, b""), 6, SubmitUnknownError),
    (raw(504, b"<html>504</html>"), 6, SubmitUnknownError),
    (raw(404, b"not found"), 6, SubmitUnknownError),
    (raw(302, b"", {"Location": "https://rh.test/"}), 6, SubmitUnknownError),
    (envelope(500, status=502), 6, SubmitUnknownError),
    (raw(200, b"<html>oops"), 7, SubmitUnknownError),
    (raw(200, b'{"code":0,"msg":"success","data":{"taskId":"19'), 7, SubmitUnknownError),
    (raw(200, b"[1, 2]"), 7, SubmitUnknownError),
    (raw(200, b'{"code": NaN, "data": null}'), 7, SubmitUnknownError),
    (raw(200, b"[" * 100_000 + b"]" * 100_000), 7, SubmitUnknownError),
    (raw(200, b""), 7, SubmitUnknownError),
    (raises(lambda r: httpx.ReadTimeout("read", request=r)), 7, SubmitUnknownError),
    (raises(lambda r: httpx.RemoteProtocolError("dropped", request=r)), 7, SubmitUnknownError),
    (raises(lambda r: httpx.ReadError("reset", request=r)), 7, SubmitUnknownError),
]


def make_client(handler, deadline_s=60.0):
    settings = resolve_settings(api_key=KEY, base_url="http://rh.test", env={},
                                request_deadline_s=deadline_s)
    policy = RetryPolicy(max_attempts=3, sleep=no_sleep)
    return RunningHubClient(settings, policy=policy, transport=httpx.MockTransport(handler))


def attempt(handler, deadline_s=60.0):
    calls = []

    def counted(request):
        calls.append(1)
        return handler(request)

    async def go():
        async with make_client(counted, deadline_s) as client:
            return await client.create({"workflowId": "1904136902449209346"})

    try:
        return asyncio.run(go()), None, len(calls)
    except Exception as exc:  # noqa: BLE001 - the test asserts the class below
        return None, exc, len(calls)


@pytest.mark.parametrize("handler,rule,expected", EXAMPLES)
def test_every_example_is_decided_by_its_rule_and_sent_once_unless_it_never_left(
        handler, rule, expected):
    submitted, error, calls = attempt(handler)
    outcome = CREATE_RULES[rule].outcome
    if outcome is CreateOutcome.RESEND:
        assert calls == 3  # the whole retry policy, since none of them could have landed
        assert error is not None and not isinstance(error, SubmitUnknownError)
        return
    assert calls == 1, "a create that may have left this machine is never sent again"
    if expected is None:
        assert error is None and submitted is not None
        assert submitted.task_id == "1910246754753896450"
    else:
        assert isinstance(error, expected), (error, expected)
        assert KEY not in str(error)


def test_every_rule_has_an_example_and_create_rule_agrees_with_the_client():
    assert {rule for _, rule, _ in EXAMPLES} == set(range(len(CREATE_RULES)))
    assert create_rule(None, ApiConnectionError("refused", sent=False)) == 0
    assert create_rule(None, ApiConnectionError("read timeout", sent=True)) == 7


def test_a_redirect_or_a_refused_key_is_unknown_and_stops_the_run_with_the_fix():
    _, error, _ = attempt(raw(301, b"", {"Location": "https://rh.test/task/openapi/create"}))
    assert isinstance(error, SubmitUnknownError)
    assert error.stop_run == ("RunningHub answered HTTP 301, redirecting to https: set "
                              "RUNNINGHUB_BASE_URL (or --base-url) to https://rh.test")
    _, error, _ = attempt(raw(401, b"unauthorized"))
    assert isinstance(error, SubmitUnknownError) and "RUNNINGHUB_API_KEY" in error.stop_run
    _, error, _ = attempt(raw(503, b""))
    assert isinstance(error, SubmitUnknownError) and error.stop_run is None


def test_an_oversized_or_bombed_answer_is_unknown_and_never_held_whole():
    big = b'{"code":0,"msg":"' + b"x" * (API_MAX_BYTES + 10) + b'","data":null}'
    _, error, _ = attempt(raw(200, big))
    assert isinstance(error, SubmitUnknownError) and "8 MiB" in str(error)
    bomb = gzip.compress(b'{"code":0,"msg":"' + b" " * (64 * 2**20) + b'"}', 9)
    assert len(bomb) < 200_000

    def gzipped(request):
        # a stream, so httpx.MockTransport does not decode it on its way in
        return httpx.Response(200, headers={"Content-Encoding": "gzip"},
                              stream=httpx.ByteStream(bomb))

    _, error, _ = attempt(gzipped)
    assert isinstance(error, SubmitUnknownError)
    assert "inflates past 8 MiB" in str(error)


def test_an_answer_that_never_completes_ends_at_the_request_deadline():
    async def stall(request):
        await asyncio.sleep(30)

    async def go():
        async with make_client(stall, deadline_s=0.3) as client:
            return await client.create({"workflowId": "1"})

    loop = asyncio.new_event_loop()
    try:
        started = loop.time()
        with pytest.raises(SubmitUnknownError) as info:
            loop.run_until_complete(go())
        assert loop.time() - started < 5
    finally:
        loop.close()
    assert "0.3 s request deadline" in str(info.value)


def test_the_readme_table_is_the_rule_the_code_implements():
    text = README.read_text(encoding="utf-8")
    section = text.split("### What a create's answer means", 1)[1]
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", section.split("\n\n", 3)[2], re.M)
    assert rows[0] == ("What came back", "What rhbatch does")
    assert rows[1:] == [(r.what, r.does) for r in CREATE_RULES]


def test_the_task_id_of_a_numeric_answer_is_kept_exactly():
    submitted, error, _ = attempt(envelope(0, {**TASK, "taskId": 1910246754753896451}))
    assert error is None and submitted.task_id == "1910246754753896451"
    assert json.loads('{"a": 1910246754753896451}')["a"] == 1910246754753896451
