"""The only module that speaks HTTP to RunningHub.

Every answer is read from its body: business errors arrive as HTTP 200 with a non-zero ``code``
(runninghub-api.md §2.5), and each code is classified by :func:`pipeline.errors.classify`.

Every exchange is bounded: a total deadline covers connect, send and the whole answer
(``Settings.request_deadline_s``), and an answer is read at most :data:`API_MAX_BYTES` after
decompression, so a trickling gateway, a 200 MB page or a gzip bomb ends as one clear error.
Answers are parsed strictly: no NaN or Infinity, no nesting deep enough to crash the parser.

Retries follow one :class:`RetryPolicy`: bounded by attempts and total time, exponential with full
jitter, ``Retry-After`` honoured up to a cap, only for errors marked transient. The API calls run it
as a plain loop (:meth:`RetryPolicy.call`); :meth:`RetryPolicy.retrying` is the same policy as a
tenacity object, for callers that want one (downloads).
``create`` is the exception that shapes everything: RunningHub has no idempotency key and bills every
accepted task. What a create's answer means is decided in one place, :func:`interpret_create`, by the
rules of :data:`CREATE_RULES` (the README prints the same table): a create is resent only when the
request provably never left this machine; everything that is neither a task id nor a refusal the
service states in its own envelope is :class:`SubmitUnknownError`, never resent automatically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import random
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
    CODES,
    AnswerTooLarge,
    ApiConnectionError,
    ApiError,
    CapacityError,
    Kind,
    RouteMissing,
    RunFatalError,
    SubmitUnknownError,
    TransientApiError,
    api_error_for,
    classify,
)
from pipeline.safetext import clean_text, clip
from pipeline.store import Cost

_orjson: Any
try:  # optional: the standard library's json gives the same answers, at a few times the CPU
    import orjson as _orjson
except ImportError:  # pragma: no cover - where no orjson wheel exists
    _orjson = None

if TYPE_CHECKING:
    from pipeline.transport import AiohttpTransport

log = logging.getLogger("rhbatch.client")
T = TypeVar("T")

CREATE_PATH = "/task/openapi/create"
APP_RUN_PATH = "/task/openapi/ai-app/run"
OUTPUTS_PATH = "/task/openapi/outputs"
CANCEL_PATH = "/task/openapi/cancel"
ACCOUNT_PATH = "/uc/openapi/accountStatus"
UPLOAD_PATH = "/task/openapi/upload"
WORKFLOW_JSON_PATH = "/api/openapi/getJsonApiFormat"
V2_QUERY_PATH = "/openapi/v2/query"
V2_RUN_WORKFLOW_PATH = "/openapi/v2/run/workflow/{}"
V2_RUN_APP_PATH = "/openapi/v2/run/ai-app/{}"
V2_UPLOAD_PATH = "/openapi/v2/media/upload/binary"
V2_QUEUE_PATH = "/openapi/v2/queue/status"
#: ``--api``: which generation creates and reads. ``auto`` creates on v1 and reads with v2 query,
#: and moves creates to v2 when the key's v1 task routes are gone (see RunningHubClient.detect).
APIS = ("auto", "v1", "v2")
# v2 task states as rhbatch names them (CREATE is a task not yet queued).
V2_STATES = {"CREATE": "QUEUED", "QUEUED": "QUEUED", "RUNNING": "RUNNING", "SUCCESS": "SUCCESS",
             "FAILED": "FAILED", "CANCEL": "FAILED", "CANCELLED": "FAILED"}
# A task id that arrives as a bare JSON number above 2**53 may have lost its last digits on the way
# (runninghub-api-2026.md: a JavaScript layer); such an id is kept, flagged, and never matched.
EXACT_JSON_INT = 2**53

# HTTP statuses after which a *poll* is simply asked again (a create is never resent on them).
RETRY_HTTP = frozenset({429, 503})
# The largest API answer read, after decompression: real answers are a few KiB (an outputs list of
# a few hundred files is well under 1 MiB). Downloads have their own cap (download.py).
API_MAX_BYTES = 8 * 2**20
# Stored text from the service (messages, failure reasons) is cut to this many characters.
MAX_STORED_TEXT = 4000
# Connections kept to RunningHub, whatever --concurrency is. Requests are short, so a few keep-alive
# connections carry thousands of live tasks; a pool sized to the concurrency made every request pay
# httpcore's per-request scan of all connections (quadratic in the pool size, a syscall per idle
# connection): 60 connections cost ~0.6 ms of CPU per request, 1,000 would cost tens of ms.
HTTP_MAX_CONNECTIONS = 16
# aiohttp's pool has no such scan: enough connections for the polls and creates that a far
# service keeps in flight (a wave of ends of 1,000 slots at a 200 ms round trip: about 60 polls
# and 32 creates).
AIOHTTP_MAX_CONNECTIONS = 96
TASK_OPTION_FIELDS = ("addMetadata", "instanceType", "usePersonalQueue", "retainSeconds", "webhookUrl")


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

    async def call(self, attempt: Callable[[], Awaitable[T]],
                   predicate: Callable[[BaseException], bool], what: str) -> T:
        """``attempt()`` under the policy: again while ``predicate`` says its error is worth
        another try, within ``max_attempts`` and ``max_total_s``; the last error is raised as
        it is. A plain loop: the API calls' hot path pays nothing for the policy until a retry."""
        started = time.monotonic()
        number = 1
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if (not predicate(exc) or number >= self.max_attempts
                        or time.monotonic() - started >= self.max_total_s):
                    raise
                # one line per retry only in the debug log: during an outage the runner reports
                # once a minute instead of thousands of identical warnings
                log.debug("%s failed (attempt %d of %d), retrying: %s", what, number,
                          self.max_attempts, redact(exc))
                await self.sleep(self.wait_s(number, exc))
                number += 1

    def retrying(self, predicate: Callable[[BaseException], bool], what: str) -> AsyncRetrying:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.wait_s(state.attempt_number, exc)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            # one line per retry only in the debug log: during an outage the runner reports once
            # a minute instead of thousands of identical warnings
            log.debug(
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
    return isinstance(exc, ApiConnectionError) and not exc.sent


# -- reading an answer ----------------------------------------------------------------------

NOT_JSON: Any = object()  # the body is not strict JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _parse_json_stdlib(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return NOT_JSON


# An integer of 20 digits (or a negative one of 19) may lie outside 64 bits, where orjson reads a
# float and the standard library an exact int: such a body is read by the standard library.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_WIDE_POSITIVE, _WIDE_NEGATIVE = b"0" * 20, b"-" + b"0" * 19
_WIDE_NUMBER_TEXT = re.compile(r"\d{20}|-\d{19}")
# orjson reads 1,024 levels deep, the standard library as deep as the call stack allows (often
# fewer): a body with more brackets than this (a few per output file) is read by the latter
_ORJSON_MAX_OPEN = 256
# what orjson encodes itself: plain values only; subclasses, dataclasses and dates are refused
_ORJSON_PLAIN = 0 if _orjson is None else (
    _orjson.OPT_PASSTHROUGH_SUBCLASS | _orjson.OPT_PASSTHROUGH_DATACLASS
    | _orjson.OPT_PASSTHROUGH_DATETIME)


def parse_json(body: bytes | str) -> Any:
    """Strict JSON (RFC 8259): no NaN/Infinity, no overflowing floats; :data:`NOT_JSON` for
    anything else, including nesting too deep for the parser.

    The result is always the standard library's (``json.loads`` with those rules): orjson reads
    the body first where it is installed, and whatever orjson refuses (a BOM, UTF-16, a lone
    surrogate, NaN, a float past the double range) or might read differently (an integer past
    64 bits, nesting deep enough for the standard library to refuse) is read by the standard
    library, which decides."""
    if _orjson is not None:
        if isinstance(body, bytes):
            digits = body.translate(_DIGITS_AS_ZERO)  # a C loop: a regex scan costs 10x more
            plain = (_WIDE_POSITIVE not in digits and _WIDE_NEGATIVE not in digits
                     and body.count(b"[") + body.count(b"{") <= _ORJSON_MAX_OPEN)
        else:
            plain = _WIDE_NUMBER_TEXT.search(body) is None and (
                body.count("[") + body.count("{") <= _ORJSON_MAX_OPEN)
        if plain:
            try:
                return _orjson.loads(body)
            except _orjson.JSONDecodeError:
                pass
    return _parse_json_stdlib(body)


def dump_json(value: Any) -> bytes:
    """A request body: compact UTF-8 JSON that reads back to the same values as
    ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)`` (a float
    may be spelled differently: 1e-5 for 1e-05). orjson encodes where it is installed; what it
    refuses (non-str keys, ints past 64 bits, str/int/float subclasses, dataclasses, dates,
    nesting past 254) and any body with a ``null`` (orjson writes NaN as null) is encoded by the
    standard library, which raises where it always did."""
    if _orjson is not None:
        try:
            out = _orjson.dumps(value, option=_ORJSON_PLAIN)
        except _orjson.JSONEncodeError:
            pass
        else:
            if b"null" not in out:
                return out
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Answer:
    """One HTTP answer, read whole (bounded) and decoded; ``headers`` look names up in any case."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    _parsed: Any = field(default=None, repr=False)

    def json(self) -> Any:
        if self._parsed is None:
            self._parsed = parse_json(self.body) if self.body else NOT_JSON
        return self._parsed


async def _read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The raw (still encoded) body, refused past ``cap``; None when the transport already read
    and decoded it (httpx.MockTransport in tests), so ``response.content`` is the body."""
    if response.is_stream_consumed:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > cap:
            raise AnswerTooLarge(f"answer over {cap} bytes", request=response.request)
        chunks.append(chunk)
    return b"".join(chunks)


def _inflate(data: bytes, wbits: int, cap: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = [inflater.decompress(data, cap + 1)]
    size = len(out[0])
    while inflater.unconsumed_tail and size <= cap:
        piece = inflater.decompress(inflater.unconsumed_tail, cap + 1 - size)
        out.append(piece)
        size += len(piece)
    if size > cap:
        raise AnswerTooLarge(f"answer inflates past {cap} bytes")
    return b"".join(out)


def _decode(raw: bytes, encoding: str | None, cap: int) -> bytes:
    """``raw`` decoded by its Content-Encoding, never past ``cap`` bytes (a bomb stops there)."""
    for name in reversed([e.strip().lower() for e in (encoding or "").split(",") if e.strip()]):
        if name == "identity":
            continue
        try:
            if name in ("gzip", "x-gzip"):
                raw = _inflate(raw, zlib.MAX_WBITS | 16, cap)
            elif name == "deflate":
                try:
                    raw = _inflate(raw, zlib.MAX_WBITS, cap)
                except zlib.error:  # raw deflate without the zlib header, as some servers send
                    raw = _inflate(raw, -zlib.MAX_WBITS, cap)
            else:
                raise ValueError(f"unsupported Content-Encoding {name!r}")
        except zlib.error as exc:
            raise ValueError(f"a {name} body that does not decompress: {exc}") from None
    return raw


def _int_code(envelope: dict[str, Any]) -> int | None:
    """The envelope's ``code`` when it is a JSON integer (or digits), else None."""
    code = envelope.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().isdigit():
        return int(code.strip())
    return None


def redirect_advice(base_url: str, status: int, location: str | None) -> str:
    """The fix for an HTTP 3xx: rhbatch never follows redirects (a create must not be re-sent)."""
    target = clean_text(location or "", 200)
    if base_url.startswith("http://") and target.startswith("https://"):
        https = "https://" + base_url[len("http://"):]
        return (f"RunningHub answered HTTP {status}, redirecting to https: set RUNNINGHUB_BASE_URL "
                f"(or --base-url) to {https}")
    where = f" to {target}" if target else ""
    return (f"RunningHub answered HTTP {status}, a redirect{where}: rhbatch does not follow "
            "redirects; set RUNNINGHUB_BASE_URL (or --base-url) to the API's own address, e.g. "
            "https://www.runninghub.ai")


# -- what a create's answer means ------------------------------------------------------------


class CreateOutcome(enum.Enum):
    RESEND = "resend"  # provably never left this machine
    CREATED = "created"  # a task id came back
    WAIT = "wait"  # refused for capacity: nothing was made
    ROW_FAILED = "row_failed"  # refused: this row is wrong
    RUN_STOPPED = "run_stopped"  # refused: credentials or money
    UNKNOWN = "unknown"  # maybe created and billed


def _code_list(kind: Kind) -> str:
    codes = sorted(c for c, known in CODES.items() if known.kind is kind)
    parts: list[str] = []
    run: list[int] = []
    for code in [*codes, None]:
        if code is not None and run and code == run[-1] + 1:
            run.append(code)
            continue
        if run:
            parts.append(f"{run[0]}–{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
        run = [] if code is None else [code]
    return ", ".join(parts)


REFUSALS: dict[Kind, CreateOutcome] = {
    Kind.CAPACITY: CreateOutcome.WAIT,
    Kind.ROW_FATAL: CreateOutcome.ROW_FAILED,
    Kind.RUN_FATAL: CreateOutcome.RUN_STOPPED,
}
_UNKNOWN_DOES = "`SUBMIT_UNKNOWN`: the task may exist and be billed; never resent automatically"


@dataclass(frozen=True)
class CreateRule:
    what: str  # what came back
    does: str  # what rhbatch does
    outcome: CreateOutcome


#: The one create-outcome rule, first match wins. The README's table "What a create's answer
#: means" is this list (a test compares them); :func:`create_rule` implements it.
CREATE_RULES: tuple[CreateRule, ...] = (
    CreateRule("No connection could be made: refused, name not resolved, TLS handshake failed, "
               "connect or pool timeout (no byte of the request was written)",
               "resent under the retry policy; when it runs out the row stays `PENDING` and the "
               "run stops (exit 3)", CreateOutcome.RESEND),
    CreateRule("Any answer that parses and carries `data.taskId`, whatever its `code` (0, 813, "
               "500, `null`, `\"0.0\"`) or HTTP status",
               "created: the task id is recorded at once and polled, never resent",
               CreateOutcome.CREATED),
    CreateRule(f"A RunningHub envelope with a capacity code: {_code_list(Kind.CAPACITY)}",
               "refused, nothing was made: the row waits for a free slot and is sent again",
               CreateOutcome.WAIT),
    CreateRule(f"An envelope with a row-fatal code: {_code_list(Kind.ROW_FATAL)}",
               "refused: the row is `FAILED` with the code (433 keeps ComfyUI's `node_errors`); "
               "the other rows go on", CreateOutcome.ROW_FAILED),
    CreateRule(f"An envelope with a run-fatal code: {_code_list(Kind.RUN_FATAL)}",
               "refused: the row stays `PENDING` and the run stops (exit 3) with the fix",
               CreateOutcome.RUN_STOPPED),
    CreateRule("Code 0 without a taskId; a code meaning server error or one not listed above "
               "(500, 1005, 1013, 804, 805, 807, ...); a code that is not an integer",
               _UNKNOWN_DOES, CreateOutcome.UNKNOWN),
    CreateRule("Any other HTTP status without a refusal envelope: 429, 5xx, 4xx, a 3xx redirect",
               _UNKNOWN_DOES + "; a redirect or 401/403 also stops the run with the fix",
               CreateOutcome.UNKNOWN),
    CreateRule("A body that is not JSON or not an object, an answer cut short or over "
               f"{API_MAX_BYTES >> 20} MiB, no complete answer within the request deadline, a "
               "connection dropped after the request was written", _UNKNOWN_DOES,
               CreateOutcome.UNKNOWN),
)


def _created_task_id(parsed: dict[str, Any]) -> str | None:
    """The task id a create answer carries: ``data.taskId`` on v1, ``taskId`` on v2's flat one."""
    if "code" in parsed or "data" in parsed:
        return _task_id(parsed.get("data"))
    return _task_id(parsed)


def _answer_code(parsed: dict[str, Any]) -> int | None:
    """The business code: v1 ``code`` (an integer), v2 ``errorCode`` (digits; "" means none)."""
    if "code" in parsed or "errorCode" not in parsed:
        return _int_code(parsed)
    value = parsed.get("errorCode")
    if value == "":
        return 0
    return _int_code({"code": value})


def _task_id(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    value = data.get("taskId")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def create_rule(answer: Answer | None, error: ApiConnectionError | None) -> int:
    """The index in :data:`CREATE_RULES` of the rule that decides this create's outcome."""
    if answer is None:
        assert error is not None
        return 0 if not error.sent else 7
    parsed = answer.json()
    if isinstance(parsed, dict):
        if _created_task_id(parsed) is not None:
            return 1
        code = _answer_code(parsed)
        if code is not None and code in CODES:
            outcome = REFUSALS.get(classify(code))
            if outcome is not None:
                return [r.outcome for r in CREATE_RULES].index(outcome)
        if answer.status == 200:
            return 5
    return 6 if answer.status != 200 else 7


def interpret_create(answer: Answer | None, error: ApiConnectionError | None, *,
                     base_url: str) -> Submitted:
    """Apply :data:`CREATE_RULES`: a :class:`Submitted`, or the error that says what happened."""
    rule = CREATE_RULES[create_rule(answer, error)]
    if rule.outcome is CreateOutcome.RESEND:
        assert error is not None
        raise error
    if answer is None:
        raise SubmitUnknownError(
            f"create was sent but no usable answer came back ({error}); the task may exist and "
            "be billed, so it is not resent automatically"
        )
    parsed = answer.json()
    v2 = isinstance(parsed, dict) and "code" not in parsed and "data" not in parsed
    if rule.outcome is CreateOutcome.CREATED:
        data = parsed if v2 else parsed["data"]
        task_id = _created_task_id(parsed)
        assert task_id is not None
        status = str(data.get("status" if v2 else "taskStatus") or "QUEUED").upper()
        if status not in ("QUEUED", "RUNNING", "FAILED", "SUCCESS"):
            status = "QUEUED"
        tips = parse_prompt_tips(data.get("promptTips"))
        code = _answer_code(parsed)
        message = parsed.get("errorMessage" if v2 else "msg", "")
        return Submitted(task_id, status, tips, code if code is not None else 0,
                         clean_text(message or "", 500))
    if rule.outcome in (CreateOutcome.WAIT, CreateOutcome.ROW_FAILED, CreateOutcome.RUN_STOPPED):
        code = _answer_code(parsed)
        assert code is not None
        message = parsed.get("errorMessage" if v2 else "msg", "")
        data = parsed if v2 else parsed.get("data")
        raise api_error_for(code, clean_text(message or "", 500), data, where="create",
                            base_url=base_url)
    # unknown: say what came back, and stop the run where every later create would fare the same
    http_status = answer.status
    stop: str | None = None
    if isinstance(parsed, dict) and http_status == 200:
        raw_code = parsed.get("code", parsed.get("errorCode"))
        what = (f"code {clean_text(json.dumps(raw_code), 40)}" if _answer_code(parsed) is None
                else f"code {clean_text(json.dumps(raw_code), 40)} without a taskId")
    elif http_status != 200:
        what = f"HTTP {http_status}"
        if 300 <= http_status < 400:
            stop = redirect_advice(base_url, http_status, answer.headers.get("location"))
        elif http_status in (401, 403):
            stop = f"RunningHub refused the key (HTTP {http_status}): check RUNNINGHUB_API_KEY"
    else:
        what = f"a body that is not a JSON envelope ({len(answer.body)} bytes)"
    raise SubmitUnknownError(
        f"create answered {what}, which does not say whether a task was made; the task may "
        "exist and be billed, so it is not resent automatically", stop_run=stop,
    )


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
    cost: Cost | None = None  # when the answer carried it (v2 query's usage)


@dataclass(frozen=True)
class AccountStatus:
    remain_coins: float | None
    current_task_counts: int
    api_type: str | None
    remain_money: float | None = None
    currency: str | None = None


def _num(value: Any) -> float | None:
    """A number the service sent as a number or a string; None for null, "", NaN or Infinity."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


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
        fast = transport is None and settings.http_transport == "aiohttp"
        limit = max_connections or (AIOHTTP_MAX_CONNECTIONS if fast else HTTP_MAX_CONNECTIONS)
        self.max_connections = limit  # requests that can be in flight at once
        # the JSON calls go straight to aiohttp's pool (transport.py); the rest through httpx
        self._fast: AiohttpTransport | None = None
        if fast:
            from pipeline.transport import AiohttpTransport

            transport = self._fast = AiohttpTransport(max_connections=limit)
            self._fast_headers = {"Authorization": f"Bearer {self._key}", "User-Agent": "rhbatch",
                                  "Accept-Encoding": "gzip, deflate",
                                  "Content-Type": "application/json"}
            self._fast_timeout = AiohttpTransport.timeouts(
                connect_s=settings.connect_timeout_s, read_s=settings.read_timeout_s,
                pool_s=settings.read_timeout_s)
            base = httpx.URL(settings.base_url)
            self._fast_proxy = self._fast.proxy_for(base.scheme, base.host)
        self._http = httpx.AsyncClient(
            base_url=settings.base_url,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            headers={"Authorization": f"Bearer {self._key}", "User-Agent": "rhbatch",
                     # only encodings rhbatch decodes itself, with a bound (_decode)
                     "Accept-Encoding": "gzip, deflate"},
            transport=transport,
            follow_redirects=False,
        )
        self.deadline_s = settings.request_deadline_s
        self.requests_sent = 0
        # which generation creates and which reads; ``detect`` settles "auto" from the service
        self.api = settings.api
        self.create_api = "v2" if settings.api == "v2" else "v1"
        self.read_api = "v1" if settings.api == "v1" else "v2"

    async def __aenter__(self) -> RunningHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the exchange -----------------------------------------------------------------------

    async def _exchange(self, path: str, *, method: str = "POST", **request: Any) -> Answer:
        """One request (POST unless ``method``) within the request deadline; the answer read
        whole, bounded and decoded.

        Raises :class:`ApiConnectionError` whose ``sent`` is False only when no byte of the
        request can have reached the service (no connection could be made).
        """
        self.requests_sent += 1
        fast = self._fast is not None and request.keys() <= {"json"}
        response: httpx.Response | None = None
        raw: bytes | None
        headers: Mapping[str, str]
        try:
            async with asyncio.timeout(self.deadline_s):
                if fast:
                    assert self._fast is not None
                    body = dump_json(request["json"]) if "json" in request else None
                    status, headers, raw = await self._fast.send(
                        method, self.base_url + path, body, self._fast_headers,
                        self._fast_timeout, max_bytes=API_MAX_BYTES, proxy=self._fast_proxy)
                else:
                    built = self._http.build_request(method, path, **request)
                    built.extensions["rhbatch_max_bytes"] = API_MAX_BYTES  # aiohttp stops there
                    response = await self._http.send(built, stream=True)
                    try:
                        raw = await _read_capped(response, API_MAX_BYTES)
                    finally:
                        await response.aclose()
                    status, headers = response.status_code, response.headers
        except TimeoutError:
            raise ApiConnectionError(
                f"{path}: no complete answer within the {self.deadline_s:g} s request deadline",
                sent=True,
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ApiConnectionError(
                f"could not connect to {self.base_url}: {type(exc).__name__}", sent=False
            ) from None
        except AnswerTooLarge:
            raise ApiConnectionError(
                f"{path}: the answer is larger than {API_MAX_BYTES >> 20} MiB and was not read",
                sent=True,
            ) from None
        except httpx.HTTPError as exc:
            # The request may have reached the service: read timeout, reset, protocol error.
            detail = clean_text(redact(str(exc)), 200) or type(exc).__name__
            raise ApiConnectionError(f"{path}: {type(exc).__name__}: {detail}", sent=True) from None
        try:
            if raw is None:  # read and decoded by the transport (httpx.MockTransport in tests)
                assert response is not None
                content = response.content
            else:
                encoding = headers.get("content-encoding")
                content = _decode(raw, encoding, API_MAX_BYTES) if encoding else raw
            if len(content) > API_MAX_BYTES:
                raise AnswerTooLarge("answer too large")
        except AnswerTooLarge:
            raise ApiConnectionError(
                f"{path}: the answer inflates past {API_MAX_BYTES >> 20} MiB and was not read",
                sent=True,
            ) from None
        except ValueError as exc:
            raise ApiConnectionError(f"{path}: the answer could not be decoded ({exc})",
                                     sent=True) from None
        return Answer(status, headers, content)

    async def _post(self, path: str, body: dict[str, Any], *, key_field: str = "apiKey") -> Any:
        """POST once; return the parsed envelope or raise a classified error (polls and reads)."""
        answer = await self._exchange(path, json={key_field: self._key, **body})
        return self._envelope(path, answer)

    def _envelope(self, path: str, answer: Answer) -> dict[str, Any]:
        status = answer.status
        parsed = answer.json()
        if status != 200:
            if isinstance(parsed, dict) and _int_code(parsed) not in (None, 0):
                return parsed  # a RunningHub envelope on an error status: its code decides
            retry_after = _num(answer.headers.get("Retry-After"))
            if 300 <= status < 400:
                raise RunFatalError(redirect_advice(self.base_url, status,
                                                    answer.headers.get("location")))
            if status in (401, 403):
                raise RunFatalError(
                    f"RunningHub refused the key (HTTP {status}): check RUNNINGHUB_API_KEY"
                )
            raise ApiConnectionError(f"{path}: HTTP {status}", sent=status not in RETRY_HTTP,
                                 retry_after_s=retry_after)
        if parsed is NOT_JSON:
            raise ApiConnectionError(
                f"{path}: the answer was not JSON ({len(answer.body)} bytes)", sent=True
            )
        if not isinstance(parsed, dict) or "code" not in parsed:
            raise ApiConnectionError(f"{path}: the answer has no 'code' field", sent=True)
        return parsed

    # -- endpoints -------------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> Submitted:
        """Submit one task: resent only while it provably never left, then :func:`interpret_create`.

        Raises CapacityError, RowFatalError, RunFatalError (refused: no task was made) or
        SubmitUnknownError (a task may exist and may be billed).
        """
        if self.create_api == "v2":
            rest = {k: v for k, v in body.items() if k not in ("workflowId", "webappId")}
            path = (V2_RUN_APP_PATH.format(body["webappId"]) if "webappId" in body
                    else V2_RUN_WORKFLOW_PATH.format(body["workflowId"]))
            payload = rest
        else:
            path = APP_RUN_PATH if "webappId" in body else CREATE_PATH
            payload = {"apiKey": self._key, **body}
        try:
            answer = await self.policy.call(lambda: self._exchange(path, json=payload),
                                            _create_retryable, "create")
        except ApiConnectionError as exc:
            if exc.sent:
                return interpret_create(None, exc, base_url=self.base_url)
            raise
        return interpret_create(answer, None, base_url=self.base_url)

    async def _poll(self, path: str, body: dict[str, Any], what: str, **kw: Any) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            envelope = await self._post(path, body, **kw)
            if _code(envelope) == 1003:
                raise CapacityError(f"{what}: rate limited (1003)", code=1003)
            return envelope

        return await self.policy.call(once, _poll_retryable, what)

    async def poll(self, task_id: str) -> TaskResult:
        """A task's state, as the read generation in use tells it (v2 ``query`` or v1 ``outputs``).

        On v2 a failed task whose failedReason has no traceback is asked of v1 ``outputs`` too,
        where v1 still answers: it is the more reliable place for the traceback.
        """
        if self.read_api == "v1":
            return await self.outputs(task_id)
        result = await self.query(task_id)
        if (result.state == "FAILED" and self.create_api == "v1" and
                not (isinstance(result.failed_reason, dict) and result.failed_reason.get("traceback"))):
            try:
                legacy = await self.outputs(task_id)
            except ApiError:
                return result
            if legacy.state == "FAILED" and legacy.failed_reason:
                return dataclasses.replace(result, failed_reason=legacy.failed_reason)
        return result

    async def query(self, task_id: str) -> TaskResult:
        """v2 ``query``: state, results (``nodeId`` may be absent), usage and failedReason."""
        async def once() -> dict[str, Any]:
            answer = await self._exchange(V2_QUERY_PATH, json={"taskId": task_id})
            data = answer.json()
            if answer.status != 200:
                if isinstance(data, dict) and _int_code(data) not in (None, 0):
                    raise api_error_for(_code(data), clean_text(data.get("msg", ""), 500),
                                        None, where="query", base_url=self.base_url)
                raise ApiConnectionError(f"query: HTTP {answer.status}", sent=True)
            if not isinstance(data, dict):
                raise ApiConnectionError("query: the answer is not a JSON object", sent=True)
            if "code" in data and "status" not in data:  # a v1 envelope: 412 on an old service
                code = _code(data)
                raise api_error_for(code, clean_text(data.get("msg", ""), 500),
                                    data.get("data"), where="query", base_url=self.base_url)
            if _answer_code(data) == 1003:
                raise CapacityError("query: rate limited (1003)", code=1003)
            return data

        data = await self.policy.call(once, _poll_retryable, "query")
        state = V2_STATES.get(str(data.get("status") or "").upper())
        error_code = _answer_code(data)
        message = clean_text(data.get("errorMessage") or "", 500)
        if state is None:
            if error_code:
                raise api_error_for(error_code, message, None, where="query",
                                    base_url=self.base_url)
            raise ApiConnectionError(f"query: unknown task status {clean_text(data.get('status'), 40)}",
                                 sent=True)
        cost = cost_of_usage(data)
        if state == "SUCCESS":
            results = data.get("results")
            items: list[Any] = results if isinstance(results, list) else []
            return TaskResult("SUCCESS", [normalize_output(i) for i in items if isinstance(i, dict)],
                              cost=cost)
        if state == "FAILED":
            reason = normalize_failed_reason(data.get("failedReason"))
            if not isinstance(reason, dict):
                reason = {"exception_message": message} if message else {}
            reason = {**reason, "v2ErrorCode": data.get("errorCode"), "v2Status": data.get("status")}
            # 805 as on v1, so a run reads the same whichever generation it polls with
            return TaskResult("FAILED", failed_reason=reason, code=805, msg=message, cost=cost)
        return TaskResult(state, code=0, msg=message)

    async def detect(self) -> str:
        """Settle ``--api auto`` from the service's own answers before any create, and say how.

        v1 is probed with a harmless ``outputs`` read of a task id that cannot exist: a v1 that
        works answers 807 (or 423/1004/301); a key whose v1 task routes are gone gets 412 or an
        HTTP 404. v2 is probed with ``query`` of the same id (1004/1007 when it works).
        """
        if self.api != "auto":
            return f"RunningHub API {self.api}: creates and reads on {self.api} (--api {self.api})"
        v1 = await self._probe(OUTPUTS_PATH, {"apiKey": self._key, "taskId": "1"})
        v2 = await self._probe(V2_QUERY_PATH, {"taskId": "1"})
        if not v1 and v2:
            self.create_api = self.read_api = "v2"
            return ("RunningHub API: this key's v1 task routes are gone (412 / HTTP 404 on a v1 "
                    "read); creates and reads on v2")
        if not v2:
            self.read_api = "v1"
            return "RunningHub API: creates on v1 and reads with v1 outputs (v2 query did not answer)"
        return "RunningHub API: creates on v1, reads with v2 query (usage and money included)"

    async def _probe(self, path: str, body: dict[str, Any]) -> bool:
        """Whether ``path`` is a live route for this key (any task-level answer counts)."""
        try:
            answer = await self._exchange(path, json=body)
        except ApiConnectionError:
            return True  # no verdict: keep the default, the run's own requests will tell
        if answer.status == 404:
            return False
        parsed = answer.json()
        if not isinstance(parsed, dict):
            return True
        code = _answer_code(parsed)
        return code not in (412, 802)

    async def queue_limit(self) -> int | None:
        """v2 ``queue/status``'s ``concurrentLimit`` (the key's slots), or None if not given."""
        try:
            answer = await self._exchange(V2_QUEUE_PATH, method="GET")
        except ApiConnectionError:
            return None
        data = answer.json()
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            data = data["data"]
        if not isinstance(data, dict):
            return None
        limit = _num(data.get("concurrentLimit"))
        return int(limit) if limit is not None and limit >= 1 and limit.is_integer() else None

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
        raise api_error_for(code, msg, data, where="outputs", base_url=self.base_url)

    async def task_cost(self, task_id: str) -> Cost | None:
        """What an ended task cost, from v2 ``query``'s ``usage`` (v1 reports no cost for failed
        or cancelled tasks); None when the service does not say. Never raises for a read problem:
        an unknown cost is recorded as unknown, not as an error of the row."""
        try:
            return (await self.query(task_id)).cost
        except ApiError as exc:
            log.info("cost of task %s not available from v2 query: %s", clean_text(task_id, 40),
                     redact(exc))
            return None

    async def account_status(self) -> AccountStatus:
        envelope = await self._poll(ACCOUNT_PATH, {}, "accountStatus", key_field="apikey")
        code = _code(envelope)
        data = envelope.get("data")
        if code != 0 or not isinstance(data, dict):
            raise api_error_for(code, str(envelope.get("msg", "")), data, where="accountStatus",
                                base_url=self.base_url)
        count = _num(data.get("currentTaskCounts"))
        if count is None or count < 0 or not count.is_integer():
            raise ApiError(
                "accountStatus answered a task count that is not a whole number "
                f"({clean_text(json.dumps(data.get('currentTaskCounts')), 40)})"
            )
        return AccountStatus(
            remain_coins=_num(data.get("remainCoins")),
            current_task_counts=int(count),
            api_type=data.get("apiType"),
            remain_money=_num(data.get("remainMoney")),
            currency=data.get("currency"),
        )

    async def cancel(self, task_id: str) -> None:
        envelope = await self._poll(CANCEL_PATH, {"taskId": task_id}, "cancel")
        code = _code(envelope)
        if code != 0:
            raise api_error_for(code, str(envelope.get("msg", "")), None, where="cancel",
                                base_url=self.base_url)

    async def workflow_json(self, workflow_id: str) -> dict[str, Any]:
        """The workflow in ComfyUI API format (``data.prompt`` is JSON inside JSON)."""
        envelope = await self._poll(WORKFLOW_JSON_PATH, {"workflowId": workflow_id}, "workflow")
        code = _code(envelope)
        data = envelope.get("data")
        if code != 0 or not isinstance(data, dict):
            raise api_error_for(code, str(envelope.get("msg", "")), data,
                                where="getJsonApiFormat", base_url=self.base_url)
        prompt = data.get("prompt")
        try:
            parsed = json.loads(prompt) if isinstance(prompt, str) else prompt
        except ValueError as exc:
            raise ApiError(f"getJsonApiFormat returned a prompt that is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ApiError("getJsonApiFormat returned no workflow")
        return parsed

    async def upload(self, path: Path, file_type: str = "input") -> str:
        """Upload one input file; returns the ``fileName`` to send as the loader's value.

        With v2 reads, v2 ``media/upload/binary`` first; v1 ``upload`` where v2 has no such
        route (HTTP 404, or an old service's 412) or gives no ``fileName``.
        """
        content = path.read_bytes()
        v2_first = self.read_api == "v2"

        async def once(route: str) -> dict[str, Any]:
            fields = {"fileType": file_type} if route == V2_UPLOAD_PATH else {
                "apiKey": self._key, "fileType": file_type}
            answer = await self._exchange(route, data=fields, files={"file": (path.name, content)})
            if route == V2_UPLOAD_PATH and answer.status == 404:
                raise RouteMissing(route)
            envelope = self._envelope(route, answer)
            if _code(envelope) == 808:
                raise TransientApiError("upload failed (808)", code=808)
            return envelope

        async def attempt_on(route: str) -> dict[str, Any]:
            return await self.policy.call(lambda: once(route), _poll_retryable, "upload")

        envelope: dict[str, Any] = {}
        if v2_first:
            try:
                envelope = await attempt_on(V2_UPLOAD_PATH)
                data = envelope.get("data")
                if _code(envelope) in (412, 802) or not (
                        isinstance(data, dict) and (data.get("fileName") or data.get("filename"))):
                    if _code(envelope) not in (0, 200, 412, 802):
                        raise api_error_for(_code(envelope), clean_text(
                            envelope.get("message") or envelope.get("msg") or "", 500), data,
                            where=f"upload of {path.name}", base_url=self.base_url)
                    envelope = {}
            except RouteMissing:
                envelope = {}
        if not envelope:
            envelope = await attempt_on(UPLOAD_PATH)
        code = _code(envelope)
        data = envelope.get("data")
        if code not in (0, 200) or not isinstance(data, dict):
            msg = str(envelope.get("msg") or envelope.get("message") or "")
            raise api_error_for(code, msg, data, where=f"upload of {path.name}",
                                base_url=self.base_url)
        name = data.get("fileName") or data.get("filename")
        if not name:
            raise ApiError(f"upload of {path.name} returned no fileName")
        return str(name)


def _code(envelope: dict[str, Any]) -> int:
    code = _int_code(envelope)
    if code is None:
        raise ApiConnectionError("the answer's 'code' is not an integer", sent=True)
    return code


def cost_of_usage(data: dict[str, Any]) -> Cost | None:
    """The ``usage`` of a v2 ``query`` answer (or webhook): coins and money apart, child tasks
    listed. A figure the parent leaves null is the sum of its children's, where they give it."""
    usage = data.get("usage")
    children_raw = data.get("taskUsageList")
    children: list[dict[str, Any]] = []
    if isinstance(children_raw, list):
        for child in children_raw:
            if isinstance(child, dict) and isinstance(child.get("usage"), dict):
                cu = child["usage"]
                raw_id = child.get("taskId")
                children.append({
                    "taskId": None if raw_id is None else str(raw_id),
                    # a bare number past 2**53 may have lost digits on the way (never matched)
                    "taskIdExact": not (isinstance(raw_id, int | float) and not isinstance(
                        raw_id, bool) and abs(raw_id) > EXACT_JSON_INT),
                    "consumeCoins": _num(cu.get("consumeCoins")),
                    "consumeMoney": _num(cu.get("consumeMoney")),
                    "thirdPartyConsumeMoney": _num(cu.get("thirdPartyConsumeMoney")),
                })
    if not isinstance(usage, dict) and not children:
        return None
    usage = usage if isinstance(usage, dict) else {}

    def figure(name: str) -> float | None:
        own = _num(usage.get(name))
        if own is not None:
            return own
        parts = [c[name] for c in children if c[name] is not None]
        return sum(parts) if parts else None

    cost = Cost(figure("consumeCoins"), figure("consumeMoney"), figure("thirdPartyConsumeMoney"),
                _num(usage.get("taskCostTime")), children or None)
    return cost if cost.known else None


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


MAX_TRACEBACK_FRAMES = 50  # the last frames of a failed task's traceback that are kept


def _bounded(value: Any) -> Any:
    """A failedReason part as stored: text clipped to MAX_STORED_TEXT (with a marker), a list to
    its last MAX_TRACEBACK_FRAMES entries, anything bigger than that as clipped JSON text."""
    if isinstance(value, str):
        return clip(value, MAX_STORED_TEXT)
    if isinstance(value, list):
        kept = [_bounded(v) for v in value[-MAX_TRACEBACK_FRAMES:]]
        return ([f"[{len(value) - len(kept)} earlier entries cut by rhbatch]"] + kept
                if len(value) > len(kept) else kept)
    if isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
        return value if len(text) <= MAX_STORED_TEXT else clip(text, MAX_STORED_TEXT)
    return value


def normalize_failed_reason(reason: Any) -> Any:
    """failedReason with its stringified parts decoded (traceback is a JSON string or a list),
    every part bounded for storage (see :func:`_bounded`)."""
    if isinstance(reason, str):
        decoded = parse_json(reason)
        if decoded is NOT_JSON:
            return {"exception_message": clip(reason, MAX_STORED_TEXT)}
        reason = decoded
    if not isinstance(reason, dict):
        return _bounded(reason)
    out = dict(reason)
    for key in ("traceback", "current_inputs", "current_outputs"):
        value = out.get(key)
        if isinstance(value, str) and value[:1] in "[{":
            decoded = parse_json(value)
            if decoded is not NOT_JSON:
                out[key] = decoded
    return {str(k)[:200]: _bounded(v) for k, v in list(out.items())[:50]}
