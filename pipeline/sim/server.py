"""The wire side of the simulator: the aiohttp server, its thread and loop, dispatch, fault
injection, the audit and webhook delivery. What the answers mean is :mod:`pipeline.sim.api`'s.

:class:`Simulator` runs an aiohttp server on its own asyncio loop in a background thread (or in
the foreground with :meth:`Simulator.serve_forever`). Each request goes through ``_dispatch``:

1. *pre-faults* (drawn before anything is read): ``drop_connection`` closes the socket,
   ``garbage_body`` answers a truncated body, ``http_5xx`` an HTML error page; nothing is processed;
2. the body is read (JSON, or a streamed multipart upload) and the key taken from ``apiKey`` /
   ``apikey`` or ``Authorization: Bearer``;
3. under the simulator lock: poll routes are rate-limited per key if ``poll_rate_limit_per_s``
   is set (code 1003), then the route's rules run (:class:`pipeline.sim.api.RunningHubApi`);
4. *post-faults*: ``create_813`` / ``lost_create`` / ``after_work`` on accepted creates, then
   (unless the answer was already replaced or lost) the hostile-answer faults: ``nan_counts`` and
   ``control_chars`` rewrite the body, and at most one of ``trickle`` / ``oversized`` /
   ``gzip_bomb`` / ``deep_json`` changes how it is sent; ``slow_answer`` anywhere;
5. one audit record is appended;
6. the answer waits its network round trip, ``Faults.latency_s`` (+ jitter) real seconds, in an
   asyncio sleep outside the lock, so concurrent requests wait side by side;
7. the answer is sent (:meth:`Simulator._send`): whole, held, trickled, streamed, cut or dropped.
   Answers that take real time are registered so that :meth:`Simulator.close` aborts them at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from pipeline import resources
from pipeline.errors import ConfigError
from pipeline.sim.api import ROUTE_TABLE, Call, RunningHubApi
from pipeline.sim.audit import Audit
from pipeline.sim.config import POLL_ROUTES, V2_CREATE_ROUTES, Faults, SimConfig
from pipeline.sim.envelopes import JSON_TYPE, Reply, code_name, dumps, html_error
from pipeline.sim.hostile import GARBAGE, HostileShapes, Send, after_work_answer, gzip_bomb
from pipeline.sim.model import Account, Clock, Service, WebhookRecord, key_fingerprint

log = logging.getLogger(__name__)

WORKFLOW_DIR = resources.sim_workflow_path("text2img.json").parent
TEXT2IMG_WORKFLOW_ID = "1904136902449209346"
IMG2IMG_WORKFLOW_ID = "1904136902449209347"
DEFAULT_WEBAPP_ID = "1877265245566922753"

TICK_REAL_S = 0.01  # webhook ticker period
SHUTDOWN_TIMEOUT_S = 2.0
START_TIMEOUT_S = 10.0
CLIENT_MAX_BODY_BYTES = 32 * 1024 * 1024
UPLOAD_CHUNK_BYTES = 256 * 1024
MAX_FIELD_CHARS = 4096  # a multipart text field is cut there

_PAD_CHUNK = b"x" * (1 << 20)  # oversized answers are streamed from this one buffer


@dataclass
class _Outcome:
    """What the post-faults made of a reply: how to send it and what to audit."""

    send: Send
    status_http: int | None
    code: Any
    faults: list[str]
    replaced: bool = False  # the answer is already a fault's: no hostile shape on top


class Simulator:
    """A local RunningHub on loopback. Use as a context manager, or ``serve_forever``."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.config = config = config if config is not None else SimConfig()
        config.validate()
        self.lock = threading.RLock()
        self.clock = Clock(config.time_scale, time.monotonic)
        self.service = Service(config, self.clock, self.lock)
        self.api = RunningHubApi(self.service, lambda: self.base_url)
        self._requests: list[tuple[Any, ...]] = []
        self.audit = Audit(self.service, self._requests)
        self.host = host
        self.port = port
        self._rate: dict[str, deque[float]] = {}
        self._key_fps: dict[str, str] = {}
        # its own RNG: a latency jitter never shifts which other faults are drawn
        self._rng_latency = random.Random(f"{config.seed}:latency")
        # (faults, routes they apply to, routes with pre-faults, routes with hostile-answer faults)
        self._faults_state: tuple[Faults, frozenset[str], frozenset[str], frozenset[str]] = (
            Faults(), frozenset(), frozenset(), frozenset())
        self.set_faults(config.faults)
        self.add_workflow(TEXT2IMG_WORKFLOW_ID, _load_json(WORKFLOW_DIR / "text2img.json"))
        self.add_workflow(IMG2IMG_WORKFLOW_ID, _load_json(WORKFLOW_DIR / "img2img.json"))
        self.add_webapp(DEFAULT_WEBAPP_ID, TEXT2IMG_WORKFLOW_ID)
        for workflow_id, spec in config.workflows.items():
            if isinstance(spec, dict):
                data = spec
            elif isinstance(spec, str | Path):
                data = _load_json(Path(spec))
            else:
                raise ConfigError(f"simulator workflow {workflow_id}: expected the path of an "
                                  f"API-format JSON file or an inline mapping, got {spec!r}")
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
        self._shapes = HostileShapes()

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

    def revoke(self, key: str) -> None:
        """Revoke ``key`` now: every later call with it answers 802 APIKEY_UNAUTHORIZED (v2:
        1002), polls of its own tasks included; the tasks themselves run on (thread-safe)."""
        account = self.account(key)
        with self.lock:
            account.revoked = True

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
        # close() never waits for a stall_s / trickle / oversized / latency wait to finish
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

    # -- dispatch --------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        for method, path, route, body, name in ROUTE_TABLE:
            handler = self._handler(route, getattr(self.api, name), body)
            if method == "GET":
                app.router.add_get(path, handler)  # (and HEAD)
            elif method == "POST":
                app.router.add_post(path, handler)
            else:
                app.router.add_route(method, path, handler)

    def _handler(self, route: str, logic: Callable[[Call], Reply], body: str) -> Any:
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

    def _latency_s(self, faults: Faults) -> float:
        """This answer's round trip in real seconds (``latency_s`` + a jitter draw)."""
        if faults.latency_jitter_s > 0:
            return faults.latency_s + self._rng_latency.uniform(0.0, faults.latency_jitter_s)
        return faults.latency_s

    async def _dispatch(self, route: str, logic: Callable[[Call], Reply], body_kind: str,
                        request: web.Request) -> web.StreamResponse:
        faults, fault_routes, pre_routes, hostile_routes = self._faults_state
        latency = self._latency_s(faults) if route in fault_routes else 0.0
        if route in pre_routes:
            pre = self._pre_fault(faults)
            if pre is not None:
                # the body is not read, but a Bearer or query key still names the caller
                key = _key_from({}, request)
                with self.lock:
                    self._record(request, route, self.clock.now(), key, pre[1], None, None, pre[0])
                if latency and await self._hold(request, latency):
                    return web.Response(status=200)
                return self._pre_fault_response(request, pre)
        try:
            return await self._answer(route, logic, body_kind, request, faults, fault_routes,
                                      route in hostile_routes, latency)
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            return web.Response(status=400)

    async def _answer(self, route: str, logic: Callable[[Call], Reply], body_kind: str,
                      request: web.Request, faults: Faults, fault_routes: frozenset[str],
                      hostile: bool, latency: float) -> web.StreamResponse:
        body, upload, bad_body = await self._read_body(body_kind, request)
        key = _key_from(body, request)
        with self.lock:
            now = self.clock.now()
            call = Call(route, body, key, now, request.match_info, upload, faults,
                        route in fault_routes)
            reply = self._process(call, logic, bad_body)
            outcome = self._post_faults(call, reply, hostile)
            slow = (faults.slow_answer > 0 and call.faulted
                    and self.service.rng_faults.random() < faults.slow_answer)
            if slow:
                outcome.faults.append("slow_answer")
            code = outcome.code
            self._record(request, route, now, key, outcome.status_http,
                         code if isinstance(code, int) else None, reply.task_id,
                         "+".join(outcome.faults) or None)

        for record in reply.deliver:
            self._spawn(self._deliver(record, manual=True))
        if latency and await self._hold(request, latency):
            return web.Response(status=200)
        send = outcome.send
        if slow:
            if send.kind == "normal":
                send.kind, send.wait_s = "stall", faults.slow_answer_s
            elif await self._hold(request, faults.slow_answer_s):
                return web.Response(status=200)
        return await self._send(request, send)

    async def _read_body(self, body_kind: str, request: web.Request
                         ) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
        """(the body's fields, the upload for multipart routes, whether the body was not a JSON
        object)."""
        if body_kind.startswith("multipart"):
            upload = await self._read_upload(request, keep=body_kind == "multipart+keep")
            return upload["fields"], upload, False
        if body_kind != "json":
            return {}, None, False
        raw = await request.read()
        if not raw:
            return {}, None, False
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return (parsed, None, False) if isinstance(parsed, dict) else ({}, None, True)

    def _process(self, call: Call, logic: Callable[[Call], Reply], bad_body: bool) -> Reply:
        """The route's answer before post-faults (caller holds the lock)."""
        faults, key = call.faults, call.key
        if (call.route in POLL_ROUTES and faults.poll_rate_limit_per_s > 0 and key
                and key in self.service.accounts and call.faulted
                and self._rate_limited(key, faults.poll_rate_limit_per_s)):
            return self.api.rate_limited(call)
        reply = self.api.gate(call, bad_body)
        if reply is not None:
            return reply
        try:
            return logic(call)
        except Exception:  # a simulator bug: answer like the service's catch-all
            log.exception("simulator error on %s", call.route)
            return self.api.internal_error(call.route)

    # -- post-faults: after-work and hostile answers ---------------------------------------------

    def _post_faults(self, call: Call, reply: Reply, hostile: bool) -> _Outcome:
        """Draw the faults of a processed request (caller holds the lock)."""
        faults, route = call.faults, call.route
        outcome = _Outcome(Send(status=reply.status_http, body=reply.body,
                                 content_type=reply.content_type),
                           reply.status_http, reply.code, [reply.fault] if reply.fault else [])
        created = reply.created if call.faulted else None
        if created is not None:
            rng = self.service.rng_faults
            v2 = route in V2_CREATE_ROUTES
            if faults.create_813 and rng.random() < faults.create_813:
                answer = json.loads(reply.body)
                if v2:
                    answer.update(errorCode="813", errorMessage=code_name(813))
                else:
                    answer = {"code": 813, "msg": code_name(813), "data": answer["data"]}
                reply.body = outcome.send.body = dumps(answer)
                reply.code = outcome.code = 813
                outcome.faults.append("create_813")
                created.faults.append("create_813")
            if faults.lost_create and rng.random() < faults.lost_create:
                outcome.send = Send(kind="drop")
                outcome.status_http, outcome.replaced = None, True
                outcome.faults.append("lost_create")
                created.faults.append("lost_create")
            if not outcome.replaced and faults.after_work and rng.random() < faults.after_work:
                mode = rng.choice(faults.modes())
                outcome.faults.append(f"after_work:{mode}")
                created.faults.append(f"after_work:{mode}")
                outcome.send, outcome.status_http, outcome.code = after_work_answer(
                    mode, reply, faults, redirect_to=self.base_url + "/", v2=v2)
                outcome.replaced = True
        if hostile and not outcome.replaced:
            shaped = self._shapes.draw(route, reply, outcome.send, faults, self.service.rng_faults)
            if shaped:
                outcome.faults.extend(shaped)
                if created is not None:
                    created.faults.extend(shaped)
                if outcome.send.kind == "gzip_bomb" or "deep_json" in shaped:
                    outcome.code = 0
        return outcome

    # -- pre-faults and the rate limit -----------------------------------------------------------

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
            return web.Response(body=GARBAGE, status=200, content_type=JSON_TYPE)
        assert status is not None
        return web.Response(text=html_error(status), status=status, content_type="text/html")

    def _rate_limited(self, key: str, per_s: float) -> bool:
        window = self._rate.setdefault(key, deque())
        real = time.monotonic()
        while window and window[0] <= real - 1.0:
            window.popleft()
        if len(window) >= per_s:
            return True
        window.append(real)
        return False

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

    async def _send(self, request: web.Request, send: Send) -> web.StreamResponse:
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
            return web.Response(body=body, status=200, content_type=JSON_TYPE,
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
            return await self._stream(request, send)
        finally:
            self._slow.pop(task, None)

    async def _stream(self, request: web.Request, send: Send) -> web.StreamResponse:
        """A ``trickle`` or ``oversized`` answer, written piece by piece."""
        response = web.StreamResponse(status=send.status, headers=send.headers or None)
        response.content_type = send.content_type
        try:
            if send.kind == "trickle":
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

    # -- reading uploads -------------------------------------------------------------------------

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
                    while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
                        size += len(chunk)
                        if size <= limit:
                            digest.update(chunk)
                            if keep:
                                kept.append(chunk)
                    info["file"] = {"filename": part.filename or "", "size": size,
                                    "sha256": digest.hexdigest(),
                                    "content": b"".join(kept) if keep and size <= limit else None}
                elif part.name:
                    info["fields"][part.name] = (await part.text())[:MAX_FIELD_CHARS]
        except (ValueError, aiohttp.ClientError, AssertionError):
            info["bad"] = True
        return info

    # -- webhook delivery ------------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_REAL_S)
            with self.lock:
                due = self.service.due_webhooks(self.clock.now(), self.api.event_data)
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


# -- small helpers ------------------------------------------------------------------------------


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


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load workflow {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"workflow {path}: expected an API-format JSON object")
    return data
