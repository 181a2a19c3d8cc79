"""The answers faults send instead of, or on top of, the real one: after-work replacements of an
accepted create's answer (``Faults.after_work``) and the hostile shapes (``nan_counts``,
``control_chars``, ``trickle``, ``oversized``, ``gzip_bomb``, ``deep_json``).

:class:`Send` says how an answer leaves the server; :mod:`pipeline.sim.server` draws the faults
and sends it. The bodies are built here: a gzip bomb that never exists inflated, a deeply
nested JSON array, an envelope padded inside its ``msg`` string, service text carrying
terminal control sequences and a forged log line.
"""

from __future__ import annotations

import json
import math
import random
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pipeline.sim.config import CONTROL_INJECTION, Faults
from pipeline.sim.envelopes import JSON_TYPE, Reply, code_name, dumps, html_error, v2_flat

#: What ``garbage_body`` and ``after_work:garbage`` answer: a cut v1 envelope (v2: a cut object).
GARBAGE = b'{"code":0,"msg":"success","data":{"taskId":"19'
GARBAGE_V2 = b'{"taskId":"19'

# The answers after_work's code_* modes send: (code, msg, keeps the created task's data).
_AFTER_WORK_V1 = {
    "code_500": (500, "UNKNOWN_ERROR", False),
    "code_500_task": (500, "UNKNOWN_ERROR", True),
    "code_1005": (1005, "server error", False),
    "code_null": (None, "success", True),
    "code_text": ("0.0", "success", True),
    "code_unknown": (999, code_name(999), False),
}
# ... and on a v2 create: (errorCode, errorMessage, keeps the created task's flat object).
_AFTER_WORK_V2 = {
    "code_500": ("500", "UNKNOWN_ERROR", False),
    "code_500_task": ("500", "UNKNOWN_ERROR", True),
    "code_1005": ("1005", "server error", False),
    "code_null": (None, "", True),
    "code_text": ("0.0", "", True),
    "code_unknown": ("999", code_name(999), False),
}


@dataclass
class Send:
    """How an answer leaves the simulator (see :meth:`pipeline.sim.server.Simulator._send`).

    ``kind``: ``normal`` (``body`` at once), ``drop`` (socket closed, nothing sent), ``truncated``
    (the full Content-Length announced, half of ``body`` sent, socket closed), ``stall`` (``body``
    after ``wait_s`` real seconds), ``trickle`` (one byte of ``body`` per ``wait_s``), ``oversized``
    (``head`` + ``size`` padding bytes + ``tail``, streamed) or ``gzip_bomb`` (a gzip body that
    inflates to ``size`` bytes).
    """

    kind: str = "normal"
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    wait_s: float = 0.0
    size: int = 0
    head: bytes = b""
    tail: bytes = b""


def after_work_answer(mode: str, reply: Reply, faults: Faults, *, redirect_to: str,
                      v2: bool = False) -> tuple[Send, int | None, Any]:
    """The answer that replaces an accepted create's: (how to send it, HTTP status, code).
    On a v2 create (``v2``) the ``code_*`` modes set the flat answer's ``errorCode``;
    ``redirect`` points at ``redirect_to``."""
    answer = json.loads(reply.body)
    data = answer if v2 else answer.get("data")
    if mode.startswith("http_"):
        status = int(mode.removeprefix("http_"))
        return Send(status=status, body=html_error(status).encode(),
                    content_type="text/html"), status, None
    if mode == "redirect":
        return Send(status=302, headers={"Location": redirect_to}, content_type=""), 302, None
    if mode in ("truncated", "stall", "trickle"):
        wait = faults.stall_s if mode == "stall" else faults.trickle_interval_s
        return Send(kind=mode, body=reply.body, wait_s=wait), 200, reply.code
    if mode == "drop":
        return Send(kind="drop"), None, None
    if mode == "garbage":
        return Send(body=GARBAGE_V2 if v2 else GARBAGE), 200, None
    if v2:
        error_code, message, keep = _AFTER_WORK_V2[mode]
        flat = dict(data) if keep else v2_flat("", "")
        flat.update(errorCode=error_code, errorMessage=message)
        audit_code = int(error_code) if error_code and error_code.isdigit() else None
        return Send(body=dumps(flat)), 200, audit_code
    code, msg, keep = _AFTER_WORK_V1[mode]
    return Send(body=dumps({"code": code, "msg": msg, "data": data if keep else None})), 200, code


class HostileShapes:
    """The hostile-answer faults; keeps the turn of ``nan_counts_style`` "both"."""

    def __init__(self) -> None:
        self._nan_turn = 0

    def draw(self, route: str, reply: Reply, send: Send, faults: Faults, rng: random.Random
             ) -> list[str]:
        """Draw the hostile-answer faults for a processed request from ``rng``; rewrite ``send``
        in place; return the names of those that hit."""
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
        if not any(rate for _, rate in shapes):
            return hit
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
            send.kind, send.status, send.content_type = "oversized", 200, JSON_TYPE
            send.size = max(0, faults.oversized_bytes - len(send.head) - len(send.tail))
        elif name == "gzip_bomb":
            send.kind, send.size = "gzip_bomb", faults.gzip_bomb_bytes
        else:
            send.status, send.content_type = 200, JSON_TYPE
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
        return dumps(answer)  # json.dumps writes a float NaN as the bare token NaN


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
        return ",".join(f"{json.dumps(k)}:{dumps(v).decode()}" for k, v in pairs if k != "msg")

    before, after = join(items[:at]), join(items[at:])
    msg_open = dumps(msg if isinstance(msg, str) else "").decode()[:-1]  # without its closing quote
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
    return dumps(answer)
