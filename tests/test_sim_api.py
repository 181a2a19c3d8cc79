"""The simulator's routes and every business code they answer, over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pipeline.sim import (
    DEFAULT_WEBAPP_ID,
    IMG2IMG_WORKFLOW_ID,
    TEXT2IMG_WORKFLOW_ID,
    AccountConfig,
    Simulator,
)
from pipeline.sim.testing import SimClient

SLOW = {"time_scale": 1e-9, "queue_delay_s": 5.0, "task_duration_s": 20.0}


Starter = Callable[..., tuple[Simulator, SimClient]]

@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    """A simulator with a frozen clock (move it with ``sim.advance``) and a client."""

    def factory(accounts: list[AccountConfig] | None = None, **config: Any) -> tuple[Simulator, SimClient]:
        if accounts:
            config["accounts"] = accounts
        return frozen_sim(**{**SLOW, **config})

    return factory


# -- create ----------------------------------------------------------------------------------------


def test_create_accepts_the_doc_example_and_answers_like_the_service(start):
    sim, api = start()
    answer = api.create([("6", "text", "1 girl in classroom"), ("3", "seed", "1231231")])
    assert answer["code"] == 0 and answer["msg"] == "success"
    data = answer["data"]
    assert re.fullmatch(r"\d{19}", data["taskId"])
    assert re.fullmatch(r"[0-9a-f]{32}", data["clientId"])
    assert data["taskStatus"] == "QUEUED" and data["netWssUrl"] is None
    tips = json.loads(data["promptTips"])
    assert tips == {"result": True, "error": None, "outputs_to_execute": ["9"], "node_errors": {}}
    [task] = sim.audit.tasks()
    assert task["taskId"] == data["taskId"] and task["status"] == "QUEUED"
    assert task["nodeInfoList"][1] == {"nodeId": "3", "fieldName": "seed", "fieldValue": "1231231"}


def test_create_without_queue_delay_is_running_with_a_websocket_url(start):
    _, api = start(queue_delay_s=0.0)
    data = api.create()["data"]
    assert data["taskStatus"] == "RUNNING"
    assert data["netWssUrl"].startswith("wss://")


@pytest.mark.parametrize("body", [
    {},
    {"workflowId": ""},
    {"workflowId": "0"},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "nodeInfoList": "6.text=x"},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "nodeInfoList": [{"nodeId": "6", "fieldName": "text"}]},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "nodeInfoList": [{"fieldName": "text", "fieldValue": "x"}]},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "usePersonalQueue": "maybe"},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "webhookUrl": "ftp://example.invalid/hook"},
    {"workflowId": TEXT2IMG_WORKFLOW_ID, "workflow": "{not json"},
])
def test_bad_parameters_answer_301_and_create_nothing(start, body):
    sim, api = start()
    answer = api.post("/task/openapi/create", body)
    assert answer == {"code": 301, "msg": "PARAMS_INVALID", "data": None}
    assert sim.audit.tasks() == []


def test_a_body_that_is_not_a_json_object_answers_301(start, key):
    sim, api = start()
    for raw in (b"[1, 2]", b"{broken"):
        response = api.http.post("/task/openapi/create", content=raw,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
        assert response.json()["code"] == 301
    assert sim.audit.tasks() == []


def test_parameters_are_checked_before_the_key(start):
    _, api = start()
    assert api.post("/task/openapi/create", {}, key="nope")["code"] == 301
    assert api.post("/task/openapi/create", {"workflowId": TEXT2IMG_WORKFLOW_ID}, key="nope")["code"] == 412


def test_key_checks_412_806_802_801(start, key):
    revoked, free = secrets.token_hex(16), secrets.token_hex(16)
    sim, api = start(accounts=[AccountConfig(key=key), AccountConfig(key=revoked, revoked=True),
                               AccountConfig(key=free, free_user=True)])
    body = {"workflowId": TEXT2IMG_WORKFLOW_ID}
    assert api.post("/task/openapi/create", body, key_field=None)["code"] == 412
    assert api.post("/task/openapi/create", body, key=secrets.token_hex(16))["msg"] == "TOKEN_INVALID"
    assert api.post("/task/openapi/create", body, key=revoked)["code"] == 802
    assert api.post("/task/openapi/create", body, key=free)["code"] == 801
    assert api.post("/uc/openapi/accountStatus", key=free, key_field="apikey")["code"] == 801
    # the key may come as a Bearer header alone
    assert api.post("/task/openapi/create", body, key_field=None, bearer=True)["code"] == 0
    assert len(sim.audit.tasks()) == 1


def test_unknown_key_code_806_for_well_formed_keys(start):
    _, api = start(unknown_key_code=806)
    body = {"workflowId": TEXT2IMG_WORKFLOW_ID}
    assert api.post("/task/openapi/create", body, key=secrets.token_hex(16))["code"] == 806
    assert api.post("/task/openapi/create", body, key="short")["code"] == 412


@pytest.mark.parametrize("wallet_code", [414, 416, 812])
def test_an_empty_balance_answers_the_wallet_code_before_workflow_checks(start, key, wallet_code):
    sim, api = start(accounts=[AccountConfig(key=key, coins=0, wallet_code=wallet_code)])
    assert api.create()["code"] == wallet_code
    # the billing gate runs before workflow validation (observed on the real service)
    assert api.create(workflow_id="1234")["code"] == wallet_code
    assert api.create([("99", "text", "x")])["code"] == wallet_code
    sim.account(key).coins = 100
    assert api.create()["code"] == 0


def test_unknown_workflow_380(start):
    sim, api = start()
    answer = api.create(workflow_id="1111111111111111111")
    assert answer == {"code": 380, "msg": "WORKFLOW_NOT_EXISTS", "data": None}
    assert sim.audit.tasks() == []


def test_unknown_node_or_field_803(start):
    sim, api = start()
    answer = api.create([("99", "text", "x")])
    assert answer["code"] == 803 and answer["msg"] == "APIKEY_INVALID_NODE_INFO"
    assert answer["data"]["reason"] == "node_not_found_in_workflow"
    answer = api.create([("6", "prompt", "x")])
    assert answer["code"] == 803 and answer["data"]["reason"] == "field_not_found_in_node"
    assert sim.audit.tasks() == []


def test_workflow_json_with_node_info_list_answers_803_and_alone_is_accepted(start):
    sim, api = start()
    prompt = api.post("/api/openapi/getJsonApiFormat", {"workflowId": TEXT2IMG_WORKFLOW_ID})
    workflow = json.loads(prompt["data"]["prompt"])
    workflow["6"]["inputs"]["text"] = "baked in"
    text = json.dumps(workflow)
    assert api.create([("6", "text", "x")], workflow=text)["code"] == 803
    assert api.create(workflow=text)["code"] == 0
    assert len(sim.audit.tasks()) == 1


@pytest.mark.parametrize("node,field,value", [
    ("3", "seed", "abc"),
    ("3", "seed", ""),
    ("3", "cfg", "high"),
    ("3", "cfg", None),
])
def test_values_that_do_not_fit_answer_433_with_node_errors(start, node, field, value):
    sim, api = start()
    answer = api.create([(node, field, value)])
    assert answer["code"] == 433 and answer["msg"] == "VALIDATE_PROMPT_FAILED"
    tips = json.loads(answer["data"]["promptTips"])
    assert tips["result"] is False
    error = tips["node_errors"][node]
    assert error["class_type"] in ("KSampler", "CLIPTextEncode")
    assert error["errors"][0]["type"] == "invalid_input_type"
    assert error["errors"][0]["extra_info"]["input_name"] == field
    assert error["dependent_outputs"] == ["9"]
    assert sim.audit.tasks() == []


@pytest.mark.parametrize("node,field,value,input_name", [
    ("3", "model", ["99", 0], "samples"),    # a link to a node that does not exist
    ("6", "text", ["a", "b"], "positive"),   # a two-item list is a link, to node "a"
])
def test_a_link_to_a_missing_node_answers_433_on_the_node_holding_it(start, node, field, value, input_name):
    # ComfyUI reports the failure on the node whose link cannot be followed, as seen from the node
    # that links to it (the input name is the downstream node's)
    sim, api = start()
    answer = api.create([(node, field, value)])
    assert answer["code"] == 433
    tips = json.loads(answer["data"]["promptTips"])
    [error] = tips["node_errors"][node]["errors"]
    assert error["type"] == "exception_during_inner_validation"
    assert error["extra_info"]["input_name"] == input_name
    assert error["extra_info"]["exception_type"] == "KeyError"
    assert tips["node_errors"][node]["dependent_outputs"] == ["9"]
    assert sim.audit.tasks() == []


@pytest.mark.parametrize("node,field,value", [
    ("3", "seed", 7),
    ("3", "seed", "1231231"),
    ("3", "seed", 7.0),
    ("3", "seed", 3.5),            # truncated to 3
    ("3", "seed", True),           # int(True) is 1
    ("3", "cfg", 7),
    ("3", "cfg", "7.5"),
    ("3", "denoise", 1),
    ("6", "text", 123),            # ComfyUI applies str() to STRING inputs
    ("6", "text", ""),
    ("6", "text", True),           # "True"
    ("6", "text", None),           # "None"
    ("3", "model", ["4", 0]),      # re-pointing a link at an existing node
    ("4", "ckpt_name", "sdxl.safetensors"),
])
def test_values_comfyui_would_coerce_are_accepted(start, node, field, value):
    _, api = start()
    assert api.create([(node, field, value)])["code"] == 0


def test_a_literal_on_a_link_input_is_accepted_and_fails_when_it_runs(start):
    sim, api = start()
    task_id = api.task_id([("6", "clip", "x")])
    sim.advance(30)
    answer = api.outputs(task_id)
    assert answer["code"] == 805
    reason = answer["data"]["failedReason"]
    assert reason["node_id"] == "6" and reason["node_name"] == "CLIPTextEncode"
    [task] = sim.audit.tasks()
    assert task["status"] == "FAILED"


def test_shared_and_normal_keys_answer_421_at_the_concurrency_limit(start, key):
    normal = secrets.token_hex(16)
    sim, api = start(accounts=[AccountConfig(key=key, api_type="SHARED", concurrency=2),
                               AccountConfig(key=normal, api_type="NORMAL", concurrency=1)])
    assert api.create([("3", "seed", 1)])["code"] == 0
    assert api.create([("3", "seed", 2)])["code"] == 0
    assert api.create([("3", "seed", 3)]) == {"code": 421, "msg": "TASK_QUEUE_MAXED", "data": None}
    assert api.account()["data"]["currentTaskCounts"] == "2"
    body = {"workflowId": TEXT2IMG_WORKFLOW_ID}
    assert api.post("/task/openapi/create", body, key=normal)["code"] == 0
    assert api.post("/task/openapi/create", body, key=normal)["code"] == 421
    sim.advance(26)  # 5 s queued + 20 s running
    assert api.account()["data"]["currentTaskCounts"] == "0"
    assert api.create([("3", "seed", 3)])["code"] == 0
    assert len(sim.audit.tasks()) == 4


def test_exclusive_key_415_personal_queue_and_814(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, api_type="EXCLUSIVE", concurrency=1,
                                             personal_queue_limit=2)])
    first = api.task_id([("3", "seed", 1)])
    assert api.create([("3", "seed", 2)]) == {"code": 415, "msg": "TASK_INSTANCE_MAXED", "data": None}
    second = api.task_id([("3", "seed", 2)], usePersonalQueue="true")
    third = api.task_id([("3", "seed", 3)], usePersonalQueue=True)
    assert api.create([("3", "seed", 4)], usePersonalQueue="true")["code"] == 814
    assert api.create([("3", "seed", 4)], usePersonalQueue="false")["code"] == 415
    assert api.account()["data"]["currentTaskCounts"] == "3"
    assert [api.status(t)["data"] for t in (first, second, third)] == ["QUEUED"] * 3
    sim.advance(30)  # first done at 25; second starts queuing then
    assert [api.status(t)["data"] for t in (first, second, third)] == ["SUCCESS", "RUNNING", "QUEUED"]
    sim.advance(60)
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    assert [tasks[t]["status"] for t in (first, second, third)] == ["SUCCESS"] * 3
    # each queued task took the slot the moment the previous one released it
    assert tasks[second]["started_at"] == pytest.approx(tasks[first]["ended_at"] + 5.0)
    assert tasks[third]["started_at"] == pytest.approx(tasks[second]["ended_at"] + 5.0)
    assert tasks[second]["personal_queue"] and not tasks[first]["personal_queue"]
    assert api.account()["data"]["currentTaskCounts"] == "0"


# -- task queries ------------------------------------------------------------------------------------


def test_status_and_outputs_follow_the_lifecycle(start):
    sim, api = start()
    task_id = api.task_id([("3", "seed", 5)])
    assert api.status(task_id) == {"code": 0, "msg": "success", "data": "QUEUED"}
    assert api.outputs(task_id) == {"code": 813, "msg": "APIKEY_TASK_IS_QUEUED", "data": None}
    sim.advance(6)
    assert api.status(task_id)["data"] == "RUNNING"
    running = api.outputs(task_id)
    assert running["code"] == 804 and running["msg"] == "APIKEY_TASK_IS_RUNNING"
    assert running["data"]["netWssUrl"].startswith("wss://")
    sim.advance(20)
    assert api.status(task_id)["data"] == "SUCCESS"
    done = api.outputs(task_id)
    assert done["code"] == 0
    [item] = done["data"]
    assert item == {
        "fileUrl": f"{sim.base_url}/files/{task_id}/9_0.png", "fileType": "png",
        "taskCostTime": "20", "nodeId": "9", "consumeCoins": "4", "consumeMoney": None,
        "thirdPartyConsumeMoney": None,
    }
    image = api.http.get(item["fileUrl"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_failed_tasks_answer_805_with_a_failed_reason_within_10_s(start):
    sim, api = start(failure_rate=1.0, queue_delay_s=0.0, task_duration_s=(60.0, 120.0))
    task_id = api.task_id()
    sim.advance(10.5)
    assert api.status(task_id)["data"] == "FAILED"
    answer = api.outputs(task_id)
    assert answer["code"] == 805 and answer["msg"] == "APIKEY_TASK_STATUS_ERROR"
    reason = answer["data"]["failedReason"]
    assert reason["exception_type"] == "torch.OutOfMemoryError"
    assert reason["node_id"] == "3" and reason["node_name"] == "KSampler"
    assert isinstance(json.loads(reason["traceback"]), list)
    [task] = sim.audit.tasks()
    assert task["status"] == "FAILED" and task["ended_at"] - task["started_at"] <= 10.0
    assert task["coins"] >= 1  # failed tasks are billed for the time they ran
    assert api.http.get(f"/files/{task_id}/9_0.png").status_code == 404


def test_unknown_and_foreign_task_ids_answer_807(start, key):
    other = secrets.token_hex(16)
    _, api = start(accounts=[AccountConfig(key=key), AccountConfig(key=other)])
    foreign = api.post("/task/openapi/create", {"workflowId": TEXT2IMG_WORKFLOW_ID}, key=other)
    foreign_id = foreign["data"]["taskId"]
    for task_id in ("1999999999999999999", foreign_id):
        for path in ("/task/openapi/status", "/task/openapi/outputs", "/task/openapi/cancel",
                     "/task/openapi/getWebhookDetail"):
            answer = api.post(path, {"taskId": task_id})
            assert answer == {"code": 807, "msg": "APIKEY_TASK_NOT_FOUND", "data": None}, path
    assert api.post("/task/openapi/outputs", {})["code"] == 301
    assert api.post("/task/openapi/status", {"taskId": foreign_id}, key=other)["code"] == 0


def test_cancel_queued_running_and_finished_tasks(start, key):
    sim, api = start(coins_per_second=1.0)
    queued = api.task_id([("3", "seed", 1)])
    running = api.task_id([("3", "seed", 2)])
    finished = api.task_id([("3", "seed", 3)])
    sim.advance(8)  # all three running for ~3 s
    assert api.cancel(queued) == {"code": 0, "msg": "success", "data": None}  # (running by now)
    sim.advance(4)
    assert api.cancel(running)["code"] == 0
    sim.advance(30)
    assert api.cancel(finished)["code"] == 0  # finished: 0 by default
    assert api.status(running)["data"] == "FAILED"
    reason = api.outputs(running)
    assert reason["code"] == 805 and reason["data"]["failedReason"]["exception_type"] == "TaskCancelled"
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    assert tasks[queued]["status"] == tasks[running]["status"] == "CANCEL"
    assert tasks[finished]["status"] == "SUCCESS"
    assert tasks[queued]["coins"] == 3 and tasks[running]["coins"] == 7  # runtime used, rounded up
    account = sim.account(key)
    assert account.billed_coins == 3 + 7 + 20
    assert api.account()["data"]["currentTaskCounts"] == "0"


def test_cancel_while_still_queued_bills_nothing(start, key):
    sim, api = start()
    task_id = api.task_id()
    assert api.cancel(task_id)["code"] == 0
    assert api.outputs(task_id)["code"] == 805
    [task] = sim.audit.tasks()
    assert task["status"] == "CANCEL" and task["coins"] == 0
    assert sim.account(key).coins == 10**9


def test_cancel_of_a_finished_task_can_answer_another_code(start):
    sim, api = start(cancel_finished_code=805)
    task_id = api.task_id()
    sim.advance(30)
    assert api.cancel(task_id) == {"code": 805, "msg": "APIKEY_TASK_STATUS_ERROR", "data": None}


def test_account_status_accepts_apikey_apiKey_or_bearer_and_answers_strings(start, key):
    _, api = start(accounts=[AccountConfig(key=key, api_type="EXCLUSIVE", coins=177814)])
    expected = {"code": 0, "msg": "success", "data": {
        "remainCoins": "177814", "currentTaskCounts": "0", "remainMoney": None, "currency": None,
        "apiType": "EXCLUSIVE"}}
    assert api.post("/uc/openapi/accountStatus", key_field="apikey") == expected
    assert api.post("/uc/openapi/accountStatus", key_field="apiKey") == expected
    assert api.post("/uc/openapi/accountStatus", key_field=None, bearer=True) == expected
    assert api.post("/uc/openapi/accountStatus", key_field=None)["code"] == 412


def test_get_json_api_format_returns_the_prompt_as_a_string(start):
    _, api = start()
    answer = api.post("/api/openapi/getJsonApiFormat", {"workflowId": TEXT2IMG_WORKFLOW_ID})
    assert answer["code"] == 0 and answer["msg"] == "SUCCESS"
    assert isinstance(answer["data"]["prompt"], str)
    prompt = json.loads(answer["data"]["prompt"])
    assert prompt["3"]["class_type"] == "KSampler" and prompt["3"]["inputs"]["model"] == ["4", 0]
    assert prompt["9"]["class_type"] == "SaveImage" and prompt["6"]["_meta"]["title"]
    img2img = json.loads(api.post("/api/openapi/getJsonApiFormat",
                                  {"workflowId": IMG2IMG_WORKFLOW_ID})["data"]["prompt"])
    assert img2img["10"] == {"class_type": "LoadImage", "_meta": {"title": "Load Image"},
                             "inputs": {"image": "example.png"}}
    assert api.post("/api/openapi/getJsonApiFormat", {"workflowId": "42"})["code"] == 380
    assert api.post("/api/openapi/getJsonApiFormat", {})["code"] == 301


def test_ai_app_run_maps_the_webapp_to_its_workflow(start):
    sim, api = start()
    answer = api.post("/task/openapi/ai-app/run", {
        "webappId": int(DEFAULT_WEBAPP_ID),
        "nodeInfoList": [{"nodeId": "6", "fieldName": "text", "fieldValue": "app", "description": "x"}],
    })
    assert answer["code"] == 0 and answer["data"]["taskStatus"] == "QUEUED"
    [task] = sim.audit.tasks()
    assert task["webapp_id"] == DEFAULT_WEBAPP_ID and task["workflowId"] == TEXT2IMG_WORKFLOW_ID
    assert api.post("/task/openapi/ai-app/run", {"webappId": "42", "nodeInfoList": []}) == {
        "code": 901, "msg": "WEBAPP_NOT_EXISTS", "data": None}
    assert api.post("/task/openapi/ai-app/run", {"nodeInfoList": []})["code"] == 301
    assert api.post("/task/openapi/ai-app/run", {"webappId": DEFAULT_WEBAPP_ID})["code"] == 301
    bad = api.post("/task/openapi/ai-app/run", {"webappId": DEFAULT_WEBAPP_ID, "nodeInfoList": [
        {"nodeId": "7", "fieldName": "nope", "fieldValue": 1}]})
    assert bad["code"] == 803


def test_img2img_accepts_an_uploaded_image_name(start):
    sim, api = start()
    upload = api.http.post("/task/openapi/upload", data={"apiKey": api.key, "fileType": "image"},
                           files={"file": ("cat.png", b"\x89PNG fake image")})
    name = upload.json()["data"]["fileName"]
    answer = api.create([("10", "image", name), ("3", "denoise", 0.5)], workflow_id=IMG2IMG_WORKFLOW_ID)
    assert answer["code"] == 0
    assert sim.audit.tasks()[0]["workflowId"] == IMG2IMG_WORKFLOW_ID


def test_upload_checks_type_size_and_key(start):
    sim, api = start()
    content = b"\x89PNG" + secrets.token_bytes(2000)
    answer = api.http.post("/task/openapi/upload", data={"apiKey": api.key, "fileType": "input"},
                           files={"file": ("in.PNG", content)}).json()
    digest = hashlib.sha256(content).hexdigest()
    assert answer == {"code": 0, "msg": "success", "data": {"fileName": f"api/{digest}.png",
                                                             "fileType": "input"}}
    zipped = api.http.post("/task/openapi/upload", data={"apiKey": api.key, "fileType": "zip"},
                           files={"file": ("in.zip", b"PK\x03\x04zip")}).json()
    assert zipped["data"]["fileName"] == hashlib.sha256(b"PK\x03\x04zip").hexdigest()
    bearer = api.http.post("/task/openapi/upload", headers={"Authorization": f"Bearer {api.key}"},
                           files={"file": ("a.mp3", b"ID3")}).json()
    assert bearer["code"] == 0 and bearer["data"]["fileName"].endswith(".mp3")
    assert api.http.post("/task/openapi/upload", data={"apiKey": api.key},
                         files={"file": ("tool.exe", b"MZ")}).json()["code"] == 301
    assert api.http.post("/task/openapi/upload", data={"apiKey": api.key},
                         files={"file": ("empty.png", b"")}).json()["code"] == 301
    assert api.http.post("/task/openapi/upload", data={"apiKey": secrets.token_hex(16)},
                         files={"file": ("a.png", b"x")}).json()["code"] == 412
    assert api.http.post("/task/openapi/upload", json={"apiKey": api.key}).json()["code"] == 301
    big = b"\0" * (30 * 1024 * 1024 + 1)
    too_big = api.http.post("/task/openapi/upload", data={"apiKey": api.key},
                            files={"file": ("big.png", big)}).json()
    assert too_big == {"code": 809, "msg": "APIKEY_FILE_SIZE_EXCEEDED", "data": None}
    assert set(sim.uploads) == {f"api/{digest}.png", zipped["data"]["fileName"],
                                bearer["data"]["fileName"]}


def test_upload_that_arrives_in_small_pieces_parses_like_one_sent_at_once(start):
    """A slow or proxied client delivers the multipart body a few bytes at a time; the parser
    over-reads across a piece boundary and must hand the surplus back, not fail the upload."""
    sim, api = start()
    boundary = "rh" + secrets.token_hex(8)
    content = b"\x89PNG" + secrets.token_bytes(100_000)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"apiKey\"\r\n\r\n{api.key}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    value_at = body.index(api.key.encode())

    def pieces():
        # headers and 3 bytes of the key, then 5 more, then everything else in one go
        for start_at, end_at in ((0, value_at + 3), (value_at + 3, value_at + 8), (value_at + 8, len(body))):
            yield body[start_at:end_at]
            time.sleep(0.1)

    response = api.http.post("/task/openapi/upload", content=pieces(),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    digest = hashlib.sha256(content).hexdigest()
    assert response.json()["data"] == {"fileName": f"api/{digest}.png", "fileType": "input"}
    assert set(sim.uploads) == {f"api/{digest}.png"}


def test_any_other_path_or_method_answers_200_token_invalid(start):
    sim, api = start()
    for method, path in (("GET", "/"), ("POST", "/task/openapi/nope"), ("GET", "/task/openapi/create"),
                         ("PUT", "/uc/openapi/accountStatus")):
        response = api.http.request(method, path)
        assert response.status_code == 200
        assert response.json() == {"code": 412, "msg": "TOKEN_INVALID", "data": None}
    assert [r["route"] for r in sim.audit.requests()] == ["unknown"] * 4


def test_v2_query_and_queue_status(start, key):
    sim, api = start(accounts=[AccountConfig(key=key, concurrency=3)])
    task_id = api.task_id([("3", "seed", 9)])
    headers = {"Authorization": f"Bearer {key}"}
    queued = api.http.post("/openapi/v2/query", json={"taskId": task_id}, headers=headers).json()
    assert queued["status"] == "QUEUED" and queued["errorCode"] == "" and queued["results"] is None
    queue = api.http.get("/openapi/v2/queue/status", headers=headers).json()
    assert queue["data"] == {"apiKeyType": "SHARED", "concurrentLimit": 3, "runningCount": 0,
                             "queuedCount": 1, "totalCurrentTasks": 1}
    sim.advance(6)
    queue = api.http.get("/openapi/v2/queue/status", headers=headers).json()
    assert queue["data"]["runningCount"] == 1 and queue["data"]["queuedCount"] == 0
    sim.advance(30)
    done = api.http.post("/openapi/v2/query", json={"taskId": task_id}, headers=headers).json()
    assert done["status"] == "SUCCESS"
    assert done["results"] == [{"url": f"{sim.base_url}/files/{task_id}/9_0.png", "nodeId": "9",
                                "outputType": "png", "text": None}]
    assert done["usage"]["consumeCoins"] == "4" and done["usage"]["taskCostTime"] == "20"
    missing = api.http.post("/openapi/v2/query", json={"taskId": "1999999999999999999"},
                            headers=headers).json()
    assert missing["errorCode"] == "1004"
    assert api.http.post("/openapi/v2/query", json={"taskId": "0"}, headers=headers).json()[
        "errorCode"] == "1007"
    assert api.http.post("/openapi/v2/query", json={"taskId": task_id}).json()["errorCode"] == "1002"
    cancelled = api.task_id()
    api.cancel(cancelled)
    answer = api.http.post("/openapi/v2/query", json={"taskId": cancelled}, headers=headers).json()
    assert answer["status"] == "CANCEL" and answer["errorCode"] == "1000"


def test_the_client_sees_http_errors_as_httpx_would(start):
    # sanity: a plain httpx client against the simulator keeps its connection alive
    _, api = start()
    with httpx.Client(base_url=api.sim.base_url) as http:
        for _ in range(3):
            assert http.post("/uc/openapi/accountStatus", json={"apikey": api.key}).json()["code"] == 0
