"""The scheduler's decisions, without HTTP: when a task is asked about, when the account is read,
how many creates leave at once, what a capacity answer and a streak of unknown creates do.

The end-to-end behaviour over real HTTP (the simulator on loopback) is in the tests at the end."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import fast_settings, write_manifest

from pipeline import store as st
from pipeline.client import Submitted, TaskResult
from pipeline.config import resolve_settings
from pipeline.errors import CapacityError
from pipeline.pacing import (
    ACCOUNT_CALLS_PER_TASK,
    ACCOUNT_POLL_MIN_FRACTION,
    CREATE_FILL_S,
    CREATE_RATE_HEADROOM,
    CREATES_IN_FLIGHT_MAX,
    CREATES_IN_FLIGHT_MIN,
    DRIFT_FRACTION,
    DRIFT_GROWTH,
    DRIFT_MIN_GENERATION,
    FLOOR_GENERATIONS,
    RECHECK_FRACTION,
    RECHECK_GROWTH,
    SEARCH_PROBES,
    EndModel,
    account_poll_interval,
    create_slots,
    default_creates_in_flight,
)
from pipeline.runner import (
    DEFER_MAX_RECHECKS,
    FIRST_END_AGE_FRACTION,
    FIRST_END_CLOSE_FRACTION,
    FIRST_END_FAST_LIVE,
    FIRST_END_READS_PER_ROW,
    SAFETY_SLOW_FACTOR,
    UNKNOWN_STREAK_STOP,
    Runner,
    _Live,
)

# -- the end model ---------------------------------------------------------------------------------


def test_the_first_end_sets_the_expected_end_where_it_was_seen_to_end():
    model = EndModel()
    assert not model.known
    model.learn(30.2, running_at=30.0)  # seen closely: the middle
    assert model.tau == pytest.approx(30.1)
    # seen in a wide interval (no "still running" before it, or a read's): the top of it, so
    # the next tasks are not asked over and over before their end
    fresh = EndModel()
    fresh.learn(10.0, running_at=8.0)
    assert fresh.tau == pytest.approx(10.0)


def test_a_late_end_raises_the_expected_end_but_one_straggler_does_not_move_it_far():
    model = EndModel(tau=15.0, early=0.0)
    # a first guess too early: the first late ends move it up, no more than twice at a time
    model.learn(40.0, running_at=39.5, late=True)
    assert model.tau == pytest.approx(30.0 + RECHECK_FRACTION * 15.0)
    model.learn(30.6, running_at=30.0, late=True)
    model.learn(30.5, running_at=30.1, late=True)
    # just after the middle of where the late ones ended (30.3): the straggler at 40 is out
    assert 30.3 < model.tau < 30.7
    for _ in range(3):
        model.learn(30.5, running_at=30.0, late=True)
    before = model.tau
    model.learn(300.0, running_at=290.0, late=True)  # one straggler among regular tasks
    assert model.tau == before


def test_ends_found_at_the_first_check_move_the_expected_end_earlier_faster_each_generation():
    model = EndModel(tau=60.0, early=0.0)
    steps = []
    for _generation in range(6):
        before = model.tau
        for _ in range(10):  # a generation of 10 live tasks, each ended by its first check
            model.learn(model.tau, first_check=model.tau, live=10)
        steps.append(1 - model.tau / before)
    assert steps[0] == pytest.approx(DRIFT_FRACTION, rel=0.05)
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))  # a wrong guess corrects fast
    model.learn(50.0, running_at=49.0, late=True)  # a late one resets the step
    before = model.tau
    for _ in range(10):
        model.learn(model.tau, first_check=model.tau, live=10)
    assert 1 - model.tau / before == pytest.approx(DRIFT_FRACTION)
    after = model.tau
    # an end the model never asked about says nothing about its first check
    model.learn(1.0, live=10)
    assert model.tau == after


def _search_rounds(model: EndModel, true_end: float, generation: int) -> tuple[int, int]:
    """Generations of ``generation`` tasks of ``true_end`` s each, their first checks handed out
    together (tasks created before any of them answered), asked in time order; a task still
    running is asked again at the recheck the model gives. Returns (tasks, extra calls) until the
    search ends."""
    tasks = extra = 0
    while model.searching and tasks < 100 * generation:
        for due in sorted(model.first_check(generation) for _ in range(generation)):
            if not model.searching:
                break
            tasks += 1
            if due >= true_end:
                model.learn(due, first_check=due, live=generation)
                continue
            model.not_yet(due)
            extra += 1
            searching = model.searching
            again = due + model.recheck_s(due - (model.tau or 0.0), age_s=due)
            if searching:  # a probe that came too early asks again at the top: ended
                assert again >= true_end
            running = due
            while again < true_end:  # the search ended with this answer: the usual rechecks
                model.not_yet(again)
                extra += 1
                running = again
                again += model.recheck_s(again - (model.tau or 0.0), age_s=again)
            model.learn(again, running_at=running, late=True, first_check=due, live=generation)
    return tasks, extra


def test_after_a_first_end_seen_in_a_wide_interval_the_end_is_searched_for_with_few_calls():
    # 0.3 s tasks, the first ones seen ended by a read 2 s after their creates
    model = EndModel()
    model.learn(2.0, running_at=0.0)
    assert model.tau == pytest.approx(2.0) and model.searching
    # while searching, every task but the probes is asked at the top, where all have ended
    probes = [model.first_check(8) for _ in range(8)]
    assert probes[:SEARCH_PROBES] == pytest.approx([0.5, 1.0, 1.5])
    assert probes[SEARCH_PROBES:] == [2.0] * (8 - SEARCH_PROBES)
    tasks, extra = _search_rounds(model, 0.3, 8)
    assert not model.searching
    # found: just after the end, within two rechecks' width
    assert 0.3 <= model.tau <= 0.3 * (1 + 2 * RECHECK_FRACTION) + 1e-9
    # a few generations, at most one extra call per probe: (13.33 -> 1 %: log4 is under 4)
    assert tasks <= 6 * 8 and extra <= 6 * SEARCH_PROBES, (tasks, extra)
    # a probe of the search answering once it is over, from the wide gap up to the old top,
    # says nothing more; the same end of a task asked at its expected end raises the guess
    found = model.tau
    model.learn(0.9, running_at=0.26, late=True, first_check=0.26, live=8, probe=True)
    assert model.tau == found
    plain = EndModel.from_state(model.state())
    plain.learn(0.9, running_at=0.26, late=True, first_check=0.26, live=8)
    assert plain.tau > found
    # afterwards, back to small steps: a generation moves it by DRIFT_FRACTION
    before = model.tau
    for _ in range(8):
        model.learn(model.tau, first_check=model.tau, live=8)
    assert 1 - model.tau / before == pytest.approx(DRIFT_FRACTION)


def test_a_search_ends_at_its_top_when_durations_disagree():
    # one task still running at 8 s when another had ended by 5 s: durations vary, no search
    model = EndModel()
    model.learn(5.0, running_at=1.0)
    assert model.searching
    model.not_yet(8.0)
    assert not model.searching and model.tau == pytest.approx(5.0)
    # the usual learning goes on from there: a late end raises it
    model.learn(9.0, running_at=8.0, late=True, first_check=5.0)
    assert model.tau > 8.0


def test_at_one_slot_a_generation_for_the_step_is_a_few_ends():
    model = EndModel(tau=30.0, early=0.0)
    generations = []
    for _ in range(3):
        before = model.tau
        for _ in range(DRIFT_MIN_GENERATION):  # one slot: each end alone in flight
            model.learn(model.tau, first_check=model.tau, live=1)
        generations.append(1 - model.tau / before)
    # DRIFT_MIN_GENERATION ends move it by one step, which then grows
    assert generations == pytest.approx(
        [DRIFT_FRACTION, DRIFT_FRACTION * DRIFT_GROWTH, DRIFT_FRACTION * DRIFT_GROWTH ** 2])


def test_a_straggler_is_asked_again_ever_less_often_within_the_cap():
    model = EndModel(tau=30.0)
    assert model.recheck_s(0.0) == pytest.approx(30.0 * RECHECK_FRACTION)
    # past the expected end, a gap of (growth - 1) x how late it is: geometric from the end
    assert model.recheck_s(30.0) == pytest.approx(30.0 * (RECHECK_GROWTH - 1))
    checks, at = [], 30.0 * (1 + RECHECK_FRACTION)
    while at < 300.0:
        checks.append(at)
        at += model.recheck_s(at - 30.0)
    assert len(checks) < 20  # a task ten times late costs a few checks, not hundreds
    assert model.recheck_s(600.0, cap_s=10.0) == 10.0
    tiny = EndModel(tau=0.001)
    assert tiny.recheck_s(0.0, floor_s=0.02) == 0.02  # never faster than the round trip


def test_the_account_is_read_less_as_the_expected_end_checks_find_every_end():
    model = EndModel(tau=30.0)
    assert model.read_share() == 1.0  # nothing learnt: the reads are assumed useful
    for _ in range(40):
        model.learn(30.0, live=20)  # every end found by its own check
    assert model.read_share() == pytest.approx(0.1)
    for _ in range(20):  # ends that a read found well before their check
        model.learn(10.0, by_read=True, first_check=model.tau, live=20)
    assert model.read_share() == 1.0
    # found by a read just before its check: not early (regular durations stay regular)
    regular = EndModel(tau=30.0, early=0.0)
    regular.learn(29.5, by_read=True, first_check=30.0, live=20)
    assert regular.early == 0.0


def test_the_model_is_kept_with_the_run_and_a_bad_record_is_ignored():
    model = EndModel(tau=12.5, early=0.25)
    again = EndModel.from_state(model.state())
    assert (again.tau, again.early) == (12.5, 0.25)
    for bad in (None, "x", {"tau_s": "1"}, {"tau_s": -1, "early": 0.1},
                {"tau_s": math.inf, "early": 0}, {"tau_s": 3.0, "early": 2.0}):
        assert not EndModel.from_state(bad).known


def test_account_reads_follow_the_rate_of_ends_and_the_share_they_are_worth():
    # the pace the reads had before: unchanged with the defaults
    assert account_poll_interval(2.0, 30.0, 50) == pytest.approx(1.2)
    # a tenth of that pace, and no upper bound: 50 regular 30 s tasks cost a read per 20 ends
    slow = account_poll_interval(2.0, 30.0, 50, ACCOUNT_CALLS_PER_TASK * 0.1, slowest_s=math.inf)
    assert slow == pytest.approx(12.0)
    assert account_poll_interval(2.0, 30.0, 1, 0.05, slowest_s=math.inf) == pytest.approx(600.0)


# -- creates in flight -----------------------------------------------------------------------------


def test_the_bound_on_creates_in_flight_follows_the_window():
    assert default_creates_in_flight(1) == CREATES_IN_FLIGHT_MIN
    assert default_creates_in_flight(320) == 20
    assert default_creates_in_flight(5000) == CREATES_IN_FLIGHT_MAX
    # ... and what the slots need to turn over once a task: 50 slots of 50 ms tasks at 8 ms
    assert default_creates_in_flight(50, 0.008, 0.05) == 12  # 8 needed, x 1.5
    assert default_creates_in_flight(50, 0.005, 30.0) == CREATES_IN_FLIGHT_MIN  # long: the minimum
    # at a far service the whole window, before and after a duration is known: tasks made
    # together end together, and a wave refilled 8 at a time costs its last slots round trips
    assert default_creates_in_flight(20, 0.2) == 20
    assert default_creates_in_flight(20, 0.2, 30.0) == 20
    assert default_creates_in_flight(50, 0.2, 1.0) == 50
    assert default_creates_in_flight(4, 0.2, 1.0) == CREATES_IN_FLIGHT_MIN
    assert default_creates_in_flight(1000, 0.2, 0.5) == CREATES_IN_FLIGHT_MAX  # never past it


def test_creates_in_flight_follow_the_round_trip_and_the_rate_the_slots_need():
    assert create_slots(32, None, to_fill=1000, window=1000, task_s=None) == 1  # nothing measured
    assert create_slots(1, 0.2, to_fill=1000, window=1000, task_s=30.0) == 1  # the setting 1
    # loopback: one at a time, so a kill leaves at most one row in doubt
    assert create_slots(32, 0.002, to_fill=20, window=20, task_s=None) == 1
    # 1,000 free slots at a 200 ms round trip: as many as allowed
    assert create_slots(32, 0.2, to_fill=1000, window=1000, task_s=None) == 32
    # steady state, 1,000 slots of 30 s tasks: 33 creates a second x 0.2 s x 3 in flight
    assert create_slots(64, 0.2, to_fill=0, window=1000, task_s=30.0) == 20
    # a wave of 100 tasks about to end at 0.2 s: their slots are refilled together
    assert create_slots(64, 0.2, to_fill=0, window=1000, task_s=30.0, ending_soon=100) == 64
    # free slots at a far service (20 ms, and 13 ms: the bench's 200 ms at time scale 15): as
    # many at once as the bound allows, not a fill rate's share of it
    assert create_slots(64, 0.02, to_fill=100, window=100, task_s=600.0) == 64
    assert create_slots(8, 0.013, to_fill=50, window=50, task_s=2.0) == 8
    # ... near (5 ms), filling 100 slots within CREATE_FILL_S
    assert create_slots(64, 0.005, to_fill=100, window=100, task_s=600.0) == int(
        100 / CREATE_FILL_S * 0.005 * CREATE_RATE_HEADROOM)
    # no free slot and no wave: Little's law on the turnover, far or near
    assert create_slots(64, 0.02, to_fill=0, window=100, task_s=30.0) == 1


# -- the runner's decisions, no HTTP ---------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    index: int
    number: int
    row_id: str
    workflow_id: str = "1904136902449209346"
    node_info_list: tuple[dict[str, Any], ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


class _NoClient:
    """The runner's decisions below never reach the client."""

    base_url = "http://127.0.0.1:9"
    requests_sent = 0


@pytest.fixture
def runner(tmp_path):
    made: list[st.RunStore] = []

    def make(rows: int = 10, **settings: Any) -> Runner:
        store = st.RunStore.open(tmp_path / f"run{len(made)}", create=True)
        made.append(store)
        store.insert_rows(_Row(i, i + 1, f"r{i}") for i in range(rows))
        values = {"concurrency": 8, "account_poll_interval_s": 2.0, "max_poll_interval_s": 30.0}
        values.update(settings)
        resolved = resolve_settings(api_key=secrets.token_hex(16), base_url=_NoClient.base_url,
                                    env={}, **values)
        return Runner(store, _NoClient(), resolved)  # type: ignore[arg-type]

    yield make
    for store in made:
        store.close()


def _measure(runner: Runner, rtt_s: float, times: int) -> None:
    for _ in range(times):
        runner._rtt_sample(rtt_s)


def _live(runner: Runner, idx: int, *, age_s: float = 0.0) -> _Live:
    now = time.monotonic()
    live = _Live(idx, f"task{idx}", st.RUNNING, time.time() - age_s, now, now - age_s)
    runner._add_live(live)
    return live


def test_a_task_is_first_asked_about_at_its_expected_end_less_half_a_round_trip(runner):
    r = runner()
    r.model = EndModel(tau=30.0, early=0.0)
    _measure(r, 0.2, 3)
    live = _live(r, 0, age_s=10.0)
    assert r._first_check_delay(live) == pytest.approx(30.0 - 10.0 - 0.1, abs=0.01)
    assert live.first_check == 30.0
    overdue = _live(r, 1, age_s=40.0)
    assert r._first_check_delay(overdue) == 0.0


def test_before_any_end_is_known_each_task_is_asked_about_on_the_safety_clock(runner):
    r = runner()
    live = _live(r, 0)
    # until a read says otherwise the count is exactly ours: it tells every end by itself
    assert r._first_check_delay(live) == 30.0 * SAFETY_SLOW_FACTOR
    r._account_exact = False  # other tasks on the key: an end of ours may not show
    assert r._first_check_delay(live) == 30.0
    r._account_ok = False  # no count at all: the task's own poll interval
    assert r._first_check_delay(live) == r.settings.poll_interval_s


def test_with_webhooks_a_task_gets_only_a_rare_safety_poll(runner):
    r = runner()
    r.webhook_tokens = True
    r.model = EndModel(tau=10.0, early=0.0)
    live = _live(r, 0)
    assert r._first_check_delay(live) == pytest.approx(40.0, abs=0.01)  # tau + max_poll_interval
    r.model = EndModel(tau=60.0, early=0.0)
    assert r._first_check_delay(live) == pytest.approx(120.0, abs=0.01)  # twice tau
    _live(r, 1, age_s=5.0)
    _measure(r, 0.01, 1)
    assert r._next_read_at(time.monotonic()) is None  # the deliveries tell each end, not reads


def test_a_still_running_task_is_asked_again_after_a_growing_gap(runner):
    r = runner()
    r.model = EndModel(tau=30.0, early=0.0)
    live = _live(r, 0, age_s=30.0)
    r._first_check_delay(live)
    live.negatives, live.running_at = 1, time.monotonic()
    assert r._recheck_delay(live) == pytest.approx(30.0 * RECHECK_FRACTION, abs=0.01)
    live.running_at = live.t0 + 50.0  # 20 s late: the next check 10 s on
    assert r._recheck_delay(live) == pytest.approx(20.0 * (RECHECK_GROWTH - 1), abs=0.01)
    # asked 10 s before its expected end (a stand-in for a read): half the way there
    young = _live(r, 1, age_s=20.0)
    r._first_check_delay(young)
    young.negatives, young.running_at = 1, young.t0 + 20.0
    assert r._recheck_delay(young) == pytest.approx(5.0, abs=0.01)


def test_regular_ends_are_read_for_rarely_and_not_before_any_task_can_end(runner):
    r = runner()
    _measure(r, 0.01, 1)
    r.model = EndModel(tau=30.0, early=0.0)
    now = time.monotonic()
    r._last_read_at = now
    young = _live(r, 0, age_s=5.0)  # its end cannot be near before half its expected duration
    assert r._next_read_at(now) == pytest.approx(young.t0 + 15.0)
    _live(r, 1, age_s=20.0)
    regular = r._next_read_at(now) - now
    r.model = EndModel(tau=30.0, early=1.0)  # ends the reads find early: read ten times more
    varied = r._next_read_at(now) - now
    assert regular == pytest.approx(10 * varied)
    # nothing known yet: the configured interval, slowed by the oldest task's age
    r.model = EndModel()
    _live(r, 2, age_s=100.0)
    assert r._next_read_at(now) - now == pytest.approx(FIRST_END_AGE_FRACTION * 100.0, abs=0.01)
    # a young run with a few tasks: the configured interval; with many: a quarter of it
    young = runner()
    _measure(young, 0.01, 1)
    for i in range(3):
        _live(young, i)
    young._last_read_at = now
    assert young._next_read_at(now) - now == pytest.approx(2.0, abs=0.01)
    _live(young, 3)
    assert young._next_read_at(now) - now == pytest.approx(0.5, abs=0.01)


def test_a_run_of_many_rows_reads_closely_for_its_first_ends_within_a_budget(runner):
    r = runner(rows=400, concurrency=20)
    r.pool.start(r)  # what the run has to do: its rows
    assert r.pool.planned == 400
    _measure(r, 0.01, 1)
    oldest = min(_live(r, i, age_s=28.0).t0 for i in range(20))
    now = time.monotonic()
    r._last_read_at = now
    # the floor, not a tenth of the 28 s age (2.8 s) ...
    assert r._next_read_at(now) - now == pytest.approx(2.0 * ACCOUNT_POLL_MIN_FRACTION, abs=0.01)
    # ... for FIRST_END_READS_PER_ROW reads a row, then the age slows them again
    r._first_end_reads = int(FIRST_END_READS_PER_ROW * 400)
    assert r._next_read_at(now) - now == pytest.approx(
        FIRST_END_AGE_FRACTION * (now - oldest), abs=0.001)
    # the budget follows the rows left to do, and is split over the run's keys
    small = runner(rows=40)
    small.pool.start(small)
    assert small._first_end_budget() == pytest.approx(FIRST_END_READS_PER_ROW * 40)
    small.pool.size = 2
    assert small._first_end_budget() == pytest.approx(FIRST_END_READS_PER_ROW * 20)


def test_at_a_far_service_the_reads_for_the_first_ends_reach_it_the_floor_apart(runner):
    # The last read's time is its middle, when the service looked (half a round trip after it
    # left); the next leaves half a trip before the floor is up, so the service sees the reads
    # the floor apart (0.5 s at a 2 s interval), not the floor and half a trip (0.6 s at 200 ms).
    r = runner(rows=400, concurrency=20)
    r.pool.start(r)
    _measure(r, 0.2, 3)
    for i in range(20):
        _live(r, i, age_s=10.0)
    now = time.monotonic()
    looked = now - 0.05
    r._last_read_at = looked
    leaves = r._next_read_at(now)
    assert leaves + 0.2 / 2 - looked == pytest.approx(2.0 * ACCOUNT_POLL_MIN_FRACTION, abs=0.001)
    # once the close reads are spent, a tenth of the age (1 s) paces them, from the last middle
    r._first_end_reads = int(FIRST_END_READS_PER_ROW * 400)
    assert r._next_read_at(now) - looked == pytest.approx(1.0, abs=0.01)


def test_the_reads_for_the_first_ends_of_short_tasks_are_a_tenth_of_their_age_apart(runner):
    # Within the floor (0.5 s at a 2 s interval), reads before the first end are a tenth of the
    # oldest task's age apart at the service, down to a fifth of the floor: 3 s tasks' first
    # ends are seen within 0.3 s, not 0.5 s, 1 s tasks' within 0.1 s; a task older than 5 s is
    # read for at the floor.
    r = runner(rows=400, concurrency=20)
    r.pool.start(r)
    _measure(r, 0.2, 3)
    floor = 2.0 * ACCOUNT_POLL_MIN_FRACTION
    tasks = [_live(r, i, age_s=3.0) for i in range(20)]
    now = time.monotonic()
    oldest = min(t.t0 for t in tasks)
    r._last_read_at = now
    at_service = r._next_read_at(now) + 0.2 / 2 - now
    assert at_service == pytest.approx(FIRST_END_AGE_FRACTION * (now - oldest), abs=0.001)
    assert at_service < floor
    for t in tasks:  # younger: no closer than a fifth of the floor
        t.t0 = now - 0.5
    assert r._next_read_at(now) + 0.2 / 2 - now == pytest.approx(
        FIRST_END_CLOSE_FRACTION * floor, abs=0.001)
    # a lone task or a few are read for at the interval, whatever their age
    few = runner(rows=400, concurrency=20)
    few.pool.start(few)
    _measure(few, 0.2, 3)
    for i in range(FIRST_END_FAST_LIVE - 1):
        _live(few, i, age_s=3.0)
    few._last_read_at = now
    assert few._next_read_at(now) + 0.2 / 2 - now == pytest.approx(2.0, abs=0.001)


def test_a_read_that_shows_ends_hands_over_the_slots_of_the_likeliest_tasks(runner):
    r = runner()
    r.model = EndModel(tau=30.0, early=0.0)
    first = _live(r, 0, age_s=29.0)
    second = _live(r, 1, age_s=20.0)
    third = _live(r, 2, age_s=10.0)
    before = list(r.live.values())
    r._on_account_count(2, before, time.monotonic(), previous=time.monotonic() - 1)
    assert first.suspected and first.by_read and not second.suspected and not third.suspected
    assert r._in_flight() == 2
    r._on_account_count(5, before, time.monotonic())  # others' tasks on the key: no end shown
    assert not r._account_exact and not second.suspected


def test_a_capacity_answer_waits_for_the_count_to_show_a_free_slot(runner):
    r = runner()
    for i in range(6):
        _live(r, i)
    r._on_capacity(CapacityError("full", code=421))
    assert r._capacity_wait and r.capacity_answers == 1
    assert r._next_read_at(time.monotonic()) <= time.monotonic()  # read the count at once
    # 6 of ours and 2 creates in doubt hold the key's 8 slots: the window stays at 8
    r._capacity_count(8)
    assert r.window == 8 and r.store.get_meta("learnt_limit") == 8
    r._capacity_count(8)
    assert r._capacity_wait  # still full
    r._capacity_count(7)
    assert not r._capacity_wait  # a slot is free: submit now
    assert r._capacity_wait_s >= 0.0


def test_a_capacity_wait_ends_when_a_task_of_the_run_ends(runner):
    r = runner()
    live = _live(r, 0)
    r._on_capacity(CapacityError("full", code=421))
    r._capacity_count(1)
    assert r._capacity_wait
    r._forget(live)
    assert not r._capacity_wait


def test_without_a_count_a_capacity_answer_falls_back_to_the_window_and_a_pause(runner):
    r = runner()
    r._account_ok = False
    for i in range(3):
        _live(r, i)
    r._on_capacity(CapacityError("full", code=421))
    assert r.window == 3 and r._backoff_until == 0.0  # the first: wait for one of ours to end
    r._on_capacity(CapacityError("full", code=421))
    assert r._backoff_until > time.monotonic()  # the second in a row: a growing pause
    assert not r._capacity_wait


def test_the_window_grows_back_one_slot_at_a_time_while_the_limit_is_unknown(runner):
    r = runner()
    r.window = 2
    for i in range(2):
        _live(r, i)
    r._after_create_ok()
    assert r.window == 3
    r._after_create_ok()  # 2 held, window 3: no growth until it is used
    assert r.window == 3


def test_rows_leave_together_within_the_window_and_the_creates_in_flight_bound(runner):
    r = runner(rows=30, concurrency=8)
    assert len(r._take_rows()) == 1  # no round trip measured yet: one create at a time
    r._creating, r._slots_at = 0, -math.inf
    r._pending = []
    r._pending_cursor = -1
    _measure(r, 0.005, 3)  # near: 8 free slots / 0.5 s x 0.005 s x 3 = 0.24, one at a time
    assert len(r._take_rows()) == 1
    r._creating, r._slots_at = 0, -math.inf
    _measure(r, 0.04, 16)  # a far service: the 8 free slots at once (the bound is 8)
    assert r.create_bound == 8
    assert len(r._take_rows()) == 8 and r._creating == 8
    r._creating, r._slots_at = 0, -math.inf
    r.create_bound = 1
    assert len(r._take_rows()) == 1
    r._creating, r._slots_at = 0, -math.inf
    r.create_bound = 64
    _measure(r, 5.0, 16)
    for i in range(5):
        _live(r, 100 + i)
    assert len(r._take_rows()) == 3  # the window: 8 slots, 5 held


def test_the_budget_admits_creates_in_flight_as_if_each_were_already_billed(runner):
    r = runner(rows=10, concurrency=8)
    ledger = r.pool.ledger
    ledger.max_coins = 100.0
    ledger.priced, ledger.top_coins, ledger.spent = 5, 10.0, 40.0  # the next task: 15 coins
    _measure(r, 5.0, 3)
    rows = r._take_rows()
    assert len(rows) == 4  # 40 + 15 x 4 = 100; a fifth could pass the limit


def test_creates_in_doubt_in_a_row_pause_for_a_task_duration_then_stop_the_run(runner):
    r = runner()
    r.model = EndModel(tau=3.0, early=0.0)
    r._on_unknown()
    assert r._backoff_until == 0.0  # one in doubt: no pause
    r._on_unknown()
    pause = r._backoff_until - time.monotonic()
    assert 1.4 <= pause <= 3.0  # a task duration, jittered
    r._on_unknown()
    assert r._backoff_until - time.monotonic() <= 6.0
    for _ in range(UNKNOWN_STREAK_STOP - 3):
        r._on_unknown()
    assert r._stop_submitting and r._exit_code == 3
    assert r._stopped.startswith("RunningHub is failing: ")


# -- end to end, over real HTTP --------------------------------------------------------------------


def _run(sim: Any, key: str, manifest: Any, run_dir: Any, **overrides: Any) -> Any:
    from pipeline.batch import ManifestArgs, run_batch

    settings = fast_settings(sim, key, **overrides)
    return run_batch(ManifestArgs(manifest), run_dir, settings, handle_signals=False)


def test_regular_tasks_are_found_at_their_end_with_few_calls(make_sim, api_key, tmp_path):
    # 1 slot, 40 tasks of 2 simulated seconds at time scale 20 (0.1 s real): after the first
    # end, each task is asked about at its expected end, and the account is hardly read
    sim = make_sim(concurrency=1, time_scale=20.0, task_duration_s=2.0, queue_delay_s=0.0)
    manifest = write_manifest(tmp_path / "m.csv", 40)
    summary = _run(sim, api_key, manifest, tmp_path / "run", concurrency=1,
                   account_poll_interval_s=0.1, max_poll_interval_s=1.5, poll_interval_s=0.25)
    assert summary.exit_code == 0 and summary.counts[st.SUCCESS] == 40
    requests = sim.audit.requests()
    per_task = len(requests) / 40
    assert per_task <= 2.6, [r["route"] for r in requests][:80]
    tasks = sorted(sim.audit.tasks(), key=lambda t: t["created_at"])
    gaps = [b["created_at"] - a["ended_at"] for a, b in zip(tasks, tasks[1:], strict=False)]
    # from a task's end to the next create, in simulated seconds: a fraction of the 2 s task
    assert sorted(gaps)[len(gaps) // 2] < 0.3, gaps
    store = st.RunStore.open(tmp_path / "run", readonly=True)
    try:
        kept = EndModel.from_state(store.get_meta("end_model"))
    finally:
        store.close()
    assert kept.known and 1.5 < kept.tau * 20.0 < 3.0  # learnt about 2 simulated s


def test_tasks_whose_creates_are_in_doubt_hold_slots_and_the_run_waits_for_them_by_the_count(
        make_sim, api_key, tmp_path):
    from pipeline.sim import Faults

    # a lost create makes its task (it holds a slot for its 1 s) but answers nothing: the run
    # cannot see it, gets a capacity answer, and waits for the account to show a free slot
    sim = make_sim(concurrency=4, time_scale=1.0, task_duration_s=1.0, queue_delay_s=0.0,
                   seed=3, faults=Faults(lost_create=0.15, routes=("create",)))
    manifest = write_manifest(tmp_path / "m.csv", 40)
    started = time.monotonic()
    summary = _run(sim, api_key, manifest, tmp_path / "run", concurrency=4,
                   account_poll_interval_s=0.5, capacity_backoff_s=20.0,
                   max_capacity_backoff_s=60.0, max_poll_interval_s=5.0)
    elapsed = time.monotonic() - started
    lost = summary.counts[st.SUBMIT_UNKNOWN]
    assert lost >= 1 and summary.counts[st.SUCCESS] + lost == 40
    # never the 20 s capacity pause: each wait ends when the count shows the slot free
    assert summary.capacity_answers >= 1
    assert elapsed < 20.0 + lost * 1.0, (elapsed, summary.capacity_wait_s)
    assert summary.capacity_wait_s < 20.0


def test_creates_overlap_at_a_long_round_trip_and_a_second_interrupt_leaves_them_in_doubt(
        make_sim, api_key, tmp_path):
    from pipeline.client import RunningHubClient
    from pipeline.manifest import load_manifest
    from pipeline.sim import Faults

    # every answer takes 0.3 s; 40 slots of long tasks: the first wave's creates overlap
    sim = make_sim(concurrency=40, time_scale=1.0, task_duration_s=60.0, queue_delay_s=0.0,
                   faults=Faults(latency_s=0.3))
    manifest = write_manifest(tmp_path / "m.csv", 40)
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows(load_manifest(manifest).rows)
    settings = fast_settings(sim, api_key, concurrency=40, account_poll_interval_s=0.5)

    async def scenario() -> Any:
        async with RunningHubClient(settings) as client:
            runner = Runner(store, client, settings, creates_in_flight=8)
            task = asyncio.create_task(runner.run())
            deadline = time.monotonic() + 20
            while store.counts()[st.SUBMITTING] < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            runner.stop()  # first Ctrl-C: waits for the creates in flight
            runner.stop()  # second: at once
            summary = await asyncio.wait_for(task, 10.0)
            return summary, runner._most_creating

    try:
        summary, most = asyncio.run(scenario())
        assert 2 <= most <= 8
        counts = summary.counts
        assert counts[st.SUBMITTING] == 0
        assert 1 <= counts[st.SUBMIT_UNKNOWN] <= 8  # at most the bound in doubt
        created = {t["taskId"] for t in sim.audit.tasks()}
        known = {r["task_id"] for r in store.iter_rows() if r["task_id"]}
        assert known <= created and len(created - known) <= counts[st.SUBMIT_UNKNOWN]
    finally:
        store.close()


def test_at_a_far_service_a_slot_is_handed_over_as_the_expected_end_check_leaves(runner):
    r = runner(rows=5, concurrency=4)
    r.model = EndModel(tau=3.0, early=0.0)
    _measure(r, 0.2, 3)  # a round trip of 7 % of a task
    live = _live(r, 0, age_s=3.0)
    r._first_check_delay(live)
    held = r._in_flight()
    r._hand_over(live, time.monotonic())
    assert live.suspected and live.handover and r._in_flight() == held - 1
    # the task had not ended: the create that took its slot is refused, the slot is the task's
    live.polling = True
    r._on_capacity(CapacityError("full", code=421))
    assert not live.suspected and not live.handover and r._in_flight() == held
    assert not r._capacity_wait and r._backoff_until == 0.0  # no wait, no pause: its check says
    # on loopback the answer comes back in no time: no handover
    near = runner(rows=5, concurrency=4)
    near.model = EndModel(tau=3.0, early=0.0)
    _measure(near, 0.001, 3)
    task = _live(near, 0, age_s=3.0)
    near._first_check_delay(task)
    near._hand_over(task, time.monotonic())
    assert not task.suspected


class _FullClient(_NoClient):
    """Every create is refused for capacity (421), as when it reaches a full key."""

    def __init__(self) -> None:
        self.creates = 0

    async def create(self, body: Any) -> Any:
        self.creates += 1
        raise CapacityError("full", code=421)


def test_a_refused_create_that_took_a_handed_over_slot_teaches_nothing_about_the_limit(runner):
    # The race measured at 200 ms: the check of a handed-over task answers "still running"
    # (the slot is the task's again) before the create that took its slot is refused. That
    # refusal must not start a wait for the count and learn "what the key holds" from a count
    # read while the handed-over tasks are ending (a 50-slot key kept a window of 47).
    r = runner(rows=10, concurrency=8)
    r.client = client = _FullClient()
    r.model = EndModel(tau=3.0, early=0.0)
    _measure(r, 0.2, 3)
    tasks = [_live(r, 100 + i, age_s=3.0) for i in range(8)]
    for live in tasks:
        r._first_check_delay(live)
    r._hand_over(tasks[0], time.monotonic())
    assert tasks[0].handover and r._in_flight() == 7
    row = r._take_rows()[0]
    # the check answered first: still running, its slot held again
    r._suspect(tasks[0], False)
    tasks[0].handover = False
    asyncio.run(r._submit(row))
    assert client.creates == 1 and r.capacity_answers == 1
    assert not r._capacity_wait and r._backoff_until == 0.0 and r._capacity_strikes == 0
    assert r.window == 8 and r.store.get_meta("learnt_limit") is None
    assert r.store.counts()[st.PENDING] == 10  # the row is back, nothing in doubt
    # the same refusal long after any handover: the key is full, the count is waited for
    r._handover_at = time.monotonic() - 10.0
    r._creating = 0  # (the first create's done-callback, outside a task here)
    r._forget(tasks[1])  # a task ended: a free slot, taken by a create that is refused
    asyncio.run(r._submit(r._take_rows()[0]))
    assert r._capacity_wait and r._capacity_strikes == 1


def test_a_late_end_that_the_guess_only_slipped_under_is_placed_by_the_ends_found_around_it():
    # Regular 3 s tasks at a far service: the guess drifts just under the end, a check finds
    # its task running at 2.99 s, and the recheck's answer comes a round trip later (3.2 s).
    # The tasks found ended at their first checks just before say the end is by 3.01 s: the
    # model goes there, not to the middle of the round trip (3.1 s: every later slot idle
    # 0.1 s a turnover, measured at C=20, D=3 s, 200 ms).
    model = EndModel(tau=3.0, early=0.0)
    for _ in range(6):
        model.learn(3.01, first_check=3.0, live=20)
    model.learn(3.2, running_at=2.99, late=True, first_check=2.99, live=20)
    assert 3.0 < model.tau <= 3.01 + RECHECK_FRACTION * 3.0
    # durations that vary: a task found ended well before this one was seen running, so the
    # ends found around it say nothing about it, and the late interval stands
    varied = EndModel(tau=3.0, early=0.0)
    for ended in (3.01, 2.5, 3.01):
        varied.learn(ended, first_check=3.0, live=20)
    varied.learn(3.2, running_at=2.99, late=True, first_check=2.99, live=20)
    assert varied.tau > 3.09


def test_the_guess_does_not_drift_back_under_a_regular_end_it_just_found_for_a_few_generations():
    model = EndModel(tau=3.0, early=0.0)
    for _ in range(6):
        model.learn(3.01, first_check=3.0, live=DRIFT_MIN_GENERATION)
    model.learn(3.2, running_at=2.99, late=True, first_check=2.99, live=DRIFT_MIN_GENERATION)
    floor = 2.99 + RECHECK_FRACTION * 3.0 / 2  # just above the "not yet"
    seen = []
    for _ in range(FLOOR_GENERATIONS * DRIFT_MIN_GENERATION):
        model.learn(model.tau, first_check=model.tau, live=DRIFT_MIN_GENERATION)
        seen.append(model.tau)
    # the step had grown enough to cross 2.99 within those ends: it stopped just above
    assert min(seen) == pytest.approx(floor, abs=1e-4)
    # afterwards the guess moves earlier again (durations that shrink are still followed)
    for _ in range(3 * DRIFT_MIN_GENERATION):
        model.learn(model.tau, first_check=model.tau, live=DRIFT_MIN_GENERATION)
    assert model.tau < 2.99


def test_a_search_on_one_slot_halves_the_interval_with_each_probe():
    # on one slot every task of a round is a probe while the interval shrinks: one probe at
    # the middle (a call when it is early) instead of three from the bottom up
    model = EndModel()
    model.learn(2.0, running_at=0.0)
    assert model.first_check(1) == pytest.approx(1.0)
    assert model.first_check(1) == pytest.approx(2.0)  # the rest of the round at the top
    model.not_yet(1.0)  # the probe was early: what is left is halved, a new round
    assert model.first_check(1) == pytest.approx(1.5)


class _AnswerClient(_NoClient):
    """Polls answer ``state``; creates are accepted."""

    def __init__(self, state: str = "RUNNING") -> None:
        self.state = state
        self.polls: list[str] = []

    async def poll(self, task_id: str) -> Any:
        self.polls.append(task_id)
        return TaskResult(self.state)

    async def create(self, body: Any) -> Any:
        return Submitted(f"made{secrets.token_hex(4)}", "QUEUED")


def test_a_task_running_at_its_check_moves_the_checks_not_yet_sent_of_its_generation(runner):
    # Measured at C=20, D=120 s: when the guess slips under a regular duration, every task of
    # the generation still to be checked was asked too early, one "not yet" each (0.2 calls
    # per task over the run). The first "not yet" moves the others' first checks a recheck
    # after its age, by at most DEFER_MAX_RECHECKS rechecks.
    r = runner(rows=10, concurrency=8)
    r.client = client = _AnswerClient("RUNNING")
    r.model = EndModel(tau=120.0, early=0.0)
    _measure(r, 0.002, 3)
    late = _live(r, 100, age_s=120.0)
    pending = [_live(r, 101 + i, age_s=119.0 - i) for i in range(3)]
    young = _live(r, 110, age_s=10.0)  # made later with the same guess: moved too
    raised = _live(r, 111, age_s=10.0)  # its check is already past the new point: not moved
    sent = _live(r, 112, age_s=119.9)  # its check is on its way: not moved
    for live in (late, *pending, young, raised, sent):
        r._first_check_delay(live)
    sent.polling = True
    raised.first_check = 121.0
    generations = [live.generation for live in pending]
    gap = RECHECK_FRACTION * 120.0
    asyncio.run(r._poll_one(late))
    assert client.polls == [late.task_id] and late.negatives == 1
    for live, generation in zip(pending, generations, strict=True):
        assert 120.0 < live.first_check <= 120.0 + DEFER_MAX_RECHECKS * gap
        assert live.first_check == pytest.approx(120.0 + gap, abs=0.05)
        assert live.generation > generation  # rescheduled there
    assert young.first_check == pytest.approx(120.0 + gap, abs=0.05)
    assert raised.first_check == 121.0 and sent.first_check == 120.0
    # a probe of a search that finds its task running moves nothing
    r2 = runner(rows=10, concurrency=8)
    r2.client = _AnswerClient("RUNNING")
    r2.model = EndModel()
    r2.model.learn(120.0, running_at=100.0)  # a first end seen widely: a search
    assert r2.model.searching
    _measure(r2, 0.002, 3)
    probe, other = _live(r2, 100, age_s=105.0), _live(r2, 101, age_s=104.0)
    r2._first_check_delay(probe)
    r2._first_check_delay(other)
    assert probe.probe and probe.first_check < 120.0
    before = other.first_check
    asyncio.run(r2._poll_one(probe))
    assert other.first_check == before


def test_checks_due_at_the_top_of_a_search_follow_it_down(runner):
    # The tasks made while the first ends come in are asked at the top of the search (where the
    # first end was seen); once a probe finds its task ended lower, those checks not yet sent
    # are due there instead.
    r = runner(rows=10, concurrency=8)
    r.model = EndModel()
    r.model.learn(3.4, running_at=2.6)
    assert r.model.searching and r.model.tau == 3.4
    _measure(r, 0.002, 3)
    probe = _live(r, 100, age_s=3.1)
    waiting = [_live(r, 101 + i, age_s=3.0) for i in range(4)]
    young = _live(r, 110, age_s=0.5)
    for live in (probe, *waiting, young):
        r._first_check_delay(live)
    probe.first_check, probe.probe = 3.1, True
    tops = [live for live in (*waiting, young) if not live.probe]
    assert tops and all(live.first_check == 3.4 for live in tops)
    r._finish(probe, time.monotonic())
    assert r.model.tau == pytest.approx(3.1, abs=0.01)
    for live in tops:
        assert live.first_check == pytest.approx(3.1, abs=0.01)
    probes = [live for live in (*waiting, young) if live.probe]
    assert all(live.first_check < 3.4 for live in probes)  # the search's points: left alone


def test_the_reads_for_the_first_ends_quicken_as_soon_as_enough_tasks_are_live(runner):
    # The account watcher planned its next read when the first task was live (at the full
    # interval, a lone task); the FIRST_END_FAST_LIVE-th create wakes it, so it reads at a
    # quarter of the interval from then on instead of a whole interval after the first.
    r = runner(rows=10, concurrency=8)
    r.client = _AnswerClient()
    _measure(r, 0.002, 3)
    r._read_idle = False

    async def submit_all() -> list[bool]:
        woken = []
        for _ in range(FIRST_END_FAST_LIVE + 1):
            row = r._next_pending()
            r._read_wake.clear()
            await r._submit(row)
            woken.append(r._read_wake.is_set())
        return woken

    woken = asyncio.run(submit_all())
    assert len(r.live) == FIRST_END_FAST_LIVE + 1
    assert woken == [n == FIRST_END_FAST_LIVE for n in range(1, FIRST_END_FAST_LIVE + 2)]
    now = time.monotonic()
    r._last_read_at = now
    assert r._next_read_at(now) == pytest.approx(now + 2.0 * ACCOUNT_POLL_MIN_FRACTION)


def test_after_a_create_in_doubt_creates_go_one_at_a_time(runner):
    r = runner(rows=10, concurrency=8)
    _measure(r, 5.0, 3)
    assert r._create_slots() > 1
    r._on_unknown()
    r._slots_at = -math.inf
    assert r._create_slots() == 1


def test_a_late_end_bounded_by_the_ends_around_it_is_not_held_up_by_old_wide_ones():
    # 1 s tasks at a 200 ms round trip: three late ends seen in a round trip's width (no end
    # found at a check yet to bound them) left middles near 1.19 s. Generations later the guess
    # has drifted to 1.02 s and a bounded late end says the end is by 1.03 s: the guess goes
    # there, not back to the median of those old middles (every slot 0.16 s idle a turnover
    # for the next ten generations, measured at C=50, D=1 s, 200 ms).
    model = EndModel(tau=1.0, early=0.0)
    for _ in range(3):
        model.learn(1.3, running_at=1.08, late=True, first_check=1.0, live=50)
    assert model.tau > 1.18
    model.tau = 1.02
    for _ in range(6):
        model.learn(1.03, first_check=1.02, live=50)
    model.learn(1.23, running_at=1.025, late=True, first_check=1.02, live=50)
    assert 1.025 < model.tau <= 1.03 + RECHECK_FRACTION * 1.03 + 1e-9


def test_the_ends_a_search_found_at_their_checks_bound_the_first_late_end_after_it():
    # the search ends at 1.03 s (a probe found its task ended there, another was running at
    # 1.025 s); the next task seen running at 1.028 s is answered a round trip later (1.25 s):
    # the probe's end bounds it, and the guess stays near 1.03 s instead of 1.14 s
    model = EndModel()
    model.learn(1.44, running_at=0.98)  # the first end, seen by reads 0.46 s apart: searched
    assert model.searching
    model.learn(1.03, first_check=1.03, probe=True, live=50)
    model.not_yet(1.025)
    assert not model.searching and model.tau == pytest.approx(1.03)
    model.learn(1.25, running_at=1.028, late=True, first_check=1.03, live=50)
    assert model.tau < 1.04


def test_a_read_that_finds_the_account_idle_bounds_the_ends_it_shows(runner):
    # Before the first end, the read handled at t finds nothing live on the account: every
    # task of ours made before it had ended by t. The polls that confirm each end answer a
    # round trip later; the end is placed by the read (the first end's search starts 0.2 s
    # lower at a 200 ms round trip), not by those polls.
    r = runner(rows=400, concurrency=20)
    _measure(r, 0.2, 3)
    tasks = [_live(r, i, age_s=1.0) for i in range(4)]
    now = time.monotonic()
    for t in tasks:
        t.seen_at = t.t0 + 0.1  # each seen at its create's answer, before the read left
    sent = now - 0.2
    r._last_read_at = sent + 0.1  # the read, handled half a round trip after it left
    r._on_account_count(0, list(r.live.values()), sent, previous=sent - 0.25)
    assert all(t.suspected and t.read_high == pytest.approx(sent + 0.1) for t in tasks)
    r._finish(tasks[0], at=now + 0.1)  # its poll, sent as the read answered
    assert r.model.searching
    assert r.model.tau == pytest.approx(sent + 0.1 - tasks[0].t0, abs=0.005)
    # a count that shows only some ends proves nothing of any one task
    other = runner(rows=400, concurrency=20)
    some = [_live(other, i, age_s=1.0) for i in range(4)]
    for t in some:
        t.seen_at = t.t0 + 0.1
    other._last_read_at = now
    other._on_account_count(2, list(other.live.values()), now, previous=now - 0.25)
    assert all(t.read_high is None for t in some)


def test_a_task_is_timed_from_its_create_answer_less_half_the_fastest_round_trip(runner):
    # A far service that queues a wave of creates makes the last of them up to 0.17 s after
    # they left (measured: 50 creates and 50 polls at once). Timed from the send, those tasks
    # were asked too early (a "not yet", a refused handover and a guess raised for every
    # task); timed from the answer, a task is asked late by at most how slow this loop was to
    # read the answer.
    r = runner()
    assert r._made_at(10.0, 10.5) == pytest.approx(10.25)  # no round trip known: the middle
    _measure(r, 0.2, 3)
    assert r._made_at(10.0, 10.2) == pytest.approx(10.1)
    assert r._made_at(10.0, 10.37) == pytest.approx(10.27)  # handled 0.17 s after it arrived
    assert r._made_at(10.0, 10.05) == pytest.approx(10.025)  # faster than the floor: its own
