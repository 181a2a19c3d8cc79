"""Run state: one SQLite database per run directory, the single source of truth.

Layout of a run directory::

    DIR/state.db        this database (WAL mode: every commit survives a kill of the process)
    DIR/.lock           held with flock by the one process running DIR
    DIR/results.jsonl   output manifest (and results.csv), kept current from the database (refresh.py)
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
  second create), a lost result leaves a task id that is polled again.
- A row with a task id is only ever polled, never resubmitted (``retry`` starts a new attempt and
  keeps the old one in ``attempts_log``).

Schema changes are named migrations applied in order and recorded in ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline._files import (  # noqa: F401 (re-exported: the run directory's guards)
    DISK_FULL_FIX,
    FileLock,
    _unwritable_fix,
    check_run_subdir,
    database_error,
    open_in_run_dir,
    os_fix,
    refuse_entry,
    storage_error,
)
from pipeline.costs import Cost, Spending
from pipeline.errors import StateError, StorageError

STATE_DB = "state.db"
LOCK_FILE = ".lock"

# The states of one output file in the ``files`` table (not a row's: a SUCCESS row's files may be in
# any of them); their meanings are in pipeline/download.py's docstring, which manages them.
FILE_PENDING = "PENDING"
FILE_DOWNLOADED = "DOWNLOADED"
FILE_FAILED = "FAILED"
FILE_EXPIRED = "EXPIRED"
FILE_REFUSED = "REFUSED"
FILE_STATES = (FILE_PENDING, FILE_DOWNLOADED, FILE_FAILED, FILE_EXPIRED, FILE_REFUSED)


@dataclass(frozen=True)
class RunPaths:
    """Every name in a run directory, spelled once (the layout in the module docstring)."""

    root: Path
    state_db: Path = field(init=False)
    lock: Path = field(init=False)
    log: Path = field(init=False)
    report: Path = field(init=False)
    files: Path = field(init=False)
    workflows: Path = field(init=False)
    uploads: Path = field(init=False)

    STATE_DB: ClassVar[str] = STATE_DB
    LOCK: ClassVar[str] = LOCK_FILE
    RESULT_FILES: ClassVar[tuple[str, str]] = ("results.jsonl", "results.csv")
    RESULTS_INDEX: ClassVar[str] = ".results-index"  # where each record sits in the results files
    LOG: ClassVar[str] = "rhbatch.log"
    REPORT: ClassVar[str] = "report.html"
    FILES: ClassVar[str] = "files"
    WORKFLOWS: ClassVar[str] = "workflows"
    UPLOADS: ClassVar[str] = "uploads.json"

    def __post_init__(self) -> None:
        for attr in ("state_db", "lock", "log", "report", "files", "workflows", "uploads"):
            object.__setattr__(self, attr, self.root / getattr(self, attr.upper()))

    def results(self, fmt: str = "jsonl") -> Path:
        """``results.<fmt>`` (jsonl and csv are kept current during a run; others are exports)."""
        return self.root / f"results.{fmt}"


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

# spend (migration 005): each total and what one row adds to it
_UNPRICED = ("({row}.task_id IS NOT NULL AND {row}.coins IS NULL AND {row}.money IS NULL AND "
             "{row}.third_party_money IS NULL)")
_SPEND_SUMS = {"tasks": "1", "coins": "IFNULL({row}.coins, 0)", "money": "IFNULL({row}.money, 0)",
               "third": "IFNULL({row}.third_party_money, 0)",
               "coins_n": "({row}.coins IS NOT NULL)", "money_n": "({row}.money IS NOT NULL)",
               "third_n": "({row}.third_party_money IS NOT NULL)", "unpriced": _UNPRICED}

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
    (
        # Several API keys in one run: the fingerprint of the key a row's create was sent with,
        # committed with SUBMITTING (before the create leaves); every later call for that task
        # uses that key. NULL: the run's only key (runs made before keys could be pooled).
        "003_key_of_every_attempt",
        """
        ALTER TABLE rows ADD COLUMN key_fp TEXT;
        ALTER TABLE attempts_log ADD COLUMN key_fp TEXT;
        """,
    ),
    (
        # The results refresh asks which rows changed since it last wrote (refresh.changed_rows).
        "004_rows_by_update_time",
        """
        CREATE INDEX rows_updated ON rows (updated_at);
        """,
    ),
    (
        # What the rows cost per creating key and status, kept by SQLite in the transaction of every
        # change of a row (triggers): RunStore.spending reads these totals, not every row; each
        # key's dearest task comes from two small indexes. spend.key: key_fp, '' for NULL; *_n: the
        # figures known. insert_rows counts new rows (a trigger per insert costs 50 % more).
        "005_spending_totals",
        """
        CREATE TABLE spend (key TEXT NOT NULL, status TEXT NOT NULL, tasks INTEGER NOT NULL,
            coins REAL NOT NULL, money REAL NOT NULL, third REAL NOT NULL,
            coins_n INTEGER NOT NULL, money_n INTEGER NOT NULL, third_n INTEGER NOT NULL,
            unpriced INTEGER NOT NULL, PRIMARY KEY (key, status));
        INSERT INTO spend SELECT IFNULL(key_fp, ''), status, COUNT(*), TOTAL(coins), TOTAL(money),
            TOTAL(third_party_money), COUNT(coins), COUNT(money), COUNT(third_party_money),
            SUM(task_id IS NOT NULL AND coins IS NULL AND money IS NULL
            AND third_party_money IS NULL) FROM rows GROUP BY 1, 2;
        CREATE TRIGGER spend_out AFTER DELETE ON rows BEGIN {take} END;
        CREATE TRIGGER spend_move AFTER UPDATE OF status, key_fp, task_id, coins, money,
            third_party_money ON rows BEGIN {take} {add} END;
        CREATE INDEX rows_top_coins ON rows (key_fp, coins) WHERE coins IS NOT NULL;
        CREATE INDEX rows_top_money ON rows (key_fp, IFNULL(money, 0) + IFNULL(third_party_money, 0))
            WHERE money IS NOT NULL OR third_party_money IS NOT NULL;
        """.format(
            add="INSERT INTO spend VALUES (IFNULL(new.key_fp, ''), new.status, "
                + ", ".join(e.format(row="new") for e in _SPEND_SUMS.values())
                + ") ON CONFLICT (key, status) DO UPDATE SET "
                + ", ".join(f"{c} = {c} + excluded.{c}" for c in _SPEND_SUMS) + ";",
            take="UPDATE spend SET "
                 + ", ".join(f"{c} = {c} - {e.format(row='old')}" for c, e in _SPEND_SUMS.items())
                 + " WHERE key = IFNULL(old.key_fp, '') AND status = old.status;"),
    ),
]


def _dumps(value: Any) -> str:
    # allow_nan=False: what is stored is strict JSON (RFC 8259), so every results file is too
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def loads(text: str | None) -> Any:
    """A stored JSON column as Python (None stays None)."""
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class ActiveTask:
    idx: int
    task_id: str
    status: str
    submitted_at: float
    started_at: float | None
    key_fp: str | None = None  # the key that created it (None: the run's only key)


class RunLock(FileLock):
    """An exclusive flock on ``DIR/.lock``: one process runs a run directory at a time."""

    def __init__(self, run_dir: Path):
        super().__init__(RunPaths(run_dir).lock)


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
            raise StateError(f"{run_dir} holds no rhbatch run (no {STATE_DB}): check the path, or "
                             f"start one with `rhbatch run MANIFEST --out {run_dir}`")
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
            raise database_error(exc, path) from None
        except OSError as exc:
            raise StorageError(f"Cannot create run directory {run_dir}: {exc.strerror}") from None

    @classmethod
    def _upgrade(cls, path: Path) -> None:
        """Before a read-only open: apply pending migrations if the file can be written (they
        only add columns, tables and indexes, safe beside a reader); a read-only copy of an old
        run stays as it is."""
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
                for statement in sql.split(";\n"):  # each ends a line; a trigger's inner ones don't
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
        """Make every commit so far durable against power loss (fsync the WAL file); cheap when
        nothing is pending, and safe from another thread (it only opens the file)."""
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
            raise database_error(exc, self.path) from None

    def _write(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> None:
        """One statement, committed; ``durable=False`` skips the fsync (see the module docstring)."""
        try:
            self._sync_mode(durable)
            self.conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            raise database_error(exc, self.path) from None

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
        with self.transaction():
            for row in rows:
                chunk.append((row.index, row.number, row.row_id, row.workflow_id,
                              _dumps(list(row.node_info_list)), _dumps(row.inputs),
                              _dumps(row.options), now))
                if len(chunk) >= batch:
                    count += self._insert_chunk(chunk)
                    chunk = []
            if chunk:
                count += self._insert_chunk(chunk)
        return count

    def _insert_chunk(self, chunk: list[tuple[Any, ...]]) -> int:
        self.conn.executemany(
            "INSERT INTO rows (idx, number, row_id, workflow_id, node_info_list, inputs, options, "
            "updated_at) VALUES (?,?,?,?,?,?,?,?)", chunk)
        self.conn.execute(  # the spending totals (migration 005): PENDING rows, nothing known
            "INSERT INTO spend VALUES ('', 'PENDING', ?, 0, 0, 0, 0, 0, 0, 0) "
            "ON CONFLICT (key, status) DO UPDATE SET tasks = tasks + excluded.tasks", (len(chunk),))
        return len(chunk)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        out.update(self.conn.execute("SELECT status, SUM(tasks) FROM spend GROUP BY status" if
                                     self._totals() else
                                     "SELECT status, COUNT(*) FROM rows GROUP BY status"))
        return out

    def total(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def pending(self, after_idx: int = -1, limit: int = 1000) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT idx, row_id, workflow_id, node_info_list, options, attempts FROM rows "
            "WHERE status = 'PENDING' AND idx > ? ORDER BY idx LIMIT ?", (after_idx, limit)
        ).fetchall()

    def active(self) -> list[ActiveTask]:
        return [ActiveTask(r["idx"], r["task_id"], r["status"], r["submitted_at"] or 0.0,
                           r["started_at"], r["key_fp"]) for r in self.conn.execute(
            "SELECT idx, task_id, status, submitted_at, started_at, key_fp FROM rows "
            "WHERE status IN ('QUEUED', 'RUNNING') ORDER BY submitted_at, idx")]

    def key_counts(self) -> dict[str | None, dict[str, int]]:
        """Per key fingerprint (None: not recorded), how many rows are in each state."""
        out: dict[str | None, dict[str, int]] = {}
        for key_fp, status, n in self.conn.execute(
                "SELECT NULLIF(key, ''), status, tasks FROM spend WHERE tasks > 0 AND (key != '' "
                "OR status != 'PENDING')" if self._totals() else
                "SELECT key_fp, status, COUNT(*) FROM rows WHERE key_fp IS NOT NULL OR "
                "status != 'PENDING' GROUP BY key_fp, status"):
            out.setdefault(key_fp, {})[status] = n
        return out

    def recover(self) -> int:
        """After a crash: a row left SUBMITTING may have been created; make it SUBMIT_UNKNOWN."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE rows SET status = 'SUBMIT_UNKNOWN', error = ?, updated_at = ? "
                "WHERE status = 'SUBMITTING'",
                ("rhbatch stopped while this row's create request may have been in flight; "
                 "check RunningHub's call records before resubmitting", time.time()))
            return cur.rowcount

    def mark_submitting(self, idx: int, token: str | None = None, key_fp: str | None = None) -> None:
        """Durable (fsync'd) before the create leaves; ``token`` is the attempt's webhook token,
        ``key_fp`` the fingerprint of the key the create is sent with."""
        self._write(
            "UPDATE rows SET status = 'SUBMITTING', attempts = attempts + 1, error = NULL, "
            "error_code = NULL, attempt_token = ?, reconciled = NULL, key_fp = ?, updated_at = ? "
            "WHERE idx = ?",
            (token, key_fp, time.time(), idx),
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
            (_dumps(outputs), cost.coins, cost.money, cost.third_party_money,
             None if cost.children is None else _dumps(cost.children), cost.seconds, at,
             time.time(), idx),
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
        return {r[0]: r[1] for r in self.conn.execute(
            "SELECT attempt_token, idx FROM rows WHERE status = 'SUBMIT_UNKNOWN' "
            "AND attempt_token IS NOT NULL")}

    def mark_failed(self, idx: int, *, code: int | None, error: str, failed_reason: Any = None,
                    at: float | None = None, status: str = FAILED,
                    cost: Cost | None = None) -> None:
        cost = cost or Cost()
        self._write(
            "UPDATE rows SET status = ?, error_code = ?, error = ?, failed_reason = ?, "
            "coins = ?, money = ?, third_party_money = ?, usage = ?, "
            "task_cost_s = COALESCE(?, task_cost_s), finished_at = ?, updated_at = ? WHERE idx = ?",
            (status, code, error, None if failed_reason is None else _dumps(failed_reason),
             cost.coins, cost.money, cost.third_party_money,
             None if cost.children is None else _dumps(cost.children), cost.seconds,
             at if at is not None else time.time(), time.time(), idx),
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
                    "third_party_money, key_fp) SELECT idx, attempts, task_id, status, error_code, "
                    "error, submitted_at, finished_at, coins, money, third_party_money, key_fp "
                    "FROM rows WHERE idx = ?", (idx,))
                conn.execute(
                    "UPDATE rows SET status = 'PENDING', task_id = NULL, error = NULL, "
                    "error_code = NULL, failed_reason = NULL, outputs = NULL, coins = NULL, "
                    "money = NULL, third_party_money = NULL, usage = NULL, attempt_token = NULL, "
                    "reconciled = NULL, key_fp = NULL, task_cost_s = NULL, submitted_at = NULL, "
                    "started_at = NULL, finished_at = NULL, updated_at = ? WHERE idx = ?", (now, idx))
                conn.execute("DELETE FROM files WHERE row_idx = ?", (idx,))
        return len(indexes)

    def _row_chunks(self, batch: int) -> Iterator[list[sqlite3.Row]]:
        last = -1
        while True:
            chunk = self.conn.execute("SELECT * FROM rows WHERE idx > ? ORDER BY idx LIMIT ?",
                                      (last, batch)).fetchall()
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

    # -- output files (the download's table) ------------------------------------------------

    def success_outputs(self, after_idx: int, limit: int = 2000) -> list[tuple[int, Any, float | None]]:
        """(idx, decoded outputs, finished_at) of SUCCESS rows with outputs, after ``after_idx``."""
        out = []
        for row in self.conn.execute(
            "SELECT idx, outputs, finished_at FROM rows WHERE status = 'SUCCESS' AND idx > ? "
            "AND outputs IS NOT NULL ORDER BY idx LIMIT ?",
            (after_idx, limit),
        ):
            try:
                outputs = json.loads(row["outputs"]) or []
            except ValueError:
                outputs = []
            out.append((row["idx"], outputs, row["finished_at"]))
        return out

    def plan_files(self, wanted: Sequence[tuple[int, int, str, str | None, float | None]]) -> int:
        """Record (row_idx, n, url, node_id, url_seen_at) file rows; a file whose URL changed (its
        row was retried and succeeded again) is set back to pending. Returns the rows changed."""
        with self.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO files (row_idx, n, url, node_id, url_seen_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(row_idx, n) DO UPDATE SET url = excluded.url, "
                "node_id = excluded.node_id, url_seen_at = excluded.url_seen_at, "
                f"status = '{FILE_PENDING}', error = NULL, tries = 0 WHERE files.url != excluded.url",
                wanted,
            )
            return conn.total_changes - before

    def file_with_row(self, row_idx: int, n: int) -> sqlite3.Row | None:
        """One file's record joined with its SUCCESS row's id, number and outputs (None: the row
        is no longer SUCCESS, or there is no such file)."""
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT f.row_idx, f.n, f.url, f.node_id, f.path, f.sha256, f.status, f.tries, "
            "r.row_id, r.number, r.outputs FROM files f JOIN rows r ON r.idx = f.row_idx "
            "WHERE f.row_idx = ? AND f.n = ? AND r.status = 'SUCCESS'", (row_idx, n)).fetchone()
        return row

    _FILE_COLUMNS = frozenset({"path", "sha256", "size", "status", "error", "tries"})

    def update_file(self, row_idx: int, n: int, url: str, **values: Any) -> None:
        """Set columns of one file's record, if its URL is still ``url``."""
        unknown = set(values) - self._FILE_COLUMNS
        if unknown:
            raise ValueError(f"not a files column: {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as conn:
            conn.execute(f"UPDATE files SET {sets} WHERE row_idx = ? AND n = ? AND url = ?",  # noqa: S608
                         (*values.values(), row_idx, n, url))

    def file_path_taken(self, rel: str, row_idx: int, n: int) -> bool:
        """Whether another file's record already claims the path ``rel``."""
        return self.conn.execute(
            "SELECT 1 FROM files WHERE path = ? AND NOT (row_idx = ? AND n = ?) LIMIT 1",
            (rel, row_idx, n),
        ).fetchone() is not None

    def file_candidates(self) -> Iterator[tuple[int, int]]:
        """(row_idx, n) of every file of a SUCCESS row to fetch or verify, oldest URL first."""
        yield from self.conn.execute(
            "SELECT f.row_idx, f.n FROM files f JOIN rows r ON r.idx = f.row_idx "
            f"WHERE r.status = 'SUCCESS' AND f.status != '{FILE_EXPIRED}' "
            "ORDER BY COALESCE(f.url_seen_at, 0), f.row_idx, f.n"
        )

    def file_counts(self) -> dict[str, int]:
        """How many output files are in each file state."""
        return {status: n for status, n in self.conn.execute(
            "SELECT status, COUNT(*) FROM files GROUP BY status ORDER BY status")}

    def files_summary(self) -> list[list[Any]]:
        """Per file state: how many files, their tries and bytes (what the results say of files)."""
        return [list(r) for r in self.conn.execute(
            "SELECT status, COUNT(*), TOTAL(tries), TOTAL(size) FROM files GROUP BY status "
            "ORDER BY status")]

    ROWS_PER_QUERY = 500  # idx IN (...) parameters per statement

    def rows_by_idx(self, wanted: Sequence[int]) -> list[sqlite3.Row]:
        """The rows with these indexes (in no particular order)."""
        found: list[sqlite3.Row] = []
        for start in range(0, len(wanted), self.ROWS_PER_QUERY):
            chunk = tuple(wanted[start:start + self.ROWS_PER_QUERY])
            found += self.conn.execute(
                f"SELECT * FROM rows WHERE idx IN ({','.join('?' * len(chunk))})",  # noqa: S608
                chunk).fetchall()
        return found

    def updated_since(self, since: float) -> Iterator[tuple[int, float]]:
        """(idx, updated_at) of every row changed at or after ``since``."""
        yield from self.conn.execute(
            "SELECT idx, updated_at FROM rows WHERE updated_at >= ?", (since,))

    def top_failures(self, limit: int) -> list[tuple[int, int | None, str | None]]:
        """(count, error_code, error) of the commonest causes of failed, cancelled, unknown rows."""
        return [(r["n"], r["error_code"], r["error"]) for r in self.conn.execute(
            "SELECT COUNT(*) AS n, error_code, error FROM rows WHERE status IN "
            "('FAILED', 'CANCELLED', 'SUBMIT_UNKNOWN') GROUP BY error_code, error "
            "ORDER BY n DESC LIMIT ?", (limit,))]

    def unknown_rows(self, limit: int) -> list[tuple[int, str, str]]:
        """(row number, row_id, why) of the first ``limit`` SUBMIT_UNKNOWN rows."""
        return [(r["number"], r["row_id"], r["error"] or "") for r in self.conn.execute(
            "SELECT number, row_id, error FROM rows WHERE status = 'SUBMIT_UNKNOWN' "
            "ORDER BY idx LIMIT ?", (limit,))]

    # -- money ------------------------------------------------------------------------------

    def priced_rows(self) -> int:
        """Rows whose cost is known (for the expected cost of the next task)."""
        return int(self.conn.execute("SELECT COUNT(*) FROM rows WHERE coins IS NOT NULL").fetchone()[0])

    def reconciled_counts(self) -> dict[str, int]:
        """Rows whose unknown create was resolved to a task, by how (e.g. "webhook")."""
        return {how: n for how, n in self.conn.execute(
            "SELECT reconciled, COUNT(*) FROM rows WHERE reconciled IS NOT NULL GROUP BY reconciled")}

    def spending(self) -> Spending:
        """What the run has cost so far, every attempt counted, split by how each task ended."""
        return self.spending_by_key(whole=True)[None]

    def spending_by_key(self, *, whole: bool = False) -> dict[str | None, Spending]:
        """:meth:`spending` per fingerprint of the creating key (None: not recorded, an old run's
        one key); ``whole``: every key together under None. The rows' part is read from the
        totals SQLite keeps (migration 005), or, in a read-only copy of an older run, a scan."""
        out: dict[str | None, Spending] = {None: Spending()} if whole else {}
        totals = self._totals()
        if totals:
            self._spending_of_rows(out, whole)
        for source in ("attempts_log",) if totals else ("rows", "attempts_log"):
            self._spending_scan(out, source, whole)
        return out

    def _totals(self) -> bool:  # SQLite keeps the rows' totals (005; not in an old read-only copy)
        return bool(self.conn.execute("PRAGMA user_version").fetchone()[0] >= 5)

    def _spending_of_rows(self, out: dict[str | None, Spending], whole: bool) -> None:
        keys = set()
        for key, status, n, coins, money, third, coins_n, money_n, third_n, unpriced in self.conn.execute(
                "SELECT * FROM spend WHERE tasks > 0 ORDER BY status, key"):
            keys.add(key)
            into = out.setdefault(None if whole else key or None, Spending())
            # a total none of whose figures is known is None, as SUM says (not 1e-17 of residue)
            into.add(status, n, coins if coins_n else None, money if money_n else None,
                     third if third_n else None, unpriced, None, None, final=status in FINAL)
        for key in sorted(keys):  # each key's dearest task, as Spending.add takes a group's
            into = out[None if whole else key or None]
            top, top_money = self.conn.execute(
                "SELECT (SELECT MAX(coins) FROM rows WHERE key_fp IS ?1 AND coins IS NOT NULL), "
                "(SELECT MAX(IFNULL(money, 0) + IFNULL(third_party_money, 0)) FROM rows "
                "WHERE key_fp IS ?1 AND (money IS NOT NULL OR third_party_money IS NOT NULL))",
                (key or None,)).fetchone()
            if top is not None:
                into.max_coins = max(into.max_coins or 0.0, top)
            if top_money:
                into.max_money = max(into.max_money or 0.0, top_money)

    def _spending_scan(self, out: dict[str | None, Spending], source: str, whole: bool) -> None:
        """Add the spending of every row of ``source`` (rows or attempts_log) to ``out``."""
        group = "status" if whole else "key_fp, status"
        for key_fp, status, n, coins, money, third, unpriced, top, top_money in self.conn.execute(
            f"SELECT {'NULL' if whole else 'key_fp'}, status, COUNT(*), SUM(coins), "  # noqa: S608
            f"SUM(money), SUM(third_party_money), SUM(task_id IS NOT NULL AND coins IS NULL "
            f"AND money IS NULL AND third_party_money IS NULL), MAX(coins), "
            f"MAX(COALESCE(money, 0) + COALESCE(third_party_money, 0)) FROM {source} "
            f"GROUP BY {group}"
        ):
            into = out.setdefault(key_fp, Spending())
            into.add(status, n, coins, money, third, unpriced or 0, top, top_money,
                     final=status in FINAL)
            if source == "attempts_log" and status == SUBMIT_UNKNOWN:
                into.unknown_attempts += n
