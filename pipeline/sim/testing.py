"""Helpers for tests that drive the simulator over real HTTP (no pytest import here).

- :class:`SimClient`: a small synchronous httpx client bound to one simulator and one key.
- :class:`WebhookRecorder`: a loopback HTTP server that records webhook deliveries and answers
  with scripted status codes or delays (rhbatch's own receiver is a different thing:
  :class:`pipeline.webhooks.WebhookReceiver`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from pipeline.sim.server import TEXT2IMG_WORKFLOW_ID, Simulator

CLIENT_TIMEOUT_S = 10.0


class SimClient:
    """``post`` any route with the key in the body (default), as Bearer, or not at all."""

    def __init__(self, sim: Simulator, key: str, *, timeout_s: float = CLIENT_TIMEOUT_S):
        self.sim = sim
        self.key = key
        self.http = httpx.Client(base_url=sim.base_url, timeout=timeout_s)

    def __enter__(self) -> SimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, body: dict[str, Any] | None = None, *, key_field: str | None = "apiKey",
             bearer: bool = False, key: str | None = None) -> dict[str, Any]:
        payload = dict(body or {})
        use = key if key is not None else self.key
        if key_field:
            payload[key_field] = use
        headers = {"Authorization": f"Bearer {use}"} if bearer else {}
        response = self.http.post(path, json=payload, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def create(self, nodes: Iterable[tuple[str, str, Any]] = (), *, workflow_id: str = TEXT2IMG_WORKFLOW_ID,
               **extra: Any) -> dict[str, Any]:
        body = {"workflowId": workflow_id,
                "nodeInfoList": [{"nodeId": n, "fieldName": f, "fieldValue": v} for n, f, v in nodes]}
        body.update(extra)
        return self.post("/task/openapi/create", body)

    def task_id(self, nodes: Iterable[tuple[str, str, Any]] = (), **extra: Any) -> str:
        answer = self.create(nodes, **extra)
        assert answer["code"] == 0, answer
        return str(answer["data"]["taskId"])

    def outputs(self, task_id: str) -> dict[str, Any]:
        return self.post("/task/openapi/outputs", {"taskId": task_id})

    def status(self, task_id: str) -> dict[str, Any]:
        return self.post("/task/openapi/status", {"taskId": task_id})

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.post("/task/openapi/cancel", {"taskId": task_id})

    def account(self) -> dict[str, Any]:
        return self.post("/uc/openapi/accountStatus", key_field="apikey")

    def wait_outputs(self, task_id: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Poll outputs until the task is no longer queued or running."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.outputs(task_id)
            if answer["code"] not in (804, 813) or time.monotonic() > deadline:
                return answer
            time.sleep(0.01)


class WebhookRecorder:
    """Record POSTed JSON bodies; answer ``statuses`` in turn (then ``default_status``)."""

    def __init__(self, *, statuses: Iterable[int] = (), default_status: int = 200, delay_s: float = 0.0):
        self.received: list[dict[str, Any]] = []
        self.statuses = list(statuses)
        self.default_status = default_status
        self.delay_s = delay_s
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"raw": raw.decode("utf-8", "replace")}
                with receiver._cond:
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    delay = receiver.delay_s
                if delay:
                    time.sleep(delay)
                with receiver._cond:
                    receiver.received.append(body)
                    receiver._cond.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the simulator gave up waiting
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Block until ``count`` deliveries arrived (or the timeout); return them all."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout_s)
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> WebhookRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
