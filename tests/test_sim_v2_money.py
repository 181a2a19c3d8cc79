"""Money billing, child tasks and results without nodeId in the simulator (issue #15): v2 query
usage, taskUsageList with a child taskId that lost its last digits, v1 outputs money fields, the
account's money wallet and the audit's money ledger; over real HTTP."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from pipeline.errors import ConfigError
from pipeline.sim import (
    DEFAULT_WEBAPP_ID,
    IMG2IMG_WORKFLOW_ID,
    TEXT2IMG_WORKFLOW_ID,
    AccountConfig,
    SimConfig,
    Simulator,
    WorkflowBilling,
)
from pipeline.sim.testing import SimClient, WebhookRecorder

Starter = Callable[..., tuple[Simulator, SimClient]]

WF = TEXT2IMG_WORKFLOW_ID
RUN_WF = f"/openapi/v2/run/workflow/{WF}"
NODES = [{"nodeId": "3", "fieldName": "seed", "fieldValue": 1}]
DURATION_S = 10.0  # frozen_sim: queue delay 1 s, then 10 s of GPU time


@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    return functools.partial(frozen_sim, client_timeout_s=5.0)


def run(api: SimClient, path: str = RUN_WF, **body: Any) -> str:
    answer = api.http.post(path, json={"nodeInfoList": NODES, **body},
                           headers={"Authorization": f"Bearer {api.key}"}).json()
    assert answer["errorCode"] == "", answer
    return str(answer["taskId"])


def query(api: SimClient, task_id: str) -> httpx.Response:
    response = api.http.post("/openapi/v2/query", json={"taskId": task_id},
                             headers={"Authorization": f"Bearer {api.key}"})
    assert response.status_code == 200
    return response


def test_a_money_only_workflow_bills_money_not_coins(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, coins=100, money=5.0)],
                     workflow_billing={WF: {"billing": "money", "money_per_second": 0.014}})
    task_id = run(api)
    v1_id = api.task_id([("3", "seed", 2)])  # v1 creates of the workflow are billed the same way
    assert api.account()["data"]["remainMoney"] == "5.00"
    sim.advance(1 + DURATION_S)
    answer = query(api, task_id).json()
    assert answer["status"] == "SUCCESS"
    assert answer["usage"] == {"consumeMoney": None, "consumeCoins": None, "taskCostTime": "10",
                               "thirdPartyConsumeMoney": "0.14"}
    assert "taskUsageList" not in answer and "parentTaskId" not in answer  # no child tasks
    [item] = api.outputs(v1_id)["data"]
    assert (item["consumeCoins"], item["consumeMoney"], item["thirdPartyConsumeMoney"]) == (
        None, None, "0.14")
    data = api.account()["data"]
    assert data["remainMoney"] == "4.72" and data["currency"] == "CNY"
    assert data["remainCoins"] == "100"  # no coins spent
    assert sim.audit.ledger() == {task_id: 0, v1_id: 0}  # the coin ledger stays coins
    assert sim.audit.money_ledger() == {task_id: 0.14, v1_id: 0.14}
    assert sim.audit.money_total() == pytest.approx(0.28)
    account = sim.account(key)
    assert account.billed_money == pytest.approx(0.28) and account.billed_coins == 0
    assert account.money == pytest.approx(4.72)
    assert [t["money"] for t in sim.audit.tasks()] == [0.14, 0.14]


def test_both_coins_and_money_and_the_consume_money_field(start, key):
    sim, api = start(workflow_billing={WF: WorkflowBilling(billing="both", money_per_second=0.05,
                                                           money_field="consumeMoney",
                                                           coins_per_second=1.0)})
    task_id = run(api)
    img = api.task_id([("3", "seed", 1)], workflow_id=IMG2IMG_WORKFLOW_ID)  # no entry: coins
    sim.advance(11)
    assert query(api, task_id).json()["usage"] == {
        "consumeMoney": "0.50", "consumeCoins": "10", "taskCostTime": "10",
        "thirdPartyConsumeMoney": None}
    [item] = api.outputs(task_id)["data"]
    assert (item["consumeCoins"], item["consumeMoney"], item["thirdPartyConsumeMoney"]) == (
        "10", "0.50", None)
    assert query(api, img).json()["usage"]["consumeCoins"] == "2"
    assert sim.audit.ledger() == {task_id: 10, img: 2}
    assert sim.audit.money_ledger() == {task_id: 0.5}
    # the account has no money wallet: accountStatus says so, the money is still counted
    data = api.account()["data"]
    assert data["remainMoney"] is None and data["currency"] is None
    assert sim.account(key).billed_money == 0.5


def test_failed_and_cancelled_money_tasks_pay_for_the_seconds_used(start, key):
    sim, api = start(task_duration_s=100.0, workflow_billing={WF: {"billing": "money"}})
    running = run(api)
    queued_delay = run(api, nodeInfoList=[{"nodeId": "3", "fieldName": "seed", "fieldValue": 2}])
    assert api.cancel(queued_delay)["code"] == 0  # still in its queue delay: nothing ran
    sim.advance(1 + 25)
    assert api.cancel(running)["code"] == 0
    answer = query(api, running).json()
    assert answer["status"] == "CANCEL"
    assert answer["usage"]["thirdPartyConsumeMoney"] == "0.35"  # 25 s x 0.014
    assert query(api, queued_delay).json()["usage"]["thirdPartyConsumeMoney"] == "0.00"
    assert sim.audit.money_ledger() == {running: 0.35, queued_delay: 0.0}


def test_a_spent_money_wallet_refuses_money_workflows_only(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, money=0.0, wallet_code=416)],
                     workflow_billing={WF: {"billing": "money"}})
    answer = api.http.post(RUN_WF, json={"nodeInfoList": NODES},
                           headers={"Authorization": f"Bearer {key}"}).json()
    assert answer["errorCode"] == "605" and answer["taskId"] == ""
    assert api.create()["code"] == 416
    assert api.create(workflow_id=IMG2IMG_WORKFLOW_ID)["code"] == 0  # billed in coins
    sim.account(key).money = 1.0  # a top-up
    assert api.create()["code"] == 0


def test_child_tasks_carry_the_bill_and_their_ids_lose_digits(start, key):
    sim, api = start(workflow_billing={WF: {"billing": "money", "child_tasks": 2}})
    task_id = run(api)
    pending = query(api, task_id).json()
    assert pending["parentTaskId"] is None and pending["taskUsageList"] is None  # not ended
    sim.advance(11)
    response = query(api, task_id)
    answer = response.json()
    [task] = sim.audit.tasks()
    real_ids = task["childTaskIds"]
    assert len(real_ids) == 2 and len(set(real_ids + [task_id])) == 3
    assert all(re.fullmatch(r"\d{19}", i) for i in real_ids)
    # the parent: its money is null (the children carry it), its own time stays
    assert answer["taskId"] == task_id and answer["parentTaskId"] is None
    assert answer["usage"] == {"consumeMoney": None, "consumeCoins": None, "taskCostTime": "10",
                               "thirdPartyConsumeMoney": None}
    children = answer["taskUsageList"]
    assert [c["usage"] for c in children] == [
        {"consumeMoney": None, "consumeCoins": None, "taskCostTime": "5",
         "thirdPartyConsumeMoney": "0.07"}] * 2
    assert all(c["parentTaskId"] == task_id and c["taskStatus"] == "SUCCESS" for c in children)
    for child, real in zip(children, real_ids, strict=True):
        assert isinstance(child["taskId"], int)  # a bare JSON number, not a string
        assert child["taskId"] == int(float(real)) and float(child["taskId"]) == float(real)
        assert f'"taskId":{child["taskId"]},' in response.text
    assert any(child["taskId"] != int(real) for child, real in zip(children, real_ids, strict=True))
    # the top-level taskId stays an exact string
    assert f'"taskId":"{task_id}"' in response.text
    assert sim.audit.money_ledger() == {task_id: 0.14}
    # v1 outputs carry the task's total
    assert api.outputs(task_id)["data"][0]["thirdPartyConsumeMoney"] == "0.14"


def test_child_coins_are_rounded_up_per_child_and_the_ledger_is_their_sum(start, key):
    sim, api = start(workflow_billing={WF: {"child_tasks": 3}})
    task_id = run(api)
    sim.advance(11)
    answer = query(api, task_id).json()
    assert answer["usage"]["consumeCoins"] is None and answer["usage"]["taskCostTime"] == "10"
    assert [c["usage"]["consumeCoins"] for c in answer["taskUsageList"]] == ["1", "1", "1"]
    assert [c["usage"]["thirdPartyConsumeMoney"] for c in answer["taskUsageList"]] == [None] * 3
    assert sim.audit.ledger() == {task_id: 3}  # 3 x ceil(3.33 s x 0.2), not ceil(10 s x 0.2)
    assert sim.audit.money_ledger() == {}
    assert api.outputs(task_id)["data"][0]["consumeCoins"] == "3"


def test_parent_usage_total_repeats_the_sums_on_the_parent(start, key):
    sim, api = start(failure_rate=1.0, task_duration_s=8.0,
                     workflow_billing={WF: {"billing": "both", "child_tasks": 1,
                                            "parent_usage": "total"}})
    task_id = run(api, path=f"/openapi/v2/run/ai-app/{DEFAULT_WEBAPP_ID}")
    sim.advance(20)
    answer = query(api, task_id).json()
    [task] = sim.audit.tasks()
    [child] = answer["taskUsageList"]
    assert answer["status"] == "FAILED" and child["taskStatus"] == "FAILED"
    assert answer["usage"]["consumeCoins"] == child["usage"]["consumeCoins"] == str(task["coins"])
    assert answer["usage"]["thirdPartyConsumeMoney"] == child["usage"]["thirdPartyConsumeMoney"]
    assert Decimal(child["usage"]["thirdPartyConsumeMoney"]) == Decimal(str(task["money"]))


def test_child_task_ids_in_the_javascript_style(start, key):
    sim, api = start(child_task_id_style="js", workflow_billing={WF: {"child_tasks": 1}})
    task_id = run(api)
    sim.advance(11)
    [child] = query(api, task_id).json()["taskUsageList"]
    [real] = sim.audit.tasks()[0]["childTaskIds"]
    assert child["taskId"] == int(Decimal(repr(float(real))))  # e.g. 2052287938007814100
    assert float(child["taskId"]) == float(real) and str(child["taskId"]) != real
    assert query(api, real).json()["errorCode"] == "1004"  # a child is not a task of its own


def test_results_without_node_id_globally_and_per_workflow(start, key):
    sim, api = start(results_without_node_id=True,
                     workflow_billing={IMG2IMG_WORKFLOW_ID: {"results_without_node_id": False}})
    bare = run(api)
    kept = run(api, path=f"/openapi/v2/run/workflow/{IMG2IMG_WORKFLOW_ID}")
    sim.advance(11)
    [item] = query(api, bare).json()["results"]
    assert item == {"url": f"{sim.base_url}/files/{bare}/9_0.png", "outputType": "png", "text": None}
    assert "nodeId" in query(api, kept).json()["results"][0]
    assert api.outputs(bare)["data"][0]["nodeId"] == "9"  # v1 outputs keep it


def test_v2_webhooks_carry_children_and_results_without_node_id(start, key):
    sim, api = start(queue_delay_s=0.0, workflow_billing={
        WF: {"billing": "money", "child_tasks": 1, "results_without_node_id": True}})
    with WebhookRecorder() as hook:
        task_id = run(api, webhookUrl=hook.url)
        sim.advance(11)
        [delivery] = hook.wait_for(1)
    event = delivery["eventData"]
    assert delivery["taskId"] == task_id and isinstance(event, dict)
    assert "nodeId" not in event["results"][0] and event["parentTaskId"] is None
    [child] = event["taskUsageList"]
    assert isinstance(child["taskId"], int) and child["parentTaskId"] == task_id
    assert child["usage"]["thirdPartyConsumeMoney"] == "0.14"
    assert event["usage"]["thirdPartyConsumeMoney"] is None
    # a v1 webhook (v1-created task) stays the outputs string, money included
    with WebhookRecorder() as hook:
        api.task_id([("3", "seed", 5)], webhookUrl=hook.url)
        sim.advance(11)
        [delivery] = hook.wait_for(1)
    item = json.loads(delivery["eventData"])["data"][0]
    assert item["thirdPartyConsumeMoney"] == "0.14" and item["consumeCoins"] is None


# -- configuration ------------------------------------------------------------------------------


def test_workflow_billing_loads_from_yaml(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text(
        "accounts:\n"
        f"  - {{key: \"{'k' * 32}\", coins: 100, money: 50.5, v1_task_routes: \"412\"}}\n"
        "results_without_node_id: true\n"
        "child_task_id_style: js\n"
        "workflow_billing:\n"
        f"  {WF}:\n"
        "    billing: money\n"
        "    money_per_second: 0.02\n"
        "    money_field: consumeMoney\n"
        "    child_tasks: 2\n"
        "    parent_usage: total\n"
        "    results_without_node_id: false\n",
        encoding="utf-8",
    )
    config = SimConfig.from_file(path)
    assert config.workflow_billing == {WF: WorkflowBilling(
        billing="money", money_per_second=0.02, money_field="consumeMoney", child_tasks=2,
        parent_usage="total", results_without_node_id=False)}
    assert config.accounts[0].money == 50.5 and config.accounts[0].v1_task_routes == "412"
    assert config.results_without_node_id and not config.without_node_id(WF)
    assert config.without_node_id(IMG2IMG_WORKFLOW_ID)
    assert config.billing_for(IMG2IMG_WORKFLOW_ID) == WorkflowBilling()


@pytest.mark.parametrize("spec, match", [
    ({"billing": "gold"}, "billing 'gold' is not one of coins, money, both"),
    ({"money_per_second": -1}, "money_per_second must be a number >= 0"),
    ({"coins_per_second": "1"}, "coins_per_second must be a number >= 0"),
    ({"money_field": "money"}, "money_field 'money' is not one of"),
    ({"child_tasks": -1}, "child_tasks must be an integer"),
    ({"child_tasks": 1.5}, "child_tasks must be an integer"),
    ({"parent_usage": None}, "parent_usage None is not one of children, total"),
    ({"results_without_node_id": "yes"}, "results_without_node_id must be"),
    ({"colour": "red"}, "unknown key.*'colour'.*valid keys: billing"),
])
def test_bad_workflow_billing_is_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        SimConfig.from_dict({"workflow_billing": {WF: spec}})


def test_other_bad_money_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown workflow id.*'42'"):
        Simulator(SimConfig(workflow_billing={"42": {"billing": "money"}}))
    with pytest.raises(ConfigError, match="child_task_id_style 'hex'"):
        SimConfig(child_task_id_style="hex").validate()
    with pytest.raises(ConfigError, match="money must be a number or null"):
        AccountConfig(key="k" * 32, money="lots").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="results_without_node_id must be true or false"):
        SimConfig(results_without_node_id=None).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workflow_billing must be a mapping"):
        SimConfig.from_dict({"workflow_billing": [WF]})
