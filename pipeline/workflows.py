"""Getting the workflows a batch runs: from a file, from the run's cache, or from RunningHub.

:class:`WorkflowCache` keeps fetched workflows on disk as ``<dir>/<workflowId>.json`` =
``{"workflowId", "sha256", "fetched_at", "prompt": {...}}``, written atomically; :func:`workflow_hash`
is the sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) and identifies a workflow version
for drift checks. :func:`fetch_workflows` asks ``getJsonApiFormat`` once per workflow not cached.
The checks of rows against a workflow are :mod:`pipeline.preflight`'s, which does no I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline._files import gather_or_cancel, write_json_atomic
from pipeline.errors import InputError, RowFatalError

FETCH_JOBS = 4  # getJsonApiFormat requests in flight




def workflow_hash(api_json: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, compact, UTF-8) of an API-format workflow."""
    canonical = json.dumps(api_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class WorkflowCache:
    """Fetched workflows on disk: ``<directory>/<workflowId>.json``, written atomically."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path_for(self, workflow_id: str) -> Path:
        workflow_id = str(workflow_id)
        if not _SAFE_ID.fullmatch(workflow_id) or workflow_id.startswith("."):
            raise InputError(
                f"workflowId {workflow_id!r} cannot name a cache file: a RunningHub workflowId "
                "is a number such as 1904136902449209346"
            )
        return self.directory / f"{workflow_id}.json"

    def entry(self, workflow_id: str) -> dict[str, Any] | None:
        """The whole cache record, or None when absent or unreadable (it is then fetched again)."""
        try:
            with self.path_for(workflow_id).open(encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), dict):
            return None
        return record

    def get(self, workflow_id: str) -> dict[str, Any] | None:
        record = self.entry(workflow_id)
        return record["prompt"] if record else None

    def put(self, workflow_id: str, api_json: dict[str, Any]) -> str:
        """Store ``api_json`` for ``workflow_id``; returns its :func:`workflow_hash`."""
        digest = workflow_hash(api_json)
        record = {
            "workflowId": str(workflow_id),
            "sha256": digest,
            "fetched_at": time.time(),
            "prompt": api_json,
        }
        write_json_atomic(self.path_for(workflow_id), record)
        return digest


async def fetch_workflows(
    client: Any,
    workflow_ids: Iterable[str],
    cache: WorkflowCache | None,
    *,
    refresh: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each distinct workflow's API JSON: from ``cache`` first (unless ``refresh``), else one
    ``getJsonApiFormat`` call per id, stored in ``cache``.

    Errors from RunningHub propagate; a row-fatal one (380 unknown workflow, 810 never run) is
    re-raised naming the workflowId.
    """
    ids = list(dict.fromkeys(str(w) for w in workflow_ids))
    found: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for wid in ids:
        cached = None if (cache is None or refresh) else cache.get(wid)
        if cached is not None:
            found[wid] = cached
        else:
            missing.append(wid)
    gate = asyncio.Semaphore(FETCH_JOBS)

    async def fetch(wid: str) -> None:
        async with gate:
            try:
                api_json = await client.workflow_json(wid)
            except RowFatalError as exc:
                raise RowFatalError(
                    f"workflow {wid}: {exc}", code=exc.code, msg=exc.msg, data=exc.data
                ) from None
        if cache is not None:
            cache.put(wid, api_json)
        found[wid] = api_json

    await gather_or_cancel(fetch(wid) for wid in missing)
    return {wid: found[wid] for wid in ids}


_FILE_FIX = (
    "save the workflow in API format: RunningHub's getJsonApiFormat answer, or ComfyUI's "
    "Workflow > Export (API)"
)


def _looks_like_api(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(n, dict) and isinstance(n.get("class_type"), str) for n in obj.values())
    )


def load_workflow_file(path: str | Path) -> dict[str, Any]:
    """An API-format workflow from a file. Accepts the bare API JSON, the getJsonApiFormat envelope
    ``{"code": 0, "data": {"prompt": "<json>"}}`` and the ``{"prompt": {...}}`` wrapper of ComfyUI's
    ``/prompt`` body; raises :class:`InputError` with the fix for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file: check the --workflow-json path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it ({exc}): {_FILE_FIX}") from None
    try:
        obj: Any = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not JSON ({exc}): {_FILE_FIX}") from None
    if isinstance(obj, dict) and "code" in obj and "data" in obj:  # getJsonApiFormat envelope
        if obj.get("code") not in (0, "0"):
            raise InputError(
                f"{path}: a getJsonApiFormat answer with code {obj.get('code')} "
                f"({obj.get('msg', '')}), not a workflow: fetch it again with a valid key and id"
            )
        obj = obj["data"] if isinstance(obj["data"], dict) else {}
    if isinstance(obj, dict) and "prompt" in obj and not _looks_like_api(obj):
        obj = obj["prompt"]
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except ValueError as exc:
                raise InputError(f"{path}: its prompt is not JSON ({exc}): {_FILE_FIX}") from None
    if isinstance(obj, dict) and isinstance(obj.get("nodes"), list) and "links" in obj:
        raise InputError(
            f"{path}: this is a ComfyUI UI workflow (nodes and links), not the API format: {_FILE_FIX}"
        )
    if not _looks_like_api(obj):
        raise InputError(
            f"{path}: not an API-format workflow (expected node ids mapping to objects with "
            f"class_type and inputs): {_FILE_FIX}"
        )
    return {str(k): v for k, v in obj.items()}
