"""SIGKILL ``rhbatch run`` at chosen instants, resume each time: no row lost, none paid twice.

Each kill waits for the event it is meant to land on (``kill_harness.INSTANTS``: before the first
request, the first request, a random instant mid-run, a create accepted with its answer in flight,
just after a create was answered, under after-work faults an ambiguous create answer in flight, a
poll, the run's end), and each test checks that every instant it asked for was hit. The rows are
enough that the run is still going at its last kill.
"""

from __future__ import annotations

import sys

import pytest
from conftest import write_manifest
from kill_harness import INSTANTS, run_with_kills


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and flock")
def test_kill_and_resume_loses_nothing_and_never_creates_twice(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=20, time_scale=100.0)
    manifest = write_manifest(tmp_path / "m.csv", 60)
    result = run_with_kills(sim, api_key, manifest, tmp_path / "run", kills=7, seed=11,
                            kill_after_s=(0.05, 0.3))
    assert result.instants == {i: 1 for i in INSTANTS if i != "ambiguous"}, result
    assert result.rows == 60
    assert result.final_counts == {"SUCCESS": 60}, result
    assert result.mismatches == []
    assert result.created_twice_not_unknown == 0
    # one create at a time: a kill can leave at most one row in doubt
    assert result.unknown_reported <= result.kills
    assert result.exit_codes[-1] == 0


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and flock")
def test_kill_and_resume_under_faults(make_sim, api_key, tmp_path):
    from pipeline.sim import Faults

    sim = make_sim(
        concurrency=20,
        time_scale=100.0,
        seed=5,
        faults=Faults(http_5xx=0.03, drop_connection=0.03, lost_create=0.03, task_failure=0.05),
    )
    manifest = write_manifest(tmp_path / "m.csv", 60)
    result = run_with_kills(sim, api_key, manifest, tmp_path / "run", kills=7, seed=12,
                            kill_after_s=(0.05, 0.3))
    assert result.instants == {i: 1 for i in INSTANTS if i != "ambiguous"}, result
    assert result.rows == 60
    assert set(result.final_counts) <= {"SUCCESS", "FAILED", "SUBMIT_UNKNOWN"}
    assert result.mismatches == []
    assert result.created_twice_not_unknown == 0


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and flock")
@pytest.mark.timeout(280)
def test_kill_and_resume_under_after_work_faults_never_creates_twice_without_consent(
        make_sim, api_key, tmp_path):
    from pipeline.sim import Faults
    from pipeline.sim.config import AFTER_WORK_MODES

    # 10 % of creates make (and bill) the task and then answer in one of the ambiguous shapes (a
    # redirect stops the run by design, so it is left to tests/test_money_truth.py)
    modes = tuple(m for m in AFTER_WORK_MODES if m != "redirect")
    sim = make_sim(concurrency=20, time_scale=100.0, seed=21,
                   faults=Faults(after_work=0.10, after_work_modes=modes, stall_s=2.0,
                                 trickle_interval_s=0.05))
    manifest = write_manifest(tmp_path / "m.csv", 200)
    # every instant twice (the run's end once): 2 of them with an ambiguous create answer in flight
    result = run_with_kills(sim, api_key, manifest, tmp_path / "run", kills=15, seed=22,
                            kill_after_s=(0.1, 0.5), extra_flags=("--request-deadline", "1"))
    assert result.kills == 15, result
    assert result.instants == {**{i: 2 for i in INSTANTS}, "finishing": 1}, result
    assert result.rows == 200
    assert result.exit_codes[-1] in (0, 1), result  # the consented retry of unknown rows ran
    assert set(result.final_counts) <= {"SUCCESS", "FAILED", "SUBMIT_UNKNOWN"}
    assert result.mismatches == []
    # every second create is of a row that ended SUBMIT_UNKNOWN and was resubmitted on consent
    assert result.created_twice_not_unknown == 0
    injected = [t for t in sim.audit.tasks() if any(f.startswith("after_work:") for f in t["faults"])]
    assert injected, "the fault was never injected"
