"""Configuration of the simulator: accounts, timings, billing, retention, webhooks and faults.

Every field can be set from a YAML or JSON file with :meth:`SimConfig.from_file`::

    seed: 3
    time_scale: 100            # simulated seconds per real second
    task_duration_s: [10, 30]  # uniform range, or one number for a fixed duration
    queue_delay_s: 0.5
    failure_rate: 0.05
    accounts:
      - {key: "<32 hex chars>", api_type: EXCLUSIVE, concurrency: 2, coins: 5000}
    open_accounts: false
    faults: {http_5xx: 0.02, drop_connection: 0.01, routes: [create, outputs]}
    workflows: {"123": "my_workflow_api.json"}   # id -> API-format JSON file (or an inline mapping)
    webapps: {"456": "123"}                      # AI-app webappId -> workflow id

Unknown keys are an error (:class:`pipeline.errors.ConfigError`) that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

#: Every route name the simulator knows (used by ``Faults.routes`` and in the audit).
ROUTES: tuple[str, ...] = (
    "create",
    "ai_app_run",
    "status",
    "outputs",
    "cancel",
    "account_status",
    "upload",
    "get_json_api_format",
    "get_webhook_detail",
    "retry_webhook",
    "v2_query",
    "v2_queue_status",
    "files",
    "unknown",
)

#: Routes faults apply to when ``Faults.routes`` is None: the task API, not file downloads.
DEFAULT_FAULT_ROUTES: frozenset[str] = frozenset(r for r in ROUTES if r not in ("files",))

#: Routes whose calls count against ``Faults.poll_rate_limit_per_s``.
POLL_ROUTES: frozenset[str] = frozenset({"status", "outputs", "account_status", "v2_query"})

#: Routes that create (and bill) a task: where ``after_work`` and ``newline_task_id`` apply.
CREATE_ROUTES: frozenset[str] = frozenset({"create", "ai_app_run"})

#: What ``Faults.after_work`` may answer once the task is created, started and billed.
AFTER_WORK_MODES: tuple[str, ...] = (
    "http_429",       # HTTP 429 with an nginx-like HTML page
    "http_500",
    "http_502",
    "http_503",
    "http_504",
    "code_500",       # HTTP 200 {"code":500,"msg":"UNKNOWN_ERROR","data":null}
    "code_500_task",  # HTTP 200, code 500, data = the created task's normal data (taskId included)
    "code_1005",      # HTTP 200 {"code":1005,"msg":"server error","data":null}
    "code_null",      # "code": null, msg success, data with the taskId
    "code_text",      # "code": "0.0", data with the taskId
    "code_unknown",   # code 999, data null
    "redirect",       # HTTP 302 to the base URL + "/", empty body
    "truncated",      # full Content-Length announced, half the body sent, connection closed
    "garbage",        # HTTP 200, a non-JSON body
    "drop",           # socket closed with no answer
    "stall",          # the normal answer held ``stall_s`` real seconds
    "trickle",        # the normal answer one byte every ``trickle_interval_s`` real seconds
)

#: How ``Faults.nan_counts`` spells the count: a "NaN" string, a bare NaN token, or both in turn.
NAN_COUNTS_STYLES: tuple[str, ...] = ("string", "token", "both")

#: A log line a hostile answer forges (``newline_task_id`` puts it after a newline in a task id).
FORGED_LOG_LINE = "2026-12-01 00:00:00 ERROR rhbatch: forged"

#: What ``control_chars`` appends to the service's text: an OSC window title, a clear-screen, a
#: bare carriage return (overwrites the line on a terminal) and a newline with a forged log line.
CONTROL_INJECTION = "\x1b]0;pwned\x07\x1b[2J\rOK\n" + FORGED_LOG_LINE

API_TYPES = ("NORMAL", "SHARED", "EXCLUSIVE")
WALLET_CODES = (414, 416, 812)


@dataclass
class AccountConfig:
    """One API key and what its account may do.

    ``api_type`` NORMAL/SHARED answer 421 when ``concurrency`` tasks are live; EXCLUSIVE answers
    415, or queues up to ``personal_queue_limit`` tasks when the create asks ``usePersonalQueue``
    (814 beyond). ``wallet_code`` is the code create answers once ``coins`` is spent (414, 416 or
    812). ``free_user`` makes every call answer 801, ``revoked`` 802.
    """

    key: str
    api_type: str = "SHARED"
    concurrency: int = 50
    coins: float = 10**9
    free_user: bool = False
    revoked: bool = False
    personal_queue_limit: int = 1000
    wallet_code: int = 414

    def validate(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError("simulator account: key must be a non-empty string")
        if self.api_type not in API_TYPES:
            raise ConfigError(
                f"simulator account: api_type {self.api_type!r} is not one of {', '.join(API_TYPES)}"
            )
        if self.concurrency < 1:
            raise ConfigError("simulator account: concurrency must be at least 1")
        if self.wallet_code not in WALLET_CODES:
            raise ConfigError(
                f"simulator account: wallet_code {self.wallet_code} is not one of {WALLET_CODES}"
            )
        if self.personal_queue_limit < 0:
            raise ConfigError("simulator account: personal_queue_limit must be >= 0")

    def __repr__(self) -> str:  # never show the key
        return (f"AccountConfig(key=<redacted>, api_type={self.api_type!r}, "
                f"concurrency={self.concurrency}, coins={self.coins!r})")


@dataclass
class Faults:
    """Injected failures. Rates are probabilities in 0..1 drawn from the seeded RNG.

    - ``http_5xx``: answer HTTP 500/502/503 with an HTML body; the request is not processed.
    - ``drop_connection``: close the socket before processing; nothing happens server-side.
    - ``garbage_body``: HTTP 200 with a truncated, non-JSON body; the request is not processed.
    - ``slow_answer``: process, then hold the answer ``slow_answer_s`` real seconds.
    - ``task_failure``: an accepted task ends FAILED (on top of ``SimConfig.failure_rate``).
    - ``lost_create``: a create is processed and the task exists, then the socket is closed.
    - ``create_813``: a create is processed, the task exists, and the answer is code 813 with the
      taskId in ``data``.
    - ``poll_rate_limit_per_s``: status/outputs/accountStatus/v2 query calls by one key beyond this
      many per real second answer code 1003 (0 = no limit).
    - ``status_outputs_lag_s``: for this many simulated seconds after a task succeeds, ``/status``
      says SUCCESS while ``/outputs`` still answers 804.
    - ``routes``: route names (see ``ROUTES``) the rate faults apply to; None = all but ``files``.

    After-work faults (the request was processed and its task created, started and billed):

    - ``after_work``: on an accepted create or ai-app run, replace the answer by one mode drawn
      uniformly from ``after_work_modes`` (None = every one of ``AFTER_WORK_MODES``). The request
      audit's fault and the task's ``faults`` say ``after_work:<mode>``. ``stall`` holds the
      answer ``stall_s`` real seconds; ``trickle`` sends it one byte per ``trickle_interval_s``.

    Hostile answers (issue #12), drawn after the request is processed, on ``routes``:

    - ``trickle``: the real answer, one byte every ``trickle_interval_s`` real seconds.
    - ``oversized``: HTTP 200, the real envelope with its ``msg`` padded so that the body is
      ``oversized_bytes`` long (streamed; Content-Length set).
    - ``gzip_bomb``: ``Content-Encoding: gzip``, a small body that inflates to ``gzip_bomb_bytes``
      (``{"code":0,"msg":"success","data":null`` then spaces then ``}``); built once per size.
    - ``deep_json``: HTTP 200 ``{"code":0,"msg":"success","data":[[[...]]]}`` nested
      ``deep_json_depth`` deep.
      (trickle, oversized, gzip_bomb and deep_json are one exclusive draw: at most one applies.)
    - ``nan_counts``: accountStatus answers ``currentTaskCounts`` as the string "NaN" or a bare
      NaN token (``nan_counts_style`` "string", "token" or "both" = in turn) and ``remainCoins``
      "Infinity".
    - ``control_chars``: the answer's service text (every ``msg``, v2 ``errorMessage``, a
      failedReason's ``exception_message``/``node_name``/``traceback``, outputs ``fileType``)
      carries ``CONTROL_INJECTION``: an OSC title, a clear-screen, a bare CR and a forged log line.
    - ``newline_task_id``: an accepted create's task id carries a newline and a forged log line;
      the task is stored under exactly that id (status/outputs/cancel/v2 query accept it).
    """

    http_5xx: float = 0.0
    drop_connection: float = 0.0
    garbage_body: float = 0.0
    slow_answer: float = 0.0
    slow_answer_s: float = 2.0
    task_failure: float = 0.0
    lost_create: float = 0.0
    create_813: float = 0.0
    poll_rate_limit_per_s: float = 0.0
    status_outputs_lag_s: float = 0.0
    routes: tuple[str, ...] | None = None
    after_work: float = 0.0
    after_work_modes: tuple[str, ...] | None = None
    stall_s: float = 30.0
    trickle: float = 0.0
    trickle_interval_s: float = 1.0
    oversized: float = 0.0
    oversized_bytes: int = 200 * 2**20
    gzip_bomb: float = 0.0
    gzip_bomb_bytes: int = 2**30
    deep_json: float = 0.0
    deep_json_depth: int = 100_000
    nan_counts: float = 0.0
    nan_counts_style: str = "both"
    control_chars: float = 0.0
    newline_task_id: float = 0.0

    RATES = ("http_5xx", "drop_connection", "garbage_body", "slow_answer", "task_failure",
             "lost_create", "create_813", "after_work", "trickle", "oversized", "gzip_bomb",
             "deep_json", "nan_counts", "control_chars", "newline_task_id")

    def validate(self) -> None:
        for name in self.RATES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulator faults: {name} must be between 0 and 1, got {value!r}")
        for name in ("slow_answer_s", "poll_rate_limit_per_s", "status_outputs_lag_s", "stall_s",
                     "trickle_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"simulator faults: {name} must be >= 0, got {value!r}")
        for name, low in (("oversized_bytes", 64), ("gzip_bomb_bytes", 64), ("deep_json_depth", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"simulator faults: {name} must be an integer >= {low}, got {value!r}")
        if self.after_work_modes is not None:
            modes = self.after_work_modes
            if isinstance(modes, str) or not modes:
                raise ConfigError("simulator faults: after_work_modes must be a non-empty list of "
                                  f"modes (or null for all); valid modes: {', '.join(AFTER_WORK_MODES)}")
            unknown = [m for m in modes if m not in AFTER_WORK_MODES]
            if unknown:
                raise ConfigError(
                    f"simulator faults: unknown after_work mode(s) {', '.join(map(repr, unknown))}; "
                    f"valid modes: {', '.join(AFTER_WORK_MODES)}"
                )
        if self.nan_counts_style not in NAN_COUNTS_STYLES:
            raise ConfigError(
                f"simulator faults: nan_counts_style {self.nan_counts_style!r} is not one of "
                f"{', '.join(NAN_COUNTS_STYLES)}"
            )
        if self.routes is not None:
            unknown = [r for r in self.routes if r not in ROUTES]
            if unknown:
                raise ConfigError(
                    f"simulator faults: unknown route(s) {', '.join(map(repr, unknown))}; "
                    f"valid routes: {', '.join(ROUTES)}"
                )

    def applies_to(self) -> frozenset[str]:
        return DEFAULT_FAULT_ROUTES if self.routes is None else frozenset(self.routes)

    def modes(self) -> tuple[str, ...]:
        """The after-work modes in force (``after_work_modes``, or all of them)."""
        return AFTER_WORK_MODES if self.after_work_modes is None else tuple(self.after_work_modes)


def _range(value: float | tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if isinstance(value, int | float):
        low = high = float(value)
    else:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"simulator: {name} must be a number or a [low, high] pair") from None
    if low < 0 or high < low:
        raise ConfigError(f"simulator: {name} must satisfy 0 <= low <= high, got {value!r}")
    return low, high


@dataclass
class SimConfig:
    """Everything the simulator does, in simulated seconds unless the name says real seconds."""

    seed: int = 0
    time_scale: float = 1.0
    accounts: list[AccountConfig] = field(default_factory=list)
    open_accounts: bool = False
    default_account: AccountConfig = field(
        default_factory=lambda: AccountConfig(key="-", api_type="NORMAL", concurrency=1)
    )
    task_duration_s: float | tuple[float, float] = (10.0, 30.0)
    queue_delay_s: float | tuple[float, float] = (0.0, 2.0)
    failure_rate: float = 0.0
    coins_per_second: float = 0.2
    file_ttl_s: float = 86400.0
    retention_s: float = 7 * 86400.0
    webhook_retries: int = 3
    webhook_retry_interval_s: float = 60.0
    webhook_timeout_s: float = 5.0
    faults: Faults = field(default_factory=Faults)
    workflows: dict[str, Any] = field(default_factory=dict)
    webapps: dict[str, str] = field(default_factory=dict)
    unknown_key_code: int = 412
    cancel_finished_code: int = 0
    max_upload_bytes: int = 30 * 1024 * 1024

    def validate(self) -> None:
        """Raise ConfigError on the first impossible value."""
        if self.time_scale <= 0:
            raise ConfigError("simulator: time_scale must be > 0")
        _range(self.task_duration_s, "task_duration_s")
        _range(self.queue_delay_s, "queue_delay_s")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ConfigError("simulator: failure_rate must be between 0 and 1")
        for name in ("coins_per_second", "file_ttl_s", "retention_s", "webhook_retry_interval_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"simulator: {name} must be >= 0")
        if self.webhook_timeout_s <= 0:
            raise ConfigError("simulator: webhook_timeout_s must be > 0")
        if self.webhook_retries < 0:
            raise ConfigError("simulator: webhook_retries must be >= 0")
        if self.unknown_key_code not in (412, 806):
            raise ConfigError("simulator: unknown_key_code must be 412 or 806")
        for account in self.accounts:
            account.validate()
        keys = [a.key for a in self.accounts]
        if len(set(keys)) != len(keys):
            raise ConfigError("simulator: two accounts share the same key")
        self.faults.validate()

    @property
    def duration_range(self) -> tuple[float, float]:
        return _range(self.task_duration_s, "task_duration_s")

    @property
    def queue_delay_range(self) -> tuple[float, float]:
        return _range(self.queue_delay_s, "queue_delay_s")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: Path | None = None,
                  source: str = "simulator config") -> SimConfig:
        """Build a config from plain data; relative workflow paths resolve against ``base_dir``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
        values = dict(data)
        _check_keys(values, cls, source)
        if "accounts" in values:
            if not isinstance(values["accounts"], list):
                raise ConfigError(f"{source}: accounts must be a list of mappings")
            values["accounts"] = [
                _build(AccountConfig, a, f"{source}: accounts[{i}]") for i, a in enumerate(values["accounts"])
            ]
        if "default_account" in values:
            account = dict(values["default_account"] or {})
            account.setdefault("key", "-")
            values["default_account"] = _build(AccountConfig, account, f"{source}: default_account")
        if "faults" in values:
            faults = dict(values["faults"] or {})
            for name in ("routes", "after_work_modes"):
                if isinstance(faults.get(name), list):
                    faults[name] = tuple(faults[name])
            values["faults"] = _build(Faults, faults, f"{source}: faults")
        for name in ("task_duration_s", "queue_delay_s"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        if "workflows" in values:
            workflows = {}
            for wf_id, spec in (values["workflows"] or {}).items():
                if isinstance(spec, str) and base_dir is not None and not Path(spec).is_absolute():
                    spec = str(base_dir / spec)
                workflows[str(wf_id)] = spec
            values["workflows"] = workflows
        if "webapps" in values:
            values["webapps"] = {str(k): str(v) for k, v in (values["webapps"] or {}).items()}
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> SimConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read simulator config {path}: {exc.strerror}") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        return cls.from_dict(data, base_dir=path.parent, source=str(path))


def _check_keys(values: dict[str, Any], cls: type, source: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in values if k not in valid)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
        )


def _build(cls: type, values: Any, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: must be a mapping")
    _check_keys(values, cls, source)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
