"""A built-in receiver for RunningHub's ``TASK_END`` webhooks: an early hint, never the authority.

``rhbatch run --webhook-listen HOST:PORT`` starts an HTTP server (loopback by default) whose only
route is ``/rhbatch/<token>/<attempt>``, with a fresh unguessable token per run and one more per
create attempt. Each task is created with ``webhookUrl`` pointing there (or at ``--webhook-url`` +
the same path, for a tunnel or proxy that forwards to the listener). A delivery makes the run poll
that task's ``outputs`` at once; the outputs answer decides the row's state, so a lost, repeated,
late or forged webhook changes nothing but how soon a task's end is noticed.

The attempt part is what reconciles a create that ended in doubt: the delivery to that attempt's
URL names the task that create made, so once a poll under the run's key confirms the task exists,
the row follows it instead of waiting in SUBMIT_UNKNOWN (and it is never resent). ``eventData``
may be a JSON string (v1) or an object (v2); only ``taskId`` is used.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from aiohttp import web

from pipeline.client import NOT_JSON, parse_json
from pipeline.errors import UsageError

log = logging.getLogger("rhbatch.webhooks")
PATH_PREFIX = "/rhbatch/"
MAX_BODY_BYTES = 4 << 20


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise UsageError(f"--webhook-listen {text!r} is not HOST:PORT: write e.g. 127.0.0.1:8787")
    return host or "127.0.0.1", int(port)


class WebhookReceiver:
    """Accepts TASK_END deliveries and passes each task id to ``on_task_end``."""

    def __init__(self, host: str, port: int, on_task_end: Callable[..., object]):
        self.host = host
        self.port = port
        self.on_task_end = on_task_end
        self.token = secrets.token_urlsafe(24)
        self.deliveries = 0
        self.rejected = 0
        self._runner: web.AppRunner | None = None

    @property
    def path(self) -> str:
        return PATH_PREFIX + self.token

    def url(self, public_base: str | None = None) -> str:
        base = public_base.rstrip("/") if public_base else f"http://{self.host}:{self.port}"
        return base + self.path

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(self.path, self._handle)
        app.router.add_post(self.path + "/{attempt}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UsageError(
                f"--webhook-listen {self.host}:{self.port}: cannot listen there ({exc.strerror}): "
                "choose another port"
            ) from None
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            if body is NOT_JSON:
                raise ValueError("not strict JSON")
        except (ValueError, UnicodeDecodeError):
            self.rejected += 1
            return web.json_response({"ok": False, "error": "not JSON"}, status=400)
        task_id = body.get("taskId") if isinstance(body, dict) else None
        if not task_id:
            event = body.get("eventData") if isinstance(body, dict) else None
            if isinstance(event, str):
                event = parse_json(event)
            task_id = event.get("taskId") if isinstance(event, dict) else None
        if isinstance(task_id, bool) or not isinstance(task_id, str | int):
            task_id = None
        if not task_id:
            self.rejected += 1
            return web.json_response({"ok": False, "error": "no taskId"}, status=400)
        self.deliveries += 1
        attempt = request.match_info.get("attempt")
        known = self.on_task_end(str(task_id), attempt) if attempt else self.on_task_end(str(task_id))
        log.debug("webhook for task %s (%s)", task_id, "ours" if known else "not live")
        return web.json_response({"ok": True})
