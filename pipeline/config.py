"""Settings, resolved once: flag, then environment, then default; the API key is never printed.

``Settings`` is frozen. The key lives in a :class:`Secret` whose ``repr``/``str`` are redacted, and
:func:`redact` scrubs it from any text that could reach a log, an exception message or a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from pipeline.safetext import escape_controls

DEFAULT_BASE_URL = "https://www.runninghub.ai"
ENV_API_KEY = "RUNNINGHUB_API_KEY"
ENV_BASE_URL = "RUNNINGHUB_BASE_URL"
ENV_HTTP = "RHBATCH_HTTP"
# The connection pool under httpx: aiohttp's (default, about 1 ms of CPU per request) or httpx's own.
HTTP_TRANSPORTS = ("aiohttp", "httpx")
DEFAULT_HTTP_TRANSPORT = HTTP_TRANSPORTS[0]

DEFAULT_CONCURRENCY = 1  # consumer keys run one task at a time
HTTP_CONNECT_TIMEOUT_S = 10.0
HTTP_READ_TIMEOUT_S = 30.0  # one read; the request deadline bounds the whole exchange
# Connect + send + the whole answer. A create answer that trickles in one byte at a time ends as
# SUBMIT_UNKNOWN at this deadline instead of holding the submitter for minutes.
HTTP_REQUEST_DEADLINE_S = 60.0
POLL_INTERVAL_S = 5.0  # a task's own outputs poll, when nothing better is known
ACCOUNT_POLL_INTERVAL_S = 2.0  # the shared accountStatus signal
MAX_POLL_INTERVAL_S = 30.0  # every live task is asked about at least this often
CAPACITY_BACKOFF_S = 20.0  # first wait after 421/415/1520 before resubmitting
MAX_CAPACITY_BACKOFF_S = 120.0
RESULTS_FLUSH_INTERVAL_S = 10.0
# A task that has not ended this long after its create is cancelled on RunningHub and its row
# FAILED with TASK_TIMEOUT_CODE (real tasks take seconds to minutes; a few run for an hour).
TASK_TIMEOUT_S = 6 * 3600.0
# While RunningHub cannot be reached, one line this often says since when and what is retried.
OUTAGE_REPORT_INTERVAL_S = 60.0
# Without a terminal, a plain progress line this often on stderr and in the run's log.
PROGRESS_INTERVAL_S = 30.0
# How the note on an unexpected exception naming the log that holds its traceback begins (added by
# batch.execute; the CLI's last-resort message names that log).
TRACEBACK_NOTE = "The traceback is in "


class Secret:
    """A string that never shows itself in repr, str or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_REDACT_KEYS: set[str] = set()
_KEYLIKE = re.compile(r"(?i)(apikey|api_key|authorization|bearer)([\"'=:\s]+)([A-Za-z0-9._\-]{8,})")


def register_secret(value: str) -> None:
    """Make :func:`redact` (and every rhbatch log line) scrub ``value`` from now on."""
    if value:
        _REDACT_KEYS.add(value)


def redact(text: Any) -> str:
    """``text`` as a string with every registered secret and key-looking assignment masked."""
    out = str(text)
    for key in _REDACT_KEYS:
        if key in out:
            out = out.replace(key, "***")
    return _KEYLIKE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record, scrubs secrets from it and escapes its control
    characters: a newline or carriage return in service text (a task id, a ``msg``) can neither
    forge a log line nor rewrite a terminal, so every record stays one line in the format's shape.
    A traceback keeps the line breaks of its frames; each exception's own text is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape_controls(redact(record.getMessage()))
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _safe_traceback(record.exc_info)
            record.exc_info = None
        return True


# How the chunks of a traceback that are rhbatch's own structure begin (after "  |", "  +" of an
# exception group); any other chunk is an exception's text: str(exc), perhaps the service's.
_FRAME_STARTS = ("Traceback ", "File ", "Exception Group Traceback", "[Previous line")


def _safe_traceback(exc_info: Any) -> str:
    parts = []
    for chunk in traceback.format_exception(*exc_info):
        chunk = redact(chunk)
        if chunk.startswith("\n") or chunk.lstrip(" |+-").startswith(_FRAME_STARTS):
            parts.append("\n".join(escape_controls(line) for line in chunk.split("\n")))
        else:
            parts.append(escape_controls(chunk.removesuffix("\n")) + "\n")
    return "".join(parts).rstrip("\n")


def key_fingerprint(key: str) -> str:
    """A short one-way digest of the API key: tells keys apart, never reveals one."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def show_url(url: str) -> str:
    """``url`` fit for a message: anything before an ``@`` in its authority is masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return redact(url)
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return redact(f"{scheme}{sep}{authority}{slash}{path}")


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to talk to RunningHub, resolved once."""

    api_key: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = DEFAULT_CONCURRENCY
    poll_interval_s: float = POLL_INTERVAL_S
    account_poll_interval_s: float = ACCOUNT_POLL_INTERVAL_S
    max_poll_interval_s: float = MAX_POLL_INTERVAL_S
    capacity_backoff_s: float = CAPACITY_BACKOFF_S
    max_capacity_backoff_s: float = MAX_CAPACITY_BACKOFF_S
    connect_timeout_s: float = HTTP_CONNECT_TIMEOUT_S
    read_timeout_s: float = HTTP_READ_TIMEOUT_S
    request_deadline_s: float = HTTP_REQUEST_DEADLINE_S
    task_timeout_s: float = TASK_TIMEOUT_S
    api: str = "auto"  # which RunningHub API generation creates and reads (client.APIS)
    concurrency_given: bool = False  # --concurrency was set: a cap over the key's stated limit
    give_up_after_s: float | None = None  # an outage this long stops the run (exit 3); None: never
    outage_report_interval_s: float = OUTAGE_REPORT_INTERVAL_S
    results_flush_interval_s: float = RESULTS_FLUSH_INTERVAL_S
    http_transport: str = DEFAULT_HTTP_TRANSPORT
    # sent with every create (instanceType, webhookUrl, webappId, ...); read-only, like the rest
    task_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.task_options, MappingProxyType):
            object.__setattr__(self, "task_options", MappingProxyType(dict(self.task_options)))

    def require_key(self) -> str:
        if not self.api_key:
            raise ConfigError(f"No API key: set {ENV_API_KEY} or pass --api-key")
        return self.api_key.reveal()


def resolve_settings(
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Flag > environment > default, validated. ``overrides`` are other Settings fields (None = unset)."""
    environ = os.environ if env is None else env
    key = api_key or environ.get(ENV_API_KEY) or None
    if key is not None:
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z0-9_\-]{8,128}", key):
            raise ConfigError(
                f"The API key in {'--api-key' if api_key else ENV_API_KEY} does not look like a "
                "RunningHub key (32 letters and digits): copy it again from the RunningHub console"
            )
        register_secret(key)
    url = (base_url or environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        credentials = parts.username is not None or parts.password is not None
    except ValueError:  # urllib: "Invalid IPv6 URL", a bad port, ...
        valid, credentials = False, "@" in url
    shown = show_url(url)
    if not valid:
        raise ConfigError(
            f"Base URL {shown!r} is not an http(s) URL: set {ENV_BASE_URL} or --base-url to "
            f"e.g. {DEFAULT_BASE_URL}"
        )
    if credentials:
        raise ConfigError(
            f"Base URL {shown!r} carries credentials: give the key with {ENV_API_KEY} or "
            "--api-key, never inside the URL"
        )
    values = {k: v for k, v in overrides.items() if v is not None}
    transport = values.setdefault("http_transport", environ.get(ENV_HTTP) or DEFAULT_HTTP_TRANSPORT)
    if transport not in HTTP_TRANSPORTS:
        raise ConfigError(
            f"{ENV_HTTP}={transport!r} is not a known HTTP stack: use one of {', '.join(HTTP_TRANSPORTS)}"
        )
    concurrency = values.get("concurrency", DEFAULT_CONCURRENCY)
    values.setdefault("concurrency_given", "concurrency" in values)
    if values.get("api", "auto") not in ("auto", "v1", "v2"):
        raise ConfigError(f"--api {values['api']!r} is not one of auto, v1, v2")
    if not isinstance(concurrency, int) or concurrency < 1 or concurrency > 5000:
        raise ConfigError(f"--concurrency must be a whole number from 1 to 5000, not {concurrency!r}")
    for name, value in values.items():
        if name.endswith("_s") and (not isinstance(value, int | float) or value < 0):
            raise ConfigError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return Settings(api_key=Secret(key) if key else None, base_url=url, **values)
