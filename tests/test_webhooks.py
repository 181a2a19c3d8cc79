"""Webhooks as an early hint: a webhook run and a polling run give the same output manifest."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import fast_settings, read_results, write_manifest

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.webhooks import WebhookReceiver, parse_listen

STABLE = ("row_id", "status", "nodeInfoList", "workflowId", "inputs")


def _stable(records):
    return [{k: r[k] for k in STABLE} for r in records]


def test_webhook_run_matches_polling_run_even_with_dropped_and_repeated_deliveries(
    make_sim, api_key, tmp_path, monkeypatch
):
    manifest = write_manifest(tmp_path / "m.csv", 30)
    polling_sim = make_sim(concurrency=10, seed=4)
    polled = run_batch(ManifestArgs(manifest), tmp_path / "poll",
                       fast_settings(polling_sim, api_key, concurrency=10), handle_signals=False)
    assert polled.counts[st.SUCCESS] == 30

    # Every other delivery fails (the service retries it: repeats), and every third one is
    # swallowed before rhbatch sees it (dropped): polling must still finish every row.
    from aiohttp import web

    calls = {"n": 0}
    original = WebhookReceiver._handle

    async def flaky(self, request):
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # dropped: answered, but rhbatch never hears of it
            return web.json_response({"ok": True})
        response = await original(self, request)
        if calls["n"] % 2 == 0:  # seen, but answered 500: the service delivers it again
            return web.Response(status=500, text="try again")
        return response

    monkeypatch.setattr(WebhookReceiver, "_handle", flaky)
    hook_sim = make_sim(concurrency=10, seed=4, webhook_retry_interval_s=1.0)
    # slow safety polls: completions are mostly learned from webhooks and the account count
    settings = fast_settings(hook_sim, api_key, concurrency=10, max_poll_interval_s=2.0)
    hooked = run_batch(ManifestArgs(manifest), tmp_path / "hook", settings, handle_signals=False,
                       webhook_listen="127.0.0.1:0")
    assert hooked.counts[st.SUCCESS] == 30
    assert _stable(read_results(tmp_path / "hook")) == _stable(read_results(tmp_path / "poll"))
    sent = [t["webhookUrl"] for t in hook_sim.audit.tasks()]
    assert all(u and u.startswith("http://127.0.0.1:") and "/rhbatch/" in u for u in sent)
    # one unguessable run token, then a token of each create attempt's own (row-attempt-random)
    prefixes = {u.rsplit("/", 1)[0] for u in sent}
    assert len(prefixes) == 1 and len(sent[0].split("/rhbatch/")[1].split("/")[0]) >= 30
    assert len(set(sent)) == len(sent)
    assert calls["n"] >= 30  # deliveries reached the receiver, some of them repeats


def test_receiver_ignores_bodies_without_a_task_and_unknown_tasks():
    import asyncio

    seen = []

    async def scenario():
        receiver = WebhookReceiver("127.0.0.1", 0, lambda t: seen.append(t) or False)
        await receiver.start()
        try:
            async with httpx.AsyncClient() as client:
                url = receiver.url()
                bad = await client.post(url, content=b"not json")
                empty = await client.post(url, json={"event": "TASK_END"})
                nested = await client.post(url, json={
                    "event": "TASK_END",
                    "eventData": json.dumps({"taskId": "42", "status": "SUCCESS"}),
                })
                direct = await client.post(url, json={"event": "TASK_END", "taskId": "43",
                                                       "eventData": "{}"})
                wrong = await client.post(url.rsplit("/", 1)[0] + "/guess", json={"taskId": "1"})
            return bad.status_code, empty.status_code, nested.status_code, direct.status_code, \
                wrong.status_code, receiver.deliveries, receiver.rejected
        finally:
            await receiver.stop()

    codes = asyncio.run(scenario())
    assert codes == (400, 400, 200, 200, 404, 2, 2)
    assert seen == ["42", "43"]


@pytest.mark.parametrize("text", ["8787", "host:", "h:99999"])
def test_listen_address_must_be_host_and_port(text):
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="is not HOST:PORT"):
        parse_listen(text)
