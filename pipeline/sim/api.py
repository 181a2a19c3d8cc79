"""RunningHub's API over the simulated model: its routes and their checks in the documented order.

Each route is a method of :class:`RunningHubApi` that takes one :class:`Call` (the parsed body,
the key, the simulated time, the path parameters, an upload, the faults in force) and returns a
:class:`~pipeline.sim.envelopes.Reply` (the body to send and what to audit). Nothing here reads a
socket or awaits: :mod:`pipeline.sim.server` reads the request, injects the wire faults, records
the audit and sends the reply, and calls these methods under the simulator lock.
:data:`ROUTE_TABLE` says which path is which route; :mod:`pipeline.sim.envelopes` writes the
answers and :mod:`pipeline.sim.checks` holds the create's checks that need no account.

Create checks, in the order of runninghub-api.md section 8 (v1 and v2 creates alike):
parameters 301, key 412/806/802/801, balance ``wallet_code`` (414/416/812), workflow 380 (app
901), a spent money wallet, concurrency 421 (EXCLUSIVE: 415, the personal queue or 814),
nodeInfoList 803, ComfyUI's validation of the prompt 433 (:func:`pipeline.sim.checks.comfy_verdict`),
accepted. A prompt with at least one valid output is accepted even when others failed (ComfyUI's
partial validity): only the valid outputs are produced, and ``promptTips`` carries ``result: true``
with the failed outputs' ``node_errors``. A prompt that passes validation but fails when it runs (a
V3 COMBO value, a literal on a link input) is accepted, billed, and ends FAILED (805) with the
``failedReason`` of :func:`pipeline.sim.comfy.run_time_failure`. A key's account may be revoked
mid-run (``AccountConfig.revoke_after_creates`` / ``revoke_at_s``, ``Simulator.revoke``): from
then on every call with it answers 802 (v2: 1002).

Independent on purpose: the simulator is the oracle rhbatch's client is judged against, so it
shares no logic with the client (see :mod:`pipeline.sim`). Its code names, key fingerprint,
link test and canonical nodeInfoList are its own copies; do not "deduplicate" them.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.sim.checks import (
    ComfyVerdict,
    CreateParams,
    comfy_verdict,
    create_params,
    id_param,
    malformed_prompt,
    node_info_error,
    prompt_with,
)
from pipeline.sim.config import (
    CREATE_ROUTES,
    CURRENCY,
    FORGED_LOG_LINE,
    V1_TASK_ROUTES,
    V2_CREATE_ROUTES,
    V2_ERROR_MESSAGES,
    Faults,
    WorkflowBilling,
    v2_error_code,
)
from pipeline.sim.envelopes import (
    FILE_EXPIRED,
    Reply,
    as_v2,
    code_name,
    dumps,
    envelope,
    failed_reason,
    html_error,
    v2_error,
    v2_flat,
    v2_upload_envelope,
)
from pipeline.sim.model import (
    CANCEL,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCESS,
    WELL_FORMED_KEY,
    Account,
    Service,
    Task,
    Workflow,
    fmt_money,
    signature,
)
from pipeline.sim.png import render_png

#: Where v2 uploads are served (``download_url``); registered before ``/files/{task_id}/{name}``.
UPLOADS_PATH = "/files/uploads"
#: Simulated seconds a task whose prompt fails at run time runs before it fails (node errors surface
#: "within about 10 s", runninghub-api.md section 5).
RUN_TIME_FAILURE_S = 2.0

#: (HTTP method, path, route name, body kind, :class:`RunningHubApi` method). Body kinds: "json",
#: "multipart", "multipart+keep" (the file's bytes are kept) and "none". Order matters: the
#: first match wins, and the last entry answers every other path like the service (412).
ROUTE_TABLE: tuple[tuple[str, str, str, str, str], ...] = (
    ("POST", "/task/openapi/create", "create", "json", "create"),
    ("POST", "/task/openapi/ai-app/run", "ai_app_run", "json", "ai_app_run"),
    ("POST", "/task/openapi/status", "status", "json", "status"),
    ("POST", "/task/openapi/outputs", "outputs", "json", "outputs"),
    ("POST", "/task/openapi/cancel", "cancel", "json", "cancel"),
    ("POST", "/uc/openapi/accountStatus", "account_status", "json", "account_status"),
    ("POST", "/api/openapi/getJsonApiFormat", "get_json_api_format", "json", "get_json_api_format"),
    ("POST", "/task/openapi/getWebhookDetail", "get_webhook_detail", "json", "get_webhook_detail"),
    ("POST", "/task/openapi/retryWebhook", "retry_webhook", "json", "retry_webhook"),
    ("POST", "/openapi/v2/query", "v2_query", "json", "v2_query"),
    ("POST", "/openapi/v2/run/workflow/{workflow_id}", "v2_run_workflow", "json", "v2_run_workflow"),
    ("POST", "/openapi/v2/run/ai-app/{webapp_id}", "v2_run_ai_app", "json", "v2_run_ai_app"),
    ("POST", "/task/openapi/upload", "upload", "multipart", "upload"),
    ("POST", "/openapi/v2/media/upload/binary", "v2_upload", "multipart+keep", "v2_upload"),
    ("GET", "/openapi/v2/queue/status", "v2_queue_status", "none", "v2_queue_status"),
    ("GET", UPLOADS_PATH + "/{name}", "files", "none", "uploaded_file"),
    ("GET", "/files/{task_id}/{name}", "files", "none", "file"),
    ("*", "/{tail:.*}", "unknown", "none", "unknown"),
)

#: Routes that answer the flat v2 object (so their errors are written in it too).
V2_FLAT_ROUTES = V2_CREATE_ROUTES | {"v2_query"}

UPLOAD_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "mp3", "wav", "flac", "mp4", "avi", "mov", "mkv", "zip"}
)


@dataclass
class Call:
    """One request as the API sees it: no sockets, just what it said and when it was processed.

    ``params`` are the path parameters (``{workflow_id}``...); ``upload`` is the streamed
    multipart body of an upload route (``fields``, ``file``, ``bad``); ``faulted`` says whether
    the faults in force apply to this route (``Faults.routes``).
    """

    route: str
    body: dict[str, Any]
    key: str | None
    now: float
    params: Mapping[str, str] = field(default_factory=dict)
    upload: dict[str, Any] | None = None
    faults: Faults = field(default_factory=Faults)
    faulted: bool = False


def _fmt_coins(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


class RunningHubApi:
    """RunningHub's routes over one :class:`~pipeline.sim.model.Service`.

    ``base_url`` gives the simulator's address once it is bound (for file URLs and netWssUrl).
    """

    def __init__(self, service: Service, base_url: Callable[[], str]):
        self.service = service
        self.config = service.config
        self._base_url = base_url
        self._wall0 = time.time()

    # -- checks every route shares ---------------------------------------------------------------

    def auth(self, key: str | None, now: float) -> tuple[Account | None, Reply | None]:
        """The key check: (the account, None) or (None, the refusal: 412/806, 802, 801)."""
        account = self.service.lookup_account(key)
        if account is None:
            code = 412
            if self.config.unknown_key_code == 806 and key and WELL_FORMED_KEY.match(key):
                code = 806
            return None, envelope(code)
        if account.revoked_at(now):
            return None, envelope(802)
        if account.free_user:
            return None, envelope(801)
        return account, None

    def gate(self, call: Call, bad_body: bool) -> Reply | None:
        """What a route answers before its own logic runs: a v1 task route for a v2-only key
        (``AccountConfig.v1_task_routes``), or a body that is not a JSON object (301)."""
        if call.route in V1_TASK_ROUTES:
            account = self.service.lookup_account(call.key)
            if account is not None and account.v1_task_routes == "412":
                return envelope(412)
            if account is not None and account.v1_task_routes == "404":
                return Reply(html_error(404).encode(), code=None, status_http=404,
                             content_type="text/html")
        if bad_body:
            return as_v2(envelope(301)) if call.route in V2_FLAT_ROUTES else envelope(301)
        return None

    def rate_limited(self, call: Call) -> Reply:
        """The answer to a poll over ``Faults.poll_rate_limit_per_s``: code 1003."""
        if call.route == "v2_query":
            reply = v2_error(str(call.body.get("taskId") or ""), "1003", "rate limited")
        else:
            reply = envelope(1003, None, "rate limited")
        reply.fault = "poll_rate_limit"
        return reply

    def internal_error(self, route: str) -> Reply:
        """The service's catch-all answer (what a simulator bug answers), in the route's envelope."""
        if route in V2_FLAT_ROUTES:
            return as_v2(envelope(500, None, "UNKNOWN_ERROR"))
        if route == "v2_upload":
            return v2_upload_envelope(500, None, "UNKNOWN_ERROR")
        return envelope(500, None, "UNKNOWN_ERROR")

    def _find_task(self, call: Call) -> tuple[Task | None, Account | None, Reply | None]:
        """The task a v1 poll names, checked in order: taskId 301, key, then 807 for an
        unknown, foreign or expired task."""
        task_id = call.body.get("taskId")
        if task_id is None or task_id == "" or isinstance(task_id, bool | list | dict):
            return None, None, envelope(301)
        task_id = str(task_id)
        account, error = self.auth(call.key, call.now)
        if error is not None:
            error.task_id = task_id
            return None, None, error
        assert account is not None
        account.settle(call.now)
        task = self.service.tasks.get(task_id)
        if task is None or task.account is not account or task.gone(call.now, self.config.retention_s):
            return None, account, envelope(807, task_id=task_id)
        return task, account, None

    def _wss(self, task: Task) -> str:
        return f"wss://{self._base_url().removeprefix('http://')}/ws/c_{task.client_id}"

    # -- create (v1 and v2), checks in the order of section 8 -------------------------------------

    def create(self, call: Call) -> Reply:
        workflow_id = id_param(call.body.get("workflowId"))
        if workflow_id is None:
            return envelope(301)
        return self._create_task(call, workflow_id, None)

    def ai_app_run(self, call: Call) -> Reply:
        webapp_id = id_param(call.body.get("webappId"))
        if webapp_id is None or not isinstance(call.body.get("nodeInfoList"), list):
            return envelope(301)
        return self._create_task(call, None, webapp_id)

    def v2_run_workflow(self, call: Call) -> Reply:
        workflow_id = call.params.get("workflow_id", "").strip()
        if not workflow_id or workflow_id == "0":
            return as_v2(envelope(301))
        return as_v2(self._create_task(call, workflow_id, None))

    def v2_run_ai_app(self, call: Call) -> Reply:
        webapp_id = call.params.get("webapp_id", "").strip()
        if not webapp_id or webapp_id == "0" or not isinstance(call.body.get("nodeInfoList"), list):
            return as_v2(envelope(301))
        return as_v2(self._create_task(call, None, webapp_id))

    def _create_task(self, call: Call, workflow_id: str | None, webapp_id: str | None) -> Reply:
        """Checks 1 to 8: parameters 301, key, balance, workflow 380 / app 901, a spent money
        wallet, concurrency 421 / 415 / 814, nodeInfoList 803, the prompt as ComfyUI validates it
        433, then accept."""
        service, now = self.service, call.now
        # 1. parameters
        params = create_params(call.body)
        if params is None:
            return envelope(301)
        # 2. key
        account, error = self.auth(call.key, now)
        if error is not None:
            return error
        assert account is not None
        # 3. balance (before any workflow validation, as observed on the real service)
        account.settle(now)
        if account.coins <= 0:
            return envelope(account.wallet_code)
        # 4. workflow / app exists
        if webapp_id is not None:
            workflow_id = service.webapps.get(webapp_id)
            if workflow_id is None:
                return envelope(901)
        assert workflow_id is not None
        workflow = service.workflows.get(workflow_id)
        if workflow is None:
            return envelope(380)
        billing = self.config.billing_for(workflow_id)
        if billing.money and account.money_cents is not None and account.money_cents <= 0:
            return envelope(account.wallet_code)  # a money wallet, spent
        # 5. concurrency
        in_pqueue = False
        if len(account.active) + len(account.pqueue) >= account.concurrency:
            if account.api_type != "EXCLUSIVE":
                return envelope(421)
            if not params.personal:
                return envelope(415)
            if len(account.pqueue) >= account.personal_queue_limit:
                return envelope(814)
            in_pqueue = True
        # 6. nodeInfoList against the saved workflow (RunningHub's own check, before ComfyUI's)
        refusal = node_info_error(workflow, params)
        if refusal is not None:
            return refusal
        if params.override is not None:
            try:
                workflow = Workflow.from_api_json(workflow_id, params.override)
            except ValueError as exc:
                return malformed_prompt(params.override, str(exc))
        # 7. the prompt the overrides make, validated as ComfyUI does
        verdict = comfy_verdict(prompt_with(workflow.nodes, params.node_info))
        if not verdict.ok:
            return verdict.rejection()
        # 8. accept (perhaps with some outputs failed, or to fail when it runs)
        return self._accept(call, account, workflow, webapp_id, billing, params, in_pqueue, verdict)

    def _accept(self, call: Call, account: Account, workflow: Workflow, webapp_id: str | None,
                billing: WorkflowBilling, params: CreateParams, in_pqueue: bool,
                verdict: ComfyVerdict) -> Reply:
        """Create, start (or queue) and answer an accepted task."""
        service, now, faults = self.service, call.now, call.faults
        delay, runtime, fail, fault = service.draw_task(faults.task_failure)
        if verdict.run_failure is not None:  # fails at run time, whatever was drawn
            fail, fault, runtime = True, None, min(runtime, RUN_TIME_FAILURE_S)
        task_id = service.new_task_id()
        forged = (faults.newline_task_id > 0 and call.faulted and call.route in CREATE_ROUTES
                  and service.rng_faults.random() < faults.newline_task_id)
        if forged:  # the id itself carries a forged log line; the task lives under exactly it
            task_id = f"{task_id}\n{FORGED_LOG_LINE}"
        workflow_id = workflow.workflow_id
        sig_source = params.node_info if params.override is None else [
            {"nodeId": "workflow", "fieldName": "sha256",
             "fieldValue": hashlib.sha256(workflow.prompt_text.encode()).hexdigest()}
        ]
        task = Task(
            task_id=task_id, client_id=service.new_client_id(), account=account,
            workflow_id=workflow_id, workflow=workflow, node_info_list=params.node_info,
            signature=signature(workflow_id, sig_source), created_at=now, queue_delay=delay,
            runtime=runtime, fail=fail, webapp_id=webapp_id, webhook_url=params.webhook_url,
            add_metadata=params.add_metadata and webapp_id is None,
            instance_type=params.instance_type, personal_queue=in_pqueue, billing=billing,
            v2=call.route in V2_CREATE_ROUTES, children=service.new_children(billing),
            outputs_to_execute=list(verdict.outputs_to_execute), run_failure=verdict.run_failure,
        )
        if fault:
            task.faults.append(fault)
        if forged:
            task.faults.append("newline_task_id")
        service.tasks[task.task_id] = task
        service.task_list.append(task)
        if in_pqueue:
            account.pqueue.append(task)
        else:
            account.start(task, now)
        account.count_create()
        status = task.status(now)
        data = {
            "netWssUrl": self._wss(task) if status == RUNNING else None,
            "taskId": task.task_id,
            "clientId": task.client_id,
            "taskStatus": status,
            # ComfyUI's answer as it queued the prompt. With partial validity (some outputs failed)
            # RunningHub's docs say only that such a task is "rejected with 433 or comes back
            # FAILED"; the simulator follows ComfyUI, which queues the valid outputs: the task is
            # accepted, and promptTips says ``result: true`` with the failed outputs' node_errors.
            "promptTips": verdict.prompt_tips(),
        }
        reply = envelope(0, data, task_id=task.task_id, fault="newline_task_id" if forged else None)
        reply.created = task
        return reply

    # -- v1 task queries -------------------------------------------------------------------------

    def status(self, call: Call) -> Reply:
        task, _account, error = self._find_task(call)
        if error is not None:
            return error
        assert task is not None
        status = task.status(call.now)
        # /status has no CANCEL value: a cancelled task reads FAILED (see outputs for the reason)
        return envelope(0, FAILED if status == CANCEL else status, task_id=task.task_id)

    def outputs(self, call: Call) -> Reply:
        task, _account, error = self._find_task(call)
        if error is not None:
            return error
        assert task is not None
        now = call.now
        status = task.status(now)
        if status == QUEUED:
            return envelope(813, None, task_id=task.task_id)
        if status == RUNNING:
            return envelope(804, {"netWssUrl": self._wss(task)}, task_id=task.task_id)
        if status in (FAILED, CANCEL):
            return envelope(805, {"failedReason": failed_reason(task)}, task_id=task.task_id)
        lag = call.faults.status_outputs_lag_s
        assert task.end_at is not None
        if lag and now < task.end_at + lag:
            reply = envelope(804, {"netWssUrl": self._wss(task)}, task_id=task.task_id)
            reply.fault = "status_outputs_lag"
            return reply
        if task.outputs_cache is None:
            task.outputs_cache = dumps({"code": 0, "msg": "success", "data": self._items(task)})
        return Reply(task.outputs_cache, code=0, task_id=task.task_id)

    def _items(self, task: Task, *, numeric_cost: bool = False) -> list[dict[str, Any]]:
        """v1 outputs items: each carries the task's totals (coins, and money as a string for a
        workflow billed in money, in its ``money_field``)."""
        cost_s = int(round(task.used_s()))
        billing = task.billing
        coins = None if task.coins is None or not billing.coins else str(task.coins)
        money = None if task.money_cents is None else fmt_money(task.money_cents)
        base_url = self._base_url()
        return [
            {
                "fileUrl": f"{base_url}/files/{quote(task.task_id, safe='')}/{node_id}_0.png",
                "fileType": "png",
                "taskCostTime": cost_s if numeric_cost else str(cost_s),
                "nodeId": node_id,
                "consumeCoins": coins,
                "consumeMoney": money if billing.money_field == "consumeMoney" else None,
                "thirdPartyConsumeMoney": money if billing.money_field == "thirdPartyConsumeMoney"
                else None,
            }
            for node_id in task.outputs()
        ]

    def cancel(self, call: Call) -> Reply:
        task, account, error = self._find_task(call)
        if error is not None:
            return error
        assert task is not None and account is not None
        if task.status(call.now) in (QUEUED, RUNNING):
            account.cancel(task, call.now)
            return envelope(0, None, task_id=task.task_id)
        return envelope(self.config.cancel_finished_code, None, task_id=task.task_id)

    def account_status(self, call: Call) -> Reply:
        account, error = self.auth(call.key, call.now)
        if error is not None:
            return error
        assert account is not None
        account.settle(call.now)
        data = {
            "remainCoins": _fmt_coins(account.coins),
            "currentTaskCounts": str(len(account.active) + len(account.pqueue)),
            "remainMoney": None if account.money_cents is None else fmt_money(account.money_cents),
            "currency": None if account.money_cents is None else CURRENCY,
            "apiType": account.api_type,
        }
        return envelope(0, data)

    def get_json_api_format(self, call: Call) -> Reply:
        workflow_id = call.body.get("workflowId")
        if isinstance(workflow_id, int) and not isinstance(workflow_id, bool):
            workflow_id = str(workflow_id)
        if not isinstance(workflow_id, str) or not workflow_id.strip():
            return envelope(301)
        _account, error = self.auth(call.key, call.now)
        if error is not None:
            return error
        workflow = self.service.workflows.get(workflow_id.strip())
        if workflow is None:
            return envelope(380)
        return envelope(0, {"prompt": workflow.prompt_text}, "SUCCESS")

    # -- webhooks --------------------------------------------------------------------------------

    def _time_text(self, sim_t: float) -> str:
        return datetime.fromtimestamp(self._wall0 + sim_t).strftime("%Y-%m-%d %H:%M:%S")

    def get_webhook_detail(self, call: Call) -> Reply:
        task, account, error = self._find_task(call)
        if error is not None:
            return error
        assert task is not None and account is not None
        record = task.webhook
        if record is None:
            return envelope(1, None, "webhook event not exists", task_id=task.task_id)
        data = {
            "id": record.webhook_id,
            "userApiKey": f"{account.key_fp}************************",
            "taskId": task.task_id,
            "webhookUrl": record.url,
            # a v2 task's eventData is delivered as an object; the record shows it as JSON text
            "eventData": record.event_data if isinstance(record.event_data, str)
            else json.dumps(record.event_data, ensure_ascii=False),
            "callbackStatus": record.status,
            "callbackResponse": record.response,
            "retryCount": record.retry_count,
            "createTime": self._time_text(record.create_time),
            "updateTime": self._time_text(record.update_time),
        }
        return envelope(0, data, task_id=task.task_id)

    def retry_webhook(self, call: Call) -> Reply:
        webhook_id = call.body.get("webhookId")
        url = call.body.get("webhookUrl")
        if webhook_id in (None, "") or isinstance(webhook_id, bool | list | dict):
            return envelope(301)
        if url not in (None, "") and (not isinstance(url, str)
                                      or not url.startswith(("http://", "https://"))):
            return envelope(301)
        account, error = self.auth(call.key, call.now)
        if error is not None:
            return error
        record = self.service.webhooks.get(str(webhook_id))
        if record is None or record.task.account is not account:
            return envelope(807)
        if url:
            record.url = url
        reply = envelope(0, None, task_id=record.task.task_id)
        if not record.in_flight:
            record.in_flight = True
            record.status = "RETRYING"
            record.retry_count += 1
            reply.deliver.append(record)
        return reply

    def event_data(self, task: Task) -> Any:
        """A webhook's eventData for an ended task: for a task created on v1, the outputs answer
        as a JSON string; for one created on v2, the v2 query object (not a string)."""
        if task.v2:
            assert task.end_at is not None
            return self._v2_task_data(task, task.end_at)
        if task.fail:
            payload: dict[str, Any] = {"code": 805, "msg": code_name(805),
                                       "data": {"failedReason": failed_reason(task)}}
        else:
            # quirk of the real service: taskCostTime is a number inside webhook eventData
            payload = {"code": 0, "msg": "success", "data": self._items(task, numeric_cost=True)}
        return json.dumps(payload, ensure_ascii=False)

    # -- v2 query and queue ----------------------------------------------------------------------

    def v2_query(self, call: Call) -> Reply:
        raw_id = call.body.get("taskId")
        task_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else ""
        account, error = self.auth(call.key, call.now)
        if error is not None:
            code = v2_error_code(error.code or 412)
            return v2_error(task_id, code, V2_ERROR_MESSAGES.get(code, code_name(error.code or 412)))
        assert account is not None
        if task_id not in self.service.tasks and (not task_id.isdigit() or int(task_id) <= 0):
            return v2_error(task_id, "1007", "taskId must be greater than 0")
        account.settle(call.now)
        task = self.service.tasks.get(task_id)
        if task is None or task.account is not account or task.gone(call.now, self.config.retention_s):
            return v2_error(task_id, "1004", "not found or expired")
        return Reply(dumps(self._v2_task_data(task, call.now)), code=0, task_id=task_id)

    @staticmethod
    def _v2_usage(billing: WorkflowBilling, coins: int | None, money_cents: int | None,
                  cost_s: float, *, carried: bool = False) -> dict[str, Any]:
        """A v2 ``usage`` object. ``carried``: the figures are its children's, so null here."""
        money = None if money_cents is None or carried else fmt_money(money_cents)
        return {
            "consumeMoney": money if billing.money_field == "consumeMoney" else None,
            "consumeCoins": None if coins is None or carried or not billing.coins else str(coins),
            "taskCostTime": str(int(round(cost_s))),
            "thirdPartyConsumeMoney": money if billing.money_field == "thirdPartyConsumeMoney" else None,
        }

    def _v2_task_data(self, task: Task, now: float) -> dict[str, Any]:
        """A task in the v2 query shape (v2 query answers and v2 webhook eventData)."""
        status = task.status(now)
        data = v2_flat(task.task_id, status, client_id=task.client_id)
        ended = status in (SUCCESS, FAILED, CANCEL)
        billing = task.billing
        if ended:
            carried = bool(task.children) and billing.parent_usage == "children"
            data["usage"] = self._v2_usage(billing, task.coins or 0, task.money_cents,
                                           task.used_s(), carried=carried)
        if status == SUCCESS:
            bare = self.config.without_node_id(task.workflow_id)
            data["results"] = [
                {"url": i["fileUrl"], "outputType": "png", "text": None,
                 **({} if bare else {"nodeId": i["nodeId"]})}
                for i in self._items(task)
            ]
        elif status in (FAILED, CANCEL):
            reason = failed_reason(task)
            data["errorCode"] = "1000"
            data["errorMessage"] = reason["exception_message"].split("\n", 1)[0]
            data["failedReason"] = reason
        if task.children:
            data["parentTaskId"] = None
            data["taskUsageList"] = [
                {"taskId": self._lossy_id(child.task_id), "parentTaskId": task.task_id,
                 "taskStatus": status,
                 "usage": self._v2_usage(billing, child.coins, child.money_cents, child.cost_s)}
                for child in task.children
            ] if ended else None
        return data

    def _lossy_id(self, task_id: str) -> int:
        """A task id as a JavaScript layer writes it: a float64, so its last digits are lost
        ("float": ``int(float(id))``; "js": the shortest digits that round-trip, as JS prints)."""
        value = float(task_id)
        if self.config.child_task_id_style == "js":
            return int(Decimal(repr(value)))
        return int(value)

    def v2_queue_status(self, call: Call) -> Reply:
        account, error = self.auth(call.key, call.now)
        if error is not None:
            return error
        assert account is not None
        now = call.now
        account.settle(now)
        running = sum(1 for t in account.active.values() if t.status(now) == RUNNING)
        total = len(account.active) + len(account.pqueue)
        data = {"apiKeyType": account.api_type, "concurrentLimit": account.concurrency,
                "runningCount": running, "queuedCount": total - running, "totalCurrentTasks": total}
        return envelope(0, data)

    # -- uploads ---------------------------------------------------------------------------------

    def upload(self, call: Call) -> Reply:
        upload = call.upload
        assert upload is not None
        _account, error = self.auth(call.key, call.now)
        if error is not None:
            return error
        problem = self._upload_problem(upload)
        if problem == "size":
            return envelope(809)
        if problem == "type":
            return envelope(301, None, "PARAMS_INVALID")
        if problem:
            return envelope(301)
        file = upload["file"]
        ext = Path(file["filename"]).suffix.lower().lstrip(".")
        name = file["sha256"] if ext == "zip" else f"api/{file['sha256']}.{ext}"
        self.service.uploads[name] = file["size"]
        file_type = call.body.get("fileType") or "input"
        return envelope(0, {"fileName": name, "fileType": file_type})

    def _upload_problem(self, upload: dict[str, Any]) -> str | None:
        """What is wrong with an upload, for both generations' envelopes: "bad" (no file, an
        empty one, a body that is not multipart), "size" (over ``max_upload_bytes``) or "type"
        (an extension the service does not take); None when it is accepted."""
        file = upload["file"]
        if upload["bad"] or file is None or file["size"] == 0:
            return "bad"
        if file["size"] > self.config.max_upload_bytes:
            return "size"
        if Path(file["filename"]).suffix.lower().lstrip(".") not in UPLOAD_EXTENSIONS:
            return "type"
        return None

    def v2_upload(self, call: Call) -> Reply:
        """``/openapi/v2/media/upload/binary``: the v1 upload's checks in v2's envelope
        (``{code, message, data}``): a bad key 401, parameters 1007, over the size limit 1008."""
        upload = call.upload
        assert upload is not None
        _account, error = self.auth(call.key, call.now)
        if error is not None:
            return v2_upload_envelope(401, None, "ApiKey verification failed")
        problem = self._upload_problem(upload)
        if problem:
            return v2_upload_envelope(1008 if problem == "size" else 1007)
        file = upload["file"]
        ext = Path(file["filename"]).suffix.lower().lstrip(".")
        stored = f"{file['sha256']}.{ext}"
        name = f"api/{stored}"
        self.service.uploads[name] = file["size"]
        self.service.upload_blobs[stored] = (file["content"] or b"", call.now)
        data = {"fileName": name, "download_url": f"{self._base_url()}{UPLOADS_PATH}/{stored}",
                "type": ext, "size": file["size"]}
        return v2_upload_envelope(0, data)

    # -- files and everything else ---------------------------------------------------------------

    def uploaded_file(self, call: Call) -> Reply:
        """A v2 upload's ``download_url``: its bytes, 403 (expired) after ``file_ttl_s``."""
        name = call.params.get("name", "")
        stored = self.service.upload_blobs.get(name)
        if stored is None:
            return Reply(b"Not Found", code=None, status_http=404, content_type="text/plain")
        content, uploaded_at = stored
        if call.now - uploaded_at > self.config.file_ttl_s:
            return Reply(FILE_EXPIRED, code=None, status_http=403, content_type="application/xml")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Reply(content, code=None, status_http=200, content_type=kind)

    def file(self, call: Call) -> Reply:
        """A generated output: a PNG (with the task's metadata unless addMetadata was false)."""
        task_id = call.params.get("task_id", "")
        name = call.params.get("name", "")
        now = call.now
        not_found = Reply(b"Not Found", code=None, status_http=404, content_type="text/plain",
                          task_id=task_id or None)
        task = self.service.tasks.get(task_id)
        if task is None:
            return not_found
        task.account.settle(now)
        if task.status(now) != SUCCESS or task.gone(now, self.config.retention_s):
            return not_found
        stem, _dot, ext = name.partition(".")
        node_id, _sep, index = stem.rpartition("_")
        if ext != "png" or index != "0" or node_id not in task.outputs():
            return not_found
        assert task.end_at is not None
        if now - task.end_at > self.config.file_ttl_s:
            return Reply(FILE_EXPIRED, code=None, status_http=403, content_type="application/xml",
                         task_id=task_id)
        text = ""
        if task.add_metadata:
            text = json.dumps({"workflowId": task.workflow_id, "nodeInfoList": task.signature})
        png = render_png(f"{task.signature}|{node_id}|{index}", text)
        return Reply(png, code=None, status_http=200, content_type="image/png", task_id=task_id)

    def unknown(self, call: Call) -> Reply:
        """Any path that is not a route: 412 TOKEN_INVALID, like the real service."""
        return envelope(412)
