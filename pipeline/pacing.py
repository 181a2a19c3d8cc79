"""When a run's tasks end and how many creates it sends at once: the pacing models of the run
loop (:mod:`pipeline.runner`), pure functions and state without I/O.

- :func:`account_poll_interval`: how often the shared ``accountStatus`` read is worth its call;
- :class:`EndModel`: when a live task is first asked about, learnt from the tasks that ended
  (a search after a first end seen in a wide interval, then small steps and late ends);
- :func:`default_creates_in_flight`, :func:`create_slots`: the bound on creates in flight and
  Little's law within it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

# -- the shared account read --
# The shared accountStatus read is spent at about this many calls per finished task when ends are
# hard to predict: with many short tasks in flight it is read more often than
# --account-poll-interval, down to a quarter of it.
ACCOUNT_CALLS_PER_TASK = 0.5
ACCOUNT_POLL_MIN_FRACTION = 0.25
# -- pacing by expected ends (EndModel) --
# A task still running at its expected end is asked again after this share of the expected
# duration, each later gap this many times the last (a straggler costs a few calls).
RECHECK_FRACTION = 0.005
RECHECK_GROWTH = 1.5
RECHECK_MIN_S = 0.005
# A task found ended at its first check moves the expected end this share earlier, spread over a
# generation of live tasks; while a whole generation agrees the step grows, up to the maximum.
DRIFT_FRACTION = 0.001
DRIFT_GROWTH = 1.5
DRIFT_MAX_FRACTION = 0.05
DRIFT_MIN_GENERATION = 4  # a generation, for the step, is at least this many ends (one slot:
# a first check that comes too early costs a whole call per task, so the guess moves slower)
# After a first end seen in a wide interval the end is searched for: this many tasks of each
# round are first asked at points spread over what is left of the interval (the rest at its top,
# where every task has ended); a probe that finds its task running asks again at the top, so a
# round costs at most this many extra calls and narrows the interval this many + 1 times.
SEARCH_PROBES = 3
FLOOR_GENERATIONS = 4  # generations for which the drift stays above a regular end seen closely
FOUND_SAMPLES = 16  # the recent ends found at their first check that can bound a late end
LATE_SAMPLES = 5  # a task still running at its first check raises the expected end to the median
# of this many late ends, so one straggler does not delay every later check
EARLY_WEIGHT = 0.2  # moving average of "an account read found this end before its first check"
EARLY_START = 0.5  # before the first ends say otherwise, reads are assumed to find ends early
EARLY_FULL = 0.3  # at this share of early ends the account is read at ACCOUNT_CALLS_PER_TASK ...
READ_SHARE_MIN = 0.1  # ... and never at less than this share of that pace
EARLY_MARGIN_FRACTION = 0.05  # found this share of the expected end before its check: early

# -- creates in flight --
# At most this many creates in flight at once, unless the run's setting says otherwise: one
# for every CREATE_SLOTS_EACH slots of the window, from CREATES_IN_FLIGHT_MIN to
# CREATES_IN_FLIGHT_MAX, and not fewer than CREATE_NEED_HEADROOM times what turning every slot
# over once a task duration needs at the measured round trip (short tasks at a far service:
# 50 slots of 1 s tasks at 200 ms need 10 in flight); at a far service (a round trip of
# FAR_RTT_S or more) not fewer than the window (a wave of ends is refilled in one round trip).
# A kill leaves at most that many rows in doubt. Within it, Little's law
# on the measured round trip: the rate the slots need (free slots, or the slots of a wave of
# tasks about to end, filled within CREATE_FILL_S; every slot turned over once a task duration)
# times the round trip, times CREATE_RATE_HEADROOM. At a far service (a round trip of FAR_RTT_S
# or more) free slots are filled with as many creates at once as the bound allows: a paid slot
# left free while creates wait their turn costs the user, and the bound is what a kill can leave
# in doubt either way. (Filling within CREATE_FILL_S held 50 free slots at a 13 ms round trip
# to 4 creates at once: 0.43 s of ramp, 1.5 % of a 30 s task.)
FAR_RTT_S = 0.01  # a round trip from which a service is far: waves of ends are looked for
CREATES_IN_FLIGHT_MIN = 8
CREATES_IN_FLIGHT_MAX = 64
CREATE_SLOTS_EACH = 16
CREATE_FILL_S = 0.5
CREATE_RATE_HEADROOM = 3.0
CREATE_NEED_HEADROOM = 1.5


def account_poll_interval(base_s: float, typical_task_s: float | None, live: int,
                          calls_per_task: float = ACCOUNT_CALLS_PER_TASK,
                          slowest_s: float | None = None) -> float:
    """Seconds until the next accountStatus read.

    ``live`` tasks of ``typical_task_s`` end about ``live / typical_task_s`` times a second; reading
    the count every ``typical / (calls_per_task x live)`` seconds costs that many calls per task
    and halves the wait for the next read when ends come often. Never slower than ``slowest_s``
    (default ``base_s``, the configured interval) nor faster than a quarter of ``base_s``.
    """
    if not typical_task_s or live <= 0:
        return base_s
    paced = typical_task_s / (calls_per_task * live)
    return min(base_s if slowest_s is None else slowest_s,
               max(base_s * ACCOUNT_POLL_MIN_FRACTION, paced))


class EndModel:
    """When this run's tasks end, learnt from the ones that did.

    ``tau`` is the offset (seconds after a create was answered) at which a live task is first
    asked about. A check only says "ended by now" or "not yet", so ``tau`` is steered rather than
    measured. The first end known sets it to the middle of the interval in which that task was
    seen to end when that interval is narrow. When it is wide (a read's, before anything was
    known), the end is searched for: ``tau`` is the top of the interval (every task has ended by
    then), and SEARCH_PROBES tasks of each round are first asked at points spread inside it
    (``first_check``). Each "not yet" raises the bottom, each end lowers the top, and a probe
    that found its task running asks again at the top (``recheck_s``): a few calls per round,
    and the interval shrinks SEARCH_PROBES + 1 times a round until it is as narrow as a
    recheck. Ends that disagree (a task still running after another had ended: durations that
    vary) end the search at the top. Afterwards:

    - a task that had ended by its first check (or that an account read found earlier) moves
      ``tau`` a little earlier: DRIFT_FRACTION per generation of live tasks (at least
      DRIFT_MIN_GENERATION ends), a step that grows by DRIFT_GROWTH while whole generations
      agree, so a right guess costs a "not yet" only now and then;
    - a task still running at its first check ("late") raises ``tau`` to just after the median
      of the last LATE_SAMPLES late ends (each the middle of the interval it was seen to end in):
      regular durations settle just after their end, one straggler does not delay every later
      check.

    A task still running after its expected end is asked again after RECHECK_FRACTION of ``tau``,
    then after (RECHECK_GROWTH - 1) times how late it already is. ``early`` is the moving share
    of ends an account read found before their first check: near 0 when durations are regular
    (the expected-end checks find every end and the account is read rarely), high when they vary.
    """

    def __init__(self, tau: float | None = None, early: float = EARLY_START):
        self.tau = tau
        self.early = early
        self.ends = 0
        self._late: deque[tuple[float, float]] = deque(maxlen=LATE_SAMPLES)
        # where recent tasks were found ended at their first check: an upper bound on a late
        # end that the guess only just slipped under (see learn)
        self._found: deque[float] = deque(maxlen=FOUND_SAMPLES)
        # below this offset a regular duration was seen still running: the drift stops just
        # above it for the ends left in _floor_ends (see learn)
        self._floor: float | None = None
        self._floor_ends = 0
        self._drift = DRIFT_FRACTION
        self._agreeing = 0
        # the search after a wide first end: the bottom and top of where tasks end, and the
        # probes and first checks given out since either last moved
        self._low: float | None = None
        self._high: float | None = None
        self._probes = 0
        self._checks = 0
        self._round = SEARCH_PROBES  # probes a round: fewer with fewer slots (first_check)

    @property
    def known(self) -> bool:
        return self.tau is not None

    @property
    def searching(self) -> bool:
        return self._high is not None

    def first_check(self, window: int = 1) -> float:
        """The offset at which a new live task is first asked about: ``tau``, or a probe point
        while searching (SEARCH_PROBES a round; a round with no news at all lasts a
        ``window`` of first checks, then gives out its probes again)."""
        assert self.tau is not None
        if self._high is None or self._low is None:
            return self.tau
        # fewer slots than probes: fewer probes a round, so each halves what is left (on one
        # slot every task of a round that restarts is a probe, and a call when it is early)
        self._round = min(SEARCH_PROBES, max(1, window))
        self._checks += 1
        if self._checks > max(window, self._round + 1):
            self._probes, self._checks = 0, 1
        if self._probes >= self._round:
            return self._high
        self._probes += 1
        return self._low + (self._high - self._low) * self._probes / (self._round + 1)

    def not_yet(self, age_s: float) -> None:
        """A task was still running ``age_s`` after its create."""
        if self._low is not None and self._high is not None and age_s > self._low:
            width = self._high - self._low
            self._low = age_s
            self._narrowed(width)

    def _narrowed(self, width: float) -> None:
        """The search interval, ``width`` wide before, moved: the end of the search, or a new
        round of probes once it shrank by a probe's share (not by the jitter of a check)."""
        assert self._low is not None and self._high is not None
        if self._low >= self._high or self._high - self._low <= 2 * RECHECK_FRACTION * self._high:
            self.tau = self._high  # found (or durations that vary): every task ended by then
            self._low = self._high = None
            self._drift = DRIFT_FRACTION
            self._agreeing = 0
            return
        self.tau = self._high
        if self._high - self._low <= width * (1 - 0.5 / (self._round + 1)):
            self._probes = self._checks = 0

    def recheck_s(self, overdue_s: float, *, floor_s: float = RECHECK_MIN_S,
                  cap_s: float = math.inf, age_s: float | None = None) -> float:
        """The wait before asking again a task still running ``overdue_s`` after the expected
        end (negative: before it), ``age_s`` after its create. While searching, at the top of
        the interval (a probe asked too early costs one call more). Before the expected end,
        half the way there each time (a first check made far too early closes in on the end in
        a few calls); then RECHECK_FRACTION of ``tau``; then (RECHECK_GROWTH - 1) x how late it
        already is, so the checks of a straggler space out geometrically."""
        assert self.tau is not None
        if self._high is not None and age_s is not None and age_s < self._high:
            return min(cap_s, max(floor_s, self._high - age_s))
        gap = max(self.tau * RECHECK_FRACTION, abs(overdue_s) * (RECHECK_GROWTH - 1))
        if overdue_s < 0:
            gap = max(self.tau * RECHECK_FRACTION, -overdue_s / 2)
        return min(cap_s, max(floor_s, gap))

    def learn(self, ended_by: float, *, running_at: float | None = None, late: bool = False,
              by_read: bool = False, first_check: float | None = None, live: int = 1,
              probe: bool = False) -> None:
        """One task ended by ``ended_by`` s after its create; it was still running at
        ``running_at`` s (its last "not yet", if any); ``late``: it was still running at its
        first check (due at ``first_check`` s); ``by_read``: an account read found its end;
        ``live``: tasks now in flight; ``probe``: its first check was a probe of a search. An
        end counts as early when a read found it well (EARLY_MARGIN_FRACTION of ``tau``) before
        its first check would have."""
        if probe and self._high is None:
            # a probe of a search that is over: its answers were learnt as they came, and where
            # it ended in the wide gap up to the top says nothing more
            first_check, running_at, late = None, None, False
        self.ends += 1
        due = first_check if first_check is not None else self.tau
        early = (by_read and not late and due is not None
                 and due - ended_by > EARLY_MARGIN_FRACTION * due)
        self.early += EARLY_WEIGHT * ((1.0 if early else 0.0) - self.early)
        if self.tau is None:
            low = min(running_at if running_at is not None else 0.0, ended_by)
            width = ended_by - low
            if width <= 2 * RECHECK_FRACTION * ended_by:  # seen closely: its middle
                self.tau = max(RECHECK_MIN_S, (low + ended_by) / 2)
                return
            # seen in a wide interval: search it, every task asked at its top meanwhile
            self.tau = max(RECHECK_MIN_S, ended_by)
            self._low, self._high = low, self.tau
            self._probes = self._checks = 0
            return
        if self._high is not None and self._low is not None:
            if first_check is not None and not by_read:
                self._found.append(ended_by)  # found at its check: a bound for a late end after
            width = self._high - self._low
            self._high = min(self._high, max(RECHECK_MIN_S, ended_by))
            if running_at is not None:
                self._low = max(self._low, running_at)
            if self._high - self._low < width:
                self._narrowed(width)
            return
        if first_check is None and not late:  # it ended before the model asked it anything
            if running_at is None or running_at <= self.tau:
                return
            late = True  # still running after the expected end
        if late:
            # where it ended: between its last "not yet" and the answer that said it had
            low = ended_by if running_at is None else min(running_at, ended_by)
            # ... or sooner, when durations are regular: the recent tasks found ended at their
            # first check all ended by then (none of them before this "not yet", give or take a
            # recheck of jitter: else durations vary, and the interval stands). The guess had
            # only slipped under the end, and the answer after a recheck is a round trip later.
            tolerance = RECHECK_FRACTION * self.tau
            bounded = False
            if self._found and min(self._found) >= low - tolerance:
                above = [f for f in self._found if f > low]
                if above and min(above) < ended_by:
                    ended_by, bounded = min(above), True
            self._late.append(((low + ended_by) / 2, (ended_by - low) / 2))
            middles = [m for m, _ in self._late]
            # just after the middle of the recent late ends (a few are trusted no further than
            # twice the current guess): not where the checks happened to be made; an end
            # bounded by the ends found around it is no straggler, and is placed by itself
            # (the median would still hold the wide intervals of generations ago)
            middle = ((low + ended_by) / 2 if bounded else statistics.median(middles)
                      if len(middles) >= 3 else min(min(middles), 2 * self.tau))
            # plus half the usual width of those intervals (at most a recheck): the first checks
            # should find the task ended. An end placed that closely gets a whole recheck: just
            # over it, the next small step earlier would be a "not yet" again (one slot: every
            # fifth task, against every fifteenth to twentieth)
            margin = (RECHECK_FRACTION * self.tau if bounded else
                      min(statistics.median(h for _, h in self._late), RECHECK_FRACTION * self.tau))
            self.tau = max(self.tau, middle + margin)
            self._drift = DRIFT_FRACTION
            self._agreeing = 0
            if bounded:
                self._floor = low
                self._floor_ends = FLOOR_GENERATIONS * max(DRIFT_MIN_GENERATION, live)
            return
        if first_check is not None and not by_read:
            self._found.append(ended_by)
        generation = max(DRIFT_MIN_GENERATION, live)
        # the whole generation moves it by the step
        drifted = self.tau * (1.0 - self._drift) ** (1.0 / generation)
        if self._floor is not None:
            # not below where a regular duration was seen running (a "not yet" for each task of
            # the next generation, and at a far service a refused create for each handed-over
            # slot), never raised by it; for a few generations, so that durations that shrink
            # are still followed
            drifted = max(drifted, min(self.tau, self._floor + RECHECK_FRACTION * self.tau / 2))
            self._floor_ends -= 1
            if self._floor_ends <= 0:
                self._floor = None
        self.tau = max(RECHECK_MIN_S, drifted)
        self._agreeing += 1
        if self._agreeing >= generation:
            self._agreeing = 0
            self._drift = min(max(DRIFT_MAX_FRACTION, self._drift), self._drift * DRIFT_GROWTH)

    def read_share(self) -> float:
        """The share of ACCOUNT_CALLS_PER_TASK the account reads are worth now."""
        return min(1.0, max(READ_SHARE_MIN, self.early / EARLY_FULL))

    def state(self) -> dict[str, float]:
        return {"tau_s": self.tau or 0.0, "early": self.early}

    @classmethod
    def from_state(cls, state: Any) -> EndModel:
        """The model kept by an earlier invocation of the run (anything unusable: a fresh one)."""
        if isinstance(state, dict):
            tau, early = state.get("tau_s"), state.get("early")
            if (isinstance(tau, int | float) and isinstance(early, int | float)
                    and math.isfinite(tau) and tau > 0 and 0.0 <= early <= 1.0):
                return cls(float(tau), float(early))
        return cls()


def default_creates_in_flight(window: int, rtt_s: float | None = None,
                              task_s: float | None = None) -> int:
    """The bound on creates in flight when the run sets none: one for every CREATE_SLOTS_EACH
    slots, from CREATES_IN_FLIGHT_MIN to CREATES_IN_FLIGHT_MAX; once a round trip ``rtt_s`` and
    a task duration ``task_s`` are known, at least CREATE_NEED_HEADROOM times the creates in
    flight that turning ``window`` slots over once a task duration needs (within the maximum).
    At a far service (``rtt_s`` of FAR_RTT_S or more) the whole ``window`` (within the
    maximum): the first fill reaches every slot in one round trip, and so does each generation
    after it, since tasks made together end together (a wave of 20 ends refilled 8 at a time
    costs its last slots two round trips; 50 slots of 1 s tasks at 200 ms filled 15 at a time:
    1.2 s of ramp, 6 % of a 20-task run)."""
    bound = max(CREATES_IN_FLIGHT_MIN, window // CREATE_SLOTS_EACH)
    if rtt_s and task_s:
        bound = max(bound, math.ceil(window / task_s * rtt_s * CREATE_NEED_HEADROOM))
    if rtt_s is not None and rtt_s >= FAR_RTT_S:
        bound = max(bound, window)
    return min(CREATES_IN_FLIGHT_MAX, bound)


def create_slots(bound: int, rtt_s: float | None, *, to_fill: int, window: int,
                 task_s: float | None, ending_soon: int = 0) -> int:
    """How many creates may be in flight now: Little's law on the round trip ``rtt_s``.

    The rate the slots need is the largest of filling ``to_fill`` free slots, or the slots of the
    ``ending_soon`` tasks expected to end, within CREATE_FILL_S, and of turning all ``window``
    slots over once per task duration ``task_s``; in flight = rate x round trip x
    CREATE_RATE_HEADROOM, rounded down, from 1 to ``bound``; at a far service (``rtt_s`` of
    FAR_RTT_S or more) with free slots or a wave about to end, the ``bound`` itself. One while no
    round trip has been measured and on loopback.
    """
    if bound <= 1 or rtt_s is None:
        return 1
    if rtt_s >= FAR_RTT_S and (to_fill > 0 or ending_soon > 0):
        return bound
    rate = max(0, to_fill, ending_soon) / CREATE_FILL_S
    if task_s:
        rate = max(rate, window / task_s)
    return max(1, min(bound, int(rate * rtt_s * CREATE_RATE_HEADROOM)))
