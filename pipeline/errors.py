"""rhbatch's exception tree and the RunningHub response-code taxonomy.

Every error raised inside ``pipeline`` derives from :class:`RhbatchError`, and every rhbatch exception
class is defined here. Third-party exceptions (httpx, jsonschema, sqlite3, pandas, OSError) are
translated where they are caught. Chaining rule: ``raise ... from None`` when the new message says
everything the user needs (the usual case: the message names the file, row or request and the fix, and
the third-party traceback would only repeat it, or echo a URL), ``raise ... from exc`` when the cause
carries information the message does not (an unexpected failure in our own code).

::

    RhbatchError                      (exit_code 1 unless a subclass says otherwise)
    ├── UsageError                    bad flags or settings                       exit 2, run-fatal
    │   └── ConfigError               missing key, bad base URL, bad sim config   exit 2
    ├── InputError                    the user's files are wrong                  exit 2
    │   ├── ManifestError             every problem in a manifest, at once
    │   │   └── ManifestProblems      ... grouped by kind (ProblemGroup), each capped
    │   ├── SchemaError               the JSON Schema itself is invalid
    │   └── SweepError                a sweep spec is wrong
    ├── StateError                    the run directory cannot be used            exit 2
    │   ├── RunLockedError            another rhbatch process holds the run
    │   └── ManifestChangedError      the run exists with another manifest
    ├── StorageError                  disk full, read-only, corrupt state         exit 3
    │   └── ResourceMissing           a file rhbatch ships is not installed (also FileNotFoundError)
    ├── RunStopped                    the run must stop (account, credentials)    exit 3
    ├── SpliceAbandoned               a results splice stopped midway (internal to refresh.py)
    └── ApiError                      a RunningHub answer we cannot use
        ├── TransientApiError         retry the same request later (5xx, 429, resets, garbage)
        │   └── ApiConnectionError    the exchange failed below the API; ``sent``: it may have been acted on
        ├── CapacityError             the account is full: wait and resubmit (421, 415, ...)
        ├── RowFatalError             this row is wrong: fail it, carry on (803, 433, ...)
        ├── RunFatalError             the whole run must stop (412, 414, 416, ...)
        ├── TaskGoneError             the task id is unknown or purged (807, 423, 1004)
        ├── SubmitUnknownError        a create was sent and its outcome is unknown
        └── RouteMissing              the service has no such route (HTTP 404): use the other generation
    FileDownloadError                 one output file could not be fetched (``file_state`` says how)
    ├── TransientDownloadError        network trouble, 5xx, 429, a short body: retried
    ├── ExpiredUrlError               the URL is gone (403/404/410): the row's files are expired
    └── RefusedDownloadError          refused by the host or by our own limits

    AnswerTooLarge (an httpx.ReadError, raised inside a transport; the client turns it into an
    ApiConnectionError with sent=True)

Every class carries ``transient`` / ``row_fatal`` / ``run_fatal`` so callers branch on what an error
means, never on its text.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from pipeline.safetext import clean_text, escape_controls

if TYPE_CHECKING:
    from pipeline.manifest.rows import Manifest

MSG_SHOWN_CHARS = 500  # of a service ``msg`` in an error message


class Kind(enum.Enum):
    """What a RunningHub code means for the caller (section 6 of runninghub-api.md)."""

    OK = "ok"
    STATE = "state"  # 804 running, 813 queued: keep polling
    CAPACITY = "capacity"  # account full or service busy: wait, then resubmit
    TRANSIENT = "transient"  # retry the same request with backoff
    ROW_FATAL = "row_fatal"  # this row's input is wrong: fail the row
    RUN_FATAL = "run_fatal"  # credentials or money: stop the whole run
    TASK_FAILED = "task_failed"  # the task ran and failed
    TASK_GONE = "task_gone"  # unknown, foreign or purged task id


@dataclass(frozen=True)
class Code:
    code: int
    name: str
    kind: Kind
    fix: str = ""


_CODES = [
    Code(0, "success", Kind.OK),
    Code(301, "PARAMS_INVALID", Kind.ROW_FATAL, "check workflowId and the request fields"),
    Code(380, "WORKFLOW_NOT_EXISTS", Kind.ROW_FATAL, "check the workflowId and that your key can see it"),
    Code(
        412,
        "TOKEN_INVALID",
        Kind.RUN_FATAL,
        "check RUNNINGHUB_API_KEY and RUNNINGHUB_BASE_URL (a .cn key only works on runninghub.cn)",
    ),
    Code(
        414,
        "TASK_CREATE_FAILED_BY_NOT_ENOUGH_POWER_VALUE",
        Kind.RUN_FATAL,
        "top up the account's API balance, then run the same command again to resume",
    ),
    Code(415, "TASK_INSTANCE_MAXED", Kind.CAPACITY),
    Code(
        416,
        "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET",
        Kind.RUN_FATAL,
        "top up the wallet, then run the same command again to resume",
    ),
    Code(421, "TASK_QUEUE_MAXED", Kind.CAPACITY),
    Code(423, "TASK_NOT_FOUNED", Kind.TASK_GONE),
    Code(433, "VALIDATE_PROMPT_FAILED", Kind.ROW_FATAL, "fix the row's node values (see promptTips)"),
    Code(
        435,
        "TASK_USER_EXCLAPI_INSTANCE_NOT_FOUND",
        Kind.ROW_FATAL,
        "set instanceType to a machine class your key owns",
    ),
    Code(436, "TASK_USER_EXCLAPI_REQUIRED", Kind.ROW_FATAL, "this call needs an exclusive key"),
    Code(500, "UNKNOWN_ERROR", Kind.TRANSIENT),
    Code(801, "APIKEY_UNSUPPORTED_FREE_USER", Kind.RUN_FATAL, "the API needs a paid membership"),
    Code(802, "APIKEY_UNAUTHORIZED", Kind.RUN_FATAL, "the key is not authorised or was revoked"),
    Code(
        803,
        "APIKEY_INVALID_NODE_INFO",
        Kind.ROW_FATAL,
        "a nodeId/fieldName is not in the workflow: run `rhbatch inspect`",
    ),
    Code(804, "APIKEY_TASK_IS_RUNNING", Kind.STATE),
    Code(805, "APIKEY_TASK_STATUS_ERROR", Kind.TASK_FAILED),
    Code(806, "APIKEY_USER_NOT_FOUND", Kind.RUN_FATAL, ""),  # the fix names a site: site_fix()
    Code(807, "APIKEY_TASK_NOT_FOUND", Kind.TASK_GONE),
    Code(808, "APIKEY_UPLOAD_FAILED", Kind.TRANSIENT),
    Code(809, "APIKEY_FILE_SIZE_EXCEEDED", Kind.ROW_FATAL, "input files must be 30 MB or smaller"),
    Code(
        810,
        "WORKFLOW_NOT_SAVED_OR_NOT_RUNNING",
        Kind.ROW_FATAL,
        "save the workflow and run it once in the RunningHub web UI",
    ),
    Code(811, "CORPAPIKEY_INVALID", Kind.RUN_FATAL, "the enterprise key is invalid"),
    Code(
        812,
        "CORPAPIKEY_INSUFFICIENT_FUNDS",
        Kind.RUN_FATAL,
        "top up the enterprise account, then run the same command again to resume",
    ),
    Code(813, "APIKEY_TASK_IS_QUEUED", Kind.STATE),
    Code(814, "PERSONAL_QUEUE_COUNT_LIMIT", Kind.CAPACITY),
    Code(901, "WEBAPP_NOT_EXISTS", Kind.ROW_FATAL, "check the webappId"),
    Code(1000, "unknown error", Kind.TASK_FAILED),
    Code(1001, "invalid request", Kind.ROW_FATAL),
    Code(1002, "auth failed", Kind.RUN_FATAL, "check RUNNINGHUB_API_KEY"),
    Code(1003, "rate limited", Kind.CAPACITY),
    Code(1004, "not found or expired", Kind.TASK_GONE),
    Code(1005, "server error", Kind.TRANSIENT),
    Code(1006, "timeout", Kind.TASK_FAILED),
    Code(1007, "param invalid", Kind.ROW_FATAL),
    Code(1008, "size exceeded", Kind.ROW_FATAL),
    Code(1009, "method not allowed", Kind.ROW_FATAL),
    Code(1010, "service busy", Kind.CAPACITY),
    Code(1011, "service overloaded", Kind.CAPACITY),
    Code(1012, "service unavailable", Kind.CAPACITY),
    Code(1013, "file processing failed", Kind.TRANSIENT),
    Code(1014, "needs an enterprise-shared key", Kind.ROW_FATAL),
    Code(1015, "generation failed", Kind.TASK_FAILED),
    Code(1101, "node info error", Kind.ROW_FATAL),
    Code(1501, "content moderation rejected", Kind.ROW_FATAL),
    Code(1504, "model timeout", Kind.TASK_FAILED),
    Code(1505, "real-person generation prohibited", Kind.ROW_FATAL),
    Code(1520, "TASK_USER_CONCURRENT_LIMIT", Kind.CAPACITY),
    # v2: seen in clients as "no balance" (runninghub-api-2026.md)
    Code(605, "NOT_ENOUGH_BALANCE", Kind.RUN_FATAL,
         "top up the account's balance, then run the same command again to resume"),
    # rhbatch's own, never sent by RunningHub: the task outlived --task-timeout and was cancelled
    Code(9100, "RHBATCH_TASK_TIMEOUT", Kind.TASK_FAILED,
         "raise --task-timeout if such tasks are expected, then `rhbatch retry DIR --code 9100`"),
]
TASK_TIMEOUT_CODE = 9100

CODES: dict[int, Code] = {c.code: c for c in _CODES}


def classify(code: int) -> Kind:
    """The kind of a RunningHub business code; unknown non-zero codes count as row-fatal."""
    known = CODES.get(code)
    return known.kind if known else Kind.ROW_FATAL


def code_name(code: int) -> str:
    known = CODES.get(code)
    return known.name if known else f"CODE_{code}"


class RhbatchError(Exception):
    """Base of every rhbatch error."""

    exit_code = 1
    transient = False
    row_fatal = False
    run_fatal = False


class UsageError(RhbatchError):
    exit_code = 2
    run_fatal = True


class ConfigError(UsageError):
    pass


class InputError(RhbatchError):
    exit_code = 2
    run_fatal = True


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row of a manifest (row is 1-based, as the user counts)."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f'column "{self.column}"')
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ManifestError(InputError):
    """Every problem found in a manifest, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:200])
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count}, nothing was submitted:\n{shown}{more}")


@dataclass(frozen=True)
class ProblemGroup:
    """The problems of one kind: the first ``manifest.PROBLEMS_SHOWN_PER_KIND``, and how many in all."""

    kind: str | None  # "binding", "value", "preflight", "file"; None for a file that cannot be read
    problems: tuple[Problem, ...]
    total: int

    def more_line(self) -> Problem | None:
        """The line that counts the problems not listed, or None when every one is."""
        more = self.total - len(self.problems)
        if more <= 0:
            return None
        what = f"{self.kind} problems" if self.kind else "problems like these"
        return Problem(None, None, f"... and {more:,} more {what}")


class ManifestProblems(ManifestError):
    """Every problem found in a manifest, by kind; ``total`` counts them all.

    ``problems`` is what is shown: each group's listed problems followed by its "... and N more"
    line. ``manifest``, when the file could be read as rows, holds the rows that the checks made
    after loading can still judge (see :func:`pipeline.manifest.load_manifest`).
    """

    def __init__(self, source: str, groups: Sequence[ProblemGroup], manifest: Manifest | None = None):
        groups = [g for g in groups if g.total]
        shown: list[Problem] = []
        for group in groups:
            shown.extend(group.problems)
            more = group.more_line()
            if more is not None:
                shown.append(more)
        total = sum(g.total for g in groups)
        listed = "\n".join(f"  {p}" for p in shown)
        InputError.__init__(
            self, f"{source}: {total:,} problem{'s' if total != 1 else ''}, nothing was submitted:"
                  f"\n{listed}")
        self.source = source
        self.problems = shown
        self.groups = tuple(groups)
        self.total = total
        self.manifest = manifest


class SchemaError(InputError):
    pass


class SweepError(InputError):
    pass


class StateError(RhbatchError):
    exit_code = 2
    run_fatal = True


class RunLockedError(StateError):
    pass


class ManifestChangedError(StateError):
    pass


class StorageError(RhbatchError):
    exit_code = 3
    run_fatal = True


class RunStopped(RhbatchError):
    """The run was stopped on purpose (interrupt, budget) or by the account; it can be resumed."""

    exit_code = 3
    run_fatal = True


class SpliceAbandoned(RhbatchError):
    """A results splice was told to stop (the run is stopping); the files on disk are unchanged.
    It never leaves ``pipeline.refresh``."""


class ApiError(RhbatchError):
    """A RunningHub answer that is not the success we asked for."""

    def __init__(self, message: str, code: int | None = None, msg: str = "", data: Any = None):
        super().__init__(message)
        self.code = code
        self.msg = msg
        self.data = data


class TransientApiError(ApiError):
    transient = True


class CapacityError(ApiError):
    transient = True


class RowFatalError(ApiError):
    row_fatal = True


class RunFatalError(ApiError):
    run_fatal = True
    exit_code = 3


class TaskGoneError(ApiError):
    row_fatal = True


class SubmitUnknownError(ApiError):
    """A create request left this machine and no usable answer came back: never resend it.

    ``stop_run`` holds the fix when every later create would fare the same (a redirect, a refused
    key): the row is unknown and the run stops.
    """

    row_fatal = True

    def __init__(self, message: str, *, stop_run: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.stop_run = stop_run


class ApiConnectionError(TransientApiError):
    """The exchange failed below the API: ``sent`` says whether the request may have been acted on.

    ``sent=False``: no connection was made (refused, DNS, TLS, connect or pool timeout), so resending a
    create cannot pay twice. ``sent=True``: the request may have reached the service.
    """

    def __init__(self, message: str, *, sent: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.sent = sent
        self.retry_after_s = retry_after_s


class RouteMissing(ApiError):
    """The service has no such route (HTTP 404): the client falls back to the other API generation.
    It never leaves ``pipeline.client``."""


class AnswerTooLarge(httpx.ReadError):
    """An answer grew past the cap while it was read (raw or decompressed). A subclass of
    ``httpx.ReadError`` because transports raise it inside httpx's own read path."""


class ResourceMissing(StorageError, FileNotFoundError):
    """A file rhbatch ships is not in this installation."""


# The file states a download error leaves in the ``files`` table (pipeline.store.FILE_*; a test
# pins that the two agree: errors.py imports nothing from the store).
_FILE_FAILED, _FILE_EXPIRED, _FILE_REFUSED = "FAILED", "EXPIRED", "REFUSED"


class FileDownloadError(RhbatchError):
    """One file could not be fetched; ``file_state`` is what the ``files`` table records."""

    file_state = _FILE_FAILED

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TransientDownloadError(FileDownloadError):
    """Network trouble, 5xx, 429, a short body: retried under the policy."""

    transient = True


class ExpiredUrlError(FileDownloadError):
    file_state = _FILE_EXPIRED
    row_fatal = True


class RefusedDownloadError(FileDownloadError):
    file_state = _FILE_REFUSED
    row_fatal = True


#: How many problems a check lists before it only counts them.
MAX_PROBLEMS_LISTED = 1000


class Problems(list[Problem]):
    """The one problem collector: the problems listed (at most ``limit``); ``total`` counts every
    problem found."""

    def __init__(self, limit: int = MAX_PROBLEMS_LISTED):
        super().__init__()
        self.limit = limit
        self.total = 0

    def add(self, problem: Problem) -> None:
        self.total += 1
        if len(self) < self.limit:
            self.append(problem)

    @property
    def unlisted(self) -> int:
        return self.total - len(self)


#: RunningHub's two sites; a key belongs to one of them (runninghub-api.md §1).
SITES = {"ai": "https://www.runninghub.ai", "cn": "https://www.runninghub.cn"}


def site_of(base_url: str | None) -> str | None:
    """``"ai"`` or ``"cn"`` for a base URL on one of RunningHub's sites, else None."""
    try:
        host = (urlsplit(base_url).hostname or "") if base_url else ""
    except ValueError:
        return None
    for site in SITES:
        if host == f"runninghub.{site}" or host.endswith(f".runninghub.{site}"):
            return site
    return None


def site_fix(base_url: str | None) -> str:
    """The fix for 806 (key unknown): a key works only on its own site, so name the other site of
    the one in use (both when the base URL is neither, as with the simulator or a proxy)."""
    site = site_of(base_url)
    if site is None:
        return (f"wrong key or wrong site: check RUNNINGHUB_API_KEY; a runninghub.ai key needs "
                f"RUNNINGHUB_BASE_URL={SITES['ai']}, a runninghub.cn key "
                f"RUNNINGHUB_BASE_URL={SITES['cn']}")
    other = "cn" if site == "ai" else "ai"
    return (f"wrong key or wrong site: this key is unknown to runninghub.{site}: check "
            f"RUNNINGHUB_API_KEY, or for a runninghub.{other} key set "
            f"RUNNINGHUB_BASE_URL={SITES[other]} (or --base-url)")


def code_fix(code: int, base_url: str | None = None) -> str:
    """How to fix ``code`` ("" when nothing to say), for the base URL in use."""
    if code == 806:
        return site_fix(base_url)
    known = CODES.get(code)
    return known.fix if known else ""


def api_error_for(code: int, msg: str, data: Any = None, *, where: str,
                  base_url: str | None = None) -> ApiError:
    """Build the right ApiError subclass for a non-zero business ``code``.

    ``base_url`` is the site the request went to (the fix for 806 names the other one). The
    service's ``msg`` is shown with its control characters escaped; ``.msg`` keeps it as sent.
    """
    kind = classify(code)
    known = CODES.get(code)
    name = known.name if known else "unknown code"
    fixed = code_fix(code, base_url)
    fix = f": {fixed}" if fixed else ""
    shown_msg = clean_text(msg, MSG_SHOWN_CHARS) if msg and msg != name else ""
    text = (f"RunningHub {escape_controls(where)} answered {code} {name}"
            f"{' (' + shown_msg + ')' if shown_msg else ''}{fix}")
    cls: type[ApiError] = {
        Kind.CAPACITY: CapacityError,
        Kind.TRANSIENT: TransientApiError,
        Kind.RUN_FATAL: RunFatalError,
        Kind.TASK_GONE: TaskGoneError,
    }.get(kind, RowFatalError)
    return cls(text, code=code, msg=msg, data=data)
