"""Several keys in one run (issue #17), over real HTTP against the simulator: rows go to the key
with a free slot, every task is followed with the key that created it, a key that fails for good
is retired while the others finish the run, budgets hold over all keys and per key, and a resume
needs every key that still holds tasks."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.config import key_fingerprint
from pipeline.errors import StateError
from pipeline.keys import resolve_keys
from pipeline.pool import keys_holding
from pipeline.sim import AccountConfig
from pipeline.sim import key_fingerprint as audit_fp  # the simulator's audit shows a shorter one
from tests.conftest import fast_settings, write_manifest


def _keys(*secrets_: str, **labels: str):
    env = {"RUNNINGHUB_API_KEYS": ",".join(secrets_)}
    return resolve_keys(env=env)


def _run(sim, keys, manifest, out, settings=None, **options):
    settings = fast_settings(sim, None, concurrency=50, **(settings or {}))
    return run_batch(ManifestArgs(manifest), out, settings, handle_signals=False,
                     keys=tuple(keys), **options)


def audit_fp_of(recorded_fp: str, secrets_: list[str]) -> str:
    """The audit's fingerprint of the key whose run fingerprint is ``recorded_fp``."""
    return next(audit_fp(k) for k in secrets_ if key_fingerprint(k) == recorded_fp)


def _seed(task) -> int:
    return next(int(n["fieldValue"]) for n in task["nodeInfoList"] if n["fieldName"] == "seed")


def _each_task_read_with_its_key(sim) -> None:
    """No cross-key call: every task was polled only with the key that created it (the API
    detection's probe of a task id that names no task is not a task)."""
    creators = {t["taskId"]: t["key_fp"] for t in sim.audit.tasks()}
    touched = {task: seen for task, seen in sim.audit.task_key_fps().items() if task in creators}
    assert len(touched) == len(creators)
    crossed = {task: seen for task, seen in touched.items() if seen != {creators[task]}}
    assert not crossed


def _no_row_twice(sim) -> Counter:
    seeds = Counter(_seed(t) for t in sim.audit.tasks())
    assert max(seeds.values()) == 1, "a row was created twice"
    return seeds


def test_three_keys_share_the_rows_and_every_task_is_polled_with_its_own_key(make_sim, tmp_path):
    secrets_ = [secrets.token_hex(16) for _ in range(3)]
    sim = make_sim(accounts=[AccountConfig(key=k, concurrency=c)
                             for k, c in zip(secrets_, (1, 5, 20), strict=True)])
    manifest = write_manifest(tmp_path / "m.csv", 260)
    keys = _keys(*secrets_)
    summary = _run(sim, keys, manifest, tmp_path / "run")
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 260
    _no_row_twice(sim)
    fps = [audit_fp(k) for k in secrets_]
    by_key = Counter(t["key_fp"] for t in sim.audit.tasks())
    # every key worked, and the 20-slot key did most of it
    assert set(by_key) == set(fps) and by_key[fps[2]] > by_key[fps[1]] > by_key[fps[0]] >= 1
    _each_task_read_with_its_key(sim)
    # the state says which key created each row, as the service does
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        recorded = {r["task_id"]: audit_fp_of(r["key_fp"], secrets_) for r in store.iter_rows()}
        assert recorded == {t["taskId"]: t["key_fp"] for t in sim.audit.tasks()}
        meta = store.get_meta("keys")
        full = [key_fingerprint(k) for k in secrets_]
        assert [meta[fp]["label"] for fp in full] == ["key-1", "key-2", "key-3"]
        assert all(meta[fp]["retired"] is None for fp in full)
    finally:
        store.close()
    outcomes = {k.label: k for k in summary.keys}
    assert sum(k.created for k in outcomes.values()) == 260
    assert outcomes["key-1"].window <= 2  # the 1-slot key's window learnt its limit


def test_a_revoked_key_and_one_out_of_coins_are_retired_and_the_last_key_finishes(make_sim,
                                                                                  tmp_path):
    revoked, broke, good = (secrets.token_hex(16) for _ in range(3))
    sim = make_sim(accounts=[
        AccountConfig(key=revoked, concurrency=5, revoke_after_creates=6),
        AccountConfig(key=broke, concurrency=5, coins=30, wallet_code=416),
        AccountConfig(key=good, concurrency=5),
    ])
    manifest = write_manifest(tmp_path / "m.csv", 60)
    summary = _run(sim, _keys(revoked, broke, good), manifest, tmp_path / "run")
    seeds = _no_row_twice(sim)
    outcomes = {k.label: k for k in summary.keys}
    # revoked: 802 on v1, 1002 on v2 (its reads are v2 query)
    assert re.search(r"\b(802|1002)\b", outcomes["key-1"].retired or "")
    assert outcomes["key-2"].retired and "416" in outcomes["key-2"].retired
    assert outcomes["key-3"].retired is None
    # nothing lost: every row is done, or live on the revoked key (its tasks can no longer be
    # read with it, and stay recorded for a resume with it)
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        rows = list(store.iter_rows())
        stranded = [r for r in rows if r["status"] in (st.QUEUED, st.RUNNING)]
        assert all(r["key_fp"] == key_fingerprint(revoked) for r in stranded)
        assert all(r["status"] == st.SUCCESS for r in rows if r not in stranded)
        assert len(seeds) == len(rows) == 60  # every row was created once, none left pending
        meta = store.get_meta("keys")
        assert meta[key_fingerprint(revoked)]["retired"] == outcomes["key-1"].retired
    finally:
        store.close()
    assert summary.exit_code == (1 if stranded else 0)
    _each_task_read_with_its_key(sim)


def test_the_run_stops_with_exit_3_only_when_no_key_is_left(make_sim, tmp_path):
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    sim = make_sim(accounts=[AccountConfig(key=a, concurrency=2, coins=10, wallet_code=416),
                             AccountConfig(key=b, concurrency=2, coins=10, wallet_code=416)])
    manifest = write_manifest(tmp_path / "m.csv", 80)
    summary = _run(sim, _keys(a, b), manifest, tmp_path / "run")
    assert summary.exit_code == 3
    assert summary.stopped and "no key is left" in summary.stopped
    assert summary.counts[st.PENDING] > 0  # kept for a resume
    assert all(k.retired for k in summary.keys)
    _no_row_twice(sim)


# the simulator bills 0.2 coins a second of 10-30 s tasks, so at most 6 coins a task: the
# --expected-coins a user who knows the workflow gives (a lower one is the user's own estimate,
# trusted until the first prices come back)
EXPECTED = 6.0


def test_the_run_budget_holds_over_every_key_and_a_key_budget_over_its_own(make_sim, tmp_path):
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    sim = make_sim(accounts=[AccountConfig(key=a, concurrency=4),
                             AccountConfig(key=b, concurrency=4)])
    manifest = write_manifest(tmp_path / "m.csv", 200)
    summary = _run(sim, _keys(a, b), manifest, tmp_path / "run", max_coins=60.0,
                   expected_task_coins=EXPECTED)
    billed = sum(t["coins"] or 0 for t in sim.audit.tasks())
    assert summary.exit_code == 3 and "budget reached" in (summary.stopped or "")
    assert 0 < billed <= 60.0
    assert summary.counts[st.PENDING] > 0

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{a} label=small max_coins=20\n{b} label=big\n")
    keys_file.chmod(0o600)
    keys = resolve_keys(keys_file=keys_file)
    sim2 = make_sim(accounts=[AccountConfig(key=a, concurrency=4),
                              AccountConfig(key=b, concurrency=4)])
    summary = _run(sim2, keys, write_manifest(tmp_path / "n.csv", 60), tmp_path / "run2",
                   expected_task_coins=EXPECTED)
    outcomes = {k.label: k for k in summary.keys}
    assert outcomes["small"].retired and "own budget" in outcomes["small"].retired
    small = sum(t["coins"] or 0 for t in sim2.audit.tasks() if t["key_fp"] == audit_fp(a))
    assert 0 < small <= 20.0
    assert summary.counts[st.SUCCESS] == 60 and summary.exit_code == 0  # the big key finished


def test_a_resume_needs_each_key_holding_tasks_and_may_add_keys(make_sim, tmp_path):
    from pipeline.sim import Faults

    a, b, c = (secrets.token_hex(16) for _ in range(3))
    accounts = [AccountConfig(key=k, concurrency=3) for k in (a, b, c)]
    lossy = make_sim(accounts=accounts, faults=Faults(lost_create=0.5, routes=["create"]),
                     seed=3)
    manifest = write_manifest(tmp_path / "m.csv", 12)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{a} label=alpha\n{b} label=beta\n")
    keys_file.chmod(0o600)
    first = _run(lossy, resolve_keys(keys_file=keys_file), manifest, tmp_path / "run")
    assert first.counts[st.SUBMIT_UNKNOWN] > 0
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        holding = keys_holding(store)
    finally:
        store.close()
    held_by = {key_fingerprint(a): "alpha", key_fingerprint(b): "beta"}
    missing = next(held_by[fp] for fp in holding)
    kept = a if missing == "beta" else b
    creates = len(lossy.audit.tasks())
    with pytest.raises(StateError, match=rf"key {missing} \(fingerprint [0-9a-f]+\) still has"):
        _run(lossy, _keys(kept, c), manifest, tmp_path / "run")
    assert len(lossy.audit.tasks()) == creates  # refused before anything was sent
    # every key that holds tasks, plus a new one: accepted
    again = _run(lossy, _keys(a, b, c), manifest, tmp_path / "run")
    assert again.counts[st.SUBMIT_UNKNOWN] == first.counts[st.SUBMIT_UNKNOWN]  # never resent


@pytest.mark.parametrize("content, mode, message", [
    ("{k1}\n{k2}\n", 0o644, "others on this machine may read it (mode 644): run chmod 600"),
    ("{k1}\n{k1}\n", 0o600, "line 2: the same key as line 1"),
    ("{k1} label=a max=zero\n", 0o600, "line 1: max=zero is not a whole number"),
])
def test_a_bad_keys_file_exits_2_naming_the_line_and_sends_nothing(make_sim, tmp_path, content,
                                                                   mode, message):
    k1, k2 = secrets.token_hex(16), secrets.token_hex(16)
    sim = make_sim(accounts=[AccountConfig(key=k1), AccountConfig(key=k2)])
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(content.format(k1=k1, k2=k2))
    keys_file.chmod(mode)
    manifest = write_manifest(tmp_path / "m.csv", 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNINGHUB_")}
    env["RUNNINGHUB_BASE_URL"] = sim.base_url
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out",
         str(tmp_path / "run"), "--keys-file", str(keys_file)],
        capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "keys.txt" in done.stderr
    assert k1 not in done.stderr + done.stdout and k2 not in done.stderr + done.stdout
    assert sim.audit.requests() == []
    assert not Path(tmp_path / "run").exists()


def test_run_and_retry_take_their_keys_from_the_environment(make_sim, tmp_path):
    """The CLI end to end with RUNNINGHUB_API_KEYS: a run whose creates end in doubt, then
    `retry --unknown --accept-double-pay` resends them, each on one of the pool's keys."""
    from pipeline.sim import Faults

    a, b = secrets.token_hex(16), secrets.token_hex(16)
    sim = make_sim(accounts=[AccountConfig(key=a, concurrency=3), AccountConfig(key=b,
                                                                               concurrency=3)],
                   faults=Faults(lost_create=0.4, routes=["create"]), seed=5)
    manifest = write_manifest(tmp_path / "m.csv", 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNINGHUB_")}
    env.update(RUNNINGHUB_BASE_URL=sim.base_url, RUNNINGHUB_API_KEYS=f"{a},{b}")
    out = tmp_path / "run"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    first = cli("run", str(manifest), "--out", str(out), "--poll-interval", "0.05")
    assert first.returncode == 1, first.stderr
    assert "key-1:" in first.stderr and "key-2:" in first.stderr  # the summary's key lines
    unknown = st.RunStore.open(out, readonly=True)
    try:
        sent = unknown.counts()[st.SUBMIT_UNKNOWN]
    finally:
        unknown.close()
    assert sent > 0
    sim.set_faults(Faults())
    tasks = len(sim.audit.tasks())
    again = cli("retry", str(out), "--unknown", "--accept-double-pay", "--poll-interval", "0.05")
    assert again.returncode in (0, 1), again.stderr
    assert len(sim.audit.tasks()) == tasks + sent  # each unknown row sent once more
    assert a not in again.stderr + first.stderr and b not in again.stderr + first.stderr


def test_progress_says_a_key_retired_once_and_a_stop_of_every_key_once(capsys):
    from pipeline.progress import Progress
    from pipeline.runner import Event

    progress = Progress(10, 0, quiet=True, interval_s=0)
    progress(Event("retired", detail="key key-2: 416 not enough wallet"))
    for _ in range(3):  # the run's budget stops each key's runner
        progress(Event("stopping", detail="budget reached: 60 coins spent of --max-coins 60"))
    progress.close()
    err = capsys.readouterr().err
    assert err.count("Key retired: key key-2: 416 not enough wallet") == 1
    assert err.count("Stopping: budget reached") == 1


def test_creates_that_made_their_task_then_failed_stay_with_their_key_and_are_never_resent(
        make_sim, tmp_path):
    """The service does the work and then answers 5xx, an odd envelope, a cut or a stalled
    answer: each such row is SUBMIT_UNKNOWN on the key that sent it, and no other key sends it
    again, in this run or on resume."""
    from pipeline.sim import Faults

    secrets_ = [secrets.token_hex(16) for _ in range(3)]
    sim = make_sim(accounts=[AccountConfig(key=k, concurrency=4) for k in secrets_],
                   faults=Faults(after_work=0.3, routes=["create"]), seed=11)
    manifest = write_manifest(tmp_path / "m.csv", 40)
    keys = _keys(*secrets_)
    first = _run(sim, keys, manifest, tmp_path / "run", settings={"request_deadline_s": 2.0})
    assert first.counts[st.SUBMIT_UNKNOWN] > 0
    _no_row_twice(sim)
    again = _run(sim, keys, manifest, tmp_path / "run", settings={"request_deadline_s": 2.0})
    assert again.counts[st.SUBMIT_UNKNOWN] == first.counts[st.SUBMIT_UNKNOWN]
    _no_row_twice(sim)
    made_by = {_seed(t): t["key_fp"] for t in sim.audit.tasks()}
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        unknown = [r for r in store.iter_rows() if r["status"] == st.SUBMIT_UNKNOWN]
        for row in unknown:  # the row names the key whose create made its task
            seed = json_seed(row["node_info_list"])
            assert audit_fp_of(row["key_fp"], secrets_) == made_by[seed]
    finally:
        store.close()
    _each_task_read_with_its_key(sim)


def json_seed(node_info_list: str) -> int:
    import json

    return next(int(n["fieldValue"]) for n in json.loads(node_info_list)
                if n["fieldName"] == "seed")
