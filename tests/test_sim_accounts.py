"""Per-account faults for key failover: a key that runs out of coins mid-run, a key revoked
mid-run, and the audit that proves each task was polled with the key that created it."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.sim import TEXT2IMG_WORKFLOW_ID, AccountConfig, SimConfig, Simulator
from pipeline.sim.testing import SimClient

# A frozen clock, tasks that start at once and run 10 simulated seconds for 5 coins each.
FROZEN = {"time_scale": 1e-9, "queue_delay_s": 0.0, "task_duration_s": 10.0, "coins_per_second": 0.5}
V2_CREATE = f"/openapi/v2/run/workflow/{TEXT2IMG_WORKFLOW_ID}"


def _seed(n: int) -> list[tuple[str, str, Any]]:
    return [("3", "seed", n)]


@pytest.fixture
def two_keys(frozen_sim):
    """``two_keys(first=AccountConfig fields...)``: (sim, a client for the first key, one for a
    second, healthy key)."""
    opened: list[SimClient] = []

    def factory(**first: Any) -> tuple[Simulator, SimClient, SimClient]:
        first_key, second_key = secrets.token_hex(16), secrets.token_hex(16)
        sim, _api = frozen_sim(accounts=[AccountConfig(key=first_key, **first),
                                         AccountConfig(key=second_key)], **FROZEN)
        clients = SimClient(sim, first_key), SimClient(sim, second_key)
        opened.extend(clients)
        return sim, *clients

    yield factory
    for client in opened:
        client.close()


# -- out of coins mid-run ----------------------------------------------------------------------


def test_a_key_runs_out_of_coins_mid_run_and_creates_answer_416(two_keys):
    sim, poor, rich = two_keys(coins=10, wallet_code=416)
    first, second = poor.task_id(_seed(1)), poor.task_id(_seed(2))  # 10 coins, not billed yet
    assert poor.account()["data"]["remainCoins"] == "10"
    sim.advance(10)  # both end: billed 5 coins each, the balance is spent
    assert poor.create(_seed(3)) == {"code": 416, "msg": "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET",
                                     "data": None}
    v2 = poor.post(V2_CREATE, {"nodeInfoList": []})
    assert (v2["errorCode"], v2["errorMessage"], v2["taskId"]) == ("605", "no balance", "")
    # the spent key still polls what it created, and says why it cannot create more
    for task_id in (first, second):
        assert poor.outputs(task_id)["code"] == 0
    assert poor.account()["data"]["remainCoins"] == "0"
    # another key carries on
    assert rich.create(_seed(3))["code"] == 0
    assert sim.audit.ledger_total() == 10 and len(sim.audit.tasks()) == 3
    assert [r["code"] for r in sim.audit.requests("create")] == [0, 0, 416, 0]


def test_tasks_accepted_before_the_balance_ran_out_run_on_and_are_billed(two_keys):
    sim, poor, _rich = two_keys(coins=5)  # the default wallet code, 414, seen on the live service
    running = [poor.task_id(_seed(n)) for n in range(3)]  # accepted: nothing billed yet
    sim.advance(10)
    assert poor.create(_seed(9))["code"] == 414
    assert [poor.outputs(t)["code"] for t in running] == [0, 0, 0]
    assert sim.audit.ledger_total() == 15
    assert sim.account(poor.key).coins == -10  # the service bills what ran, past the balance


# -- revoked mid-run ---------------------------------------------------------------------------


def _revoked(api: SimClient, task_id: str) -> None:
    """Every call with a revoked key answers 802 (v2: 1002), polls of its own tasks included."""
    for answer in (api.create(_seed(99)), api.status(task_id), api.outputs(task_id),
                   api.cancel(task_id), api.account()):
        assert (answer["code"], answer["msg"]) == (802, "APIKEY_UNAUTHORIZED"), answer
    query = api.post("/openapi/v2/query", {"taskId": task_id})
    assert (query["errorCode"], query["taskId"]) == ("1002", task_id)
    assert api.post(V2_CREATE, {"nodeInfoList": []})["errorCode"] == "1002"


def test_revoke_after_creates_accepts_that_many_then_answers_802(two_keys):
    sim, doomed, healthy = two_keys(revoke_after_creates=2)
    first = doomed.task_id(_seed(1))
    assert doomed.status(first)["code"] == 0
    second = doomed.task_id(_seed(2))  # the second create is accepted; the key is revoked after it
    _revoked(doomed, first)
    assert healthy.create(_seed(3))["code"] == 0
    # the revoked key's tasks run on and are billed
    sim.advance(10)
    records = {t["taskId"]: t for t in sim.audit.tasks()}
    assert records[first]["status"] == records[second]["status"] == "SUCCESS"
    assert records[first]["coins"] == records[second]["coins"] == 5


def test_revoke_at_s_revokes_the_key_from_that_simulated_time(two_keys):
    sim, doomed, healthy = two_keys(revoke_at_s=100.0)
    task_id = doomed.task_id(_seed(1))
    sim.advance(99)
    assert doomed.status(task_id) == {"code": 0, "msg": "success", "data": "SUCCESS"}
    sim.advance(1)
    _revoked(doomed, task_id)
    assert healthy.create(_seed(2))["code"] == 0


def test_simulator_revoke_revokes_a_key_at_once(two_keys):
    sim, doomed, healthy = two_keys()
    task_id = doomed.task_id(_seed(1))
    sim.revoke(doomed.key)
    _revoked(doomed, task_id)
    assert healthy.create(_seed(2))["code"] == 0
    with pytest.raises(KeyError):
        sim.revoke(secrets.token_hex(16))


@pytest.mark.parametrize("fields,message", [
    ({"revoke_after_creates": 0}, "revoke_after_creates must be an integer >= 1, got 0"),
    ({"revoke_after_creates": 1.5}, "revoke_after_creates must be an integer >= 1, got 1.5"),
    ({"revoke_at_s": -1}, "revoke_at_s must be a number >= 0, got -1"),
    ({"revoke_at_s": "soon"}, "revoke_at_s must be a number >= 0, got 'soon'"),
])
def test_bad_revocation_settings_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        AccountConfig(key="k", **fields).validate()


def test_per_account_faults_from_a_config_file(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("accounts:\n  - {key: a, coins: 10, wallet_code: 416}\n"
                    "  - {key: b, revoke_after_creates: 3}\n  - {key: c, revoke_at_s: 60}\n",
                    encoding="utf-8")
    a, b, c = SimConfig.from_file(path).accounts
    assert (a.coins, a.wallet_code, b.revoke_after_creates, c.revoke_at_s) == (10, 416, 3, 60)


# -- which key touched which task --------------------------------------------------------------


def test_task_key_fps_shows_each_task_was_polled_with_the_key_that_created_it(two_keys):
    sim, one, other = two_keys()
    mine = [one.task_id(_seed(1)), one.task_id(_seed(2))]
    theirs = [other.task_id(_seed(3))]
    sim.advance(10)
    for api, task_ids in ((one, mine), (other, theirs)):
        for task_id in task_ids:
            assert api.status(task_id)["code"] == 0
            answer = api.outputs(task_id)
            assert api.http.get(answer["data"][0]["fileUrl"]).status_code == 200  # carries no key
    creator = {t["taskId"]: t["key_fp"] for t in sim.audit.tasks()}
    assert sim.audit.task_key_fps() == {task_id: {fp} for task_id, fp in creator.items()}
    assert creator[mine[0]] == sim.account(one.key).key_fp != creator[theirs[0]]


def test_task_key_fps_catches_a_task_polled_with_another_key(two_keys):
    sim, one, other = two_keys()
    task_id = one.task_id(_seed(1))
    assert other.outputs(task_id)["code"] == 807  # another account's task: not found for it
    assert sim.audit.task_key_fps()[task_id] == {sim.account(one.key).key_fp,
                                                 sim.account(other.key).key_fp}


def test_failover_to_a_second_key_keeps_every_task_on_its_own_key(two_keys):
    """What a client with two keys must do: create on the first until it is refused for good,
    then on the second, and poll every task with the key that created it."""
    sim, first, second = two_keys(revoke_after_creates=3)
    owner: dict[str, SimClient] = {}
    for n in range(6):
        for api in (first, second):
            answer = api.create(_seed(n))
            if answer["code"] == 0:
                owner[answer["data"]["taskId"]] = api
                break
            assert answer["code"] == 802
    sim.advance(10)
    # the first key's tasks can no longer be polled at all: they were billed all the same
    for task_id, api in owner.items():
        expected = 802 if api is first else 0
        assert api.outputs(task_id)["code"] == expected
    assert [api is first for api in owner.values()] == [True] * 3 + [False] * 3
    fps = sim.audit.task_key_fps()
    assert all(fps[task_id] == {sim.account(api.key).key_fp} for task_id, api in owner.items())
    assert sim.audit.ledger_total() == 6 * 5
