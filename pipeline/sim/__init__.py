"""A faithful local RunningHub: a real HTTP server on loopback for tests, benchmarks and demos.

Model
-----
The simulator implements the v1 task API of ``runninghub-api.md`` (create, ai-app/run, status,
outputs, cancel, accountStatus, upload, getJsonApiFormat, getWebhookDetail, retryWebhook), the v2
API (``run/workflow/{id}``, ``run/ai-app/{id}``, ``query``, ``media/upload/binary``,
``queue/status``), and ``GET /files/...`` for the generated outputs and v2 uploads.

* **Clock.** Everything runs on a simulated clock, ``time_scale`` simulated seconds per real second;
  ``Simulator.advance`` jumps it forward. Task state is computed lazily from timestamps
  (:mod:`pipeline.sim.model`), so idle tasks cost nothing; a 10 ms ticker only delivers webhooks.
* **Accounts.** Each key has a type (NORMAL/SHARED/EXCLUSIVE), a concurrency limit counted as
  queued + running, a coin balance billed per simulated GPU second when a task ends, and flags for
  free (801) and revoked (802) users. Unknown keys answer 412 (``unknown_key_code=806`` makes a
  well-formed unknown key answer 806 instead). ``open_accounts`` creates any well-formed
  32-character key on first use from ``default_account``. Per-account faults, for key failover:
  a small ``coins`` balance runs out mid-run (creates then answer ``wallet_code``, 416 being the
  documented code), and a key can be revoked mid-run (``revoke_after_creates``, ``revoke_at_s``,
  :meth:`Simulator.revoke`: every later call answers 802). :meth:`Audit.task_key_fps` proves
  which keys touched each task.
* **Create checks**, in the order of §8 (v1 and v2 creates alike): parameters 301 → key
  412/806/802/801 → balance 414/416/812 → workflow 380 (app 901) → a spent money wallet
  (``wallet_code``, workflows billed in money only) → concurrency 421, or 415 / personal queue /
  814 for EXCLUSIVE → nodeInfoList 803 → ComfyUI value validation 433 → accepted.
* **Choices where the docs are silent** (documented so tests can rely on them):
  STRING inputs accept numbers (ComfyUI applies ``str()``) but not booleans, null, lists or
  mappings; INT inputs accept integral floats (``7.0``) and integer strings; ``workflow`` together
  with a non-empty ``nodeInfoList`` answers 803; ``/status`` of a cancelled task reads ``FAILED``
  and ``/outputs`` answers 805 with ``exception_type`` ``TaskCancelled`` (v2 query says CANCEL);
  cancelled tasks send no webhook; cancelling a finished task answers ``cancel_finished_code``
  (0); uploads with an extension outside §3.9 or an empty file answer 301, over 30 MB 809, and a
  ZIP upload's fileName is the bare sha256; getWebhookDetail for a task without a delivery
  answers code 1 "webhook event not exists"; each output item carries the task's total
  ``consumeCoins``; webhook ``eventData`` has a numeric ``taskCostTime`` (a real quirk).
* **v2.** v2 creates run the same create pipeline and answer HTTP 200 with a flat object
  (``taskId, status, errorCode, errorMessage, clientId, promptTips, results, usage,
  failedReason``; no ``code``); an error's v1 code becomes ``errorCode`` through
  ``V2_ERROR_CODES`` (documented v2 codes where known, else the v1 number as a string). A task
  created on v2 gets webhooks whose ``eventData`` is the v2 query object, not a string. The v2
  upload answers ``{code, message, data}``. ``AccountConfig.v1_task_routes`` makes a v2-only key.
* **Money and child tasks** (:class:`WorkflowBilling`, ``SimConfig.workflow_billing``): a
  workflow can be billed in money (to the cent) instead of or besides coins, and can spawn child
  tasks listed in v2 ``taskUsageList`` with a bare numeric ``taskId`` that lost its last digits.
* **Latency** (``Faults.latency_s``, ``latency_jitter_s``): a real-time network round trip
  added to every answer, waited out concurrently, whatever the simulated clock does.
* **Faults** (:class:`Faults`) are drawn from a seeded RNG and recorded in the audit. Pre-faults
  fail before any work; ``lost_create``, ``create_813`` and ``after_work`` (one of
  ``AFTER_WORK_MODES``) fail a create whose task already exists and is billed; the hostile-answer
  faults (``trickle``, ``oversized``, ``gzip_bomb``, ``deep_json``, ``nan_counts``,
  ``control_chars``, ``newline_task_id``) answer a processed request in a shape meant to break
  the client.
* **Audit** (:class:`pipeline.sim.audit.Audit`) never holds a key, only ``key_fp``.

Layout
------
``server.py`` is the wire (aiohttp, thread and loop, dispatch, fault injection, audit records,
webhook delivery), with ``hostile.py`` (the answers faults send); ``api.py`` is RunningHub's
routes and their checks over ``model.py`` (accounts, tasks, billing, the clock), with
``checks.py`` (the create's parameter, nodeInfoList and value checks) and ``envelopes.py``
(answer shapes and the code-name table); ``config.py`` the settings;
``audit.py`` the records; ``testing.py`` the test helpers (``SimClient``, ``WebhookRecorder``);
``cli.py`` ``rhbatch sim``.

Independent copies, on purpose
------------------------------
The simulator is the oracle rhbatch is judged against, so it imports nothing from the client
side (``pipeline.client``, ``pipeline.manifest``, ``pipeline.errors.CODES``...): it keeps its own
code-name table (``envelopes.CODE_NAMES``), key fingerprint, ComfyUI link test and canonical
nodeInfoList (``model.py``), and ``tests/conftest.py`` its own ``canonical``. If both sides
shared one helper, a bug in it would agree with itself and no test would catch it. Do not
"deduplicate" these copies; the one import from rhbatch is ``pipeline.errors.ConfigError`` (and
``pipeline.resources`` to find the bundled workflows); ``tests/test_sim_layout.py`` pins it.
"""

from pipeline.sim.audit import Audit
from pipeline.sim.config import (
    AFTER_WORK_MODES,
    CONTROL_INJECTION,
    FORGED_LOG_LINE,
    ROUTES,
    V2_ERROR_CODES,
    AccountConfig,
    Faults,
    SimConfig,
    WorkflowBilling,
    v2_error_code,
)
from pipeline.sim.model import canonical_node_info, key_fingerprint, signature
from pipeline.sim.server import (
    DEFAULT_WEBAPP_ID,
    IMG2IMG_WORKFLOW_ID,
    TEXT2IMG_WORKFLOW_ID,
    Simulator,
)

__all__ = [
    "AFTER_WORK_MODES",
    "AccountConfig",
    "Audit",
    "CONTROL_INJECTION",
    "DEFAULT_WEBAPP_ID",
    "FORGED_LOG_LINE",
    "Faults",
    "IMG2IMG_WORKFLOW_ID",
    "ROUTES",
    "SimConfig",
    "Simulator",
    "TEXT2IMG_WORKFLOW_ID",
    "V2_ERROR_CODES",
    "WorkflowBilling",
    "canonical_node_info",
    "key_fingerprint",
    "signature",
    "v2_error_code",
]
