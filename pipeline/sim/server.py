"""The HTTP face of the simulator: aiohttp routes, fault injection, audit, webhook delivery.

:class:`Simulator` runs an aiohttp server on its own asyncio loop in a background thread (or in
the foreground with :meth:`Simulator.serve_forever`). Each request goes through ``_dispatch``:

1. *pre-faults* (drawn before anything is read): ``drop_connection`` closes the socket,
   ``garbage_body`` answers a truncated body, ``http_5xx`` an HTML error page; nothing is processed;
2. the body is parsed and the key taken from ``apiKey`` / ``apikey`` or ``Authorization: Bearer``;
3. poll routes are rate-limited per key if ``poll_rate_limit_per_s`` is set (code 1003);
4. the route's logic runs synchronously under the simulator lock (see :mod:`pipeline.sim.model`);
5. *post-faults*: ``create_813`` / ``lost_create`` / ``after_work`` on accepted creates, then
   (unless the answer was already replaced or lost) the hostile-answer faults: ``nan_counts`` and
   ``control_chars`` rewrite the body, and at most one of ``trickle`` / ``oversized`` /
   ``gzip_bomb`` / ``deep_json`` changes how it is sent; ``slow_answer`` anywhere;
6. one audit record is appended;
7. the answer is sent (:meth:`Simulator._send`): whole, held, trickled, streamed, cut or dropped.
   Answers that take real time are registered so that :meth:`Simulator.close` aborts them at once.

Business errors are HTTP 200 with ``{code, msg, data}``; any path that is not a route answers
``{"code":412,"msg":"TOKEN_INVALID","data":null}`` like the real service. The v2 creates
(``/openapi/v2/run/workflow/{id}``, ``/openapi/v2/run/ai-app/{id}``) and ``/openapi/v2/query``
answer HTTP 200 with the flat v2 object (``errorCode`` strings from ``V2_ERROR_CODES``, no
``code``); the v2 upload answers ``{code, message, data}`` and serves the file under
``/files/uploads/``. ``retainSeconds`` is accepted and ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import mimetypes
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from pipeline import resources
from pipeline.errors import CODES, ConfigError
from pipeline.sim.audit import Audit
from pipeline.sim.config import (
    CONTROL_INJECTION,
    CREATE_ROUTES,
    CURRENCY,
    FORGED_LOG_LINE,
    POLL_ROUTES,
    V1_TASK_ROUTES,
    V2_CREATE_ROUTES,
    V2_ERROR_MESSAGES,
    Faults,
    SimConfig,
    v2_error_code,
)
from pipeline.sim.model import (
    CANCEL,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCESS,
    WELL_FORMED_KEY,
    Account,
    Clock,
    Service,
    Task,
    WebhookRecord,
    Workflow,
    fmt_money,
    key_fingerprint,
    signature,
    value_error,
)
from pipeline.sim.png import render_png

log = logging.getLogger(__name__)

WORKFLOW_DIR = resources.sim_workflow_path("text2img.json").parent
TEXT2IMG_WORKFLOW_ID = "1904136902449209346"
IMG2IMG_WORKFLOW_ID = "1904136902449209347"
DEFAULT_WEBAPP_ID = "1877265245566922753"

TICK_REAL_S = 0.01  # webhook ticker period
SHUTDOWN_TIMEOUT_S = 2.0
START_TIMEOUT_S = 10.0
CLIENT_MAX_BODY_BYTES = 32 * 1024 * 1024
UPLOAD_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "mp3", "wav", "flac", "mp4", "avi", "mov", "mkv", "zip"}
)

_JSON = "application/json"
_GARBAGE = b'{"code":0,"msg":"success","data":{"taskId":"19'
_GARBAGE_V2 = b'{"taskId":"19'
#: Where v2 uploads are served (``download_url``); registered before ``/files/{task_id}/{name}``.
UPLOADS_PATH = "/files/uploads"
_HTML_5XX = {  # (and the 404 a v2-only key gets from v1 task routes)
    404: "404 Not Found",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}
_PAD_CHUNK = b"x" * (1 << 20)  # oversized answers are streamed from this one buffer
_FILE_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message></Error>"
)


def _msg(code: int) -> str:
    if code == 0:
        return "success"
    known = CODES.get(code)
    return known.name if known else "error"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class Reply:
    """What a route's logic decided: the body to send and what to audit."""

    body: bytes
    code: int | None = 0
    task_id: str | None = None
    key_fp: str | None = None
    status_http: int = 200
    content_type: str = _JSON
    fault: str | None = None
    created: Task | None = None  # a task this request created (for create_813 / lost_create)
    deliver: list[WebhookRecord] = field(default_factory=list)


def envelope(code: int, data: Any = None, msg: str | None = None, **audit: Any) -> Reply:
    return Reply(_dumps({"code": code, "msg": msg if msg is not None else _msg(code), "data": data}),
                 code=code, **audit)


def _v2_flat(task_id: str, status: str, error_code: str | None = "", error_message: str = "", *,
             client_id: str = "", prompt_tips: str = "") -> dict[str, Any]:
    """The flat v2 task object (create and query answers; no ``code``)."""
    return {"taskId": task_id, "status": status, "errorCode": error_code,
            "errorMessage": error_message, "clientId": client_id, "promptTips": prompt_tips,
            "results": None, "usage": None, "failedReason": None}


def _v2_upload_envelope(code: int, data: Any = None, message: str | None = None, **audit: Any
                        ) -> Reply:
    """The v2 upload's envelope: ``{code, message, data}`` (``message``, not ``msg``)."""
    if message is None:
        message = "success" if code == 0 else V2_ERROR_MESSAGES.get(str(code), _msg(code))
    return Reply(_dumps({"code": code, "message": message, "data": data}), code=code, **audit)


@dataclass
class _Send:
    """How an answer leaves the simulator (see :meth:`Simulator._send`).

    ``kind``: ``normal`` (``body`` at once), ``drop`` (socket closed, nothing sent), ``truncated``
    (the full Content-Length announced, half of ``body`` sent, socket closed), ``stall`` (``body``
    after ``wait_s`` real seconds), ``trickle`` (one byte of ``body`` per ``wait_s``), ``oversized``
    (``head`` + ``size`` padding bytes + ``tail``, streamed) or ``gzip_bomb`` (a gzip body that
    inflates to ``size`` bytes).
    """

    kind: str = "normal"
    status: int = 200
    body: bytes = b""
    content_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)
    wait_s: float = 0.0
    size: int = 0
    head: bytes = b""
    tail: bytes = b""


def _html_error(status: int) -> str:
    """nginx's error page for ``status``."""
    title = _HTML_5XX[status]
    return (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1>"
            f"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


def _parse_bool(value: Any, default: bool) -> bool | None:
    """A boolean flag as clients send it: true/false or "true"/"false"; None if neither."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _fmt_coins(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


class Simulator:
    """A local RunningHub on loopback. Use as a context manager, or ``serve_forever``."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.config = config = config if config is not None else SimConfig()
        config.validate()
        self.lock = threading.RLock()
        self.clock = Clock(config.time_scale, time.monotonic)
        self.service = Service(config, self.clock, self.lock)
        self._requests: list[tuple[Any, ...]] = []
        self.audit = Audit(self.service, self._requests)
        self.host = host
        self.port = port
        self._wall0 = time.time()
        self._rate: dict[str, deque[float]] = {}
        self._key_fps: dict[str, str] = {}
        # (faults, routes they apply to, routes with pre-faults, routes with hostile-answer faults)
        self._faults_state: tuple[Faults, frozenset[str], frozenset[str], frozenset[str]] = (
            Faults(), frozenset(), frozenset(), frozenset())
        self.set_faults(config.faults)
        self.add_workflow(TEXT2IMG_WORKFLOW_ID, _load_json(WORKFLOW_DIR / "text2img.json"))
        self.add_workflow(IMG2IMG_WORKFLOW_ID, _load_json(WORKFLOW_DIR / "img2img.json"))
        self.add_webapp(DEFAULT_WEBAPP_ID, TEXT2IMG_WORKFLOW_ID)
        for workflow_id, spec in config.workflows.items():
            data = spec if isinstance(spec, dict) else _load_json(Path(spec))
            self.add_workflow(str(workflow_id), data)
        for webapp_id, workflow_id in config.webapps.items():
            self.add_webapp(str(webapp_id), str(workflow_id))
        unknown = sorted(set(config.workflow_billing) - set(self.service.workflows))
        if unknown:
            raise ConfigError(f"simulator workflow_billing: unknown workflow id(s) "
                              f"{', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(sorted(self.service.workflows))}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._slow: dict[asyncio.Task[Any], web.Request] = {}  # answers being held or streamed
        self._closing: asyncio.Event | None = None
        self._nan_turn = 0

    # -- public API ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def now(self) -> float:
        """The simulated clock, in seconds since start."""
        with self.lock:
            return self.clock.now()

    def advance(self, seconds: float) -> None:
        """Jump the simulated clock forward (tasks finish, files and records expire)."""
        with self.lock:
            self.clock.advance(seconds)

    def set_faults(self, faults: Faults) -> None:
        """Switch the injected faults; takes effect for the next request (thread-safe)."""
        faults.validate()
        routes = faults.applies_to()
        pre = routes if (faults.drop_connection or faults.garbage_body or faults.http_5xx) else frozenset()
        hostile = routes if any((faults.trickle, faults.oversized, faults.gzip_bomb, faults.deep_json,
                                 faults.nan_counts, faults.control_chars)) else frozenset()
        self._faults_state = (faults, routes, pre, hostile)

    @property
    def faults(self) -> Faults:
        return self._faults_state[0]

    def account(self, key: str) -> Account:
        """The live account for ``key`` (coins may be assigned to top it up)."""
        with self.lock:
            account = self.service.lookup_account(key)
        if account is None:
            raise KeyError("no simulator account for that key")
        return account

    def add_account(self, config: Any) -> Account:
        with self.lock:
            return self.service.add_account(config)

    def add_workflow(self, workflow_id: str, api_json: dict[str, Any]) -> None:
        """Register an API-format workflow under ``workflow_id``."""
        try:
            with self.lock:
                self.service.add_workflow(str(workflow_id), api_json)
        except ValueError as exc:
            raise ConfigError(f"simulator workflow {workflow_id}: {exc}") from exc

    def add_webapp(self, webapp_id: str, workflow_id: str) -> None:
        """Register an AI app that runs ``workflow_id``."""
        with self.lock:
            if str(workflow_id) not in self.service.workflows:
                raise ConfigError(f"simulator webapp {webapp_id}: unknown workflow {workflow_id}")
            self.service.webapps[str(webapp_id)] = str(workflow_id)

    @property
    def uploads(self) -> dict[str, int]:
        """fileName -> size of every accepted upload."""
        with self.lock:
            return dict(self.service.uploads)

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start serving in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="rh-sim",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError("simulator did not start in time")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def close(self) -> None:
        """Stop serving and release the port, the loop and the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # loop already closed
                pass
            thread.join()
        self._thread = None
        self._loop = None

    def serve_forever(self, host: str = "127.0.0.1", port: int = 8765, *,
                      ready: Callable[[str], None] | None = None) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt), then shut down cleanly."""
        self.host, self.port = host, port
        self.start()
        if ready is not None:
            ready(self.base_url)
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    # -- loop lifecycle --------------------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # report to start(), e.g. port in use
            failure.append(exc)
            loop.run_until_complete(self._astop())
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._astop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _astart(self) -> None:
        app = web.Application(client_max_size=CLIENT_MAX_BODY_BYTES)
        self._add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._session = aiohttp.ClientSession(trust_env=False)
        self._closing = asyncio.Event()
        self._spawn(self._ticker())

    async def _astop(self) -> None:
        # answers still held, trickling or streaming: wake them and abort their sockets, so that
        # close() never waits for a stall_s / trickle / oversized answer to finish
        if self._closing is not None:
            self._closing.set()
        slow = dict(self._slow)
        for request in slow.values():
            if request.transport is not None:
                request.transport.abort()
        if slow:
            await asyncio.wait(list(slow), timeout=SHUTDOWN_TIMEOUT_S / 2)
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- routing -------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        json_routes: list[tuple[str, str, Callable[..., Reply]]] = [
            ("/task/openapi/create", "create", self._create),
            ("/task/openapi/ai-app/run", "ai_app_run", self._ai_app_run),
            ("/task/openapi/status", "status", self._status),
            ("/task/openapi/outputs", "outputs", self._outputs),
            ("/task/openapi/cancel", "cancel", self._cancel),
            ("/uc/openapi/accountStatus", "account_status", self._account_status),
            ("/api/openapi/getJsonApiFormat", "get_json_api_format", self._get_json_api_format),
            ("/task/openapi/getWebhookDetail", "get_webhook_detail", self._get_webhook_detail),
            ("/task/openapi/retryWebhook", "retry_webhook", self._retry_webhook),
            ("/openapi/v2/query", "v2_query", self._v2_query),
            ("/openapi/v2/run/workflow/{workflow_id}", "v2_run_workflow", self._v2_run_workflow),
            ("/openapi/v2/run/ai-app/{webapp_id}", "v2_run_ai_app", self._v2_run_ai_app),
        ]
        for path, route, logic in json_routes:
            app.router.add_post(path, self._handler(route, logic))
        app.router.add_post("/task/openapi/upload", self._handler("upload", self._upload, body="multipart"))
        app.router.add_post("/openapi/v2/media/upload/binary",
                            self._handler("v2_upload", self._v2_upload, body="multipart+keep"))
        app.router.add_get("/openapi/v2/queue/status",
                           self._handler("v2_queue_status", self._v2_queue_status, body="none"))
        app.router.add_get(UPLOADS_PATH + "/{name}", self._handler("files", self._uploaded_file, body="none"))
        app.router.add_get("/files/{task_id}/{name}", self._handler("files", self._file, body="none"))
        app.router.add_route("*", "/{tail:.*}", self._handler("unknown", self._unknown, body="none"))

    def _handler(self, route: str, logic: Callable[..., Reply], body: str = "json") -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._dispatch(route, logic, body, request)

        return handle

    def _fp(self, key: str | None) -> str | None:
        if not key:
            return None
        fp = self._key_fps.get(key)
        if fp is None:
            fp = key_fingerprint(key)
            if key in self.service.accounts:
                self._key_fps[key] = fp
        return fp

    def _record(self, request: web.Request, route: str, now: float, key: str | None,
                status_http: int | None, code: int | None, task_id: str | None, fault: str | None
                ) -> None:
        self._requests.append((now, request.method, request.path, route, self._fp(key), status_http,
                               code, task_id, fault))

    async def _dispatch(self, route: str, logic: Callable[..., Reply], body_kind: str,
                        request: web.Request) -> web.StreamResponse:
        faults, fault_routes, pre_routes, hostile_routes = self._faults_state
        if route in pre_routes:
            pre = self._pre_fault(faults)
            if pre is not None:
                with self.lock:
                    self._record(request, route, self.clock.now(), None, pre[1], None, None, pre[0])
                return self._pre_fault_response(request, pre)

        try:
            return await self._answer(route, logic, body_kind, request, faults, fault_routes,
                                      route in hostile_routes)
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            return web.Response(status=400)

    async def _answer(self, route: str, logic: Callable[..., Reply], body_kind: str,
                      request: web.Request, faults: Faults, fault_routes: frozenset[str],
                      hostile: bool = False) -> web.StreamResponse:
        body: dict[str, Any] = {}
        upload: dict[str, Any] | None = None
        bad_body = False
        if body_kind == "json":
            raw = await request.read()
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    body = parsed
                else:
                    bad_body = True
        elif body_kind.startswith("multipart"):
            upload = await self._read_upload(request, keep=body_kind == "multipart+keep")
            body = upload["fields"]
        key = _key_from(body, request)

        with self.lock:
            now = self.clock.now()
            reply: Reply | None = None
            if (route in POLL_ROUTES and faults.poll_rate_limit_per_s > 0 and key
                    and key in self.service.accounts and route in fault_routes
                    and self._rate_limited(key, faults.poll_rate_limit_per_s)):
                reply = envelope(1003, None, "rate limited", fault="poll_rate_limit")
                if route == "v2_query":
                    reply = self._v2_error(str(body.get("taskId") or ""), "1003", "rate limited")
                    reply.fault = "poll_rate_limit"
            if reply is None and route in V1_TASK_ROUTES:
                reply = self._v1_gone(key)
            if reply is None and bad_body:
                reply = envelope(301)
                if route in V2_CREATE_ROUTES or route == "v2_query":
                    reply = self._v2_from_envelope(reply)
            if reply is None:
                try:
                    reply = logic(body, key, now, request, upload)
                except Exception:  # a simulator bug: answer like the service's catch-all
                    log.exception("simulator error on %s", route)
                    reply = envelope(500, None, "UNKNOWN_ERROR")
                    if route in V2_CREATE_ROUTES or route == "v2_query":
                        reply = self._v2_from_envelope(reply)
                    elif route == "v2_upload":
                        reply = _v2_upload_envelope(500, None, "UNKNOWN_ERROR")
            faults_hit = [reply.fault] if reply.fault else []
            send = _Send(status=reply.status_http, body=reply.body, content_type=reply.content_type)
            status_http: int | None = reply.status_http
            code: Any = reply.code
            replaced = False  # the answer is already a fault's: no hostile shape on top
            created = reply.created if route in fault_routes else None
            if created is not None:
                rng = self.service.rng_faults
                if faults.create_813 and rng.random() < faults.create_813:
                    answer = json.loads(reply.body)
                    if route in V2_CREATE_ROUTES:
                        answer.update(errorCode="813", errorMessage=_msg(813))
                    else:
                        answer = {"code": 813, "msg": _msg(813), "data": answer["data"]}
                    reply.body = send.body = _dumps(answer)
                    reply.code = code = 813
                    faults_hit.append("create_813")
                    created.faults.append("create_813")
                if faults.lost_create and rng.random() < faults.lost_create:
                    send = _Send(kind="drop")
                    status_http, replaced = None, True
                    faults_hit.append("lost_create")
                    created.faults.append("lost_create")
                if not replaced and faults.after_work and rng.random() < faults.after_work:
                    mode = rng.choice(faults.modes())
                    name = f"after_work:{mode}"
                    faults_hit.append(name)
                    created.faults.append(name)
                    send, status_http, code = self._after_work(mode, reply, faults,
                                                               v2=route in V2_CREATE_ROUTES)
                    replaced = True
            if hostile and not replaced:
                shaped = self._hostile(route, reply, send, faults)
                if shaped:
                    faults_hit.extend(shaped)
                    if created is not None:
                        created.faults.extend(shaped)
                    if send.kind == "gzip_bomb" or "deep_json" in shaped:
                        code = 0
            slow = (faults.slow_answer > 0 and route in fault_routes
                    and self.service.rng_faults.random() < faults.slow_answer)
            if slow:
                faults_hit.append("slow_answer")
            self._record(request, route, now, key, status_http, code if isinstance(code, int) else None,
                         reply.task_id, "+".join(faults_hit) or None)

        for record in reply.deliver:
            self._spawn(self._deliver(record, manual=True))
        if slow:
            if send.kind == "normal":
                send.kind, send.wait_s = "stall", faults.slow_answer_s
            elif await self._hold(request, faults.slow_answer_s):
                return web.Response(status=200)
        return await self._send(request, send)

    # -- after-work and hostile answers -----------------------------------------------------------

    def _after_work(self, mode: str, reply: Reply, faults: Faults, *, v2: bool = False
                    ) -> tuple[_Send, int | None, Any]:
        """The answer that replaces an accepted create's: (how to send it, HTTP status, code).
        On a v2 create (``v2``) the ``code_*`` modes set the flat answer's ``errorCode``."""
        answer = json.loads(reply.body)
        data = answer if v2 else answer.get("data")
        if mode.startswith("http_"):
            status = int(mode.removeprefix("http_"))
            return _Send(status=status, body=_html_error(status).encode(),
                         content_type="text/html"), status, None
        if mode == "redirect":
            return _Send(status=302, headers={"Location": self.base_url + "/"}, content_type=""), 302, None
        if mode in ("truncated", "stall", "trickle"):
            wait = faults.stall_s if mode == "stall" else faults.trickle_interval_s
            return _Send(kind=mode, body=reply.body, wait_s=wait), 200, reply.code
        if mode == "drop":
            return _Send(kind="drop"), None, None
        if mode == "garbage":
            return _Send(body=_GARBAGE_V2 if v2 else _GARBAGE), 200, None
        if v2:
            error_code, message, keep = {
                "code_500": ("500", "UNKNOWN_ERROR", False),
                "code_500_task": ("500", "UNKNOWN_ERROR", True),
                "code_1005": ("1005", "server error", False),
                "code_null": (None, "", True),
                "code_text": ("0.0", "", True),
                "code_unknown": ("999", _msg(999), False),
            }[mode]
            flat = dict(data) if keep else _v2_flat("", "")
            flat.update(errorCode=error_code, errorMessage=message)
            audit_code = int(error_code) if error_code and error_code.isdigit() else None
            return _Send(body=_dumps(flat)), 200, audit_code
        code, msg, data = {
            "code_500": (500, "UNKNOWN_ERROR", None),
            "code_500_task": (500, "UNKNOWN_ERROR", data),
            "code_1005": (1005, "server error", None),
            "code_null": (None, "success", data),
            "code_text": ("0.0", "success", data),
            "code_unknown": (999, _msg(999), None),
        }[mode]
        return _Send(body=_dumps({"code": code, "msg": msg, "data": data})), 200, code

    def _hostile(self, route: str, reply: Reply, send: _Send, faults: Faults) -> list[str]:
        """Draw the hostile-answer faults for a processed request; rewrite ``send`` in place."""
        rng = self.service.rng_faults
        hit: list[str] = []
        if (faults.nan_counts and route == "account_status" and reply.code == 0
                and rng.random() < faults.nan_counts):
            send.body = self._nan_counts(send.body, faults.nan_counts_style)
            hit.append("nan_counts")
        if faults.control_chars and rng.random() < faults.control_chars:
            injected = _inject_control(send.body)
            if injected is not None:
                send.body = injected
                hit.append("control_chars")
        shapes = (("trickle", faults.trickle), ("oversized", faults.oversized),
                  ("gzip_bomb", faults.gzip_bomb), ("deep_json", faults.deep_json))
        if any(rate for _, rate in shapes):
            u = rng.random()
            name = ""
            for shape, rate in shapes:
                if u < rate:
                    name = shape
                    break
                u -= rate
            if not name:
                return hit
            hit.append(name)
            if name == "trickle":
                send.kind, send.wait_s = "trickle", faults.trickle_interval_s
            elif name == "oversized":
                send.head, send.tail = _padded_envelope(send.body)
                send.kind, send.status, send.content_type = "oversized", 200, _JSON
                send.size = max(0, faults.oversized_bytes - len(send.head) - len(send.tail))
            elif name == "gzip_bomb":
                send.kind, send.size = "gzip_bomb", faults.gzip_bomb_bytes
            else:
                send.status, send.content_type = 200, _JSON
                send.body = _deep_json(faults.deep_json_depth)
        return hit

    def _nan_counts(self, body: bytes, style: str) -> bytes:
        answer = json.loads(body)
        if style == "both":
            self._nan_turn += 1
            style = "string" if self._nan_turn % 2 else "token"
        data = answer.get("data") or {}
        data["currentTaskCounts"] = "NaN" if style == "string" else math.nan
        data["remainCoins"] = "Infinity"
        answer["data"] = data
        return _dumps(answer)  # json.dumps writes a float NaN as the bare token NaN

    # -- sending ---------------------------------------------------------------------------------

    async def _hold(self, request: web.Request, seconds: float) -> bool:
        """Wait ``seconds`` real seconds; True (and the socket aborted) if the simulator closed."""
        closing = self._closing
        if closing is None or seconds <= 0:
            return closing is not None and closing.is_set()
        try:
            await asyncio.wait_for(closing.wait(), seconds)
        except TimeoutError:
            return False
        if request.transport is not None:
            request.transport.abort()
        return True

    async def _send(self, request: web.Request, send: _Send) -> web.StreamResponse:
        """Send the answer as ``send`` says. Slow kinds are registered for :meth:`close`."""
        kind = send.kind
        transport = request.transport
        if kind == "normal":
            return web.Response(body=send.body, status=send.status, headers=send.headers or None,
                                content_type=send.content_type or None)
        if kind == "drop":
            if transport is not None:
                transport.close()
            return web.Response(status=200)
        if kind == "truncated":
            head = (f"HTTP/1.1 {send.status} OK\r\nContent-Type: {send.content_type}; charset=utf-8\r\n"
                    f"Content-Length: {len(send.body)}\r\n\r\n").encode()
            if transport is not None:
                transport.write(head + send.body[: len(send.body) // 2])
                transport.close()  # flushes what was written, then closes
            return web.Response(status=200)
        if kind == "gzip_bomb":
            body = await asyncio.get_running_loop().run_in_executor(None, gzip_bomb, send.size)
            return web.Response(body=body, status=200, content_type=_JSON,
                                headers={"Content-Encoding": "gzip"})
        task = asyncio.current_task()
        assert task is not None
        self._slow[task] = request
        try:
            if kind == "stall":
                if await self._hold(request, send.wait_s):
                    return web.Response(status=200)
                return web.Response(body=send.body, status=send.status, headers=send.headers or None,
                                    content_type=send.content_type or None)
            response = web.StreamResponse(status=send.status, headers=send.headers or None)
            response.content_type = send.content_type
            try:
                if kind == "trickle":
                    response.content_length = len(send.body)
                    await response.prepare(request)
                    for i in range(len(send.body)):
                        if i and await self._hold(request, send.wait_s):
                            return response
                        await response.write(send.body[i:i + 1])
                else:  # oversized
                    response.content_length = len(send.head) + send.size + len(send.tail)
                    await response.prepare(request)
                    await response.write(send.head)
                    left = send.size
                    pad = memoryview(_PAD_CHUNK)
                    while left:
                        n = min(left, len(pad))
                        await response.write(pad[:n])
                        left -= n
                    await response.write(send.tail)
                await response.write_eof()
            except ConnectionError:  # the client went away (or close() aborted the socket)
                pass
            return response
        finally:
            self._slow.pop(task, None)

    def _pre_fault(self, faults: Faults) -> tuple[str, int | None] | None:
        with self.lock:
            u = self.service.rng_faults.random()
            if u < faults.drop_connection:
                return ("drop_connection", None)
            u -= faults.drop_connection
            if u < faults.garbage_body:
                return ("garbage_body", 200)
            u -= faults.garbage_body
            if u < faults.http_5xx:
                return ("http_5xx", self.service.rng_faults.choice((500, 502, 503)))
        return None

    @staticmethod
    def _pre_fault_response(request: web.Request, pre: tuple[str, int | None]) -> web.Response:
        name, status = pre
        if name == "drop_connection":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=200)
        if name == "garbage_body":
            return web.Response(body=_GARBAGE, status=200, content_type=_JSON)
        assert status is not None
        return web.Response(text=_html_error(status), status=status, content_type="text/html")

    def _rate_limited(self, key: str, per_s: float) -> bool:
        window = self._rate.setdefault(key, deque())
        real = time.monotonic()
        while window and window[0] <= real - 1.0:
            window.popleft()
        if len(window) >= per_s:
            return True
        window.append(real)
        return False

    # -- shared checks -------------------------------------------------------------------------

    def _auth(self, key: str | None) -> tuple[Account | None, Reply | None]:
        account = self.service.lookup_account(key)
        if account is None:
            code = 412
            if self.config.unknown_key_code == 806 and key and WELL_FORMED_KEY.match(key):
                code = 806
            return None, envelope(code)
        if account.revoked:
            return None, envelope(802, key_fp=account.key_fp)
        if account.free_user:
            return None, envelope(801, key_fp=account.key_fp)
        return account, None

    def _find_task(self, body: dict[str, Any], key: str | None, now: float
                   ) -> tuple[Task | None, Account | None, Reply | None]:
        task_id = body.get("taskId")
        if task_id is None or task_id == "" or isinstance(task_id, bool | list | dict):
            return None, None, envelope(301)
        task_id = str(task_id)
        account, error = self._auth(key)
        if error is not None:
            error.task_id = task_id
            return None, None, error
        assert account is not None
        account.settle(now)
        task = self.service.tasks.get(task_id)
        if task is None or task.account is not account or task.gone(now, self.config.retention_s):
            return None, account, envelope(807, task_id=task_id)
        return task, account, None

    # -- create ---------------------------------------------------------------------------------

    def _create(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        workflow_id = body.get("workflowId")
        if isinstance(workflow_id, int) and not isinstance(workflow_id, bool):
            workflow_id = str(workflow_id)
        if not isinstance(workflow_id, str) or not workflow_id.strip() or workflow_id.strip() == "0":
            return envelope(301)
        return self._create_task(body, key, now, workflow_id.strip(), None, "create")

    def _ai_app_run(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        webapp_id = body.get("webappId")
        if isinstance(webapp_id, int) and not isinstance(webapp_id, bool):
            webapp_id = str(webapp_id)
        if not isinstance(webapp_id, str) or not webapp_id.strip() or webapp_id.strip() == "0":
            return envelope(301)
        if not isinstance(body.get("nodeInfoList"), list):
            return envelope(301)
        return self._create_task(body, key, now, None, webapp_id.strip(), "ai_app_run")

    def _create_task(self, body: dict[str, Any], key: str | None, now: float,
                     workflow_id: str | None, webapp_id: str | None, route: str) -> Reply:
        service = self.service
        # 1. parameters
        node_info = body.get("nodeInfoList")
        if node_info is None:
            node_info = []
        if not isinstance(node_info, list) or not all(
            isinstance(i, dict) and isinstance(i.get("nodeId"), str | int) and not isinstance(
                i.get("nodeId"), bool) and isinstance(i.get("fieldName"), str) and "fieldValue" in i
            for i in node_info
        ):
            return envelope(301)
        personal = _parse_bool(body.get("usePersonalQueue"), False)
        add_metadata = _parse_bool(body.get("addMetadata"), True)
        if personal is None or add_metadata is None:
            return envelope(301)
        webhook_url = body.get("webhookUrl") or None
        if webhook_url is not None and (
            not isinstance(webhook_url, str) or not webhook_url.startswith(("http://", "https://"))
        ):
            return envelope(301)
        instance_type = body.get("instanceType")
        if instance_type is not None and not isinstance(instance_type, str):
            return envelope(301)
        override = body.get("workflow")
        override_data: Any = None
        if override not in (None, ""):
            try:
                override_data = json.loads(override) if isinstance(override, str) else override
                if not isinstance(override_data, dict):
                    raise ValueError
            except ValueError:
                return envelope(301)
        # 2. key
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        fp = account.key_fp
        # 3. balance (before any workflow validation, as observed on the real service)
        account.settle(now)
        if account.coins <= 0:
            return envelope(account.wallet_code, key_fp=fp)
        # 4. workflow / app exists
        if webapp_id is not None:
            workflow_id = service.webapps.get(webapp_id)
            if workflow_id is None:
                return envelope(901, key_fp=fp)
        assert workflow_id is not None
        workflow = service.workflows.get(workflow_id)
        if workflow is None:
            return envelope(380, key_fp=fp)
        billing = self.config.billing_for(workflow_id)
        if billing.money and account.money_cents is not None and account.money_cents <= 0:
            return envelope(account.wallet_code, key_fp=fp)  # a money wallet, spent
        # 5. concurrency
        in_pqueue = False
        if len(account.active) + len(account.pqueue) >= account.concurrency:
            if account.api_type != "EXCLUSIVE":
                return envelope(421, key_fp=fp)
            if not personal:
                return envelope(415, key_fp=fp)
            if len(account.pqueue) >= account.personal_queue_limit:
                return envelope(814, key_fp=fp)
            in_pqueue = True
        # 6. nodeInfoList against the saved workflow
        if override_data is not None and node_info:
            return envelope(803, {"reason": "node_not_found_in_workflow",
                                  "detail": "nodeInfoList is checked against the saved workflow, "
                                            "not the workflow parameter: bake values into workflow"},
                            key_fp=fp)
        for item in node_info:
            node = workflow.nodes.get(str(item["nodeId"]))
            if node is None:
                return envelope(803, {"nodeId": str(item["nodeId"]), "fieldName": item["fieldName"],
                                      "reason": "node_not_found_in_workflow"}, key_fp=fp)
            if item["fieldName"] not in node.get("inputs", {}):
                return envelope(803, {"nodeId": str(item["nodeId"]), "fieldName": item["fieldName"],
                                      "reason": "field_not_found_in_node"}, key_fp=fp)
        # 7. prompt validation (ComfyUI's coercions)
        if override_data is not None:
            try:
                workflow = Workflow.from_api_json(workflow_id, override_data)
            except ValueError as exc:
                return self._prompt_failed(workflow, {}, str(exc), fp)
        node_errors: dict[str, Any] = {}
        for item in node_info:
            node_id = str(item["nodeId"])
            node = workflow.nodes[node_id]
            problem = value_error(node["inputs"][item["fieldName"]], item["fieldValue"], workflow.nodes)
            if problem is not None:
                entry = node_errors.setdefault(node_id, {
                    "errors": [], "dependent_outputs": list(workflow.output_nodes),
                    "class_type": node["class_type"],
                })
                entry["errors"].append({
                    "type": problem[0], "message": problem[1],
                    "details": f"{item['fieldName']}, {item['fieldValue']!r}",
                    "extra_info": {"input_name": item["fieldName"],
                                   "received_value": item["fieldValue"]},
                })
        if node_errors:
            return self._prompt_failed(workflow, node_errors, "", fp)
        # 8. accept
        faults, fault_routes, _pre, _hostile = self._faults_state
        delay, runtime, fail, fault = service.draw_task(faults.task_failure)
        task_id = service.new_task_id()
        forged = (faults.newline_task_id > 0 and route in fault_routes and route in CREATE_ROUTES
                  and service.rng_faults.random() < faults.newline_task_id)
        if forged:  # the id itself carries a forged log line; the task lives under exactly it
            task_id = f"{task_id}\n{FORGED_LOG_LINE}"
        sig_source = node_info if override_data is None else [
            {"nodeId": "workflow", "fieldName": "sha256",
             "fieldValue": hashlib.sha256(workflow.prompt_text.encode()).hexdigest()}
        ]
        task = Task(
            task_id=task_id, client_id=service.new_client_id(), account=account,
            workflow_id=workflow_id, workflow=workflow, node_info_list=node_info,
            signature=signature(workflow_id, sig_source), created_at=now, queue_delay=delay,
            runtime=runtime, fail=fail, webapp_id=webapp_id, webhook_url=webhook_url,
            add_metadata=bool(add_metadata) and webapp_id is None, instance_type=instance_type,
            personal_queue=in_pqueue, billing=billing, v2=route in V2_CREATE_ROUTES,
            children=service.new_children(billing),
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
        status = task.status(now)
        data = {
            "netWssUrl": self._wss(task) if status == RUNNING else None,
            "taskId": task.task_id,
            "clientId": task.client_id,
            "taskStatus": status,
            "promptTips": json.dumps({"result": True, "error": None,
                                      "outputs_to_execute": workflow.output_nodes, "node_errors": {}}),
        }
        reply = envelope(0, data, task_id=task.task_id, key_fp=fp,
                         fault="newline_task_id" if forged else None)
        reply.created = task
        return reply

    # -- v2 create ------------------------------------------------------------------------------

    def _v2_run_workflow(self, body: dict[str, Any], key: str | None, now: float,
                         request: web.Request, *_: Any) -> Reply:
        workflow_id = request.match_info.get("workflow_id", "").strip()
        if not workflow_id or workflow_id == "0":
            return self._v2_from_envelope(envelope(301))
        return self._v2_from_envelope(
            self._create_task(body, key, now, workflow_id, None, "v2_run_workflow"))

    def _v2_run_ai_app(self, body: dict[str, Any], key: str | None, now: float,
                       request: web.Request, *_: Any) -> Reply:
        webapp_id = request.match_info.get("webapp_id", "").strip()
        if not webapp_id or webapp_id == "0" or not isinstance(body.get("nodeInfoList"), list):
            return self._v2_from_envelope(envelope(301))
        return self._v2_from_envelope(
            self._create_task(body, key, now, None, webapp_id, "v2_run_ai_app"))

    def _v2_from_envelope(self, reply: Reply) -> Reply:
        """A v1 create answer (or error envelope) rewritten as v2's flat object, in place: success
        keeps taskId/status/clientId/promptTips; an error's code goes through ``V2_ERROR_CODES``
        (a 433 keeps its promptTips; a 803's reason is added to errorMessage)."""
        answer = json.loads(reply.body)
        code, msg, data = answer.get("code"), str(answer.get("msg") or ""), answer.get("data")
        if code == 0 and isinstance(data, dict) and data.get("taskId"):
            flat = _v2_flat(data["taskId"], data["taskStatus"], client_id=data["clientId"],
                            prompt_tips=data["promptTips"])
        else:
            error_code = v2_error_code(code) if isinstance(code, int) else "1005"
            message = V2_ERROR_MESSAGES.get(error_code, msg)
            if isinstance(data, dict) and isinstance(data.get("reason"), str):
                message = f"{message}: {data['reason']}"
            flat = _v2_flat("", "", error_code, message)
            if isinstance(data, dict) and isinstance(data.get("promptTips"), str):
                flat["promptTips"] = data["promptTips"]
            reply.code = int(error_code)
        reply.body = _dumps(flat)
        return reply

    def _v1_gone(self, key: str | None) -> Reply | None:
        """The answer of a v1 task route for a v2-only key (``AccountConfig.v1_task_routes``)."""
        account = self.service.lookup_account(key)
        if account is None or account.v1_task_routes == "ok":
            return None
        if account.v1_task_routes == "412":
            return envelope(412, key_fp=account.key_fp)
        return Reply(_html_error(404).encode(), code=None, status_http=404, content_type="text/html",
                     key_fp=account.key_fp)

    def _prompt_failed(self, workflow: Workflow, node_errors: dict[str, Any], detail: str,
                       fp: str) -> Reply:
        tips = {
            "result": False,
            "error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": detail,
                      "extra_info": {}},
            "outputs_to_execute": [],
            "node_errors": node_errors,
        }
        return envelope(433, {"promptTips": json.dumps(tips, ensure_ascii=False)}, key_fp=fp)

    def _wss(self, task: Task) -> str:
        return f"wss://{self.host}:{self.port}/ws/c_{task.client_id}"

    # -- task queries -------------------------------------------------------------------------

    def _status(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        task, _account, error = self._find_task(body, key, now)
        if error is not None:
            return error
        assert task is not None
        status = task.status(now)
        # /status has no CANCEL value: a cancelled task reads FAILED (see outputs for the reason)
        return envelope(0, FAILED if status == CANCEL else status, task_id=task.task_id,
                        key_fp=task.account.key_fp)

    def _outputs(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        task, _account, error = self._find_task(body, key, now)
        if error is not None:
            return error
        assert task is not None
        fp = task.account.key_fp
        status = task.status(now)
        if status == QUEUED:
            return envelope(813, None, task_id=task.task_id, key_fp=fp)
        if status == RUNNING:
            return envelope(804, {"netWssUrl": self._wss(task)}, task_id=task.task_id, key_fp=fp)
        if status in (FAILED, CANCEL):
            return envelope(805, {"failedReason": _failed_reason(task)}, task_id=task.task_id,
                            key_fp=fp)
        lag = self._faults_state[0].status_outputs_lag_s
        assert task.end_at is not None
        if lag and now < task.end_at + lag:
            reply = envelope(804, {"netWssUrl": self._wss(task)}, task_id=task.task_id, key_fp=fp)
            reply.fault = "status_outputs_lag"
            return reply
        if task.outputs_cache is None:
            task.outputs_cache = _dumps({"code": 0, "msg": "success", "data": self._items(task)})
        return Reply(task.outputs_cache, code=0, task_id=task.task_id, key_fp=fp)

    def _items(self, task: Task, *, numeric_cost: bool = False) -> list[dict[str, Any]]:
        """v1 outputs items: each carries the task's totals (coins, and money as a string for a
        workflow billed in money, in its ``money_field``)."""
        cost_s = int(round(task.used_s()))
        billing = task.billing
        coins = None if task.coins is None or not billing.coins else str(task.coins)
        money = None if task.money_cents is None else fmt_money(task.money_cents)
        return [
            {
                "fileUrl": f"{self.base_url}/files/{quote(task.task_id, safe='')}/{node_id}_0.png",
                "fileType": "png",
                "taskCostTime": cost_s if numeric_cost else str(cost_s),
                "nodeId": node_id,
                "consumeCoins": coins,
                "consumeMoney": money if billing.money_field == "consumeMoney" else None,
                "thirdPartyConsumeMoney": money if billing.money_field == "thirdPartyConsumeMoney"
                else None,
            }
            for node_id in task.workflow.output_nodes
        ]

    def _cancel(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        task, account, error = self._find_task(body, key, now)
        if error is not None:
            return error
        assert task is not None and account is not None
        if task.status(now) in (QUEUED, RUNNING):
            account.cancel(task, now)
            return envelope(0, None, task_id=task.task_id, key_fp=account.key_fp)
        code = self.config.cancel_finished_code
        return envelope(code, None, task_id=task.task_id, key_fp=account.key_fp)

    def _account_status(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        account.settle(now)
        data = {
            "remainCoins": _fmt_coins(account.coins),
            "currentTaskCounts": str(len(account.active) + len(account.pqueue)),
            "remainMoney": None if account.money_cents is None else fmt_money(account.money_cents),
            "currency": None if account.money_cents is None else CURRENCY,
            "apiType": account.api_type,
        }
        return envelope(0, data, key_fp=account.key_fp)

    def _get_json_api_format(self, body: dict[str, Any], key: str | None, now: float, *_: Any
                             ) -> Reply:
        workflow_id = body.get("workflowId")
        if isinstance(workflow_id, int) and not isinstance(workflow_id, bool):
            workflow_id = str(workflow_id)
        if not isinstance(workflow_id, str) or not workflow_id.strip():
            return envelope(301)
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        workflow = self.service.workflows.get(workflow_id.strip())
        if workflow is None:
            return envelope(380, key_fp=account.key_fp)
        return envelope(0, {"prompt": workflow.prompt_text}, "SUCCESS", key_fp=account.key_fp)

    # -- webhooks -------------------------------------------------------------------------------

    def _time_text(self, sim_t: float) -> str:
        return datetime.fromtimestamp(self._wall0 + sim_t).strftime("%Y-%m-%d %H:%M:%S")

    def _get_webhook_detail(self, body: dict[str, Any], key: str | None, now: float, *_: Any
                            ) -> Reply:
        task, account, error = self._find_task(body, key, now)
        if error is not None:
            return error
        assert task is not None and account is not None
        record = task.webhook
        if record is None:
            return envelope(1, None, "webhook event not exists", task_id=task.task_id,
                            key_fp=account.key_fp)
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
        return envelope(0, data, task_id=task.task_id, key_fp=account.key_fp)

    def _retry_webhook(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        webhook_id = body.get("webhookId")
        url = body.get("webhookUrl")
        if webhook_id in (None, "") or isinstance(webhook_id, bool | list | dict):
            return envelope(301)
        if url not in (None, "") and (not isinstance(url, str)
                                      or not url.startswith(("http://", "https://"))):
            return envelope(301)
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        record = self.service.webhooks.get(str(webhook_id))
        if record is None or record.task.account is not account:
            return envelope(807, key_fp=account.key_fp)
        if url:
            record.url = url
        reply = envelope(0, None, task_id=record.task.task_id, key_fp=account.key_fp)
        if not record.in_flight:
            record.in_flight = True
            record.status = "RETRYING"
            record.retry_count += 1
            reply.deliver.append(record)
        return reply

    def _event_data(self, task: Task) -> Any:
        """A webhook's eventData for an ended task: for a task created on v1, the outputs answer
        as a JSON string; for one created on v2, the v2 query object (not a string)."""
        if task.v2:
            assert task.end_at is not None
            return self._v2_task_data(task, task.end_at)
        if task.fail:
            payload: dict[str, Any] = {"code": 805, "msg": _msg(805),
                                       "data": {"failedReason": _failed_reason(task)}}
        else:
            # quirk of the real service: taskCostTime is a number inside webhook eventData
            payload = {"code": 0, "msg": "success", "data": self._items(task, numeric_cost=True)}
        return json.dumps(payload, ensure_ascii=False)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_REAL_S)
            with self.lock:
                due = self.service.due_webhooks(self.clock.now(), self._event_data)
            for record in due:
                self._spawn(self._deliver(record))

    async def _deliver(self, record: WebhookRecord, *, manual: bool = False) -> None:
        assert self._session is not None
        payload = {"event": "TASK_END", "taskId": record.task.task_id, "eventData": record.event_data}
        try:
            async with self._session.post(
                record.url, json=payload,
                timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout_s),
            ) as response:
                text = await response.text(errors="replace")
                ok = 200 <= response.status < 300
                answer = f"HTTP {response.status}: {text[:500]}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            ok = False
            answer = f"{type(exc).__name__}: {exc}"[:500]
        with self.lock:
            self.service.webhook_result(record, ok, answer, self.clock.now(), manual=manual)

    # -- v2 -------------------------------------------------------------------------------------

    def _v2_error(self, task_id: str, code: str, message: str, fp: str | None = None) -> Reply:
        data = _v2_flat(task_id, "", code, message)
        return Reply(_dumps(data), code=int(code), task_id=task_id or None, key_fp=fp)

    def _v2_query(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        raw_id = body.get("taskId")
        task_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else ""
        account, error = self._auth(key)
        if error is not None:
            code = v2_error_code(error.code or 412)
            return self._v2_error(task_id, code, V2_ERROR_MESSAGES.get(code, _msg(error.code or 412)))
        assert account is not None
        if task_id not in self.service.tasks and (not task_id.isdigit() or int(task_id) <= 0):
            return self._v2_error(task_id, "1007", "taskId must be greater than 0", account.key_fp)
        account.settle(now)
        task = self.service.tasks.get(task_id)
        if task is None or task.account is not account or task.gone(now, self.config.retention_s):
            return self._v2_error(task_id, "1004", "not found or expired", account.key_fp)
        data = self._v2_task_data(task, now)
        return Reply(_dumps(data), code=0, task_id=task_id, key_fp=account.key_fp)

    def _v2_usage(self, billing: Any, coins: int | None, money_cents: int | None, cost_s: float,
                  *, carried: bool = False) -> dict[str, Any]:
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
        data = _v2_flat(task.task_id, status, client_id=task.client_id)
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
            reason = _failed_reason(task)
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

    def _v2_queue_status(self, body: dict[str, Any], key: str | None, now: float, *_: Any) -> Reply:
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        account.settle(now)
        running = sum(1 for t in account.active.values() if t.status(now) == RUNNING)
        total = len(account.active) + len(account.pqueue)
        data = {"apiKeyType": account.api_type, "concurrentLimit": account.concurrency,
                "runningCount": running, "queuedCount": total - running, "totalCurrentTasks": total}
        return envelope(0, data, key_fp=account.key_fp)

    # -- upload ---------------------------------------------------------------------------------

    async def _read_upload(self, request: web.Request, *, keep: bool = False) -> dict[str, Any]:
        """Stream a multipart body: text fields, and the file's name, size and sha256 (and with
        ``keep`` its content, when within ``max_upload_bytes``)."""
        info: dict[str, Any] = {"fields": {}, "file": None, "bad": False}
        if not request.content_type.startswith("multipart/"):
            raw = await request.read()
            try:  # a JSON body still names the key, so the answer can be 301 rather than 412
                parsed = json.loads(raw) if raw else {}
            except ValueError:
                parsed = {}
            info["fields"] = parsed if isinstance(parsed, dict) else {}
            info["bad"] = True
            return info
        limit = self.config.max_upload_bytes
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, aiohttp.BodyPartReader):
                    info["bad"] = True
                    continue
                if part.name == "file" or part.filename is not None:
                    digest = hashlib.sha256()
                    size = 0
                    kept: list[bytes] = []
                    while chunk := await part.read_chunk(256 * 1024):
                        size += len(chunk)
                        if size <= limit:
                            digest.update(chunk)
                            if keep:
                                kept.append(chunk)
                    info["file"] = {"filename": part.filename or "", "size": size,
                                    "sha256": digest.hexdigest(),
                                    "content": b"".join(kept) if keep and size <= limit else None}
                elif part.name:
                    info["fields"][part.name] = (await part.text())[:4096]
        except (ValueError, aiohttp.ClientError, AssertionError):
            info["bad"] = True
        return info

    def _upload(self, body: dict[str, Any], key: str | None, now: float, request: web.Request,
                upload: dict[str, Any] | None) -> Reply:
        assert upload is not None
        account, error = self._auth(key)
        if error is not None:
            return error
        assert account is not None
        fp = account.key_fp
        file = upload["file"]
        problem = self._upload_problem(upload)
        if problem == "size":
            return envelope(809, key_fp=fp)
        if problem == "type":
            return envelope(301, None, "PARAMS_INVALID", key_fp=fp)
        if problem:
            return envelope(301, key_fp=fp)
        ext = Path(file["filename"]).suffix.lower().lstrip(".")
        name = file["sha256"] if ext == "zip" else f"api/{file['sha256']}.{ext}"
        self.service.uploads[name] = file["size"]
        file_type = body.get("fileType") or "input"
        return envelope(0, {"fileName": name, "fileType": file_type}, key_fp=fp)

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

    def _v2_upload(self, body: dict[str, Any], key: str | None, now: float, request: web.Request,
                   upload: dict[str, Any] | None) -> Reply:
        """``/openapi/v2/media/upload/binary``: the v1 upload's checks in v2's envelope
        (``{code, message, data}``): a bad key 401, parameters 1007, over the size limit 1008."""
        assert upload is not None
        account, error = self._auth(key)
        if error is not None:
            return _v2_upload_envelope(401, None, "ApiKey verification failed")
        assert account is not None
        fp = account.key_fp
        file = upload["file"]
        problem = self._upload_problem(upload)
        if problem:
            return _v2_upload_envelope(1008 if problem == "size" else 1007, key_fp=fp)
        ext = Path(file["filename"]).suffix.lower().lstrip(".")
        stored = f"{file['sha256']}.{ext}"
        name = f"api/{stored}"
        self.service.uploads[name] = file["size"]
        self.service.upload_blobs[stored] = (file["content"] or b"", now)
        data = {"fileName": name, "download_url": f"{self.base_url}{UPLOADS_PATH}/{stored}",
                "type": ext, "size": file["size"]}
        return _v2_upload_envelope(0, data, key_fp=fp)

    # -- files and everything else --------------------------------------------------------------

    def _uploaded_file(self, body: dict[str, Any], key: str | None, now: float,
                       request: web.Request, *_: Any) -> Reply:
        """A v2 upload's ``download_url``: its bytes, 403 (expired) after ``file_ttl_s``."""
        stored = self.service.upload_blobs.get(request.match_info.get("name", ""))
        if stored is None:
            return Reply(b"Not Found", code=None, status_http=404, content_type="text/plain")
        content, uploaded_at = stored
        if now - uploaded_at > self.config.file_ttl_s:
            return Reply(_FILE_EXPIRED, code=None, status_http=403, content_type="application/xml")
        kind = mimetypes.guess_type(request.match_info["name"])[0] or "application/octet-stream"
        return Reply(content, code=None, status_http=200, content_type=kind)

    def _file(self, body: dict[str, Any], key: str | None, now: float, request: web.Request,
              *_: Any) -> Reply:
        task_id = request.match_info.get("task_id", "")
        name = request.match_info.get("name", "")
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
        if ext != "png" or index != "0" or node_id not in task.workflow.output_nodes:
            return not_found
        assert task.end_at is not None
        if now - task.end_at > self.config.file_ttl_s:
            return Reply(_FILE_EXPIRED, code=None, status_http=403, content_type="application/xml",
                         task_id=task_id)
        text = ""
        if task.add_metadata:
            text = json.dumps({"workflowId": task.workflow_id, "nodeInfoList": task.signature})
        png = render_png(f"{task.signature}|{node_id}|{index}", text)
        return Reply(png, code=None, status_http=200, content_type="image/png", task_id=task_id)

    def _unknown(self, *_: Any) -> Reply:
        return envelope(412)


_BOMB_HEAD = b'{"code":0,"msg":"success","data":null'
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0, max compression


def _deflate(data: bytes, flush: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(flush)


@lru_cache(maxsize=4)
def gzip_bomb(size: int) -> bytes:
    """A gzip body that inflates to exactly ``size`` bytes: ``{"code":0,"msg":"success","data":null``,
    spaces, then ``}`` (valid JSON).

    One MiB of spaces is deflated once with a full flush (byte-aligned, no reference to earlier
    data), and that block is repeated: the 1 GiB bomb is about 1 MB, takes about half a second (the
    CRC) and never exists inflated. Cached per size.
    """
    chunk = b" " * (1 << 20)
    spaces = max(0, size - len(_BOMB_HEAD) - 1)
    whole, rest = divmod(spaces, len(chunk))
    crc = zlib.crc32(_BOMB_HEAD)
    for _ in range(whole):
        crc = zlib.crc32(chunk, crc)
    tail = chunk[:rest] + b"}"
    crc = zlib.crc32(tail, crc)
    block = _deflate(chunk, zlib.Z_FULL_FLUSH) if whole else b""
    return b"".join((
        _GZIP_HEADER, _deflate(_BOMB_HEAD, zlib.Z_FULL_FLUSH), block * whole,
        _deflate(tail, zlib.Z_FINISH),
        struct.pack("<II", crc, (len(_BOMB_HEAD) + spaces + 1) & 0xFFFFFFFF),
    ))


@lru_cache(maxsize=4)
def _deep_json(depth: int) -> bytes:
    return b'{"code":0,"msg":"success","data":' + b"[" * depth + b"]" * depth + b"}"


def _padded_envelope(body: bytes) -> tuple[bytes, bytes]:
    """``body``'s JSON envelope cut inside its ``msg`` string: padding goes between head and tail,
    ``{"code":0,"msg":"success`` + padding + ``","data":...}``. A body that is not a JSON object
    becomes ``{"code":0,"msg":"success","data":null}``."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        answer = {"code": 0, "msg": "success", "data": None}
    msg = answer.get("msg")
    items = list(answer.items())
    at = [k for k, _ in items].index("msg") if "msg" in answer else min(1, len(items))

    def join(pairs: list[tuple[str, Any]]) -> str:
        return ",".join(f"{json.dumps(k)}:{_dumps(v).decode()}" for k, v in pairs if k != "msg")

    before, after = join(items[:at]), join(items[at:])
    msg_open = _dumps(msg if isinstance(msg, str) else "").decode()[:-1]  # without its closing quote
    head = "{" + before + ("," if before else "") + '"msg":' + msg_open
    tail = '"' + ("," + after if after else "") + "}"
    return head.encode(), tail.encode()


def _inject_reason(reason: dict[str, Any]) -> None:
    for name in ("exception_message", "node_name"):
        if isinstance(reason.get(name), str):
            reason[name] += CONTROL_INJECTION
    trace = reason.get("traceback")
    if isinstance(trace, list):
        trace.append(CONTROL_INJECTION)
    elif isinstance(trace, str):
        try:
            frames = json.loads(trace)
        except ValueError:
            frames = None
        reason["traceback"] = (json.dumps([*frames, CONTROL_INJECTION]) if isinstance(frames, list)
                               else trace + CONTROL_INJECTION)


def _inject_control(body: bytes) -> bytes | None:
    """``body`` with ``CONTROL_INJECTION`` in every text the service wrote; None if not JSON."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    for name in ("msg", "errorMessage"):
        if isinstance(answer.get(name), str):
            answer[name] += CONTROL_INJECTION
    data = answer.get("data")
    for reason in (answer.get("failedReason"), data.get("failedReason") if isinstance(data, dict) else None):
        if isinstance(reason, dict):
            _inject_reason(reason)
    for items in (data, answer.get("results")):
        for item in items if isinstance(items, list) else ():
            for name in ("fileType", "outputType"):
                if isinstance(item, dict) and isinstance(item.get(name), str):
                    item[name] += CONTROL_INJECTION
    return _dumps(answer)


def _key_from(body: dict[str, Any], request: web.Request) -> str | None:
    for name in ("apiKey", "apikey"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    value = request.query.get("apiKey") or request.query.get("apikey") if request.query_string else None
    if value:
        return value
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def _failed_reason(task: Task) -> dict[str, Any]:
    if task.cancelled:
        return {"node_name": "", "node_id": "", "exception_type": "TaskCancelled",
                "exception_message": "The task was cancelled by the user", "traceback": "[]",
                "current_inputs": "{}", "current_outputs": "{}"}
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


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load workflow {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"workflow {path}: expected an API-format JSON object")
    return data
