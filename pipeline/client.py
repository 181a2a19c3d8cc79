"""The only module that speaks HTTP to RunningHub.

Every answer is read from its body: business errors arrive as HTTP 200 with a non-zero ``code``
(runninghub-api.md §2.5), and each code is classified by :func:`pipeline.errors.classify`.

Retries follow one :class:`RetryPolicy` (tenacity underneath): bounded by attempts and total time,
exponential with full jitter, ``Retry-After`` honoured up to a cap, only for errors marked transient.
``create`` is the exception that shapes everything: RunningHub has no idempotency key and bills every
accepted task, so a create is retried only when the failure proves the request was not acted on
(the connection was never made, HTTP 429, HTTP 503). Anything else after the request left (a read
timeout, a dropped connection, a 500/502/504, a garbage body) raises :class:`SubmitUnknownError` and
is never resent automatically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from pipeline.config import Settings, redact
from pipeline.errors import (
    ApiError,
    CapacityError,
    RunFatalError,
    SubmitUnknownError,
    TransientApiError,
    api_error_for,
)

log = logging.getLogger("rhbatch.client")

CREATE_PATH = "/task/openapi/create"
APP_RUN_PATH = "/task/openapi/ai-app/run"
OUTPUTS_PATH = "/task/openapi/outputs"
CANCEL_PATH = "/task/openapi/cancel"
ACCOUNT_PATH = "/uc/openapi/accountStatus"
UPLOAD_PATH = "/task/openapi/upload"
WORKFLOW_JSON_PATH = "/api/openapi/getJsonApiFormat"

# HTTP statuses that prove the request was not acted on: safe to resend even a create.
NOT_PROCESSED_HTTP = frozenset({429, 503})
# Connections kept to RunningHub, whatever --concurrency is. Requests are short, so a few keep-alive
# connections carry thousands of live tasks; a pool sized to the concurrency made every request pay
# httpcore's per-request scan of all connections (quadratic in the pool size, a syscall per idle
# connection): 60 connections cost ~0.6 ms of CPU per request, 1,000 would cost tens of ms.
HTTP_MAX_CONNECTIONS = 16
TASK_OPTION_FIELDS = ("addMetadata", "instanceType", "usePersonalQueue", "retainSeconds", "webhookUrl")


class TransportError(TransientApiError):
    """The exchange failed below the API: ``sent`` says whether the request may have been acted on."""

    def __init__(self, message: str, *, sent: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.sent = sent
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy: attempts and total time bound it; ``sleep`` is injectable for tests."""

    max_attempts: int = 6
    max_total_s: float = 120.0
    initial_wait_s: float = 0.5
    max_wait_s: float = 20.0
    retry_after_cap_s: float = 60.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def wait_s(self, attempt: int, exc: BaseException | None) -> float:
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            return min(float(retry_after), self.retry_after_cap_s)
        if isinstance(exc, CapacityError):  # 1003 rate limited: the documented pause is ~10 s
            return min(self.max_wait_s, 10.0 * random.uniform(0.5, 1.0))
        ceiling = min(self.max_wait_s, self.initial_wait_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def retrying(self, predicate: Callable[[BaseException], bool], what: str) -> AsyncRetrying:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.wait_s(state.attempt_number, exc)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s failed (attempt %d of %d), retrying: %s",
                what,
                state.attempt_number,
                self.max_attempts,
                redact(exc),
            )

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.max_total_s),
            wait=wait,
            retry=retry_if_exception(predicate),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )


def _poll_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransientApiError | CapacityError)


def _create_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransportError) and not exc.sent


@dataclass(frozen=True)
class Submitted:
    task_id: str
    status: str  # QUEUED or RUNNING (or FAILED when ComfyUI rejected the prompt)
    prompt_tips: Any = None
    code: int = 0
    msg: str = ""


@dataclass(frozen=True)
class TaskResult:
    state: str  # QUEUED, RUNNING, SUCCESS, FAILED
    outputs: list[dict[str, Any]] = field(default_factory=list)
    failed_reason: Any = None
    code: int = 0
    msg: str = ""


@dataclass(frozen=True)
class AccountStatus:
    remain_coins: float | None
    current_task_counts: int
    api_type: str | None
    remain_money: float | None = None
    currency: str | None = None


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def build_payload(
    workflow_id: str,
    node_info_list: list[dict[str, Any]] | tuple[dict[str, Any], ...],
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The create (or ai-app/run) body for one row, without the key: what ``--dry-run`` prints."""
    opts = dict(options or {})
    webapp_id = opts.pop("webappId", None)
    body: dict[str, Any] = (
        {"webappId": str(webapp_id)} if webapp_id else {"workflowId": str(workflow_id)}
    )
    body["nodeInfoList"] = [dict(item) for item in node_info_list]
    for name in TASK_OPTION_FIELDS:
        if opts.get(name) is not None:
            body[name] = opts[name]
    return body


def parse_prompt_tips(tips: Any) -> Any:
    if isinstance(tips, str) and tips.strip().startswith("{"):
        try:
            return json.loads(tips)
        except ValueError:
            return tips
    return tips


class RunningHubClient:
    """Async RunningHub client. One per run; ``async with`` closes the connection pool."""

    def __init__(
        self,
        settings: Settings,
        *,
        policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int | None = None,
    ):
        self._key = settings.require_key()
        self.base_url = settings.base_url
        self.policy = policy or RetryPolicy()
        limit = max_connections or HTTP_MAX_CONNECTIONS
        if transport is None and settings.http_transport == "aiohttp":
            from pipeline.transport import AiohttpTransport

            transport = AiohttpTransport(max_connections=limit)
        self._http = httpx.AsyncClient(
            base_url=settings.base_url,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            headers={"Authorization": f"Bearer {self._key}", "User-Agent": "rhbatch"},
            transport=transport,
            follow_redirects=False,
        )
        self.requests_sent = 0

    async def __aenter__(self) -> RunningHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the exchange -----------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], *, key_field: str = "apiKey") -> Any:
        """POST once; return the parsed envelope or raise a classified error."""
        payload = {key_field: self._key, **body}
        self.requests_sent += 1
        try:
            response = await self._http.post(path, json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransportError(
                f"could not connect to {self.base_url}: {type(exc).__name__}", sent=False
            ) from None
        except httpx.HTTPError as exc:
            # The request may have reached the service: read timeout, reset, protocol error.
            detail = redact(str(exc)) or type(exc).__name__
            raise TransportError(f"{path}: {type(exc).__name__}: {detail}", sent=True) from None
        return self._envelope(path, response)

    def _envelope(self, path: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status != 200:
            retry_after = _num(response.headers.get("Retry-After"))
            if status in NOT_PROCESSED_HTTP:
                raise TransportError(
                    f"{path}: HTTP {status}", sent=False, retry_after_s=retry_after
                )
            if status >= 500:
                raise TransportError(f"{path}: HTTP {status}", sent=True, retry_after_s=retry_after)
            if status in (401, 403):
                raise RunFatalError(
                    f"RunningHub refused the key (HTTP {status}): check RUNNINGHUB_API_KEY"
                )
            raise TransportError(f"{path}: unexpected HTTP {status}", sent=True)
        try:
            body = response.json()
        except ValueError:
            raise TransportError(
                f"{path}: the answer was not JSON ({len(response.content)} bytes)", sent=True
            ) from None
        if not isinstance(body, dict) or "code" not in body:
            raise TransportError(f"{path}: the answer has no 'code' field", sent=True)
        return body

    # -- endpoints -------------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> Submitted:
        """Submit one task. Raises CapacityError, RowFatalError, RunFatalError or SubmitUnknownError.

        A task id in the answer is returned whatever the code says (813 on create means queued).
        """
        path = APP_RUN_PATH if "webappId" in body else CREATE_PATH
        try:
            async for attempt in self.policy.retrying(_create_retryable, "create"):
                with attempt:
                    envelope = await self._post(path, body)
        except TransportError as exc:
            if exc.sent:
                raise SubmitUnknownError(
                    f"create was sent but no usable answer came back ({exc}); the task may exist "
                    "and is not resubmitted automatically"
                ) from None
            raise
        code = _code(envelope)
        data = envelope.get("data")
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if task_id:
            status = str(data.get("taskStatus") or ("QUEUED" if code == 813 else "QUEUED"))
            tips = parse_prompt_tips(data.get("promptTips"))
            return Submitted(str(task_id), status.upper(), tips, code, str(envelope.get("msg", "")))
        if code == 0:
            raise SubmitUnknownError(
                "create answered success without a taskId; the task may exist and is not "
                "resubmitted automatically"
            )
        raise api_error_for(code, str(envelope.get("msg", "")), data, where="create")

    async def _poll(self, path: str, body: dict[str, Any], what: str, **kw: Any) -> dict[str, Any]:
        async for attempt in self.policy.retrying(_poll_retryable, what):
            with attempt:
                envelope = await self._post(path, body, **kw)
                code = _code(envelope)
                if code == 1003:
                    raise CapacityError(f"{what}: rate limited (1003)", code=1003)
        return envelope

    async def outputs(self, task_id: str) -> TaskResult:
        """A task's state and, when it has ended, its files or its failedReason."""
        envelope = await self._poll(OUTPUTS_PATH, {"taskId": task_id}, "outputs")
        code = _code(envelope)
        data = envelope.get("data")
        msg = str(envelope.get("msg", ""))
        if code == 0:
            if data is None:  # seen while running (runninghub-api.md §3.6)
                return TaskResult("RUNNING", code=0, msg=msg)
            items = data if isinstance(data, list) else []
            return TaskResult("SUCCESS", [normalize_output(i) for i in items if isinstance(i, dict)])
        if code == 813:
            return TaskResult("QUEUED", code=code, msg=msg)
        if code == 804:
            return TaskResult("RUNNING", code=code, msg=msg)
        if code == 805:
            reason = data.get("failedReason") if isinstance(data, dict) else None
            return TaskResult("FAILED", failed_reason=normalize_failed_reason(reason), code=code,
                              msg=msg)
        raise api_error_for(code, msg, data, where="outputs")

    async def account_status(self) -> AccountStatus:
        envelope = await self._poll(ACCOUNT_PATH, {}, "accountStatus", key_field="apikey")
        code = _code(envelope)
        data = envelope.get("data")
        if code != 0 or not isinstance(data, dict):
            raise api_error_for(code, str(envelope.get("msg", "")), data, where="accountStatus")
        count = _num(data.get("currentTaskCounts"))
        return AccountStatus(
            remain_coins=_num(data.get("remainCoins")),
            current_task_counts=int(count or 0),
            api_type=data.get("apiType"),
            remain_money=_num(data.get("remainMoney")),
            currency=data.get("currency"),
        )

    async def cancel(self, task_id: str) -> None:
        envelope = await self._poll(CANCEL_PATH, {"taskId": task_id}, "cancel")
        code = _code(envelope)
        if code != 0:
            raise api_error_for(code, str(envelope.get("msg", "")), None, where="cancel")

    async def workflow_json(self, workflow_id: str) -> dict[str, Any]:
        """The workflow in ComfyUI API format (``data.prompt`` is JSON inside JSON)."""
        envelope = await self._poll(WORKFLOW_JSON_PATH, {"workflowId": workflow_id}, "workflow")
        code = _code(envelope)
        data = envelope.get("data")
        if code != 0 or not isinstance(data, dict):
            raise api_error_for(code, str(envelope.get("msg", "")), data, where="getJsonApiFormat")
        prompt = data.get("prompt")
        try:
            parsed = json.loads(prompt) if isinstance(prompt, str) else prompt
        except ValueError as exc:
            raise ApiError(f"getJsonApiFormat returned a prompt that is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ApiError("getJsonApiFormat returned no workflow")
        return parsed

    async def upload(self, path: Path, file_type: str = "input") -> str:
        """Upload one input file; returns the ``fileName`` to send as the loader's value."""
        content = path.read_bytes()

        async def once() -> dict[str, Any]:
            self.requests_sent += 1
            try:
                response = await self._http.post(
                    UPLOAD_PATH,
                    data={"apiKey": self._key, "fileType": file_type},
                    files={"file": (path.name, content)},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise TransportError(f"upload: {type(exc).__name__}", sent=False) from None
            except httpx.HTTPError as exc:
                raise TransportError(f"upload: {type(exc).__name__}", sent=True) from None
            envelope = self._envelope(UPLOAD_PATH, response)
            if _code(envelope) == 808:
                raise TransientApiError("upload failed (808)", code=808)
            return envelope

        async for attempt in self.policy.retrying(_poll_retryable, "upload"):
            with attempt:
                envelope = await once()
        code = _code(envelope)
        data = envelope.get("data")
        if code not in (0, 200) or not isinstance(data, dict):
            msg = str(envelope.get("msg") or envelope.get("message") or "")
            raise api_error_for(code, msg, data, where=f"upload of {path.name}")
        name = data.get("fileName") or data.get("filename")
        if not name:
            raise ApiError(f"upload of {path.name} returned no fileName")
        return str(name)


def _code(envelope: dict[str, Any]) -> int:
    try:
        return int(envelope.get("code"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TransportError("the answer's 'code' is not a number", sent=True) from None


def normalize_output(item: dict[str, Any]) -> dict[str, Any]:
    """One output file with numbers parsed; null costs stay null (never coerced to zero)."""
    return {
        "fileUrl": item.get("fileUrl") or item.get("url"),
        "fileType": item.get("fileType") or item.get("outputType"),
        "nodeId": None if item.get("nodeId") is None else str(item.get("nodeId")),
        "taskCostTime": _num(item.get("taskCostTime")),
        "consumeCoins": _num(item.get("consumeCoins")),
        "consumeMoney": _num(item.get("consumeMoney")),
        "thirdPartyConsumeMoney": _num(item.get("thirdPartyConsumeMoney")),
        "text": item.get("text"),
    }


def normalize_failed_reason(reason: Any) -> Any:
    """failedReason with its stringified parts decoded (traceback is a JSON string or a list)."""
    if isinstance(reason, str):
        try:
            reason = json.loads(reason)
        except ValueError:
            return {"exception_message": reason}
    if not isinstance(reason, dict):
        return reason
    out = dict(reason)
    for key in ("traceback", "current_inputs", "current_outputs"):
        value = out.get(key)
        if isinstance(value, str) and value[:1] in "[{":
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out
