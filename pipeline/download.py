"""Download every output file of a run into ``DIR/files/`` before RunningHub's URLs expire.

RunningHub keeps an output URL for about 24 hours. Downloading is a stage of its own, kept apart
from generation: a file that cannot be fetched is reported, and its row's task status is never
touched, so a failed download never makes rhbatch pay for a task again.

Files are named from the row, never from the URL::

    DIR/files/<row_id>_<nodeId>_<n>.<ext>

``row_id`` and ``nodeId`` keep only ``[A-Za-z0-9._-]`` (anything else, ``:`` and ``/`` included,
becomes ``_``; a leading ``.`` becomes ``_``), ``n`` is the output's index in the row's
``outputs`` list and ``ext`` is the output's ``fileType`` (else the response's Content-Type, else
``bin``) reduced to ``[a-z0-9]{1,8}``. The resolved path must sit directly in ``DIR/files/``;
two rows whose names collide after cleaning get ``-<row index>`` appended.

``DIR/files`` must be a real directory inside the run (a symbolic link there is refused, exit 2);
it is opened once per pass and every name below is created, renamed and read relative to that
descriptor. Each download streams to ``<name>.part`` (opened with ``O_EXCL | O_NOFOLLOW``), is
fsynced, then renamed over ``<name>`` (a link planted at the name is replaced, never followed); a
disk that is full or read-only stops the pass with its fix. Only then does the ``files`` table
say ``DOWNLOADED`` with the file's sha256, size and path (relative to ``DIR``). A kill leaves at
most a ``.part``, which the next run replaces.

``files.status`` values::

    PENDING     planned, not fetched yet
    DOWNLOADED  on disk, sha256 recorded (checked again on every run: a changed file is re-fetched)
    FAILED      transient trouble outlasted the retry policy; the next run tries again
    EXPIRED     HTTP 403/404/410: the URL is gone; final, never retried, never regenerated
    REFUSED     not http(s), over the size cap, or an unsafe name; retried on the next run
                (a larger cap may let it through)

Downloads run oldest URL first (``url_seen_at``, the task's finish time), ``jobs`` at a time. No
run lock is taken: a download may run beside ``rhbatch run``; SQLite WAL, short transactions and
the busy timeout let both write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import mimetypes
import os
import re
import stat
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipeline._files import entry_in, fsync_dir, sha256_file
from pipeline.client import RetryPolicy
from pipeline.errors import (
    ExpiredUrlError,
    FileDownloadError,
    RefusedDownloadError,
    RhbatchError,
    StateError,
    TransientDownloadError,
    UsageError,
)
from pipeline.refresh import refresh_results
from pipeline.safetext import escape_controls
from pipeline.store import FILE_DOWNLOADED, RunPaths, RunStore, refuse_entry, storage_error

PART_SUFFIX = ".part"


DOWNLOAD_JOBS = 4
MAX_FILE_BYTES = 512 * 2**20
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0
WRITE_TIMEOUT_S = 30.0
POOL_TIMEOUT_S = 60.0
FILE_DEADLINE_S = 30 * 60.0  # one attempt at one file, however slowly the bytes trickle in
CHUNK_BYTES = 1 << 16
MAX_REDIRECTS = 5
log = logging.getLogger("rhbatch")
MAX_STEM_CHARS = 120
DOWNLOAD_POLICY = RetryPolicy(max_attempts=5, max_total_s=300.0, initial_wait_s=1.0, max_wait_s=30.0)

EXPIRED_HTTP = frozenset({403, 404, 410})
ALLOWED_SCHEMES = frozenset({"http", "https"})

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_EXT_CHARS = re.compile(r"[^a-z0-9]")


@dataclass
class DownloadSummary:
    """What one ``download`` pass did; ``errors`` has one line per file that needs attention."""

    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileEvent:
    """Progress for one file (for the CLI's progress bar): ``status`` is the outcome."""

    row_idx: int
    n: int
    status: str  # DOWNLOADED, SKIPPED, FAILED, EXPIRED, REFUSED
    size: int
    total: int


# -- names --------------------------------------------------------------------------------


def safe_part(text: str | None, fallback: str) -> str:
    """A piece of a file name: only ``[A-Za-z0-9._-]``, no leading dot, never empty."""
    cleaned = _UNSAFE.sub("_", text or "")
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    return cleaned or fallback


def safe_ext(file_type: str | None, content_type: str | None = None) -> str:
    """The extension from ``fileType``, else the Content-Type, else ``bin``: ``[a-z0-9]{1,8}``."""
    candidates: list[str | None] = [file_type]
    if content_type:
        mime = content_type.split(";")[0].strip().lower()
        guessed = mimetypes.guess_extension(mime) if mime else None
        candidates.append(guessed)
        candidates.append(mime.split("/")[-1] if "/" in mime else None)
    for candidate in candidates:
        if not candidate:
            continue
        ext = _EXT_CHARS.sub("", candidate.strip().lower().rsplit(".", 1)[-1])
        if 1 <= len(ext) <= 8 and ext not in {"octetstream", "plain"}:
            return {"jpeg": "jpg"}.get(ext, ext)
    return "bin"


def file_name(row_id: str, node_id: str | None, n: int, ext: str) -> str:
    stem = safe_part(row_id, "row")
    if len(stem) > MAX_STEM_CHARS:
        digest = hashlib.sha256(row_id.encode()).hexdigest()[:10]
        stem = f"{stem[:MAX_STEM_CHARS]}-{digest}"
    node = safe_part(node_id, "out")[:40]
    return f"{stem}_{node}_{n}.{ext}"


# -- planning -----------------------------------------------------------------------------


def plan_downloads(store: RunStore) -> int:
    """Create ``files`` rows for every SUCCESS row's outputs not planned yet; returns how many.

    A row whose outputs changed since it was planned (it was retried and succeeded again) has its
    file rows replaced: the URLs differ, so the old ones are set back to PENDING.
    """
    planned = 0
    last = -1
    while True:
        rows = store.success_outputs(last)
        if not rows:
            return planned
        last = rows[-1][0]
        wanted: list[tuple[int, int, str, str | None, float | None]] = []
        for idx, outputs, finished_at in rows:
            for n, output in enumerate(outputs if isinstance(outputs, list) else []):
                if not isinstance(output, dict) or not output.get("fileUrl"):
                    continue
                node = output.get("nodeId")
                wanted.append((idx, n, str(output["fileUrl"]),
                               None if node is None else str(node), finished_at))
        if not wanted:
            continue
        planned += store.plan_files(wanted)


# -- downloading --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    row_idx: int
    n: int
    url: str
    node_id: str | None
    path: str | None
    sha256: str | None
    status: str
    tries: int
    row_id: str
    number: int
    file_type: str | None

    @property
    def label(self) -> str:
        node = f", node {self.node_id}" if self.node_id is not None else ""
        return f"row {self.number} ({self.row_id}) output {self.n}{node}"


def _sha256_of(name: str, dir_fd: int) -> str | None:
    """The sha256 of the regular file ``name`` in the directory ``dir_fd`` (None: no such file, or
    a link, which is never followed)."""
    try:
        return sha256_file(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def open_files_dir(run_dir: Path) -> int:
    """``DIR/files`` as an open directory descriptor, made if missing.

    It must be a real directory directly inside the run: a symbolic link there (or anything but a
    directory) is refused, so no download can land outside the run. Every file is then created,
    renamed and checked relative to this descriptor, never through the path again.
    """
    path = run_dir / RunPaths.FILES
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise storage_error(exc, path, run_dir, doing="create") from None
    try:
        info = os.lstat(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise storage_error(exc, path, run_dir, doing="open") from None
        fd = -1
    if fd < 0 or stat.S_ISLNK(info.st_mode):
        if stat.S_ISLNK(info.st_mode):
            target = escape_controls(os.readlink(path))
            raise refuse_entry(path, f"a symbolic link (to {target})")
        raise StateError(f"{escape_controls(path)} is not a directory, where rhbatch saves "
                         "downloads: move it away and run the same command again")
    opened = os.fstat(fd)
    real = Path(os.path.realpath(path))
    if ((opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino)
            or real.parent != Path(os.path.realpath(run_dir))):
        os.close(fd)
        raise StateError(f"{escape_controls(path)} resolves to {escape_controls(real)}, outside "
                         "the run: make it a plain directory inside the run and run the same "
                         "command again")
    return fd


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _expired_message(item: _Item, code: int) -> str:
    return (
        f"{item.label}: HTTP {code}: the output URL has expired (RunningHub keeps output URLs for "
        "about 24 h after the task finishes); rhbatch never regenerates a task to recover a file. "
        "To generate and pay for it again, use `rhbatch retry DIR --status SUCCESS` with a --where "
        "that selects this row"
    )


class _Downloader:
    def __init__(self, store: RunStore, client: httpx.AsyncClient, *, max_bytes: int,
                 policy: RetryPolicy, deadline_s: float, total: int,
                 on_file: Callable[[FileEvent], None] | None):
        self.store = store
        self.client = client
        self.max_bytes = max_bytes
        self.policy = policy
        self.deadline_s = deadline_s
        self.total = total
        self.on_file = on_file
        self.files_dir = store.run_dir / RunPaths.FILES
        self.dir_fd = -1  # DIR/files, opened by download_run_async (open_files_dir)
        self.summary = DownloadSummary()
        self._claimed: set[str] = set()

    # -- database ---------------------------------------------------------------------------

    def load(self, row_idx: int, n: int) -> _Item | None:
        row = self.store.file_with_row(row_idx, n)
        if row is None:
            return None
        file_type = None
        try:
            outputs = json.loads(row["outputs"] or "[]")
            if n < len(outputs) and isinstance(outputs[n], dict):
                file_type = outputs[n].get("fileType")
        except ValueError:
            pass
        return _Item(row["row_idx"], row["n"], row["url"], row["node_id"], row["path"],
                     row["sha256"], row["status"], row["tries"], row["row_id"], row["number"],
                     None if file_type is None else str(file_type))

    def record(self, item: _Item, **values: Any) -> None:
        self.store.update_file(item.row_idx, item.n, item.url, **values)

    def name_taken(self, rel: str, item: _Item) -> bool:
        if rel in self._claimed:
            return True
        return self.store.file_path_taken(rel, item.row_idx, item.n)

    # -- one file ---------------------------------------------------------------------------

    def _emit(self, item: _Item, status: str, size: int = 0) -> None:
        if self.on_file is not None:
            self.on_file(FileEvent(item.row_idx, item.n, status, size, self.total))

    async def handle(self, item: _Item) -> None:
        if item.status == FILE_DOWNLOADED and item.path and item.sha256:
            target = self.store.run_dir / item.path
            found = None
            if entry_in(target, self.files_dir):
                found = await asyncio.to_thread(_sha256_of, target.name, self.dir_fd)
            if found == item.sha256:
                self.summary.skipped += 1
                self._emit(item, "SKIPPED")
                return
            problem = "is missing" if found is None else "no longer matches its recorded sha256"
            self.summary.errors.append(
                f"{item.label}: {item.path} {problem} (tampered, truncated or deleted); fetching it again"
            )
        await self.fetch(item)

    async def fetch(self, item: _Item) -> None:
        scheme = urlsplit(item.url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            shown = f"{scheme}:" if scheme else "a URL without a scheme"
            self.fail(item, RefusedDownloadError(
                f"{item.label}: refused to fetch {shown}: only http and https output URLs are "
                "downloaded"), tries=0)
            return
        attempts = 0

        async def once() -> tuple[str, str, int]:
            nonlocal attempts
            attempts += 1
            try:
                async with asyncio.timeout(self.deadline_s):
                    return await self._fetch_once(item)
            except TimeoutError:
                raise TransientDownloadError(
                    f"{item.label}: not finished within {self.deadline_s:g} s"
                ) from None

        rel: str
        digest: str
        size: int
        try:
            rel, digest, size = await self.policy.retrying(
                lambda exc: isinstance(exc, TransientDownloadError), f"download of {item.label}"
            )(once)
        except FileDownloadError as exc:
            if isinstance(exc, TransientDownloadError):
                exc = FileDownloadError(
                    f"{exc} (gave up after {attempts} attempt{'s' if attempts != 1 else ''}): run "
                    "`rhbatch download` again while the URL is still valid (about 24 h after the "
                    "task finished)"
                )
            self.fail(item, exc, tries=attempts)
            return
        self.record(item, status=FILE_DOWNLOADED, path=rel, sha256=digest, size=size, error=None,
                    tries=item.tries + attempts)
        self.summary.downloaded += 1
        self.summary.bytes += size
        self._emit(item, FILE_DOWNLOADED, size)

    def fail(self, item: _Item, exc: FileDownloadError, *, tries: int) -> None:
        self.record(item, status=exc.file_state, error=str(exc), tries=item.tries + tries)
        self.summary.failed += 1
        self.summary.errors.append(str(exc))
        self._emit(item, exc.file_state)

    async def _fetch_once(self, item: _Item) -> tuple[str, str, int]:
        try:
            async with self.client.stream("GET", item.url) as response:
                return await self._save(item, response)
        except httpx.UnsupportedProtocol as exc:
            raise RefusedDownloadError(
                f"{item.label}: refused to follow the download to an unsupported URL ({exc}): only "
                "http and https are fetched"
            ) from None
        except httpx.TooManyRedirects:
            raise FileDownloadError(
                f"{item.label}: more than {MAX_REDIRECTS} redirects; the URL does not lead to a file"
            ) from None
        except httpx.InvalidURL as exc:
            raise RefusedDownloadError(f"{item.label}: invalid URL: {exc}") from None
        except httpx.TransportError as exc:
            kind = type(exc).__name__
            raise TransientDownloadError(f"{item.label}: {kind}: {exc or 'connection failed'}") from None

    async def _save(self, item: _Item, response: httpx.Response) -> tuple[str, str, int]:
        code = response.status_code
        if code in EXPIRED_HTTP:
            raise ExpiredUrlError(_expired_message(item, code))
        if code in (408, 425, 429) or code >= 500:
            raise TransientDownloadError(f"{item.label}: HTTP {code}",
                                         retry_after_s=_retry_after(response))
        if code != 200:
            raise FileDownloadError(f"{item.label}: HTTP {code} instead of the file")
        length_text = response.headers.get("content-length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        if length is not None and length > self.max_bytes:
            raise RefusedDownloadError(self._too_big(item, length))
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        ext = safe_ext(item.file_type, response.headers.get("content-type"))
        name = file_name(item.row_id, item.node_id, item.n, ext)
        rel = f"{RunPaths.FILES}/{name}"
        if self.name_taken(rel, item):
            name = f"{name.rsplit('.', 1)[0]}-{item.row_idx}.{ext}"
            rel = f"{RunPaths.FILES}/{name}"
        target = self.files_dir / name
        part = self.files_dir / (name + PART_SUFFIX)
        if not (entry_in(target, self.files_dir) and entry_in(part, self.files_dir)):
            raise RefusedDownloadError(f"{item.label}: the file name {name!r} leaves {self.files_dir}")
        self._claimed.add(rel)
        try:
            digest, size = await self._stream_to(part.name, response, item)
            if length is not None and not encoded and size != length:
                raise TransientDownloadError(
                    f"{item.label}: got {size} bytes of the {length} announced"
                )
            # renamed inside DIR/files (the descriptor), over whatever is at the name, link or not
            os.replace(part.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            await asyncio.to_thread(fsync_dir, self.dir_fd)
        except OSError as exc:  # disk full, read-only: the pass stops with the fix, said once
            with contextlib.suppress(OSError):
                os.unlink(part.name, dir_fd=self.dir_fd)
            raise storage_error(exc, part, self.store.run_dir) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part.name, dir_fd=self.dir_fd)
            raise
        finally:
            self._claimed.discard(rel)
        return rel, digest, size

    async def _stream_to(self, part: str, response: httpx.Response, item: _Item) -> tuple[str, int]:
        with contextlib.suppress(FileNotFoundError):
            # a leftover of a killed run (or a planted symlink): unlinked, never written through
            os.unlink(part, dir_fd=self.dir_fd)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=self.dir_fd)
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as fh:
            async for chunk in response.aiter_bytes(CHUNK_BYTES):
                if size == 0 and chunk:
                    wrong = body_mismatch(item.file_type, response.headers.get("content-type"), chunk)
                    if wrong:
                        raise TransientDownloadError(f"{item.label}: {wrong}")
                size += len(chunk)
                if size > self.max_bytes:
                    raise RefusedDownloadError(self._too_big(item, None))
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        return digest.hexdigest(), size

    def _too_big(self, item: _Item, length: int | None) -> str:
        cap = f"{self.max_bytes / 2**20:g} MiB"
        size = f"{length} bytes" if length is not None else "the body"
        return (f"{item.label}: {size} exceeds the download size cap of {cap}: raise the cap "
                "(--max-mb) to fetch it")


# The first bytes of the file types RunningHub returns; a body that does not start so is not the file.
MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "png": ((0, b"\x89PNG\r\n\x1a\n"),),
    "jpg": ((0, b"\xff\xd8\xff"),),
    "jpeg": ((0, b"\xff\xd8\xff"),),
    "gif": ((0, b"GIF8"),),
    "webp": ((0, b"RIFF"), (8, b"WEBP")),
    "wav": ((0, b"RIFF"), (8, b"WAVE")),
    "flac": ((0, b"fLaC"),),
    "mp4": ((4, b"ftyp"),),
    "mov": ((4, b"ftyp"),),
    "webm": ((0, b"\x1a\x45\xdf\xa3"),),
    "mkv": ((0, b"\x1a\x45\xdf\xa3"),),
    "zip": ((0, b"PK\x03\x04"),),
}


def body_mismatch(file_type: str | None, content_type: str | None, head: bytes) -> str | None:
    """Why ``head`` (a body's first bytes) is not a ``file_type`` file, or None when it may be.

    An HTML page (a CDN error, a login wall) answering 200 is the usual impostor.
    """
    kind = (file_type or "").lower().lstrip(".")
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime == "text/html" and kind not in ("html", "htm", "txt", ""):
        return f"the server sent an HTML page (text/html) instead of the {kind} file; it is not saved"
    signature = MAGIC.get(kind)
    if signature and not all(head[at:at + len(magic)] == magic for at, magic in signature):
        return (f"the server sent {len(head)}+ bytes that do not start like a {kind} file "
                f"({mime or 'no Content-Type'}); it is not saved")
    return None


def _candidates(store: RunStore) -> tuple[array[int], array[int]]:
    """(row_idx, n) of every file to fetch or verify, oldest URL first, packed compactly."""
    rows: array[int] = array("q")
    ns: array[int] = array("q")
    for row_idx, n in store.file_candidates():
        rows.append(row_idx)
        ns.append(n)
    return rows, ns


async def download_run_async(
    store: RunStore,
    *,
    jobs: int = DOWNLOAD_JOBS,
    max_bytes: int = MAX_FILE_BYTES,
    policy: RetryPolicy | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: httpx.Timeout | None = None,
    deadline_s: float = FILE_DEADLINE_S,
    on_file: Callable[[FileEvent], None] | None = None,
) -> DownloadSummary:
    """Plan, verify and fetch every output file of ``store``'s SUCCESS rows (one pass)."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: use at least 1 concurrent download")
    plan_downloads(store)
    rows, ns = _candidates(store)
    timeout = timeout or httpx.Timeout(
        connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S, write=WRITE_TIMEOUT_S, pool=POOL_TIMEOUT_S
    )
    async with httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        limits=httpx.Limits(max_connections=jobs, max_keepalive_connections=jobs),
        headers={"Accept-Encoding": "identity", "User-Agent": "rhbatch-download"},
        trust_env=False,
    ) as client:
        downloader = _Downloader(store, client, max_bytes=max_bytes, policy=policy or DOWNLOAD_POLICY,
                                 deadline_s=deadline_s, total=len(rows), on_file=on_file)
        if not len(rows):
            return downloader.summary
        downloader.dir_fd = open_files_dir(store.run_dir)
        position = 0
        fatal: list[RhbatchError] = []

        async def worker() -> None:
            nonlocal position
            while position < len(rows) and not fatal:
                i = position
                position += 1
                item = downloader.load(rows[i], ns[i])
                if item is None:
                    continue
                try:
                    await downloader.handle(item)
                except RhbatchError as exc:  # disk full, ...: every other file would fail alike
                    fatal.append(exc)

        try:
            await asyncio.gather(*(worker() for _ in range(min(jobs, len(rows)))))
        finally:
            os.close(downloader.dir_fd)
        if fatal:
            raise fatal[0]
    return downloader.summary


def download_run(
    run_dir: str | Path,
    *,
    jobs: int = DOWNLOAD_JOBS,
    max_bytes: int = MAX_FILE_BYTES,
    policy: RetryPolicy | None = None,
    on_file: Callable[[FileEvent], None] | None = None,
) -> DownloadSummary:
    """``rhbatch download DIR``: fetch every output into ``DIR/files/``, then refresh results.*.

    Takes no run lock, so it works while ``rhbatch run`` is still going on the same directory.
    """
    store = RunStore.open(run_dir)
    changed: set[int] = set()

    def heard(event: FileEvent) -> None:
        changed.add(event.row_idx)
        if on_file is not None:
            on_file(event)

    try:
        summary = asyncio.run(
            download_run_async(store, jobs=jobs, max_bytes=max_bytes, policy=policy, on_file=heard)
        )
        if summary.downloaded or summary.failed or summary.errors:
            refresh_results(store, changed)
        return summary
    finally:
        store.close()


# -- while a run goes (``run --download``) -------------------------------------------------

DOWNLOAD_PASS_INTERVAL_S = 5.0


async def download_pass(run_dir: Path, files_changed: Callable[[int], None] | None = None) -> None:
    """One download pass on its own connection; a failure is logged, never fatal to the run.
    ``files_changed(row_idx)`` hears of every row whose files changed (the results refresh)."""
    dl_store = RunStore.open(run_dir)
    on_file = None if files_changed is None else (lambda e: files_changed(e.row_idx))
    try:
        result = await download_run_async(dl_store, on_file=on_file)
        for error in result.errors:
            log.warning("download: %s", error)
    except Exception as exc:  # downloads are retried by the next pass or `rhbatch download`
        log.warning("download pass failed: %s", exc)
    finally:
        dl_store.close()


async def download_loop(run_dir: Path, files_changed: Callable[[int], None] | None = None) -> None:
    """``run --download``: fetch output files as tasks finish, while their URLs are fresh."""
    while True:
        await asyncio.sleep(DOWNLOAD_PASS_INTERVAL_S)
        await download_pass(run_dir, files_changed)
