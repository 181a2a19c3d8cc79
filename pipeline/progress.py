"""What ``rhbatch run`` shows while a run goes: tqdm on a terminal, plain lines without one, and
with ``--verbose`` the log.

The core emits :class:`~pipeline.runner.Event` values; this module (the command line's, and only
imported when a run starts, with tqdm) turns them into a progress bar and status lines.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from pipeline.config import PROGRESS_INTERVAL_S, RedactingFilter, redact
from pipeline.safetext import amount, escape_controls

if TYPE_CHECKING:
    from pipeline.status import KeyRow

# The runner stops with this detail when a task crashed (a full disk, ...); it then raises that
# error, which handle_errors prints once with its fix, so the "Stopping:" line would repeat it.
CRASH_PREFIX = "internal error: "


class Progress:
    """tqdm on stderr on a terminal; without one (nohup, CI, a pipe), a plain line every
    ``interval_s`` on stderr and in the run's log: counts, rate, coins, ETA. --quiet: neither."""

    def __init__(self, total: int, done: int, quiet: bool,
                 interval_s: float = PROGRESS_INTERVAL_S, *,
                 echo: Callable[[str], None] = lambda line: None):
        self.echo = echo
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="row",
            file=sys.stderr,
            disable=quiet or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        self.counts = {"submitted": 0, "success": 0, "failed": 0, "unknown": 0}
        self._stopping_said: Any = None  # the last "Stopping:" line's reason
        self.total, self.done_before, self.coins = total, done, 0.0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lines: threading.Thread | None = None
        if not quiet and not sys.stderr.isatty() and interval_s > 0:
            self._lines = threading.Thread(target=self._plain_lines, args=(interval_s,),
                                           name="progress", daemon=True)
            self._lines.start()

    def line(self) -> str:
        """One plain progress line: what a person reading a log wants to know."""
        done = self.counts["success"] + self.counts["failed"]
        elapsed = time.monotonic() - self.started
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        left = self.total - self.done_before - done - self.counts["unknown"]
        eta = f"{left / rate:,.0f} min" if rate > 0 and left > 0 else "n/a"
        return (f"progress: {self.done_before + done:,}/{self.total:,} rows final "
                f"({self.counts['success']:,} succeeded, {self.counts['failed']:,} failed, "
                f"{self.counts['unknown']:,} unknown this session), {self.counts['submitted']:,} "
                f"submitted, {rate:,.1f} rows/min, {amount(self.coins)} coins, ETA {eta}")

    def _plain_lines(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            text = self.line()
            self.echo(text)
            logging.getLogger("rhbatch.progress").info("%s", text)

    def __call__(self, event: Any) -> None:
        if event.kind == "cost":
            self.coins = float(event.detail)
        if event.kind in self.counts:
            self.counts[event.kind] += 1
        if event.kind in ("success", "failed"):
            self.bar.update(1)
        if event.kind == "retired":  # one of several keys stops creating (pipeline.pool)
            self.bar.write(f"Key retired: {escape_controls(redact(event.detail))}",
                           file=sys.stderr)
        if event.kind == "stopping" and event.detail == self._stopping_said:
            return  # said once (every key's runner stops with the run)
        if event.kind in ("outage", "reconciling"):
            self.bar.write(f"{'Waiting for webhooks: ' if event.kind == 'reconciling' else ''}"
                           f"{escape_controls(redact(event.detail))}", file=sys.stderr)
        if event.kind == "stopping" and not str(event.detail).startswith(CRASH_PREFIX):
            self._stopping_said = event.detail
            detail = escape_controls(redact(event.detail))
            if detail == "interrupted":
                detail = ("interrupted: finishing the creates in flight and saving state; press "
                          "Ctrl-C again to stop at once (a row whose create is still in flight "
                          "then becomes SUBMIT_UNKNOWN)")
            self.bar.write(f"Stopping: {detail}", file=sys.stderr)
        if not self.bar.disable:  # a disabled bar still formats its postfix: skip that work
            self.bar.set_postfix(
                sub=self.counts["submitted"], ok=self.counts["success"], fail=self.counts["failed"],
                unk=self.counts["unknown"], refresh=False,
            )

    def close(self) -> None:
        self._stop.set()
        self.bar.close()


@contextlib.contextmanager
def verbose_log(verbose: bool) -> Iterator[None]:
    """``--verbose``: the ``rhbatch`` log on stderr (key redacted) while the command runs; the
    handler is removed when it ends, so an in-process caller (a test, a notebook) that runs
    another command does not log twice."""
    if not verbose:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("rhbatch")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def spending_lines(spending: Any) -> list[str]:
    """Coins (and money, when any) billed, split by how the tasks ended; unpriced tasks named."""
    if spending is None:
        return []
    lines = []
    parts = []
    for status in ("SUCCESS", "FAILED", "CANCELLED"):
        bucket = spending.by_status.get(status)
        if bucket and (bucket["coins"] or bucket["money"] or bucket["third_party_money"]):
            parts.append(f"{amount(bucket['coins'])} {status.lower()}")
    line = f"Billed: {amount(spending.coins)} coins"
    if parts:
        line += f" ({', '.join(parts)}; every attempt counted)"
    lines.append(line)
    if spending.money or spending.third_party_money:
        lines.append(f"Money: {amount(spending.money)} consumeMoney, "
                     f"{amount(spending.third_party_money)} third-party")
    if spending.unpriced:
        lines.append(f"Cost unknown for {spending.unpriced} task(s): the service did not report it "
                     "(not counted as 0)")
    return lines


class KeyOutcomeLike(Protocol):
    """What one key did in this invocation (:class:`pipeline.pool.KeyOutcome`)."""

    @property
    def label(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def created(self) -> int: ...  # creates accepted
    @property
    def capacity_answers(self) -> int: ...
    @property
    def capacity_wait_s(self) -> float: ...
    @property
    def window(self) -> int: ...
    @property
    def retired(self) -> str | None: ...


def key_table_lines(keys: Sequence[KeyRow]) -> list[str]:
    """``rhbatch status``: one line per key of :func:`pipeline.status.key_breakdown` (rows
    done, failed, unknown, live; coins, money, why it was retired); none for a run on one key."""
    if len(keys) < 2:
        return []
    money = any(k.money for k in keys)
    unpriced = any(k.unpriced for k in keys)
    head = ["key", "done", "failed", "unknown", "live", "coins", *(["money"] * money),
            *(["unpriced"] * unpriced), "retired"]
    table = [head] + [
        [escape_controls(k.label), f"{k.count('SUCCESS'):,}", f"{k.count('FAILED', 'CANCELLED'):,}",
         f"{k.count('SUBMIT_UNKNOWN'):,}", f"{k.count('SUBMITTING', 'QUEUED', 'RUNNING'):,}",
         amount(k.coins), *([amount(k.money)] * money), *([f"{k.unpriced:,}"] * unpriced),
         escape_controls(k.retired) if k.retired else "-"]
        for k in keys]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    return ["keys:"] + ["  " + "  ".join(
        [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)),
         row[-1]]).rstrip() for row in table]


def key_summary_lines(outcomes: Sequence[KeyOutcomeLike], breakdown: Sequence[KeyRow]) -> list[str]:
    """The end-of-run summary per key when the run knows more than one: what each key created in
    this invocation, its rows' outcomes and cost over the run, the capacity answers it waited on,
    and why it was retired; none for a run on one key."""
    by_fp = {k.fingerprint: k for k in breakdown}
    done: dict[str | None, KeyOutcomeLike] = {o.fingerprint: o for o in outcomes}
    order = [*done, *(fp for fp in by_fp if fp not in done)]
    if len(order) < 2:
        return []
    lines = ["Keys:"]
    for fp in order:
        outcome, row = done.get(fp), by_fp.get(fp)
        label = outcome.label if outcome is not None else row.label if row is not None else "?"
        parts = [f"{outcome.created:,} created this run" if outcome is not None else
                 "not used this run"]
        if row is not None:
            ends = [f"{row.count('SUCCESS'):,} succeeded",
                    f"{row.count('FAILED', 'CANCELLED'):,} failed"]
            unknown, live = row.count("SUBMIT_UNKNOWN"), row.count("SUBMITTING", "QUEUED", "RUNNING")
            ends += [f"{unknown:,} unknown"] * bool(unknown) + [f"{live:,} live"] * bool(live)
            parts.append(f"its rows: {', '.join(ends)}")
            parts.append(f"{amount(row.coins)} coins" +
                         (f", {amount(row.money)} money" if row.money else ""))
        if outcome is not None:
            parts.append(f"{outcome.capacity_answers:,} capacity answers "
                         f"({outcome.capacity_wait_s:,.1f} s waited)")
        retired = (outcome.retired if outcome is not None else None) or (row.retired if row else None)
        if retired:
            parts.append(f"retired: {escape_controls(retired)}")
        lines.append(f"  {escape_controls(label)}: {'; '.join(parts)}")
    return lines


def resume_command(argv: list[str]) -> tuple[str, bool]:
    """The command that resumes this one, and whether ``--api-key`` was dropped from it: the key
    is never printed, and ``--api-key ***`` would not work (the key then comes from the
    environment)."""
    kept: list[str] = []
    dropped = skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--":
            kept.extend(argv[i:])
            break
        elif arg == "--api-key":
            dropped = skip = True
        elif arg.startswith("--api-key="):
            dropped = True
        else:
            kept.append(arg)
    return " ".join(shlex.quote(escape_controls(a)) for a in ["rhbatch", *kept]), dropped
