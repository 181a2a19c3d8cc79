"""The simulator's v2 API (issue #15): run/workflow and run/ai-app creates, the flat answers and
the v1 -> v2 code table, after-work faults on v2 creates, query, upload, v2 webhooks and
v2-only accounts; all over real HTTP."""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pipeline.errors import ConfigError
from pipeline.sim import (
    DEFAULT_WEBAPP_ID,
    TEXT2IMG_WORKFLOW_ID,
    V2_ERROR_CODES,
    AccountConfig,
    Faults,
    SimConfig,
    Simulator,
    v2_error_code,
)
from pipeline.sim.testing import SimClient, WebhookRecorder

Starter = Callable[..., tuple[Simulator, SimClient]]

WF = TEXT2IMG_WORKFLOW_ID
RUN_WF = f"/openapi/v2/run/workflow/{WF}"
RUN_APP = f"/openapi/v2/run/ai-app/{DEFAULT_WEBAPP_ID}"
QUERY = "/openapi/v2/query"
UPLOAD = "/openapi/v2/media/upload/binary"
NODES = [{"nodeId": "3", "fieldName": "seed", "fieldValue": 1}]
FLAT_KEYS = {"taskId", "status", "errorCode", "errorMessage", "clientId", "promptTips", "results",
             "usage", "failedReason"}


@pytest.fixture
def start(frozen_sim: Starter) -> Starter:
    return functools.partial(frozen_sim, client_timeout_s=5.0)


def v2(api: SimClient, path: str, body: dict[str, Any] | None = None, *, key: str | None = None,
       bearer: bool = True) -> httpx.Response:
    """POST a v2 route with ``Authorization: Bearer`` (``key`` defaults to the client's)."""
    headers = {"Authorization": f"Bearer {key or api.key}"} if bearer else {}
    return api.http.post(path, json=body if body is not None else {"nodeInfoList": NODES},
                         headers=headers)


def flat(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "code" not in answer and set(answer) >= FLAT_KEYS
    return answer


def assert_flat_error(answer: dict[str, Any], error_code: str | None) -> None:
    assert answer == {"taskId": "", "status": "", "errorCode": error_code,
                      "errorMessage": answer["errorMessage"], "clientId": "", "promptTips": "",
                      "results": None, "usage": None, "failedReason": None}
    assert isinstance(answer["errorMessage"], str) and answer["errorMessage"]


# -- create -------------------------------------------------------------------------------------


def test_run_workflow_answers_the_flat_success_object(start, key):
    sim, api = start()
    answer = flat(v2(api, RUN_WF))
    assert set(answer) == FLAT_KEYS
    assert re.fullmatch(r"\d{19}", answer["taskId"])
    assert re.fullmatch(r"[0-9a-f]{32}", answer["clientId"])
    assert answer["status"] == "QUEUED"  # queue delay 1 s on a clock that stands still
    assert (answer["errorCode"], answer["errorMessage"]) == ("", "")
    assert (answer["results"], answer["usage"], answer["failedReason"]) == (None, None, None)
    tips = json.loads(answer["promptTips"])
    assert tips["result"] is True and tips["node_errors"] == {} and tips["outputs_to_execute"] == ["9"]
    [task] = sim.audit.tasks()
    assert task["taskId"] == answer["taskId"] and task["v2"] is True
    assert task["nodeInfoList"] == NODES and task["workflowId"] == WF
    [record] = sim.audit.requests("v2_run_workflow")
    assert record["code"] == 0 and record["task_id"] == answer["taskId"]
    assert record["key_fp"] == task["key_fp"]
    # one id for both generations: v1 status knows the v2-created task
    assert api.status(answer["taskId"]) == {"code": 0, "msg": "success", "data": "QUEUED"}


def test_run_workflow_can_answer_running_and_takes_the_key_from_the_body(start, key):
    sim, api = start(queue_delay_s=0.0)
    answer = flat(v2(api, RUN_WF, {"apiKey": key, "nodeInfoList": NODES, "addMetadata": False,
                                   "instanceType": "plus", "retainSeconds": 60}, bearer=False))
    assert answer["status"] == "RUNNING" and answer["errorCode"] == ""
    [task] = sim.audit.tasks()
    assert task["instanceType"] == "plus" and task["status"] == "RUNNING"


def test_run_ai_app_creates_a_task_of_the_app(start, key, ):
    sim, api = start()
    answer = flat(v2(api, RUN_APP))
    assert answer["status"] == "QUEUED" and answer["errorCode"] == ""
    [task] = sim.audit.tasks()
    assert task["webapp_id"] == DEFAULT_WEBAPP_ID and task["workflowId"] == WF and task["v2"]
    assert sim.audit.requests("v2_run_ai_app")[0]["code"] == 0


def test_the_code_table_maps_documented_v2_codes_and_keeps_the_others():
    assert {code: v2_error_code(code) for code in (412, 802, 301, 803, 1003, 807, 809, 414, 416, 812)} \
        == {412: "1002", 802: "1002", 301: "1007", 803: "1101", 1003: "1003", 807: "1004",
            809: "1008", 414: "605", 416: "605", 812: "605"}
    for code in (421, 415, 814, 433, 380, 810, 901, 801, 806, 500):
        assert code not in V2_ERROR_CODES and v2_error_code(code) == str(code)


def _error_cases(key: str) -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(what, account settings, request, errorCode)."""
    nodes = {"nodeInfoList": NODES}
    return [
        ("no key", {}, {"path": RUN_WF, "bearer": False, "body": nodes}, "1002"),
        ("unknown key", {}, {"path": RUN_WF, "key": "u" * 32, "body": nodes}, "1002"),
        ("revoked", {"revoked": True}, {"path": RUN_WF, "body": nodes}, "1002"),
        ("free user", {"free_user": True}, {"path": RUN_WF, "body": nodes}, "801"),
        ("workflow 0", {}, {"path": "/openapi/v2/run/workflow/0", "body": nodes}, "1007"),
        ("bad nodeInfoList", {}, {"path": RUN_WF, "body": {"nodeInfoList": [{"nodeId": "3"}]}}, "1007"),
        ("bad flag", {}, {"path": RUN_WF, "body": {"nodeInfoList": NODES, "usePersonalQueue": "x"}},
         "1007"),
        ("app without nodeInfoList", {}, {"path": RUN_APP, "body": {}}, "1007"),
        ("coins spent 414", {"coins": 0}, {"path": RUN_WF, "body": nodes}, "605"),
        ("coins spent 416", {"coins": 0, "wallet_code": 416}, {"path": RUN_WF, "body": nodes}, "605"),
        ("coins spent 812", {"coins": 0, "wallet_code": 812}, {"path": RUN_APP, "body": nodes}, "605"),
        ("unknown workflow", {}, {"path": "/openapi/v2/run/workflow/1234", "body": nodes}, "380"),
        ("unknown app", {}, {"path": "/openapi/v2/run/ai-app/1234", "body": nodes}, "901"),
        ("unknown node", {}, {"path": RUN_WF, "body": {"nodeInfoList": [
            {"nodeId": "99", "fieldName": "seed", "fieldValue": 1}]}}, "1101"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_create_errors_answer_the_flat_error_with_the_mapped_code(start, key, case):
    what, account, request, error_code = _error_cases(key)[case]
    sim, api = start(accounts=[AccountConfig(key=key, **account)])
    answer = flat(v2(api, request["path"], request["body"], key=request.get("key"),
                     bearer=request.get("bearer", True)))
    assert_flat_error(answer, error_code)
    assert sim.audit.tasks() == []
    [record] = [r for r in sim.audit.requests() if r["route"].startswith("v2_run")]
    assert record["code"] == int(error_code) and record["status_http"] == 200
    if error_code == "1101":
        assert "node_not_found_in_workflow" in answer["errorMessage"]
    if error_code in ("1002", "1007", "605"):
        assert answer["errorMessage"] == {"1002": "auth failed", "1007": "param invalid",
                                          "605": "no balance"}[error_code]


def test_capacity_codes_keep_their_v1_numbers(start, key):
    shared = secrets.token_hex(16)
    sim, api = start(accounts=[
        AccountConfig(key=key, api_type="EXCLUSIVE", concurrency=1, personal_queue_limit=1),
        AccountConfig(key=shared, concurrency=1),
    ])
    assert flat(v2(api, RUN_WF, key=shared))["errorCode"] == ""
    assert_flat_error(flat(v2(api, RUN_WF, key=shared)), "421")
    assert flat(v2(api, RUN_WF))["errorCode"] == ""
    assert_flat_error(flat(v2(api, RUN_WF)), "415")
    queued = flat(v2(api, RUN_WF, {"nodeInfoList": NODES, "usePersonalQueue": True}))
    assert queued["errorCode"] == "" and queued["status"] == "QUEUED"
    assert_flat_error(flat(v2(api, RUN_WF, {"nodeInfoList": NODES, "usePersonalQueue": True})), "814")
    assert len(sim.audit.tasks()) == 3


def test_a_433_carries_prompt_tips_with_the_node_errors(start, key):
    sim, api = start()
    answer = flat(v2(api, RUN_WF, {"nodeInfoList": [
        {"nodeId": "3", "fieldName": "seed", "fieldValue": "not a number"}]}))
    assert answer["errorCode"] == "433" and answer["taskId"] == "" and answer["status"] == ""
    tips = json.loads(answer["promptTips"])
    assert tips["result"] is False
    assert tips["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] == "seed"
    assert sim.audit.tasks() == []


def test_a_body_that_is_not_json_answers_1007(start, key):
    sim, api = start()
    response = api.http.post(RUN_WF, content=b"{not json", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert_flat_error(flat(response), "1007")
    assert sim.audit.tasks() == []


# -- after-work and create faults on v2 routes -------------------------------------------------------


@pytest.mark.parametrize("mode, error_code, keeps_task", [
    ("code_500", "500", False),
    ("code_500_task", "500", True),
    ("code_1005", "1005", False),
    ("code_null", None, True),
    ("code_text", "0.0", True),
    ("code_unknown", "999", False),
])
@pytest.mark.parametrize("path", [RUN_WF, RUN_APP])
def test_after_work_code_modes_use_the_flat_error_code(start, key, mode, error_code, keeps_task, path):
    sim, api = start(faults=Faults(after_work=1.0, after_work_modes=(mode,)))
    answer = flat(v2(api, path))
    [task] = sim.audit.tasks()
    assert task["faults"] == [f"after_work:{mode}"] and task["status"] == "QUEUED"
    assert answer["errorCode"] == error_code
    if keeps_task:
        assert answer["taskId"] == task["taskId"] and answer["status"] == "QUEUED"
        assert answer["clientId"] == task["clientId"]
    else:
        assert_flat_error(answer, error_code)
    [record] = [r for r in sim.audit.requests() if r["route"].startswith("v2_run")]
    assert record["fault"] == f"after_work:{mode}" and record["task_id"] == task["taskId"]
    assert record["code"] == (int(error_code) if error_code and error_code.isdigit() else None)
    sim.set_faults(Faults())
    sim.advance(20)  # the task behind the fault runs and is billed
    assert flat(v2(api, QUERY, {"taskId": task["taskId"]}))["status"] == "SUCCESS"
    assert sim.audit.ledger() == {task["taskId"]: 2}


@pytest.mark.parametrize("mode", ["http_502", "garbage", "redirect"])
def test_after_work_transport_modes_apply_to_v2_creates(start, key, mode):
    sim, api = start(faults=Faults(after_work=1.0, after_work_modes=(mode,)))
    response = v2(api, RUN_WF)
    if mode == "http_502":
        assert response.status_code == 502 and "Bad Gateway" in response.text
    elif mode == "garbage":
        assert response.status_code == 200
        with pytest.raises(ValueError):
            response.json()
    else:
        assert response.status_code == 302 and response.headers["location"] == sim.base_url + "/"
    [task] = sim.audit.tasks()
    assert task["faults"] == [f"after_work:{mode}"]


def test_lost_create_and_create_813_apply_to_v2_creates(start, key):
    sim, api = start(faults=Faults(lost_create=1.0))
    with pytest.raises(httpx.TransportError):
        v2(api, RUN_WF)
    [lost] = sim.audit.tasks()
    assert lost["faults"] == ["lost_create"] and lost["v2"]
    sim.set_faults(Faults(create_813=1.0))
    answer = flat(v2(api, RUN_APP))
    [_, queued] = sim.audit.tasks()
    assert answer["errorCode"] == "813" and answer["taskId"] == queued["taskId"]
    assert answer["status"] == "QUEUED" and queued["faults"] == ["create_813"]
    assert sim.audit.requests("v2_run_ai_app")[0]["code"] == 813


def test_newline_task_id_applies_to_v2_creates_and_query_accepts_it(start, key):
    sim, api = start(faults=Faults(newline_task_id=1.0))
    answer = flat(v2(api, RUN_WF))
    assert "\n" in answer["taskId"]
    [task] = sim.audit.tasks()
    assert task["taskId"] == answer["taskId"] and task["faults"] == ["newline_task_id"]
    sim.set_faults(Faults())
    assert flat(v2(api, QUERY, {"taskId": answer["taskId"]}))["status"] == "QUEUED"


def test_fault_routes_can_name_the_v2_create_routes(start, key):
    sim, api = start(faults=Faults(after_work=1.0, after_work_modes=("code_500",),
                                   routes=("v2_run_ai_app",)))
    assert flat(v2(api, RUN_WF))["errorCode"] == ""
    assert flat(v2(api, RUN_APP))["errorCode"] == "500"
    assert api.create()["code"] == 0  # v1 create not named: untouched


# -- query ----------------------------------------------------------------------------------------


def test_query_of_a_success_field_by_field(start, key):
    sim, api = start()
    task_id = flat(v2(api, RUN_WF))["taskId"]
    running = flat(v2(api, QUERY, {"taskId": task_id}))
    assert running["status"] == "QUEUED" and running["usage"] is None and running["results"] is None
    sim.advance(11)
    answer = flat(v2(api, QUERY, {"taskId": task_id}))
    [task] = sim.audit.tasks()
    assert answer == {
        "taskId": task_id, "status": "SUCCESS", "errorCode": "", "errorMessage": "",
        "clientId": task["clientId"], "promptTips": "", "failedReason": None,
        "usage": {"consumeMoney": None, "consumeCoins": "2", "taskCostTime": "10",
                  "thirdPartyConsumeMoney": None},
        "results": [{"url": f"{sim.base_url}/files/{task_id}/9_0.png", "outputType": "png",
                     "text": None, "nodeId": "9"}],
    }
    assert api.http.get(answer["results"][0]["url"]).headers["content-type"] == "image/png"


def test_query_of_failed_and_cancelled_tasks_carries_usage_and_failed_reason(start, key):
    sim, api = start(failure_rate=1.0, task_duration_s=60.0)
    failed = flat(v2(api, RUN_WF))["taskId"]
    cancelled = flat(v2(api, RUN_WF, {"nodeInfoList": [
        {"nodeId": "3", "fieldName": "seed", "fieldValue": 2}]}))["taskId"]
    sim.advance(2)
    assert api.cancel(cancelled)["code"] == 0
    sim.advance(100)
    ledger = sim.audit.ledger()
    answer = flat(v2(api, QUERY, {"taskId": failed}))
    assert answer["status"] == "FAILED" and answer["errorCode"] == "1000" and answer["results"] is None
    assert answer["errorMessage"].startswith("Allocation on device 0")
    assert answer["failedReason"]["exception_type"] == "torch.OutOfMemoryError"
    assert answer["usage"]["consumeCoins"] == str(ledger[failed]) and ledger[failed] > 0
    answer = flat(v2(api, QUERY, {"taskId": cancelled}))
    assert answer["status"] == "CANCEL" and answer["failedReason"]["exception_type"] == "TaskCancelled"
    assert answer["usage"] == {"consumeMoney": None, "consumeCoins": str(ledger[cancelled]),
                               "taskCostTime": "1", "thirdPartyConsumeMoney": None}


def test_query_errors_use_the_code_table(start, key):
    free = secrets.token_hex(16)
    sim, api = start(accounts=[AccountConfig(key=key), AccountConfig(key=free, free_user=True)])
    assert flat(v2(api, QUERY, {"taskId": "1"}, bearer=False))["errorCode"] == "1002"
    assert flat(v2(api, QUERY, {"taskId": "1"}, key=free))["errorCode"] == "801"
    assert flat(v2(api, QUERY, {"taskId": "0"}))["errorCode"] == "1007"
    assert flat(v2(api, QUERY, {"taskId": "1999999999999999999"}))["errorCode"] == "1004"
    bad = api.http.post(QUERY, content=b"[", headers={"Authorization": f"Bearer {key}"})
    assert flat(bad)["errorCode"] == "1007"


# -- upload ----------------------------------------------------------------------------------------


def test_v2_upload_answers_file_name_and_a_download_url(start, key):
    sim, api = start(file_ttl_s=100.0)
    content = b"\x89PNG fake image bytes"
    response = api.http.post(UPLOAD, files={"file": ("in.PNG", content)},
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 0 and answer["message"] == "success" and "msg" not in answer
    data = answer["data"]
    sha = __import__("hashlib").sha256(content).hexdigest()
    assert data == {"fileName": f"api/{sha}.png", "type": "png", "size": len(content),
                    "download_url": f"{sim.base_url}/files/uploads/{sha}.png"}
    assert sim.uploads == {f"api/{sha}.png": len(content)}
    download = api.http.get(data["download_url"])
    assert download.status_code == 200 and download.content == content
    assert download.headers["content-type"] == "image/png"
    sim.advance(101)
    assert api.http.get(data["download_url"]).status_code == 403  # expired like output URLs
    assert api.http.get(f"{sim.base_url}/files/uploads/nope.png").status_code == 404
    # the key may come in the form too
    again = api.http.post(UPLOAD, files={"file": ("b.jpg", b"x")}, data={"apiKey": key}).json()
    assert again["code"] == 0 and again["data"]["type"] == "jpg"
    assert [r["code"] for r in sim.audit.requests("v2_upload")] == [0, 0]


def test_v2_upload_errors(start, key):
    revoked = secrets.token_hex(16)
    sim, api = start(max_upload_bytes=10, accounts=[AccountConfig(key=key),
                                                    AccountConfig(key=revoked, revoked=True)])
    bearer = {"Authorization": f"Bearer {key}"}

    def post(files: Any = None, headers: Any = None, **more: Any) -> dict[str, Any]:
        response = api.http.post(UPLOAD, files=files, headers=bearer if headers is None else headers,
                                 **more)
        assert response.status_code == 200
        return response.json()

    bad_key = {"code": 401, "message": "ApiKey verification failed", "data": None}
    assert post({"file": ("a.png", b"x")}, headers={}) == bad_key
    assert post({"file": ("a.png", b"x")}, headers={"Authorization": "Bearer " + "u" * 32}) == bad_key
    assert post({"file": ("a.png", b"x")}, headers={"Authorization": f"Bearer {revoked}"}) == bad_key
    assert post({"file": ("a.png", b"x" * 11)}) == {"code": 1008, "message": "size exceeded",
                                                     "data": None}
    assert post({"file": ("a.exe", b"x")}) == {"code": 1007, "message": "param invalid", "data": None}
    assert post({"file": ("a.png", b"")})["code"] == 1007
    assert post(json={"file": "a.png"})["code"] == 1007  # not multipart
    assert sim.uploads == {}


# -- webhooks -------------------------------------------------------------------------------------


def test_a_v2_created_task_gets_an_object_event_data_and_v1_keeps_the_string(start, key):
    sim, api = start(queue_delay_s=0.0)
    with WebhookRecorder() as hook:
        v2_id = flat(v2(api, RUN_WF, {"nodeInfoList": NODES, "webhookUrl": hook.url}))["taskId"]
        v1_id = api.task_id([("3", "seed", 2)], webhookUrl=hook.url)
        sim.advance(11)
        deliveries = {d["taskId"]: d for d in hook.wait_for(2)}
    assert set(deliveries) == {v2_id, v1_id}
    event = deliveries[v2_id]
    assert event["event"] == "TASK_END" and isinstance(event["eventData"], dict)
    assert event["eventData"] == flat(v2(api, QUERY, {"taskId": v2_id}))
    assert event["eventData"]["status"] == "SUCCESS" and event["eventData"]["results"][0]["nodeId"] == "9"
    assert isinstance(deliveries[v1_id]["eventData"], str)
    assert json.loads(deliveries[v1_id]["eventData"])["code"] == 0
    detail = api.post("/task/openapi/getWebhookDetail", {"taskId": v2_id})["data"]
    assert json.loads(detail["eventData"]) == event["eventData"]  # the record keeps it as text


def test_a_failed_v2_task_webhook_carries_the_failure(start, key):
    sim, api = start(queue_delay_s=0.0, failure_rate=1.0)
    with WebhookRecorder() as hook:
        task_id = flat(v2(api, RUN_APP, {"nodeInfoList": NODES, "webhookUrl": hook.url}))["taskId"]
        sim.advance(11)
        [delivery] = hook.wait_for(1)
    event = delivery["eventData"]
    assert delivery["taskId"] == task_id and event["status"] == "FAILED"
    assert event["errorCode"] == "1000" and event["failedReason"]["exception_type"]
    assert event["usage"]["consumeCoins"] == str(sim.audit.ledger()[task_id])


# -- v2-only accounts -------------------------------------------------------------------------------


V1_TASK_CALLS = [
    ("/task/openapi/create", {"workflowId": WF, "nodeInfoList": NODES}),
    ("/task/openapi/ai-app/run", {"webappId": DEFAULT_WEBAPP_ID, "nodeInfoList": NODES}),
    ("/task/openapi/status", {"taskId": "1"}),
    ("/task/openapi/outputs", {"taskId": "1"}),
    ("/task/openapi/cancel", {"taskId": "1"}),
]


@pytest.mark.parametrize("mode", ["412", "404"])
def test_a_v2_only_key_loses_the_v1_task_routes_but_keeps_account_status(start, key, mode):
    other = secrets.token_hex(16)
    sim, api = start(accounts=[AccountConfig(key=key, v1_task_routes=mode), AccountConfig(key=other)])
    task_id = flat(v2(api, RUN_WF))["taskId"]
    calls = [(path, {**body, "taskId": task_id} if "taskId" in body else body)
             for path, body in V1_TASK_CALLS]
    for path, body in calls:
        response = api.http.post(path, json={**body, "apiKey": key})
        if mode == "412":
            assert response.status_code == 200, path
            assert response.json() == {"code": 412, "msg": "TOKEN_INVALID", "data": None}, path
        else:
            assert response.status_code == 404, path
            assert response.headers["content-type"].startswith("text/html")
            assert "404 Not Found" in response.text
    upload = api.http.post("/task/openapi/upload", files={"file": ("a.png", b"x")},
                           data={"apiKey": key})
    assert upload.status_code == (200 if mode == "412" else 404)
    if mode == "412":
        assert upload.json()["code"] == 412
    assert len(sim.audit.tasks()) == 1  # the v1 create made nothing
    # what keeps working: accountStatus (v1), the v2 routes, and other keys' v1 routes
    status = api.account()
    assert status["code"] == 0 and status["data"]["currentTaskCounts"] == "1"
    assert flat(v2(api, QUERY, {"taskId": task_id}))["status"] == "QUEUED"
    assert api.http.get("/openapi/v2/queue/status",
                        headers={"Authorization": f"Bearer {key}"}).json()["code"] == 0
    assert api.http.post(UPLOAD, files={"file": ("a.png", b"x")},
                         headers={"Authorization": f"Bearer {key}"}).json()["code"] == 0
    assert api.post("/task/openapi/create", {"workflowId": WF}, key=other)["code"] == 0
    codes = [r["code"] for r in sim.audit.requests("create")]
    assert codes == [412 if mode == "412" else None, 0]
    assert sim.audit.requests("create")[0]["status_http"] == (200 if mode == "412" else 404)


def test_v1_task_routes_is_validated_and_accepts_the_numbers():
    with pytest.raises(ConfigError, match="v1_task_routes 'v2'.*'ok', '412', '404'"):
        SimConfig(accounts=[AccountConfig(key="k" * 32, v1_task_routes="v2")]).validate()
    with pytest.raises(ConfigError, match="v1_task_routes"):
        SimConfig.from_dict({"default_account": {"v1_task_routes": "off"}})
    config = SimConfig.from_dict({"accounts": [{"key": "k" * 32, "v1_task_routes": 404}],
                                  "open_accounts": True,
                                  "default_account": {"v1_task_routes": 412}})
    assert config.accounts[0].v1_task_routes == "404"
    assert config.default_account.v1_task_routes == "412"


def test_open_accounts_copy_the_template_v1_task_routes(make_sim):
    sim = make_sim(open_accounts=True, default_account=AccountConfig(key="-", v1_task_routes="412"))
    fresh = "f" * 32
    with httpx.Client(base_url=sim.base_url) as http:
        assert http.post("/task/openapi/create", json={"apiKey": fresh, "workflowId": WF}).json()[
            "code"] == 412
        answer = http.post(RUN_WF, json={"nodeInfoList": NODES},
                           headers={"Authorization": f"Bearer {fresh}"}).json()
    assert answer["errorCode"] == "" and answer["taskId"]
