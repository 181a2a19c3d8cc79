"""How RunningHub writes its answers: the code-name table, the v1 envelope, the v2 flat object,
the v2 upload envelope, nginx's error pages and a failed task's ``failedReason``.

- v1 business answers are HTTP 200 ``{code, msg, data}`` (:func:`envelope`), ``msg`` from
  :data:`CODE_NAMES`.
- v2 creates and the v2 query answer HTTP 200 with the flat v2 object (:func:`v2_flat`:
  ``taskId, status, errorCode, errorMessage, clientId, promptTips, results, usage,
  failedReason``; no ``code``); :func:`as_v2` rewrites a v1 create answer into it.
- The v2 upload answers ``{code, message, data}`` (:func:`v2_upload_envelope`).

:data:`CODE_NAMES` is the simulator's own copy of the service's code names, not
``pipeline.errors.CODES``: the simulator is the oracle rhbatch's client is judged against, and a
table both sides shared would let a wrong name agree with itself (see :mod:`pipeline.sim`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.sim.config import V2_ERROR_MESSAGES, v2_error_code

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.sim.model import Task, WebhookRecord

#: The service's ``msg`` for each code (runninghub-api.md section 6); others say "error".
CODE_NAMES: dict[int, str] = {
    0: "success",
    301: "PARAMS_INVALID",
    380: "WORKFLOW_NOT_EXISTS",
    412: "TOKEN_INVALID",
    414: "TASK_CREATE_FAILED_BY_NOT_ENOUGH_POWER_VALUE",
    415: "TASK_INSTANCE_MAXED",
    416: "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET",
    421: "TASK_QUEUE_MAXED",
    423: "TASK_NOT_FOUNED",
    433: "VALIDATE_PROMPT_FAILED",
    435: "TASK_USER_EXCLAPI_INSTANCE_NOT_FOUND",
    436: "TASK_USER_EXCLAPI_REQUIRED",
    500: "UNKNOWN_ERROR",
    605: "NOT_ENOUGH_BALANCE",
    801: "APIKEY_UNSUPPORTED_FREE_USER",
    802: "APIKEY_UNAUTHORIZED",
    803: "APIKEY_INVALID_NODE_INFO",
    804: "APIKEY_TASK_IS_RUNNING",
    805: "APIKEY_TASK_STATUS_ERROR",
    806: "APIKEY_USER_NOT_FOUND",
    807: "APIKEY_TASK_NOT_FOUND",
    808: "APIKEY_UPLOAD_FAILED",
    809: "APIKEY_FILE_SIZE_EXCEEDED",
    810: "WORKFLOW_NOT_SAVED_OR_NOT_RUNNING",
    811: "CORPAPIKEY_INVALID",
    812: "CORPAPIKEY_INSUFFICIENT_FUNDS",
    813: "APIKEY_TASK_IS_QUEUED",
    814: "PERSONAL_QUEUE_COUNT_LIMIT",
    901: "WEBAPP_NOT_EXISTS",
    1000: "unknown error",
    1001: "invalid request",
    1002: "auth failed",
    1003: "rate limited",
    1004: "not found or expired",
    1005: "server error",
    1006: "timeout",
    1007: "param invalid",
    1008: "size exceeded",
    1009: "method not allowed",
    1010: "service busy",
    1011: "service overloaded",
    1012: "service unavailable",
    1013: "file processing failed",
    1014: "needs an enterprise-shared key",
    1015: "generation failed",
    1101: "node info error",
    1501: "content moderation rejected",
    1504: "model timeout",
    1505: "real-person generation prohibited",
    1520: "TASK_USER_CONCURRENT_LIMIT",
}

JSON_TYPE = "application/json"
_HTML_PAGES = {  # nginx's error pages (and the 404 a v2-only key gets from v1 task routes)
    404: "404 Not Found",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}
FILE_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message></Error>"
)


def code_name(code: int) -> str:
    """The ``msg`` the service writes for ``code``."""
    return CODE_NAMES.get(code, "error")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the service writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def html_error(status: int) -> str:
    """nginx's error page for ``status``."""
    title = _HTML_PAGES[status]
    return (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1>"
            f"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@dataclass
class Reply:
    """What a route decided: the body to send, and what to audit."""

    body: bytes
    code: int | None = 0
    task_id: str | None = None
    status_http: int = 200
    content_type: str = JSON_TYPE
    fault: str | None = None
    created: Task | None = None  # a task this request created (for create_813 / lost_create)
    deliver: list[WebhookRecord] = field(default_factory=list)


def envelope(code: int, data: Any = None, msg: str | None = None, **audit: Any) -> Reply:
    """A v1 answer: ``{code, msg, data}``."""
    return Reply(dumps({"code": code, "msg": msg if msg is not None else code_name(code), "data": data}),
                 code=code, **audit)


def v2_flat(task_id: str, status: str, error_code: str | None = "", error_message: str = "", *,
            client_id: str = "", prompt_tips: str = "") -> dict[str, Any]:
    """The flat v2 task object (create and query answers; no ``code``)."""
    return {"taskId": task_id, "status": status, "errorCode": error_code,
            "errorMessage": error_message, "clientId": client_id, "promptTips": prompt_tips,
            "results": None, "usage": None, "failedReason": None}


def v2_upload_envelope(code: int, data: Any = None, message: str | None = None, **audit: Any
                       ) -> Reply:
    """The v2 upload's envelope: ``{code, message, data}`` (``message``, not ``msg``)."""
    if message is None:
        message = "success" if code == 0 else V2_ERROR_MESSAGES.get(str(code), code_name(code))
    return Reply(dumps({"code": code, "message": message, "data": data}), code=code, **audit)


def v2_error(task_id: str, code: str, message: str) -> Reply:
    """A v2 error in the flat object (``errorCode`` ``code``)."""
    return Reply(dumps(v2_flat(task_id, "", code, message)), code=int(code), task_id=task_id or None)


def as_v2(reply: Reply) -> Reply:
    """A v1 create answer (or error envelope) rewritten as v2's flat object, in place: success
    keeps taskId/status/clientId/promptTips; an error's code goes through ``V2_ERROR_CODES``
    (a 433 keeps its promptTips; a 803's reason is added to errorMessage)."""
    answer = json.loads(reply.body)
    code, msg, data = answer.get("code"), str(answer.get("msg") or ""), answer.get("data")
    if code == 0 and isinstance(data, dict) and data.get("taskId"):
        flat = v2_flat(data["taskId"], data["taskStatus"], client_id=data["clientId"],
                       prompt_tips=data["promptTips"])
    else:
        error_code = v2_error_code(code) if isinstance(code, int) else "1005"
        message = V2_ERROR_MESSAGES.get(error_code, msg)
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            message = f"{message}: {data['reason']}"
        flat = v2_flat("", "", error_code, message)
        if isinstance(data, dict) and isinstance(data.get("promptTips"), str):
            flat["promptTips"] = data["promptTips"]
        reply.code = int(error_code)
    reply.body = dumps(flat)
    return reply


def failed_reason(task: Task) -> dict[str, Any]:
    """The ``failedReason`` of a cancelled task, of one whose prompt fails when it runs
    (``Task.run_failure``, from :func:`pipeline.sim.comfy.run_time_failure`), or of another failed
    task (an out-of-memory in the sampler)."""
    if task.cancelled:
        return {"node_name": "", "node_id": "", "exception_type": "TaskCancelled",
                "exception_message": "The task was cancelled by the user", "traceback": "[]",
                "current_inputs": "{}", "current_outputs": "{}"}
    if task.run_failure is not None:
        return dict(task.run_failure)
    nodes = task.workflow.nodes
    node_id = next((n for n, v in nodes.items() if "Sampler" in v["class_type"]), next(iter(nodes)))
    return {
        "node_name": nodes[node_id]["class_type"],
        "node_id": node_id,
        "exception_type": "torch.OutOfMemoryError",
        "exception_message": (
            "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
            "Currently allocated     : 22.41 GiB\nRequested               : 3.00 GiB\n"
            "Device limit            : 23.65 GiB"
        ),
        "traceback": json.dumps([
            '  File "/app/ComfyUI/execution.py", line 323, in execute\n'
            "    output_data, output_ui, has_subgraph = get_output_data(obj, input_data_all)\n",
            '  File "/app/ComfyUI/comfy/sample.py", line 43, in sample\n'
            "    samples = sampler.sample(noise, positive, negative, cfg=cfg)\n",
        ]),
        "current_inputs": "{}",
        "current_outputs": "{}",
    }
