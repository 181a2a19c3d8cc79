"""Local input files: find them in the rows, check them, upload each distinct file once.

Which values are files:

* a value of an input listed in :data:`FILE_INPUTS` (``LoadImage.image``, ``LoadAudio.audio``, ...),
  unless it is already remote: an ``http(s)://`` URL or an ``api/...`` name from an earlier upload;
* any value written ``@path`` whose path has a suffix (``@faces/ada.png``), in any input. Text such
  as ``@ada says hi`` has no suffix and is sent as it is.

A leading ``@`` is always dropped. Relative paths are resolved against the manifest's directory
(``~`` is expanded). Missing files, directories, files over :data:`UPLOAD_MAX_BYTES` and extensions
RunningHub does not take (:data:`UPLOAD_EXTENSIONS`) are :class:`~pipeline.errors.Problem` s with the
row and column, found before anything is sent, never failures in the middle of a run.

Each distinct content (sha256) is uploaded once through ``client.upload``; the ``fileName`` RunningHub
returns (``api/<hash>.<ext>``) is what the row sends. :class:`UploadCache` keeps those names in the run
directory (``uploads.json``)::

    {"version": 1,
     "uploads": {"<sha256>": {"fileName": "api/....png", "uploaded_at": 1718000000.0, "size": 1234}},
     "hashes": {"/abs/path.png": {"size": 1234, "mtime_ns": 1718..., "sha256": "<sha256>"}}}

An uploaded name lives about a day on RunningHub, so entries older than ``retention_s``
(:data:`RETENTION_S`, 20 h) are uploaded again. ``hashes`` spares re-reading unchanged files. A run
that lasts longer than the retention should call :func:`upload_all` again before submitting more rows:
fresh entries cost nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline._files import gather_or_cancel, sha256_file, write_json_atomic
from pipeline.errors import MAX_PROBLEMS_LISTED, Problem, Problems
from pipeline.manifest import text_inputs
from pipeline.preflight import column_names
from pipeline.store import RunPaths

UPLOAD_MAX_BYTES = 30 * 1024 * 1024  # RunningHub answers 809 above this
RETENTION_S = 20 * 3600.0  # upload names live about a day; re-upload well before that
UPLOAD_JOBS = 4
UPLOAD_CACHE_FILE = RunPaths.UPLOADS

# (class_type, input) pairs whose value is a file the node loads.
FILE_INPUTS = frozenset(
    {
        ("LoadImage", "image"),
        ("LoadImageMask", "image"),
        ("LoadAudio", "audio"),
        ("LoadVideo", "video"),
        ("LoadVideo", "file"),
        ("VHS_LoadVideo", "video"),
    }
)
UPLOAD_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".mp3", ".wav", ".flac", ".mp4", ".avi", ".mov", ".mkv", ".zip"}
)
REMOTE_PREFIXES = ("http://", "https://", "api/")


def _is_file_input(workflow: Mapping[str, Any] | None, node_id: str, field: str) -> bool:
    if workflow is None:
        return False
    node = workflow.get(node_id)
    return isinstance(node, dict) and (node.get("class_type"), field) in FILE_INPUTS


def file_reference(value: Any, *, file_input: bool) -> str | None:
    """The path text a value names, or None when the value is sent as it is."""
    if not isinstance(value, str) or not value.strip():
        return None
    if value.startswith("@"):
        path = value[1:]
        return path if (file_input or Path(path).suffix) and path.strip() else None
    if file_input and not value.startswith(REMOTE_PREFIXES):
        return value
    return None


def _resolve(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base_dir / path


def _path_problem(path: Path, text: str) -> str | None:
    """Why ``path`` cannot be uploaded, or None."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return (
            f"file {text!r} not found (looked for {path}): fix the path (relative paths start at "
            "the manifest's directory), or write an http(s) URL or an api/... upload name to send "
            "it as it is"
        )
    except OSError as exc:
        return f"file {text!r} cannot be read ({exc.strerror}): check its permissions"
    if path.is_dir():
        return f"{text!r} is a directory, not a file: name one file (zip a folder to send it whole)"
    if path.suffix.lower() not in UPLOAD_EXTENSIONS:
        allowed = ", ".join(sorted(e[1:] for e in UPLOAD_EXTENSIONS))
        return (
            f"file {text!r} has an extension RunningHub does not take ({path.suffix or 'none'}): "
            f"convert it to one of {allowed}"
        )
    if info.st_size > UPLOAD_MAX_BYTES:
        return (
            f"file {text!r} is {math.ceil(info.st_size / 2**20 * 10) / 10:.1f} MB, over RunningHub's "
            f"{UPLOAD_MAX_BYTES // 2**20} MB upload limit: shrink it, or host it yourself and write "
            "its public https URL"
        )
    return None


def find_uploads(
    rows: Iterable[Any],
    base_dir: Path,
    workflows: Mapping[str, Mapping[str, Any]] | None,
    *,
    bound: Mapping[str, str] | None = None,
    limit: int = MAX_PROBLEMS_LISTED,
) -> tuple[dict[str, Path], Problems]:
    """Every file the rows name: value text -> local path, and a problem per unusable reference.

    Without ``workflows`` only ``@path`` values are files. Each distinct value is checked once.
    """
    base_dir = Path(base_dir)
    columns = column_names(bound)
    paths: dict[str, Path] = {}
    verdicts: dict[tuple[str, str], str | None] = {}  # (value, kind) -> problem message or None
    file_inputs: dict[tuple[Any, Any, Any], bool] = {}
    found: list[tuple[int, int, Problem]] = []
    for workflow_id, item, numbers, position in sorted(text_inputs(rows), key=lambda t: (t[2][0], t[3])):
        workflow = workflows.get(str(workflow_id)) if workflows else None
        value = item["fieldValue"]
        key = (workflow_id, item["nodeId"], item["fieldName"])
        is_file = file_inputs.get(key)
        if is_file is None:
            is_file = file_inputs[key] = _is_file_input(
                workflow, str(item["nodeId"]), str(item["fieldName"])
            )
        if not is_file and not value.startswith("@"):
            continue
        vkey = (value, "file" if is_file else "@")
        if vkey in verdicts:
            message = verdicts[vkey]
        else:
            text = file_reference(value, file_input=is_file)
            message = None
            if text is not None:
                path = _resolve(text, base_dir)
                message = _path_problem(path, text)
                if message is None:
                    paths[value] = path
            verdicts[vkey] = message
        if message is not None:
            target = f"{item['nodeId']}.{item['fieldName']}"
            column = columns.get(target, target)
            found.extend((n, position, Problem(n, column, message)) for n in numbers)
    problems = Problems(limit)
    for _, _, problem in sorted(found, key=lambda f: (f[0], f[1])):
        problems.add(problem)
    return paths, problems


def substitute(
    node_info_list: Iterable[Mapping[str, Any]], mapping: Mapping[str, str]
) -> tuple[dict[str, Any], ...]:
    """``node_info_list`` with every value found in ``mapping`` (value text -> fileName) replaced."""
    out = []
    for item in node_info_list:
        value = item.get("fieldValue")
        if isinstance(value, str) and value in mapping:
            out.append({**item, "fieldValue": mapping[value]})
        else:
            out.append(dict(item))
    return tuple(out)


class UploadCache:
    """sha256 -> uploaded ``fileName``, kept in a JSON file; entries expire after ``retention_s``."""

    def __init__(
        self,
        path: Path,
        *,
        retention_s: float = RETENTION_S,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self.retention_s = retention_s
        self.clock = clock
        self.uploads: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, dict[str, Any]] = {}
        try:
            with self.path.open(encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            data = {}  # absent or unreadable: start empty (the worst case is uploading again)
        if isinstance(data, dict) and data.get("version") == 1:
            self.uploads = {k: v for k, v in (data.get("uploads") or {}).items() if isinstance(v, dict)}
            self.hashes = {k: v for k, v in (data.get("hashes") or {}).items() if isinstance(v, dict)}

    def get(self, sha256: str) -> str | None:
        """The fileName uploaded for ``sha256`` if it is younger than the retention, else None."""
        entry = self.uploads.get(sha256)
        if not entry or not entry.get("fileName"):
            return None
        try:
            age = self.clock() - float(entry.get("uploaded_at", 0))
        except (TypeError, ValueError):
            return None
        return str(entry["fileName"]) if 0 <= age < self.retention_s else None

    def put(self, sha256: str, file_name: str, size: int) -> None:
        self.uploads[sha256] = {"fileName": file_name, "uploaded_at": self.clock(), "size": size}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"version": 1, "uploads": self.uploads, "hashes": self.hashes})

    def sha256_of(self, path: Path) -> tuple[str, int]:
        """The file's sha256 and size, reusing the recorded hash while size and mtime match."""
        info = path.stat()
        key = str(path.resolve())
        known = self.hashes.get(key)
        if known and known.get("size") == info.st_size and known.get("mtime_ns") == info.st_mtime_ns:
            return str(known["sha256"]), info.st_size
        sha = sha256_file(path)
        self.hashes[key] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha}
        return sha, info.st_size


async def upload_all(
    client: Any, paths: Mapping[str, Path], cache: UploadCache, *, jobs: int = UPLOAD_JOBS
) -> dict[str, str]:
    """Value text -> fileName for every entry of ``paths``, uploading each distinct content once.

    Contents with a fresh cache entry are not sent. Errors from ``client.upload`` propagate after the
    other uploads are cancelled; the ones that finished stay in the cache.
    """
    by_sha: dict[str, list[str]] = {}
    files: dict[str, tuple[Path, int]] = {}
    for value, path in paths.items():
        sha, size = await asyncio.to_thread(cache.sha256_of, path)
        by_sha.setdefault(sha, []).append(value)
        files.setdefault(sha, (path, size))
    if files:
        cache.save()  # keep the hashes even if an upload fails
    names: dict[str, str] = {}
    gate = asyncio.Semaphore(max(1, jobs))

    async def upload(sha: str) -> None:
        path, size = files[sha]
        async with gate:
            name = await client.upload(path)
        cache.put(sha, name, size)
        names[sha] = name

    stale = []
    for sha in by_sha:
        fresh = cache.get(sha)
        if fresh is not None:
            names[sha] = fresh
        else:
            stale.append(sha)
    await gather_or_cancel(upload(sha) for sha in stale)
    return {value: names[sha] for sha, values in by_sha.items() for value in values}
