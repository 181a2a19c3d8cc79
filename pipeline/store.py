"""Run state: one SQLite database per run directory, the single source of truth.

Layout of a run directory::

    DIR/state.db        this database (WAL mode: every commit survives a kill of the process)
    DIR/.lock           held with flock by the one process running DIR
    DIR/results.jsonl   output manifest, rewritten from the database (export.py)
    DIR/results.csv
    DIR/rhbatch.log     the run's log, key redacted
    DIR/files/          downloaded outputs

Row lifecycle (DESIGN.md)::

    PENDING -> SUBMITTING -> QUEUED -> RUNNING -> SUCCESS | FAILED | CANCELLED
                        \\-> SUBMIT_UNKNOWN (create sent, outcome unknown: never resent by itself)

Invariants:
- ``SUBMITTING`` is committed before a create request leaves; the task id is committed as soon as it
  arrives. A process that dies in between leaves ``SUBMITTING``, which :meth:`RunStore.recover`
  turns into ``SUBMIT_UNKNOWN`` on the next open, so no row is ever created twice by accident.
- Durability against a kill is every commit's (WAL frames are written before a commit returns).
  Durability against power loss (fsync) is paid where it matters: the ``SUBMITTING`` commit and
  every transaction are ``synchronous=FULL``; the per-task updates that follow (task id, state,
  result) are committed with ``synchronous=NORMAL`` and reach the disk with the next FULL commit or
  :meth:`RunStore.sync`. Losing one of those to a power cut only moves a row back a step that is
  safe to resume from: a lost task id leaves ``SUBMITTING`` (so ``SUBMIT_UNKNOWN``, never a
  second create), a lost result leaves a task id that is polled again. One fsync per create instead
  of three halves the time a create holds the serial submitter.
- A row with a task id is only ever polled, never resubmitted (``retry`` starts a new attempt and
  keeps the old one in ``attempts_log``).

Schema changes are named migrations applied in order and recorded in ``PRAGMA user_version``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RunLockedError, StateError, StorageError
from pipeline.safetext import escape_controls

STATE_DB = "state.db"
LOCK_FILE = ".lock"

PENDING = "PENDING"
SUBMITTING = "SUBMITTING"
QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCESS = "SUCCESS"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
SUBMIT_UNKNOWN = "SUBMIT_UNKNOWN"
STATES = (PENDING, SUBMITTING, QUEUED, RUNNING, SUCCESS, FAILED, CANCELLED, SUBMIT_UNKNOWN)
LIVE = (QUEUED, RUNNING)
FINAL = (SUCCESS, FAILED, CANCELLED)

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_initial",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE rows (
            idx INTEGER PRIMARY KEY,
            number INTEGER NOT NULL,
            row_id TEXT NOT NULL UNIQUE,
            workflow_id TEXT NOT NULL,
            node_info_list TEXT NOT NULL,
            inputs TEXT NOT NULL,
            options TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'PENDING',
            task_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            error_code INTEGER,
            error TEXT,
            failed_reason TEXT,
            outputs TEXT,
            coins REAL,
            task_cost_s REAL,
            submitted_at REAL,
            started_at REAL,
            finished_at REAL,
            updated_at REAL
        );
        CREATE INDEX rows_status ON rows (status, idx);
        CREATE TABLE attempts_log (
            row_idx INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            task_id TEXT,
            status TEXT NOT NULL,
            error_code INTEGER,
            error TEXT,
            submitted_at REAL,
            finished_at REAL,
            PRIMARY KEY (row_idx, attempt)
        );
        CREATE TABLE files (
            row_idx INTEGER NOT NULL,
            n INTEGER NOT NULL,
            url TEXT NOT NULL,
            node_id TEXT,
            path TEXT,
            sha256 TEXT,
            size INTEGER,
            status TEXT NOT NULL DEFAULT 'PENDING',
            error TEXT,
            tries INTEGER NOT NULL DEFAULT 0,
            url_seen_at REAL,
            PRIMARY KEY (row_idx, n)
        );
        """,
    ),
    (
        # What every task cost, whatever its end (failed and cancelled tasks are billed too), with
        # money apart from coins; earlier attempts keep their cost, so totals never forget a task;
        # the per-attempt webhook token and how an unknown create was reconciled.
        "002_cost_of_every_attempt",
        """
        ALTER TABLE rows ADD COLUMN money REAL;
        ALTER TABLE rows ADD COLUMN third_party_money REAL;
        ALTER TABLE rows ADD COLUMN usage TEXT;
        ALTER TABLE rows ADD COLUMN attempt_token TEXT;
        ALTER TABLE rows ADD COLUMN reconciled TEXT;
        ALTER TABLE attempts_log ADD COLUMN coins REAL;
        ALTER TABLE attempts_log ADD COLUMN money REAL;
        ALTER TABLE attempts_log ADD COLUMN third_party_money REAL;
        """,
    ),
]


def _dumps(value: Any) -> str:
    # allow_nan=False: what is stored is strict JSON (RFC 8259), so every results file is too
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class ActiveTask:
    idx: int
    task_id: str
    status: str
    submitted_at: float
    started_at: float | None


@dataclass(frozen=True)
class Cost:
    """What one task cost as the service reported it; None where it did not say (never 0)."""

    coins: float | None = None
    money: float | None = None
    third_party_money: float | None = None
    seconds: float | None = None
    children: list[dict[str, Any]] | None = None  # child tasks' usage, as reported

    @classmethod
    def of_outputs(cls, outputs: Sequence[dict[str, Any]]) -> Cost:
        """v1 ``outputs`` repeat the task's cost on every file: the largest figure is the task's."""

        def most(name: str) -> float | None:
            values = [o[name] for o in outputs if o.get(name) is not None]
            return max(values) if values else None

        return cls(most("consumeCoins"), most("consumeMoney"), most("thirdPartyConsumeMoney"),
                   most("taskCostTime"))

    @property
    def known(self) -> bool:
        return self.coins is not None or self.money is not None or self.third_party_money is not None


@dataclass
class Spending:
    """Coins and money billed, per final status, over every attempt of a run."""

    coins: float = 0.0
    money: float = 0.0
    third_party_money: float = 0.0
    by_status: dict[str, dict[str, float]] = field(default_factory=dict)
    unpriced: int = 0  # tasks that ran (they have an id) whose cost the service never reported
    # earlier attempts that ended SUBMIT_UNKNOWN and were resubmitted on the user's consent: each
    # may have been billed, at a cost no answer will ever say
    unknown_attempts: int = 0
    max_coins: float | None = None  # the dearest task so far
    max_money: float | None = None

    def add(self, status: str, n: int, coins: float | None, money: float | None,
            third: float | None, unpriced: int, max_coins: float | None,
            max_money: float | None) -> None:
        bucket = self.by_status.setdefault(
            status, {"tasks": 0, "coins": 0.0, "money": 0.0, "third_party_money": 0.0,
                     "unpriced": 0})
        bucket["tasks"] += n
        bucket["coins"] += coins or 0.0
        bucket["money"] += money or 0.0
        bucket["third_party_money"] += third or 0.0
        bucket["unpriced"] += unpriced
        self.coins += coins or 0.0
        self.money += money or 0.0
        self.third_party_money += third or 0.0
        if status in FINAL:
            self.unpriced += unpriced
        else:
            bucket["unpriced"] -= unpriced  # live tasks have not been billed yet
        if max_coins is not None:
            self.max_coins = max(self.max_coins or 0.0, max_coins)
        if max_money:
            self.max_money = max(self.max_money or 0.0, max_money)

    @property
    def all_money(self) -> float:
        return self.money + self.third_party_money


DISK_FULL_FIX = "free some disk space, then run the same command again to resume"


def _unwritable_fix(run_dir: Path, how: str = "writable again ({dir})") -> str:
    shown = escape_controls(run_dir)
    return (f"make the run directory {how.format(dir=shown)} and run the same command again, or "
            f"copy the run elsewhere (cp -a {shown} COPY) and resume there with --out COPY")


def os_fix(exc: OSError, run_dir: Path,
           fallback: str = "check the disk, then run the same command again to resume") -> str:
    """The fix for a filesystem error in ``run_dir``: one per kind of trouble, said once."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL_FIX
    if exc.errno == errno.EROFS:
        return _unwritable_fix(run_dir, "writable again (remount {dir} read-write)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _unwritable_fix(run_dir, "writable for this user ({dir})")
    return fallback


def storage_error(exc: OSError, path: Path, run_dir: Path | None = None, *,
                  doing: str = "write", **fallback: str) -> StorageError:
    """``exc`` (an OSError on ``path`` in ``run_dir``) as a StorageError with its fix
    (``fallback=`` is the fix for any other errno)."""
    shown = escape_controls(path)
    return StorageError(f"Cannot {doing} {shown}: {exc.strerror or exc}: "
                        f"{os_fix(exc, run_dir or path.parent, **fallback)}")


def _translate(exc: sqlite3.Error, path: Path) -> StorageError:
    text = str(exc)
    if "full" in text:
        fix = DISK_FULL_FIX
    elif "readonly" in text or "read-only" in text:
        fix = _unwritable_fix(path.parent)
    elif "locked" in text:
        fix = "another program holds the database; stop it and resume"
    else:
        fix = "the run state could not be written; check the disk, then resume"
    return StorageError(f"Run state {escape_controls(path)}: {text}: {fix}")


def refuse_entry(path: Path, what: str) -> StateError:
    """The error for ``path`` in a run directory that rhbatch must not write through."""
    shown = escape_controls(path)
    if what.startswith("a symbolic link"):
        return StateError(
            f"{shown} is {what}: rhbatch never writes through a link in a run directory (the "
            f"write would land outside it): remove the link (rm {shown}) and run the same "
            "command again"
        )
    return StateError(f"{shown} is {what}, where rhbatch keeps a file of its own: move it away "
                      "and run the same command again")


def check_run_subdir(directory: Path) -> None:
    """``directory`` (``files/``, ``workflows/``) must be a real directory inside its run, or
    absent: rhbatch never writes into a directory that a link points elsewhere."""
    if directory.is_symlink():
        raise refuse_entry(directory, f"a symbolic link (to {os.readlink(directory)})")
    if directory.exists() and not directory.is_dir():
        raise refuse_entry(directory, "not a directory")


def open_in_run_dir(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open (or create) the regular file ``path`` of a run directory without following a link.

    A symbolic link or anything but a regular file at ``path`` is refused with
    :func:`refuse_entry`: the PID written into ``.lock`` or the lines appended to ``rhbatch.log``
    must never land in a file outside the run. (Hard links are left alone: backups make them, and
    the kernel's protected_hardlinks stops links to files the user could not write anyway.)
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        before = None
    except OSError as exc:
        raise storage_error(exc, path, doing="open") from None
    if before is not None:
        what = _odd_entry(path, before)
        if what:
            raise refuse_entry(path, what)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a link since the lstat
            raise refuse_entry(path, "a symbolic link") from None
        raise storage_error(exc, path, doing="open") from None
    what = _odd_entry(path, os.fstat(fd))
    if what:
        os.close(fd)
        raise refuse_entry(path, what)
    os.set_blocking(fd, True)
    return fd


def _odd_entry(path: Path, info: os.stat_result) -> str:
    """How the entry at ``path`` differs from a plain file of the run ("" when it does not)."""
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            return "a symbolic link"
        return f"a symbolic link (to {escape_controls(target)})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return ""


class RunLock:
    """An exclusive flock on ``DIR/.lock``; released by the kernel if the holder dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = open_in_run_dir(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being run by process {holder}: wait for it to finish, "
                "or stop it (Ctrl-C) and run the same command again to resume"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # the pid is informative only; a read-only disk shows up at the first commit
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunStore:
    """The run's database. Every write commits before it returns."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection):
        self.run_dir = run_dir
        self.path = run_dir / STATE_DB
        self.conn = conn
        self._full_sync = True  # the connection's PRAGMA synchronous is FULL (as opened)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def exists(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / STATE_DB).is_file()

    @classmethod
    def open(cls, run_dir: str | Path, *, create: bool = False, readonly: bool = False) -> RunStore:
        run_dir = Path(run_dir)
        path = run_dir / STATE_DB
        for name in (STATE_DB, STATE_DB + "-wal", STATE_DB + "-shm"):
            # SQLite follows a link there and would keep the run's state outside the run
            entry = run_dir / name
            if entry.is_symlink():
                raise refuse_entry(entry, f"a symbolic link (to {os.readlink(entry)})")
        if not path.is_file() and not create:
            raise StateError(
                f"{run_dir} holds no rhbatch run (no {STATE_DB}): check the path, or start one "
                f"with `rhbatch run MANIFEST --out {run_dir}`"
            )
        try:
            if create:
                run_dir.mkdir(parents=True, exist_ok=True)
            if readonly:
                cls._upgrade(path)
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            else:
                conn = sqlite3.connect(path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # toggled per write by _sync_mode
            conn.row_factory = sqlite3.Row
            store = cls(run_dir, conn)
            if not readonly:
                store._migrate()
            return store
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, path) from None
        except OSError as exc:
            raise StorageError(f"Cannot create run directory {run_dir}: {exc.strerror}") from None

    @classmethod
    def _upgrade(cls, path: Path) -> None:
        """Before a read-only open: apply pending migrations if the file can be written (they
        only add columns, safe beside a reader); a read-only copy of an old run stays as it is."""
        probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version >= len(MIGRATIONS) or not os.access(path, os.W_OK):
            return
        writer = cls.open(path.parent)
        writer.close()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StateError(
                f"{self.path} was written by a newer rhbatch (state version {version}): upgrade "
                "rhbatch to resume it"
            )
        for number, (_name, sql) in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in sql.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        self.conn.close()

    def _sync_mode(self, full: bool) -> None:
        if self._full_sync != full:
            self.conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._full_sync = full

    def sync(self) -> None:
        """Make every commit so far durable against power loss (fsync the WAL file).

        Cheap when nothing is pending and safe from another thread (it only opens the file).
        """
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except OSError:
            return  # no WAL (read-only or checkpointed away): nothing to flush
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"Run state {self.path}: cannot flush to disk: {exc.strerror}") from None
        finally:
            os.close(fd)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._sync_mode(True)
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from None

    def _write(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> None:
        """One statement, committed; ``durable=False`` skips the fsync (see the module docstring)."""
        try:
            self._sync_mode(durable)
            self.conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from None

    # -- metadata ---------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, **values: Any) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, _dumps(v)) for k, v in values.items()],
            )

    # -- rows -------------------------------------------------------------------------------

    def insert_rows(self, rows: Iterable[Any], batch: int = 20_000) -> int:
        """Insert manifest rows (objects with index, number, row_id, workflow_id, ...) as PENDING."""
        now = time.time()
        count = 0
        chunk: list[tuple[Any, ...]] = []
        with self.transaction() as conn:
            for row in rows:
                chunk.append(
                    (
                        row.index,
                        row.number,
                        row.row_id,
                        row.workflow_id,
                        _dumps(list(row.node_info_list)),
                        _dumps(row.inputs),
                        _dumps(row.options),
                        now,
                    )
                )
                if len(chunk) >= batch:
                    count += len(chunk)
                    conn.executemany(
                        "INSERT INTO rows (idx, number, row_id, workflow_id, node_info_list, "
                        "inputs, options, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                        chunk,
                    )
                    chunk = []
            if chunk:
                count += len(chunk)
                conn.executemany(
                    "INSERT INTO rows (idx, number, row_id, workflow_id, node_info_list, "
                    "inputs, options, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                    chunk,
                )
        return count

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status"):
            out[status] = n
        return out

    def total(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def pending(self, after_idx: int = -1, limit: int = 1000) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT idx, row_id, workflow_id, node_info_list, options, attempts FROM rows "
            "WHERE status = 'PENDING' AND idx > ? ORDER BY idx LIMIT ?",
            (after_idx, limit),
        ).fetchall()

    def active(self) -> list[ActiveTask]:
        return [
            ActiveTask(r["idx"], r["task_id"], r["status"], r["submitted_at"] or 0.0,
                       r["started_at"])
            for r in self.conn.execute(
                "SELECT idx, task_id, status, submitted_at, started_at FROM rows "
                "WHERE status IN ('QUEUED', 'RUNNING') ORDER BY submitted_at, idx"
            )
        ]

    def recover(self) -> int:
        """After a crash: a row left SUBMITTING may have been created; make it SUBMIT_UNKNOWN."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE rows SET status = 'SUBMIT_UNKNOWN', error = ?, updated_at = ? "
                "WHERE status = 'SUBMITTING'",
                (
                    "rhbatch stopped while this row's create request may have been in flight; "
                    "check RunningHub's call records before resubmitting",
                    time.time(),
                ),
            )
            return cur.rowcount

    def mark_submitting(self, idx: int, token: str | None = None) -> None:
        """Durable (fsync'd) before the create leaves; ``token`` is the attempt's webhook token."""
        self._write(
            "UPDATE rows SET status = 'SUBMITTING', attempts = attempts + 1, error = NULL, "
            "error_code = NULL, attempt_token = ?, reconciled = NULL, updated_at = ? WHERE idx = ?",
            (token, time.time(), idx),
        )

    def mark_submitted(self, idx: int, task_id: str, status: str, at: float) -> None:
        started = at if status == RUNNING else None
        self._write(
            "UPDATE rows SET status = ?, task_id = ?, submitted_at = ?, started_at = ?, "
            "updated_at = ? WHERE idx = ?",
            (status, task_id, at, started, time.time(), idx),
            durable=False,
        )

    def mark_running(self, idx: int, at: float) -> None:
        self._write(
            "UPDATE rows SET status = 'RUNNING', started_at = COALESCE(started_at, ?), "
            "updated_at = ? WHERE idx = ? AND status = 'QUEUED'",
            (at, time.time(), idx),
            durable=False,
        )

    def revert_pending(self, idx: int) -> None:
        """The service proved the create was refused (capacity): not an attempt."""
        self._write(
            "UPDATE rows SET status = 'PENDING', attempts = MAX(attempts - 1, 0), "
            "updated_at = ? WHERE idx = ? AND status = 'SUBMITTING'",
            (time.time(), idx),
            durable=False,
        )

    def mark_unknown(self, idx: int, error: str) -> None:
        self._write(
            "UPDATE rows SET status = 'SUBMIT_UNKNOWN', error = ?, updated_at = ? WHERE idx = ?",
            (error, time.time(), idx),
            durable=False,
        )

    def mark_success(self, idx: int, outputs: list[dict[str, Any]], at: float,
                     cost: Cost | None = None) -> None:
        cost = cost if cost is not None else Cost.of_outputs(outputs)
        self._write(
            "UPDATE rows SET status = 'SUCCESS', outputs = ?, coins = ?, money = ?, "
            "third_party_money = ?, usage = ?, task_cost_s = ?, finished_at = ?, error = NULL, "
            "error_code = NULL, failed_reason = NULL, updated_at = ? WHERE idx = ?",
            (
                _dumps(outputs),
                cost.coins,
                cost.money,
                cost.third_party_money,
                None if cost.children is None else _dumps(cost.children),
                cost.seconds,
                at,
                time.time(),
                idx,
            ),
            durable=False,
        )

    def set_cost(self, idx: int, cost: Cost) -> None:
        """What a task that ended cost, learnt after its end was recorded (failed, cancelled)."""
        self._write(
            "UPDATE rows SET coins = ?, money = ?, third_party_money = ?, usage = ?, "
            "task_cost_s = COALESCE(?, task_cost_s), updated_at = ? WHERE idx = ?",
            (cost.coins, cost.money, cost.third_party_money,
             None if cost.children is None else _dumps(cost.children), cost.seconds,
             time.time(), idx),
            durable=False,
        )

    def mark_reconciled(self, idx: int, task_id: str, status: str, how: str, at: float) -> None:
        """An unknown create proven to be ``task_id`` (by ``how``): the row follows that task."""
        started = at if status == RUNNING else None
        self._write(
            "UPDATE rows SET status = ?, task_id = ?, submitted_at = COALESCE(submitted_at, ?), "
            "started_at = ?, error = NULL, reconciled = ?, updated_at = ? WHERE idx = ? "
            "AND status = 'SUBMIT_UNKNOWN'",
            (status, task_id, at, started, how, time.time(), idx),
        )

    def unknown_tokens(self) -> dict[str, int]:
        """Webhook tokens of the attempts whose create is unknown: token -> row index."""
        return {
            r[0]: r[1]
            for r in self.conn.execute(
                "SELECT attempt_token, idx FROM rows WHERE status = 'SUBMIT_UNKNOWN' "
                "AND attempt_token IS NOT NULL"
            )
        }

    def mark_failed(
        self,
        idx: int,
        *,
        code: int | None,
        error: str,
        failed_reason: Any = None,
        at: float | None = None,
        status: str = FAILED,
        cost: Cost | None = None,
    ) -> None:
        cost = cost or Cost()
        self._write(
            "UPDATE rows SET status = ?, error_code = ?, error = ?, failed_reason = ?, "
            "coins = ?, money = ?, third_party_money = ?, usage = ?, "
            "task_cost_s = COALESCE(?, task_cost_s), finished_at = ?, updated_at = ? WHERE idx = ?",
            (
                status,
                code,
                error,
                None if failed_reason is None else _dumps(failed_reason),
                cost.coins,
                cost.money,
                cost.third_party_money,
                None if cost.children is None else _dumps(cost.children),
                cost.seconds,
                at if at is not None else time.time(),
                time.time(),
                idx,
            ),
            durable=False,
        )

    def requeue(self, indexes: Sequence[int]) -> int:
        """Start a new attempt for rows (retry): the old attempt goes to ``attempts_log``."""
        now = time.time()
        with self.transaction() as conn:
            for idx in indexes:
                conn.execute(
                    "INSERT OR REPLACE INTO attempts_log (row_idx, attempt, task_id, status, "
                    "error_code, error, submitted_at, finished_at, coins, money, "
                    "third_party_money) SELECT idx, attempts, task_id, status, error_code, error, "
                    "submitted_at, finished_at, coins, money, third_party_money FROM rows "
                    "WHERE idx = ?",
                    (idx,),
                )
                conn.execute(
                    "UPDATE rows SET status = 'PENDING', task_id = NULL, error = NULL, "
                    "error_code = NULL, failed_reason = NULL, outputs = NULL, coins = NULL, "
                    "money = NULL, third_party_money = NULL, usage = NULL, attempt_token = NULL, "
                    "reconciled = NULL, task_cost_s = NULL, submitted_at = NULL, "
                    "started_at = NULL, finished_at = NULL, updated_at = ? WHERE idx = ?",
                    (now, idx),
                )
                conn.execute("DELETE FROM files WHERE row_idx = ?", (idx,))
        return len(indexes)

    def _row_chunks(self, batch: int) -> Iterator[list[sqlite3.Row]]:
        last = -1
        while True:
            chunk = self.conn.execute(
                "SELECT * FROM rows WHERE idx > ? ORDER BY idx LIMIT ?", (last, batch)
            ).fetchall()
            if not chunk:
                return
            yield chunk
            last = chunk[-1]["idx"]

    def iter_rows(self, batch: int = 5000) -> Iterator[sqlite3.Row]:
        """Every row in input order, streamed."""
        for chunk in self._row_chunks(batch):
            yield from chunk

    def iter_rows_with_files(self, batch: int = 5000) -> Iterator[tuple[sqlite3.Row, list[sqlite3.Row]]]:
        """Every row in input order with its downloaded-file records: one files query per batch."""
        for chunk in self._row_chunks(batch):
            files: dict[int, list[sqlite3.Row]] = {}
            for record in self.conn.execute(
                "SELECT * FROM files WHERE row_idx BETWEEN ? AND ? ORDER BY row_idx, n",
                (chunk[0]["idx"], chunk[-1]["idx"]),
            ):
                files.setdefault(record["row_idx"], []).append(record)
            for row in chunk:
                yield row, files.get(row["idx"], [])

    def files_for(self, idx: int) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT * FROM files WHERE row_idx = ? ORDER BY n", (idx,)
        ).fetchall()

    def priced_rows(self) -> int:
        """Rows whose cost is known (for the expected cost of the next task)."""
        return int(self.conn.execute("SELECT COUNT(*) FROM rows WHERE coins IS NOT NULL").fetchone()[0])

    def reconciled_counts(self) -> dict[str, int]:
        """Rows whose unknown create was resolved to a task, by how (e.g. "webhook")."""
        return {how: n for how, n in self.conn.execute(
            "SELECT reconciled, COUNT(*) FROM rows WHERE reconciled IS NOT NULL GROUP BY reconciled")}

    def spent_coins(self) -> float:
        """Coins billed for every task of the run whose cost is known, earlier attempts included."""
        return self.spending().coins

    def spending(self) -> Spending:
        """What the run has cost so far, every attempt counted, split by how each task ended."""
        out = Spending()
        for source in ("rows", "attempts_log"):
            for status, n, coins, money, third, unpriced, max_coins, max_money in self.conn.execute(
                f"SELECT status, COUNT(*), SUM(coins), SUM(money), SUM(third_party_money), "  # noqa: S608
                f"SUM(task_id IS NOT NULL AND coins IS NULL AND money IS NULL "
                f"AND third_party_money IS NULL), MAX(coins), "
                f"MAX(COALESCE(money, 0) + COALESCE(third_party_money, 0)) FROM {source} "
                "GROUP BY status"
            ):
                out.add(status, n, coins, money, third, unpriced or 0, max_coins, max_money)
                if source == "attempts_log" and status == SUBMIT_UNKNOWN:
                    out.unknown_attempts += n
        return out


def row_record(row: sqlite3.Row, files: Sequence[sqlite3.Row] = ()) -> dict[str, Any]:
    """The output-manifest record for one stored row (fields in DESIGN.md)."""
    outputs = _loads(row["outputs"]) or []
    record: dict[str, Any] = {
        "row": row["number"],
        "row_id": row["row_id"],
        "workflowId": row["workflow_id"],
        "inputs": _loads(row["inputs"]),
        "options": _loads(row["options"]),
        "nodeInfoList": _loads(row["node_info_list"]),
        "status": row["status"],
        "taskId": row["task_id"],
        "fileUrls": [o.get("fileUrl") for o in outputs if o.get("fileUrl")],
        "outputs": outputs,
        "coins": row["coins"],
        "money": row["money"],
        "thirdPartyMoney": row["third_party_money"],
        "taskCostTime": row["task_cost_s"],
        "error_code": row["error_code"],
        "error": row["error"],
        "failedReason": _loads(row["failed_reason"]),
        "attempts": row["attempts"],
        "reconciled": row["reconciled"],
        "submitted_at": _iso(row["submitted_at"]),
        "finished_at": _iso(row["finished_at"]),
    }
    if files:
        record["files"] = [
            {"path": f["path"], "sha256": f["sha256"], "size": f["size"], "status": f["status"],
             "nodeId": f["node_id"]}
            for f in files
        ]
    else:
        record["files"] = []
    return record


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
