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
    workflow_billing:                            # per workflow id, see WorkflowBilling
      "123": {billing: money, money_per_second: 0.014, child_tasks: 2}
    results_without_node_id: false               # v2 results / v2 webhooks without nodeId

Unknown keys are an error (:class:`pipeline.errors.ConfigError`) that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    "v2_run_workflow",
    "v2_run_ai_app",
    "v2_upload",
    "files",
    "unknown",
)

#: Routes faults apply to when ``Faults.routes`` is None: the task API, not file downloads.
DEFAULT_FAULT_ROUTES: frozenset[str] = frozenset(r for r in ROUTES if r not in ("files",))

#: Routes whose calls count against ``Faults.poll_rate_limit_per_s``.
POLL_ROUTES: frozenset[str] = frozenset({"status", "outputs", "account_status", "v2_query"})

#: Routes that create (and bill) a task: where ``after_work``, ``lost_create``, ``create_813`` and
#: ``newline_task_id`` apply.
CREATE_ROUTES: frozenset[str] = frozenset({"create", "ai_app_run", "v2_run_workflow", "v2_run_ai_app"})

#: The create routes of the v2 API: they answer the flat v2 object (``errorCode``, no ``code``).
V2_CREATE_ROUTES: frozenset[str] = frozenset({"v2_run_workflow", "v2_run_ai_app"})

#: The v1 task routes a v2-only account loses (``AccountConfig.v1_task_routes``); accountStatus,
#: getJsonApiFormat and the webhook routes keep working.
V1_TASK_ROUTES: frozenset[str] = frozenset({"create", "ai_app_run", "status", "outputs", "upload",
                                             "cancel"})

#: What ``AccountConfig.v1_task_routes`` may be: "ok" (they work), "412" (they answer
#: ``{"code":412,"msg":"TOKEN_INVALID","data":null}``) or "404" (HTTP 404 with an HTML page).
V1_TASK_ROUTE_MODES: tuple[str, ...] = ("ok", "412", "404")

#: v1 code -> the v2 ``errorCode`` string a v2 route answers for the same failure. Where
#: runninghub-api.md section 6 documents a v2 code it is used: 301 parameters -> 1007, 412/802 auth
#: -> 1002, 803 node info -> 1101, 1003 rate limit -> 1003, 807 not found -> 1004, 809 size ->
#: 1008; the wallet codes 414/416/812 -> 605 (what v2 clients treat as "no balance",
#: runninghub-api-2026.md 1.2). Every other code (421, 415, 814, 433, 380, 810, 901, 801, 806, 500,
#: ...) keeps its v1 number as a string: no v2 equivalent is documented.
V2_ERROR_CODES: dict[int, str] = {
    301: "1007",
    412: "1002",
    802: "1002",
    803: "1101",
    1003: "1003",
    807: "1004",
    809: "1008",
    414: "605",
    416: "605",
    812: "605",
}

#: ``errorMessage`` of the documented v2 codes (others say the v1 ``msg``).
V2_ERROR_MESSAGES: dict[str, str] = {
    "605": "no balance",
    "1002": "auth failed",
    "1003": "rate limited",
    "1004": "not found or expired",
    "1005": "server error",
    "1007": "param invalid",
    "1008": "size exceeded",
    "1101": "node info error",
}


def v2_error_code(code: int) -> str:
    """The v2 ``errorCode`` for a v1 ``code`` (see ``V2_ERROR_CODES``)."""
    return V2_ERROR_CODES.get(code, str(code))


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
BILLING_KINDS = ("coins", "money", "both")
MONEY_FIELDS = ("thirdPartyConsumeMoney", "consumeMoney")
PARENT_USAGE = ("children", "total")
CHILD_TASK_ID_STYLES = ("float", "js")
CURRENCY = "CNY"


@dataclass
class AccountConfig:
    """One API key and what its account may do.

    ``api_type`` NORMAL/SHARED answer 421 when ``concurrency`` tasks are live; EXCLUSIVE answers
    415, or queues up to ``personal_queue_limit`` tasks when the create asks ``usePersonalQueue``
    (814 beyond). ``wallet_code`` is the code create answers once ``coins`` is spent (414, 416 or
    812). ``free_user`` makes every call answer 801, ``revoked`` 802.

    Per-account faults, for key failover (several keys in one run):

    - **Running out of coins mid-run.** ``coins`` is the balance, and each task is billed when it
      ends; once the account's billed coins reach it (balance <= 0) every create answers
      ``wallet_code``: 416 TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET is the documented code
      (runninghub-api.md section 6), 414 (the default) the one observed live, 812 the enterprise
      one (v2 creates: 605). Tasks already accepted run on; polls, cancels and accountStatus keep
      working.
    - **Revoked mid-run.** ``revoke_after_creates`` N revokes the key once N of its creates were
      accepted (the Nth is accepted); ``revoke_at_s`` revokes it from that simulated time on;
      ``Simulator.revoke(key)`` revokes it at once. From then on every call with the key (polls
      of its own tasks included) answers 802 APIKEY_UNAUTHORIZED (v2: 1002), as ``revoked`` does.

    ``money`` is a money wallet in CNY (None = the account has none: accountStatus then says
    ``remainMoney``/``currency`` null). Workflows billed in money (``WorkflowBilling``) draw it down
    to the cent; once it is spent (<= 0) a create of such a workflow answers ``wallet_code`` (after
    the workflow check, since only then is the workflow's billing known). Without a wallet, money is
    still billed and counted (``Account.billed_money``, ``Audit.money_ledger``). ``coins`` <= 0
    still refuses every create, money workflows included: that check comes before the workflow.

    ``v1_task_routes`` makes a v2-only key: "ok" (default), "412" (v1 create, ai-app/run, status,
    outputs, upload and cancel answer ``{"code":412,"msg":"TOKEN_INVALID","data":null}`` for this
    key) or "404" (those routes answer HTTP 404 with an HTML page). accountStatus, the v2 routes and
    the other v1 routes keep working. The integers 412 / 404 are accepted for "412" / "404".
    """

    key: str
    api_type: str = "SHARED"
    concurrency: int = 50
    coins: float = 10**9
    free_user: bool = False
    revoked: bool = False
    personal_queue_limit: int = 1000
    wallet_code: int = 414
    money: float | None = None
    v1_task_routes: str = "ok"
    revoke_after_creates: int | None = None
    revoke_at_s: float | None = None

    def validate(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError("simulator account: key must be a non-empty string")
        if self.api_type not in API_TYPES:
            raise ConfigError(
                f"simulator account: api_type {self.api_type!r} is not one of {', '.join(API_TYPES)}"
            )
        _check_integer("simulator account", "concurrency", self.concurrency, 1)
        _check_number("simulator account", "coins", self.coins)
        for name in ("free_user", "revoked"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"simulator account: {name} must be true or false, "
                                  f"got {getattr(self, name)!r}")
        if self.revoke_after_creates is not None:
            _check_integer("simulator account", "revoke_after_creates", self.revoke_after_creates, 1)
        if self.revoke_at_s is not None:
            _check_number("simulator account", "revoke_at_s", self.revoke_at_s, 0)
        if self.wallet_code not in WALLET_CODES:
            raise ConfigError(
                f"simulator account: wallet_code {self.wallet_code} is not one of {WALLET_CODES}"
            )
        _check_integer("simulator account", "personal_queue_limit", self.personal_queue_limit, 0)
        if self.money is not None and (isinstance(self.money, bool)
                                       or not isinstance(self.money, int | float)
                                       or not math.isfinite(self.money)):
            raise ConfigError(f"simulator account: money must be a number or null, got {self.money!r}")
        routes = self.v1_task_routes
        if isinstance(routes, int) and not isinstance(routes, bool):
            routes = self.v1_task_routes = str(routes)
        if routes not in V1_TASK_ROUTE_MODES:
            raise ConfigError(
                f"simulator account: v1_task_routes {routes!r} is not one of "
                f"{', '.join(repr(m) for m in V1_TASK_ROUTE_MODES)}"
            )

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
      taskId in ``data`` (on a v2 create: the flat answer with ``errorCode`` "813").
    - ``poll_rate_limit_per_s``: status/outputs/accountStatus/v2 query calls by one key beyond this
      many per real second answer code 1003 (0 = no limit).
    - ``status_outputs_lag_s``: for this many simulated seconds after a task succeeds, ``/status``
      says SUCCESS while ``/outputs`` still answers 804.
    - ``routes``: route names (see ``ROUTES``) the rate faults and the latency apply to; None = all
      but ``files``.

    Network round trip (issue #18):

    - ``latency_s``: every answer on ``routes`` (the pre-faults' answers included) leaves this many
      real seconds after its request was read and processed, plus a uniform draw from 0 to
      ``latency_jitter_s`` (from its own seeded RNG, so a jitter never changes which other faults
      are drawn). Real seconds whatever ``time_scale`` (at a time_scale of 100, a 0.2 s round trip
      lasts 20 simulated seconds) and whatever ``Simulator.advance`` does. The wait is an asyncio
      sleep outside the simulator lock: concurrent requests wait side by side, and ``close()``
      cuts it short.

    After-work faults (the request was processed and its task created, started and billed):

    - ``after_work``: on an accepted create or ai-app run (v1 or v2: every route of
      ``CREATE_ROUTES``), replace the answer by one mode drawn uniformly from ``after_work_modes``
      (None = every one of ``AFTER_WORK_MODES``). The request audit's fault and the task's
      ``faults`` say ``after_work:<mode>``. ``stall`` holds the answer ``stall_s`` real seconds;
      ``trickle`` sends it one byte per ``trickle_interval_s``. On a v2 create the ``code_*``
      modes write the flat answer's ``errorCode`` instead of ``code``: code_500 -> "500" with
      taskId "", code_500_task -> "500" with the taskId, code_1005 -> "1005", code_null -> null
      with the taskId, code_text -> "0.0" with the taskId, code_unknown -> "999"; ``garbage`` is a
      cut v2 object.

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
    - ``newline_task_id``: an accepted create's task id (v1 or v2 create) carries a newline and a
      forged log line; the task is stored under exactly that id (status/outputs/cancel/v2 query
      accept it).
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
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0

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
        for name in ("latency_s", "latency_jitter_s"):
            _check_number("simulator faults", name, getattr(self, name), 0, unit=" (real seconds)")
        for name, low in (("oversized_bytes", 64), ("gzip_bomb_bytes", 64), ("deep_json_depth", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"simulator faults: {name} must be an integer >= {low}, got {value!r}")
        if self.after_work_modes is not None:
            modes = self.after_work_modes
            if not isinstance(modes, tuple | list) or not modes:
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
            if not isinstance(self.routes, tuple | list):
                raise ConfigError(f"simulator faults: routes must be a list of route names or null, "
                                  f"got {self.routes!r}; valid routes: {', '.join(ROUTES)}")
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
class WorkflowBilling:
    """How one workflow's tasks are billed and reported (``SimConfig.workflow_billing[id]``).

    Applies to every task of the workflow, AI-app runs of it included. A task is billed when it
    ends (success, failure or cancel) for the simulated GPU seconds it used:

    - ``billing``: "coins" (the default: ``coins_per_second`` x seconds, rounded up to whole
      coins, as for any workflow without an entry), "money" (no coins: ``consumeCoins`` is null
      and the money field carries ``money_per_second`` x seconds, rounded up to the cent, written
      as a decimal string such as "0.14"), or "both" (coins and money).
    - ``coins_per_second``: None = ``SimConfig.coins_per_second``.
    - ``money_per_second``: CNY per simulated second (0.014: 10 s cost "0.14").
    - ``money_field``: which usage field carries the money: "thirdPartyConsumeMoney" (partner
      nodes, the default) or "consumeMoney". The other one is null.
    - ``child_tasks``: the task spawns this many child tasks. Its runtime is split evenly between
      them and each child is billed for its share (coins rounded up and money to the cent, per
      child); the task's bill is the sum of its children's. v2 query and v2 webhooks then list
      them in ``taskUsageList`` (``{taskId, parentTaskId, taskStatus, usage}``, taskId a bare JSON
      number with its last digits lost, see ``SimConfig.child_task_id_style``) with a top-level
      ``parentTaskId`` null (the task itself has no parent). Child ids are not tasks of their
      own: a query for one answers "not found".
    - ``parent_usage`` (with child tasks): "children" (default) = the task's own ``usage`` has
      null for every figure its children carry (``consumeCoins`` and/or the money field; it keeps
      ``taskCostTime``); "total" = it also carries the sums (as in the one captured webhook,
      where the parent repeats its only child's "0.14"), so adding parent and children counts
      twice.
    - ``results_without_node_id``: None = ``SimConfig.results_without_node_id``; True drops
      ``nodeId`` from v2 ``results`` items (query and webhooks).

    v1 ``outputs`` items carry the task's totals: ``consumeCoins`` (null for "money"), and
    ``consumeMoney`` / ``thirdPartyConsumeMoney`` as strings for the money field (null otherwise).
    """

    billing: str = "coins"
    coins_per_second: float | None = None
    money_per_second: float = 0.014
    money_field: str = "thirdPartyConsumeMoney"
    child_tasks: int = 0
    parent_usage: str = "children"
    results_without_node_id: bool | None = None

    @property
    def coins(self) -> bool:
        return self.billing in ("coins", "both")

    @property
    def money(self) -> bool:
        return self.billing in ("money", "both")

    def validate(self, source: str = "simulator workflow_billing") -> None:
        if self.billing not in BILLING_KINDS:
            raise ConfigError(f"{source}: billing {self.billing!r} is not one of {', '.join(BILLING_KINDS)}")
        for name in ("coins_per_second", "money_per_second"):
            value = getattr(self, name)
            if value is None and name == "coins_per_second":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 \
                    or not math.isfinite(value):
                raise ConfigError(f"{source}: {name} must be a number >= 0, got {value!r}")
        if self.money_field not in MONEY_FIELDS:
            raise ConfigError(
                f"{source}: money_field {self.money_field!r} is not one of {', '.join(MONEY_FIELDS)}")
        if isinstance(self.child_tasks, bool) or not isinstance(self.child_tasks, int) \
                or not 0 <= self.child_tasks <= 1000:
            raise ConfigError(f"{source}: child_tasks must be an integer from 0 to 1000, "
                              f"got {self.child_tasks!r}")
        if self.parent_usage not in PARENT_USAGE:
            raise ConfigError(
                f"{source}: parent_usage {self.parent_usage!r} is not one of {', '.join(PARENT_USAGE)}")
        if self.results_without_node_id not in (None, True, False):
            raise ConfigError(f"{source}: results_without_node_id must be true, false or null")


@dataclass
class SimConfig:
    """Everything the simulator does, in simulated seconds unless the name says real seconds.

    ``workflow_billing`` maps a workflow id to its :class:`WorkflowBilling` (a mapping of its
    fields is accepted too); workflows without an entry are billed in coins as before. Every id
    must name a workflow the simulator knows (built in or in ``workflows``).
    ``results_without_node_id`` drops ``nodeId`` from every v2 ``results`` item (v2 query and v2
    webhooks) unless a workflow's entry says otherwise. ``child_task_id_style`` says how a child
    task's id in ``taskUsageList`` loses its last digits: "float" = ``int(float(id))`` (the
    float64 value, e.g. 2052287938007814144) or "js" = the digits JavaScript prints for that
    float64 (e.g. 2052287938007814100, as in the captured webhook); both are bare JSON numbers.
    """

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
    workflow_billing: dict[str, WorkflowBilling] = field(default_factory=dict)
    results_without_node_id: bool = False
    child_task_id_style: str = "float"

    def __post_init__(self) -> None:
        if isinstance(self.workflow_billing, dict):
            self.workflow_billing = {
                str(wf_id): spec if isinstance(spec, WorkflowBilling) else _build(
                    WorkflowBilling, spec, f"simulator workflow_billing[{wf_id!r}]")
                for wf_id, spec in self.workflow_billing.items()
            }

    def billing_for(self, workflow_id: str) -> WorkflowBilling:
        """The workflow's billing entry, or the default (coins) one."""
        return self.workflow_billing.get(workflow_id) or _DEFAULT_BILLING

    def without_node_id(self, workflow_id: str) -> bool:
        """Whether v2 results of this workflow's tasks leave out ``nodeId``."""
        own = self.billing_for(workflow_id).results_without_node_id
        return self.results_without_node_id if own is None else own

    def validate(self) -> None:
        """Raise ConfigError on the first impossible value."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"simulator: seed must be an integer, got {self.seed!r}")
        scale = self.time_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) \
                or scale <= 0:
            raise ConfigError(f"simulator: time_scale must be > 0 (simulated seconds per real "
                              f"second), got {scale!r}")
        _range(self.task_duration_s, "task_duration_s")
        _range(self.queue_delay_s, "queue_delay_s")
        rate = self.failure_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ConfigError(f"simulator: failure_rate must be between 0 and 1, got {rate!r}")
        for name in ("coins_per_second", "file_ttl_s", "retention_s", "webhook_retry_interval_s"):
            _check_number("simulator", name, getattr(self, name), 0)
        _check_number("simulator", "webhook_timeout_s", self.webhook_timeout_s, 0, above=True)
        _check_integer("simulator", "webhook_retries", self.webhook_retries, 0)
        _check_integer("simulator", "max_upload_bytes", self.max_upload_bytes, 0)
        if self.unknown_key_code not in (412, 806):
            raise ConfigError("simulator: unknown_key_code must be 412 or 806")
        if isinstance(self.cancel_finished_code, bool) or not isinstance(self.cancel_finished_code, int):
            raise ConfigError(f"simulator: cancel_finished_code must be an integer code, "
                              f"got {self.cancel_finished_code!r}")
        if not isinstance(self.open_accounts, bool):
            raise ConfigError("simulator: open_accounts must be true or false")
        if not isinstance(self.faults, Faults):
            raise ConfigError("simulator: faults must be a mapping of fault -> value")
        if not isinstance(self.workflow_billing, dict):
            raise ConfigError("simulator: workflow_billing must be a mapping of workflow id -> billing")
        for wf_id, billing in self.workflow_billing.items():
            if not isinstance(billing, WorkflowBilling):
                raise ConfigError(f"simulator: workflow_billing[{wf_id!r}] must be a mapping")
            billing.validate(f"simulator workflow_billing[{wf_id!r}]")
        if not isinstance(self.results_without_node_id, bool):
            raise ConfigError("simulator: results_without_node_id must be true or false")
        if self.child_task_id_style not in CHILD_TASK_ID_STYLES:
            raise ConfigError(f"simulator: child_task_id_style {self.child_task_id_style!r} is not "
                              f"one of {', '.join(CHILD_TASK_ID_STYLES)}")
        self.default_account.validate()
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
        for name in ("default_account", "faults", "workflows", "webapps"):
            if name in values and not isinstance(values[name] or {}, dict):
                raise ConfigError(f"{source}: {name} must be a mapping, got {values[name]!r}")
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
        if "workflow_billing" in values:
            billing = values["workflow_billing"] or {}
            if not isinstance(billing, dict):
                raise ConfigError(f"{source}: workflow_billing must be a mapping of workflow id -> "
                                  "billing")
            values["workflow_billing"] = {
                str(wf_id): _build(WorkflowBilling, spec, f"{source}: workflow_billing[{wf_id!r}]")
                for wf_id, spec in billing.items()
            }
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
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: "
                              f"{_one_line(exc)}") from exc
        return cls.from_dict(data, base_dir=path.parent, source=str(path))


def _one_line(exc: Exception) -> str:
    """A parser's error on one line: YAML's problem and where ("line 2, column 5"), else the
    message with its whitespace runs collapsed."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if isinstance(problem, str) and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _check_number(source: str, name: str, value: Any, low: float | None = None, *,
                  above: bool = False, unit: str = "") -> None:
    """``value`` is a finite number (>= ``low``, or > ``low`` with ``above``), else ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
        raise ConfigError(f"{source}: {name} must be a number{bound}{unit}, got {value!r}")


def _check_integer(source: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{source}: {name} must be an integer >= {low}, got {value!r}")


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


_DEFAULT_BILLING = WorkflowBilling()
