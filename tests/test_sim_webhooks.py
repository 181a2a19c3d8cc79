"""Webhook delivery, retries, getWebhookDetail and retryWebhook against a loopback receiver."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.sim import AccountConfig, Simulator
from pipeline.sim.testing import SimClient, WebhookRecorder

Starter = Callable[..., tuple[Simulator, SimClient]]

@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    return functools.partial(frozen_sim, queue_delay_s=0.0)


@pytest.fixture
def receiver() -> Iterator[WebhookRecorder]:
    with WebhookRecorder() as hook:
        yield hook


def _wait_status(api: SimClient, task_id: str, status: str, retry_count: int | None = None,
                 timeout_s: float = 5.0) -> dict[str, Any]:
    """Poll getWebhookDetail until the delivery reached ``status`` (and ``retry_count``) and no
    attempt is in flight: a retry's count rises when it is sent, while the record still says
    RETRYING from the attempt before, and only its answer schedules the next one."""
    deadline = time.monotonic() + timeout_s
    while True:
        detail = api.post("/task/openapi/getWebhookDetail", {"taskId": task_id})
        with api.sim.lock:
            settled = not any(record.in_flight for record in api.sim.service.webhooks.values()
                              if record.task.task_id == task_id)
        done = settled and detail["code"] == 0 and detail["data"]["callbackStatus"] == status and (
            retry_count is None or detail["data"]["retryCount"] == retry_count)
        if done or time.monotonic() > deadline:
            return detail
        time.sleep(0.01)


def test_a_finished_task_posts_task_end_with_the_outputs_as_a_string(start, receiver, key):
    sim, api = start()
    task_id = api.task_id([("3", "seed", 1)], webhookUrl=receiver.url)
    assert api.post("/task/openapi/getWebhookDetail", {"taskId": task_id}) == {
        "code": 1, "msg": "webhook event not exists", "data": None}
    time.sleep(0.1)
    assert receiver.received == []  # nothing before the task ends
    sim.advance(11)
    [delivery] = receiver.wait_for(1)
    assert delivery["event"] == "TASK_END" and delivery["taskId"] == task_id
    event = json.loads(delivery["eventData"])
    assert event["code"] == 0 and event["data"][0]["nodeId"] == "9"
    assert event["data"][0]["taskCostTime"] == 10  # a number in webhooks, a string in outputs
    assert event["data"][0]["fileUrl"] == api.outputs(task_id)["data"][0]["fileUrl"]
    detail = _wait_status(api, task_id, "SUCCESS")["data"]
    assert detail["callbackStatus"] == "SUCCESS" and detail["retryCount"] == 0
    assert detail["taskId"] == task_id and detail["webhookUrl"] == receiver.url
    assert detail["eventData"] == delivery["eventData"]
    assert detail["callbackResponse"].startswith("HTTP 200")
    assert key not in json.dumps(detail) and detail["userApiKey"].startswith(sim.account(key).key_fp)
    assert len(detail["createTime"]) == 19 and detail["id"].isdigit()
    time.sleep(0.1)
    assert len(receiver.received) == 1  # delivered once


def test_failed_tasks_send_the_805_payload(start, receiver):
    sim, api = start(failure_rate=1.0)
    task_id = api.task_id(webhookUrl=receiver.url)
    sim.advance(11)
    [delivery] = receiver.wait_for(1)
    event = json.loads(delivery["eventData"])
    assert event["code"] == 805 and event["data"]["failedReason"]["node_id"] == "3"
    assert delivery["taskId"] == task_id


def test_a_failing_receiver_gets_retries_then_the_record_says_failed(start):
    sim, api = start(webhook_retries=2, webhook_retry_interval_s=60.0)
    with WebhookRecorder(default_status=500) as hook:
        task_id = api.task_id(webhookUrl=hook.url)
        sim.advance(11)
        hook.wait_for(1)
        detail = _wait_status(api, task_id, "RETRYING")["data"]
        assert detail["callbackStatus"] == "RETRYING" and detail["retryCount"] == 0
        sim.advance(61)
        hook.wait_for(2)
        assert _wait_status(api, task_id, "RETRYING", retry_count=1)["data"]["retryCount"] == 1
        sim.advance(61)
        deliveries = hook.wait_for(3)
        detail = _wait_status(api, task_id, "FAILED")["data"]
        assert detail["callbackStatus"] == "FAILED" and detail["retryCount"] == 2
        assert detail["callbackResponse"].startswith("HTTP 500")
        assert detail["updateTime"] > detail["createTime"]
        sim.advance(600)
        time.sleep(0.1)
        assert len(hook.received) == len(deliveries) == 3  # 1 + webhook_retries, then it gives up
        [record] = sim.audit.webhooks()
        assert record["attempts"] == 3


def test_a_slow_receiver_times_out_and_is_retried(start):
    sim, api = start(webhook_retries=1, webhook_retry_interval_s=10.0, webhook_timeout_s=0.2)
    with WebhookRecorder(delay_s=0.6) as hook:
        task_id = api.task_id(webhookUrl=hook.url)
        sim.advance(11)
        detail = _wait_status(api, task_id, "RETRYING")["data"]
        assert "Timeout" in detail["callbackResponse"]
        hook.delay_s = 0.0
        hook.wait_for(1)
        sim.advance(11)
        detail = _wait_status(api, task_id, "SUCCESS")["data"]
        assert detail["retryCount"] == 1
        # the slow first delivery still reached the receiver: webhooks may arrive twice
        assert [d["taskId"] for d in hook.wait_for(2)] == [task_id, task_id]


def test_an_unreachable_receiver_fails_and_retry_webhook_resends_to_a_new_url(start, receiver):
    sim, api = start(webhook_retries=0)
    with WebhookRecorder() as gone:
        dead_url = gone.url
    task_id = api.task_id(webhookUrl=dead_url)
    sim.advance(11)
    detail = _wait_status(api, task_id, "FAILED")["data"]
    assert detail["retryCount"] == 0 and "Error" in detail["callbackResponse"]
    answer = api.post("/task/openapi/retryWebhook", {"webhookId": detail["id"], "webhookUrl": receiver.url})
    assert answer == {"code": 0, "msg": "success", "data": None}
    [delivery] = receiver.wait_for(1)
    assert delivery["taskId"] == task_id and delivery["eventData"] == detail["eventData"]
    detail = _wait_status(api, task_id, "SUCCESS")["data"]
    assert detail["retryCount"] == 1 and detail["webhookUrl"] == receiver.url
    assert api.post("/task/openapi/retryWebhook", {"webhookId": "1"})["code"] == 807
    assert api.post("/task/openapi/retryWebhook", {})["code"] == 301


def test_cancelled_tasks_send_no_webhook(start, receiver):
    sim, api = start()
    task_id = api.task_id(webhookUrl=receiver.url)
    sim.advance(3)
    assert api.cancel(task_id)["code"] == 0
    sim.advance(30)
    time.sleep(0.1)
    assert receiver.received == []
    assert api.post("/task/openapi/getWebhookDetail", {"taskId": task_id})["code"] == 1


def test_personal_queue_tasks_send_webhooks_once_they_run(start, receiver, key):
    sim, api = start(accounts=[AccountConfig(key=key, api_type="EXCLUSIVE", concurrency=1)])
    first = api.task_id(webhookUrl=receiver.url)
    second = api.task_id(webhookUrl=receiver.url, usePersonalQueue=True)
    sim.advance(11)
    assert [d["taskId"] for d in receiver.wait_for(1)] == [first]
    sim.advance(10)
    assert [d["taskId"] for d in receiver.wait_for(2)] == [first, second]
