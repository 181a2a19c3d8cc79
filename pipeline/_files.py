"""File plumbing, decided once: atomic replacement, fsync, hashing, "is this inside that directory".

Every file rhbatch writes whole (the results manifest, the report, sweep output, caches) is written
to a temporary file in the same directory, flushed, fsync'd and renamed over its name with
``os.replace``, so a reader (or a crash) sees the old file or the whole new one, never half of one.
The temporary file is removed when anything fails. The new file gets the mode ``open()`` would give
it (``0o666`` less the umask) unless ``chmod`` says otherwise; ``mkstemp``'s private ``0o600`` is not
kept by accident.

These helpers raise plain ``OSError``: each caller knows which file it was writing and for what, and
turns the error into its own message with the fix (:func:`storage_error` and :func:`os_fix` give the
fix for each kind of trouble). The run directory's guards are here too: rhbatch never writes through a
symbolic link or into anything but a plain file or directory of its own (:func:`open_in_run_dir`,
:func:`check_run_subdir`, :func:`refuse_entry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import RunLockedError, StateError, StorageError
from pipeline.safetext import escape_controls

HASH_CHUNK_BYTES = 1 << 20


def temporary_prefix(name: str) -> str:
    """The prefix of ``name``'s temporary siblings (hidden, so a glob for ``name`` skips them)."""
    return f".{name}."


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None,
                chmod: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit flush, fsync and rename it
    over ``path``; on an exception remove it and re-raise. ``mode`` is ``"w"`` (UTF-8 text) or
    ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode {mode!r} is not 'w' or 'wb'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, chmod if chmod is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, chmod: int | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", newline="", chmod=chmod) as fh:
        fh.write(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> None:
    """``obj`` as UTF-8 JSON (non-ASCII kept as is), written atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=indent))


def fsync_dir(path_or_fd: str | os.PathLike[str] | int) -> None:
    """Make a rename or a new entry in a directory durable. Best effort: some file systems refuse to
    fsync a directory, and that refusal is not an error of the caller's."""
    if isinstance(path_or_fd, int):
        with contextlib.suppress(OSError):
            os.fsync(path_or_fd)
        return
    try:
        fd = os.open(path_or_fd, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], *, dir_fd: int | None = None,
                follow_symlinks: bool = True) -> str:
    """The sha256 (hex) of a regular file's bytes. With ``follow_symlinks=False`` a link at ``path``
    is refused rather than followed; anything but a regular file raises ``OSError``."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)} is not a regular file")
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as fh:
            while chunk := fh.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def inside(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    """Whether ``child`` resolves (links followed) to ``parent`` or somewhere under it."""
    try:
        real_child = Path(os.path.realpath(child))
        real_parent = Path(os.path.realpath(parent))
    except (OSError, ValueError):
        return False
    return real_child == real_parent or real_parent in real_child.parents


def entry_in(path: Path, directory: Path) -> bool:
    """Whether ``path`` names an entry directly in ``directory`` (its parent resolved).

    The entry itself is not resolved: a symlink planted at that name is replaced or unlinked,
    never followed (what a writer of ``directory`` needs; :func:`inside` follows links).
    """
    return path.name not in ("", ".", "..") and path.parent.resolve() == directory.resolve()


async def gather_or_cancel(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run ``coros`` together; on the first error cancel the rest and raise that error as it is
    (``asyncio.TaskGroup`` would wrap it in an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- the run directory's guards and the fix for each kind of trouble ---------------------


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


def database_error(exc: Exception, path: Path) -> StorageError:
    """A SQLite error on the run state at ``path``, as a StorageError that names the fix."""
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


class FileLock:
    """An exclusive flock on the file ``path`` (a run's ``.lock``), which holds the holder's pid;
    released by the kernel if the holder dies."""

    def __init__(self, path: Path):
        self.path = path
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

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
