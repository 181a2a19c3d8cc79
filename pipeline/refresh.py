"""Keep a run's ``results.jsonl`` and ``results.csv`` complete and current while it runs.

The two files (their format is :mod:`pipeline.export`'s) hold one record per row, in input order,
and are only ever replaced whole: each new version is written under a temporary name beside the old
one, fsync'd, and renamed over it (``os.replace``). A kill at any instant therefore leaves the
previous complete file or the next complete file, never part of one; a temporary file left by a
kill is removed by the next run (:func:`remove_stale_temporaries`).

A new version is cheap although the files are large, because it is spliced, not rendered:

- ``DIR/.results-index`` (:class:`ResultsIndex`) describes the files as they were last written:
  each file's identity (size and mtime in ns, which a ``cp -a`` of the run keeps) and the byte
  length of every row's record in it, the rows' ``idx`` in file order, the ``updated_at`` of each
  row as it was rendered, and ``read_at``, the ``time.time()`` at which the rows were read. Binary
  layout: one line of JSON (format, rows, read_at, settled_at, byte order, per file its identity
  and header length, the ``files`` table's signature), then four arrays of ``rows`` 8-byte values
  in the machine's byte order: idx, updated_at (double), record lengths in ``results.jsonl``,
  record lengths in ``results.csv``. It is written after both files, so a kill between them
  leaves an index that describes neither, and the next refresh rewrites them whole.
- A refresh (:func:`splice`) reads the rows whose ``updated_at`` is at or after ``read_at`` less
  :data:`CHANGE_MARGIN_S` (a write takes its time before it commits, and may wait for SQLite's
  lock that long), keeps those whose ``updated_at`` differs from the one rendered, adds the rows
  whose output files a download in this process changed (the ``files`` table has no time of its
  own), and renders only those. The bytes between their records are copied from the old file by
  the kernel (``copy_file_range``), never read into Python. So a refresh costs the changed rows in
  Python and the file's size in the kernel. The run's last refresh (:meth:`ResultsFlusher.finish`,
  with the run's own connection once its writes are over: none can be in flight) leaves a
  *settled* index, ``settled_at`` = ``read_at`` less :data:`SETTLED_MARGIN_S` (a step back of the
  clock), and the next refresh reads from there: a resume does not read again every row of the
  last session's last minute (or every row of a run made just before).
- Every row is rendered again (:func:`write_results`) when the index does not describe the files
  on disk: a new run, a file written by ``rhbatch download`` or another program, edited or
  deleted, a ``files`` table changed behind this process's back, the clock moved back past
  ``read_at``. During a run that full rewrite runs in a child process (``python -m
  pipeline.refresh RUN_DIR PARENT_PID``), so the run's event loop never waits for the GIL while
  every row is rendered; the child reads the run's SQLite database (WAL: readers never block the
  writer) and writes the files and their index as above. Splices run in a thread of the run
  (their Python work is the changed rows only), as often as :class:`ResultsFlusher` allows.

The child is made to die with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed run cannot leave
one behind that renames an old snapshot over the results of a later resume; it runs in its own
session, so a Ctrl-C at the terminal stops only rhbatch. It never sees the API key.

When the run stops (its end, Ctrl-C, SIGTERM), :meth:`ResultsFlusher.stop` abandons a splice in
progress (its temporary files are removed, nothing is renamed) and waits for a child's full
rewrite; then :meth:`ResultsFlusher.finish` makes both files current with one last splice (a full
rewrite only when there is no index to splice from).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import dataclasses
import errno
import glob
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline._files import atomic_write, temporary_prefix
from pipeline.config import ENV_API_KEY
from pipeline.errors import RhbatchError, SpliceAbandoned, StorageError
from pipeline.export import RESULT_FILES, AtomicFile, CsvLines, input_columns, jsonl_line, record_of
from pipeline.store import RunPaths, RunStore, storage_error

log = logging.getLogger("rhbatch")

PR_SET_PDEATHSIG = 1
INDEX_FILE = RunPaths.RESULTS_INDEX
INDEX_FORMAT = 1
TMP_PREFIXES = tuple(temporary_prefix(name) for name in (*RESULT_FILES, INDEX_FILE))
# Longer than SQLite's busy timeout (30 s, store.py): a row written at time T commits by T + 30 s.
CHANGE_MARGIN_S = 60.0
# When no write could be in flight as the rows were read (the run's last refresh, made with its own
# connection once the run is over) only a step back of the clock can hide a change: this much.
SETTLED_MARGIN_S = 10.0
COPY_CHUNK_BYTES = 64 * 2**20  # an abandoned splice stops between two chunks
# The disk a run's results may use while it goes, on average: each refresh rewrites both files
# whole, so large ones are refreshed less often (the last refresh, when the run stops, is at once).
REFRESH_BYTES_PER_S = 2 * 2**20
_NO_RANGE_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)

Identity = tuple[int, int]  # (size, mtime in ns): a copy made with ``cp -a`` keeps both


def _identity(info: os.stat_result) -> Identity:
    return (info.st_size, info.st_mtime_ns)


def files_signature(store: RunStore) -> list[list[Any]]:
    """What the ``files`` table holds, in brief: per file state, how many, tries and bytes."""
    return store.files_summary()


@dataclass
class ResultsIndex:
    """Where each row's record is in the results files as last written (module docstring)."""

    read_at: float
    idxs: array[int]  # the rows' idx, in file order
    versions: array[float]  # each row's updated_at as rendered
    lengths: dict[str, array[int]]  # per file: each record's length in bytes
    headers: dict[str, int]  # per file: bytes before the first record
    identities: dict[str, Identity]
    signature: list[list[Any]]
    rendered: int = 0  # rows rendered by the write that made this index
    # every row updated before this is in the files as rendered (None: read_at less the margin)
    settled_at: float | None = None

    def position(self, idx: int) -> int | None:
        """The row ``idx``'s place in the files, or None if the files hold no such row."""
        if self.idxs and self.idxs[0] == 0 and self.idxs[-1] == len(self.idxs) - 1:
            return idx if 0 <= idx < len(self.idxs) else None  # the usual dense 0..N-1
        at = bisect.bisect_left(self.idxs, idx)
        return at if at < len(self.idxs) and self.idxs[at] == idx else None

    def describes(self, run_dir: Path) -> bool:
        """Whether the results files in ``run_dir`` are the ones this index was written with."""
        for name in RESULT_FILES:
            try:
                if _identity(os.lstat(run_dir / name)) != self.identities.get(name):
                    return False
            except OSError:
                return False
        return True

    def save(self, run_dir: Path) -> None:
        head = {"format": INDEX_FORMAT, "rows": len(self.idxs), "read_at": self.read_at,
                "byteorder": sys.byteorder, "signature": self.signature,
                "settled_at": self.settled_at,
                "files": {name: {"identity": list(self.identities[name]),
                                 "header": self.headers[name]} for name in RESULT_FILES}}
        parts = [json.dumps(head).encode() + b"\n", self.idxs.tobytes(), self.versions.tobytes()]
        parts += [self.lengths[name].tobytes() for name in RESULT_FILES]
        try:
            atomic_write(run_dir / INDEX_FILE, b"".join(parts))
        except OSError as exc:
            raise storage_error(exc, run_dir / INDEX_FILE, run_dir) from None

    @classmethod
    def load(cls, store: RunStore) -> ResultsIndex | None:
        """The index of ``store``'s results files, or None when there is none that describes them
        (missing, unreadable, of another format, or written before the files changed)."""
        try:
            data = _read_regular(store.run_dir / INDEX_FILE)
            line, _, body = data.partition(b"\n")
            head = json.loads(line)
            rows = int(head["rows"])
            if head["format"] != INDEX_FORMAT or head["byteorder"] != sys.byteorder:
                return None
            def column(number: int, code: str) -> Any:
                values = array(code)
                values.frombytes(body[number * 8 * rows:(number + 1) * 8 * rows])
                if len(values) != rows:
                    raise ValueError("the index is shorter than its rows")
                return values

            index = cls(
                read_at=float(head["read_at"]), idxs=column(0, "q"), versions=column(1, "d"),
                lengths={name: column(2 + i, "q") for i, name in enumerate(RESULT_FILES)},
                headers={name: int(head["files"][name]["header"]) for name in RESULT_FILES},
                identities={name: tuple(head["files"][name]["identity"])  # type: ignore[misc]
                            for name in RESULT_FILES},
                signature=head["signature"],
                settled_at=None if head.get("settled_at") is None else float(head["settled_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name in RESULT_FILES:
            if index.headers[name] + sum(index.lengths[name]) != index.identities[name][0]:
                return None
        if (not index.describes(store.run_dir) or rows != store.total()
                or index.signature != files_signature(store)):
            return None
        return index


def _read_regular(path: Path) -> bytes:
    """The bytes of the regular file at ``path``; a link or anything else there is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def _results_file(run_dir: Path, name: str) -> AtomicFile:
    return AtomicFile(run_dir / name, "wb", run_dir=run_dir)


def write_results(store: RunStore, *, settled: bool = False) -> ResultsIndex:
    """Rewrite both results files from every row, then the index that describes them;
    ``settled``: no write can be in flight as the rows are read (:meth:`ResultsFlusher.finish`)."""
    run_dir = store.run_dir
    read_at = time.time()
    signature = files_signature(store)
    lines = CsvLines(input_columns(store))
    idxs: array[int] = array("q")
    versions: array[float] = array("d")
    lengths: dict[str, array[int]] = {name: array("q") for name in RESULT_FILES}
    jsonl_name, csv_name = RESULT_FILES
    identities: dict[str, Identity] = {}
    header = lines.header().encode()
    with _results_file(run_dir, jsonl_name) as jsonl, _results_file(run_dir, csv_name) as csv_file:
        csv_file.write(header)
        add_json, add_csv = lengths[jsonl_name].append, lengths[csv_name].append
        for row, files in store.iter_rows_with_files():
            record = record_of(row, files)
            line = jsonl_line(record).encode()
            jsonl.write(line)
            add_json(len(line))
            line = lines.line(record).encode()
            csv_file.write(line)
            add_csv(len(line))
            idxs.append(row["idx"])
            versions.append(row["updated_at"] or 0.0)
        for name, handle in ((jsonl_name, jsonl), (csv_name, csv_file)):
            handle.flush()
            identities[name] = _identity(os.fstat(handle.fileno()))
    index = ResultsIndex(read_at, idxs, versions, lengths, {jsonl_name: 0, csv_name: len(header)},
                         identities, signature, rendered=len(idxs),
                         settled_at=read_at - SETTLED_MARGIN_S if settled else None)
    index.save(run_dir)
    return index


def changed_rows(store: RunStore, index: ResultsIndex, also: Iterable[int] = (), *,
                 margin_s: float = CHANGE_MARGIN_S) -> list[tuple[int, Any]]:
    """(position, row) of every row whose record in the files may differ from its row now: its
    ``updated_at`` differs from the one rendered, or it is in ``also``; by position."""
    wanted = set(also)
    since = index.read_at - margin_s if index.settled_at is None else index.settled_at
    for idx, updated_at in store.updated_since(since):
        at = index.position(idx)
        if at is None or index.versions[at] != updated_at:
            wanted.add(idx)
    out = []
    for row in store.rows_by_idx(sorted(wanted)):
        at = index.position(row["idx"])
        if at is None:
            raise LookupError(f"row {row['idx']} is not in the results files")
        out.append((at, row))
    out.sort(key=lambda item: item[0])
    return out


def _copy(src: int, dst: int, start: int, length: int, abandon: threading.Event | None) -> None:
    """Copy ``length`` bytes of ``src`` from ``start`` to ``dst``'s position, in the kernel."""
    ranged = hasattr(os, "copy_file_range")
    while length > 0:
        if abandon is not None and abandon.is_set():
            raise SpliceAbandoned()
        count = min(length, COPY_CHUNK_BYTES)
        done = 0
        if ranged:
            try:
                done = os.copy_file_range(src, dst, count, start)
            except OSError as exc:
                if exc.errno not in _NO_RANGE_COPY:
                    raise
                ranged = False
        if not ranged:
            data = os.pread(src, min(count, 1 << 20), start)
            _write_all(dst, data)
            done = len(data)
        if done == 0:
            raise OSError(errno.EIO, "the results file being copied ended early")
        start += done
        length -= done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _splice_file(run_dir: Path, name: str, index: ResultsIndex,
                 changes: Sequence[tuple[int, bytes]], abandon: threading.Event | None
                 ) -> tuple[array[int], Identity] | None:
    """Write ``name`` anew: the old file's bytes with each (position, record) of ``changes`` in
    place of the old record; the new lengths and identity, or None if the file changed meanwhile."""
    old = index.lengths[name]
    lengths = array("q", old)
    try:
        src = os.open(run_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _identity(os.fstat(src)) != index.identities[name]:
            return None
        size = index.identities[name][0]
        with _results_file(run_dir, name) as out:
            dst = out.fileno()  # written by fd only: the buffered handle stays empty
            copied = 0  # bytes of the old file taken so far
            boundary = index.headers[name]  # where the record at ``position`` starts in the old file
            position = 0
            for at, data in changes:
                boundary += sum(old[position:at])
                _copy(src, dst, copied, boundary - copied, abandon)
                _write_all(dst, data)
                boundary += old[at]
                copied, position = boundary, at + 1
                lengths[at] = len(data)
            _copy(src, dst, copied, size - copied, abandon)
            identity = _identity(os.fstat(dst))
        return lengths, identity
    finally:
        os.close(src)


def splice(store: RunStore, index: ResultsIndex, also: Iterable[int] = (), *,
           abandon: threading.Event | None = None, margin_s: float = CHANGE_MARGIN_S,
           signature: list[list[Any]] | None = None, settled: bool = False
           ) -> ResultsIndex | None:
    """Bring the results files described by ``index`` up to date by rendering only the rows that
    changed (module docstring); the new index, ``index`` itself when nothing changed, or None
    when the files can only be rewritten whole. ``signature``: the ``files`` table's, read before
    ``also`` was; ``settled``: as for :func:`write_results`. Raises :class:`SpliceAbandoned` when
    ``abandon`` is set before it is done: the files are then unchanged."""
    read_at = time.time()
    if read_at < index.read_at or not index.describes(store.run_dir):
        return None  # the clock went back (updated_at cannot be trusted), or the files changed
    if signature is None:
        signature = files_signature(store)
    try:
        rows = changed_rows(store, index, also, margin_s=margin_s)
    except LookupError:
        return None
    settled_at = read_at - SETTLED_MARGIN_S if settled else None
    if not rows:
        if settled and index.settled_at != settled_at:  # so the next splice reads less
            index = dataclasses.replace(index, read_at=read_at, settled_at=settled_at)
            index.save(store.run_dir)
        return dataclasses.replace(index, rendered=0)
    files: dict[int, list[Any]] = {}
    for _, row in rows:
        if row["status"] == "SUCCESS":
            files[row["idx"]] = store.files_for(row["idx"])
    lines = CsvLines(input_columns(store))
    records = [(at, record_of(row, files.get(row["idx"], ()))) for at, row in rows]
    jsonl_name, csv_name = RESULT_FILES
    rendered = {jsonl_name: [(at, jsonl_line(r).encode()) for at, r in records],
                csv_name: [(at, lines.line(r).encode()) for at, r in records]}
    lengths: dict[str, array[int]] = {}
    identities: dict[str, Identity] = {}
    # the two files at once: their copies and fsyncs are the kernel's, and wait on the disk
    with ThreadPoolExecutor(max_workers=len(RESULT_FILES), thread_name_prefix="splice") as pool:
        jobs = {name: pool.submit(_splice_file, store.run_dir, name, index, rendered[name], abandon)
                for name in RESULT_FILES}
        done = {name: job.result() for name, job in jobs.items()}
    for name, spliced in done.items():
        if spliced is None:
            return None
        lengths[name], identities[name] = spliced
    versions = array("d", index.versions)
    for at, row in rows:
        versions[at] = row["updated_at"] or 0.0
    new = ResultsIndex(read_at, index.idxs, versions, lengths, index.headers, identities,
                       signature, rendered=len(rows), settled_at=settled_at)
    new.save(store.run_dir)
    return new


def refresh_results(store: RunStore, also: Iterable[int] = ()) -> ResultsIndex:
    """Bring both results files up to date: a splice of the rows that changed (and of ``also``,
    rows whose output files changed) when the index still describes the files, else a whole
    rewrite."""
    signature = files_signature(store)
    index = ResultsIndex.load(store)
    if index is not None:
        new = splice(store, index, also, signature=signature)
        if new is not None:
            return new
    return write_results(store)


class ResultsFlusher:
    """Keeps the results files of a running run current (module docstring): a splice every
    ``interval_s`` at most, or five times as long as the last one took, or as long as rewriting
    the files takes at :data:`REFRESH_BYTES_PER_S`; a full rewrite in a child when there is no
    index to splice from."""

    def __init__(self, store: RunStore, interval_s: float):
        self.run_dir = store.run_dir
        self.interval_s = interval_s
        self.index = ResultsIndex.load(store)
        self._also: set[int] = set()  # rows whose output files changed since the last refresh
        self._also_lock = threading.Lock()
        self._abandon = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy: asyncio.Future[bool] | None = None

    def files_changed(self, row_idx: int) -> None:
        """A download in this process changed a file record of the row ``row_idx``."""
        with self._also_lock:
            self._also.add(row_idx)

    def _take_also(self) -> set[int]:
        with self._also_lock:
            also, self._also = self._also, set()
        return also

    def _give_back(self, also: set[int]) -> None:
        with self._also_lock:
            self._also |= also

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        delay = self.interval_s
        while True:
            await asyncio.sleep(delay)
            started = time.monotonic()
            # Shielded: a refresh always ends (renamed or abandoned) before stop() returns, so an
            # older snapshot can never be renamed over the files written after the run.
            self._busy = asyncio.ensure_future(self.refresh())
            whole = False
            try:
                whole = await asyncio.shield(self._busy)
            except asyncio.CancelledError:
                raise
            except SpliceAbandoned:
                return
            except Exception as exc:  # a failed refresh is retried; the database stays the truth
                log.warning("could not refresh results: %s", exc)
            # a splice (or a failure) may take at most a fifth of the time and its share of the
            # disk; a whole rewrite is followed by splices, which cost what changed
            took = time.monotonic() - started
            delay = self.interval_s if whole else max(self.interval_s, 5 * took,
                                                      self._size() / REFRESH_BYTES_PER_S)

    def _size(self) -> int:
        return sum(self.index.identities[name][0] for name in RESULT_FILES) if self.index else 0

    async def refresh(self) -> bool:
        """One refresh: a splice in a thread, else a whole rewrite in a child process (then
        True)."""
        if self.index is not None:
            self.index = await asyncio.to_thread(self._splice, self.index)
            if self.index is not None:
                return False
        try:
            await refresh_in_child(self.run_dir)
        except OSError as exc:  # no process to be had (limits, memory): share this one's GIL
            log.info("results refresh in this process: %s", exc)
            await asyncio.to_thread(self._rewrite)
        else:
            self.index = await asyncio.to_thread(self._load)
        return True

    def _splice(self, index: ResultsIndex, store: RunStore | None = None, *,
                settled: bool = False) -> ResultsIndex | None:
        reader = store or RunStore.open(self.run_dir, readonly=True)
        try:
            # the signature first: a file changed after it is read is in ``also`` or the next one
            signature = files_signature(reader)
            also = self._take_also()
            try:
                return splice(reader, index, also, abandon=self._abandon, signature=signature,
                              settled=settled)
            except BaseException:
                self._give_back(also)
                raise
        finally:
            if store is None:
                reader.close()

    def _rewrite(self) -> None:
        reader = RunStore.open(self.run_dir, readonly=True)
        try:
            self.index = write_results(reader)
        finally:
            reader.close()

    def _load(self) -> ResultsIndex | None:
        reader = RunStore.open(self.run_dir, readonly=True)
        try:
            return ResultsIndex.load(reader)
        finally:
            reader.close()

    async def stop(self) -> None:
        """End the refresh loop: a splice in progress is abandoned, a child's rewrite waited for."""
        self._abandon.set()
        try:
            if self._task:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            if self._busy is not None:
                await asyncio.gather(self._busy, return_exceptions=True)
        finally:
            self._abandon.clear()

    def finish(self, store: RunStore) -> None:
        """Make the results files current now (after :meth:`stop`), with ``store``'s connection:
        the run's, whose writes are over, so the index it leaves is settled (the next run's first
        splice reads only the rows changed since)."""
        if self.index is not None:
            self.index = self._splice(self.index, store, settled=True)
        how = "spliced"
        if self.index is None:
            self.index, how = write_results(store, settled=True), "rewritten whole"
        log.info("results current: %d row(s) rendered, %s", self.index.rendered, how)


async def refresh_in_child(run_dir: Path) -> None:
    """Rewrite the results of ``run_dir`` in a child process; raises StorageError if it fails."""
    env = {k: v for k, v in os.environ.items() if k != ENV_API_KEY}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.refresh", str(run_dir), str(os.getpid()),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        said = err.decode("utf-8", "replace").strip().splitlines()
        raise StorageError(said[-1] if said else f"results refresh exited with {proc.returncode}")


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete half-written results (and index) left by a refresh that was killed; the caller holds
    the run lock."""
    removed = 0
    for prefix in TMP_PREFIXES:
        for path in run_dir.glob(glob.escape(prefix) + "*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    run_dir, parent = argv if argv is not None else sys.argv[1:]
    _die_with_parent(int(parent))
    try:
        store = RunStore.open(run_dir, readonly=True)
        try:
            write_results(store)
        finally:
            store.close()
    except RhbatchError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
