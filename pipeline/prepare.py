"""Before the first coin: check every row against its workflow, upload input files, spot drift.

``prepare_rows`` runs after the manifest has loaded and before anything is stored or submitted:

1. find each workflow's API JSON: ``--workflow-json [ID=]FILE`` first, then the run's cache, then
   ``getJsonApiFormat`` (when a key is available);
2. preflight every row (:func:`pipeline.preflight.check_rows`) and every referenced file
   (:func:`pipeline.uploads.find_uploads`), raising one ManifestError with all problems;
3. upload the referenced files once per content hash and substitute the returned fileNames, so
   the stored ``nodeInfoList`` is exactly what is sent;
4. report drift: when reproducing from another run's output manifest whose run directory recorded
   the workflow hashes, warn if a workflow changed since.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import Settings, redact
from pipeline.errors import InputError, ManifestError, Problem, RunStopped, TransientApiError
from pipeline.manifest import Manifest, Row, make_row
from pipeline.preflight import (
    WorkflowCache,
    check_rows,
    fetch_workflows,
    load_workflow_file,
    workflow_hash,
)
from pipeline.uploads import UPLOAD_CACHE_FILE, UploadCache, find_uploads, substitute, upload_all

WORKFLOW_CACHE_DIR = "workflows"
T = TypeVar("T")


@dataclass
class Prepared:
    rows: list[Row]
    hashes: dict[str, str] = field(default_factory=dict)
    checked: bool = False  # preflight ran against every workflow
    skipped: str | None = None  # why it did not
    uploaded: int = 0
    warnings: list[str] = field(default_factory=list)


def parse_workflow_files(specs: Sequence[str], workflow_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--workflow-json`` values: ``ID=FILE``, or a bare ``FILE`` when the manifest has one workflow."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        wid, sep, path = spec.partition("=")
        if sep and wid.strip().isdigit():
            out[wid.strip()] = load_workflow_file(path)
            continue
        distinct = sorted(set(workflow_ids))
        if len(distinct) != 1:
            raise InputError(
                f"--workflow-json {spec}: the manifest uses {len(distinct)} workflows "
                f"({', '.join(distinct[:5])}): write --workflow-json ID=FILE for each"
            )
        out[distinct[0]] = load_workflow_file(spec)
    return out


def _with_client(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(client)``; a service that cannot be reached stops the run with the fix."""
    from pipeline.client import RunningHubClient

    async def main() -> T:
        async with RunningHubClient(settings) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except TransientApiError as exc:
        raise RunStopped(
            f"RunningHub is unreachable: {redact(exc)}; check the network and "
            f"{settings.base_url}, then run the same command again to resume"
        ) from None


def prepare_rows(
    manifest: Manifest,
    *,
    settings: Settings | None,
    workflow_files: Sequence[str] = (),
    run_dir: Path | None = None,
    preflight: bool = True,
    upload: bool = True,
) -> Prepared:
    """Check and ready ``manifest``'s rows; raises ManifestError with every problem found."""
    rows = manifest.rows
    ids = sorted({r.workflow_id for r in rows})
    prepared = Prepared(rows=rows)
    workflows: dict[str, dict[str, Any]] = parse_workflow_files(workflow_files, ids)
    missing = [w for w in ids if w not in workflows]
    cache = WorkflowCache(run_dir / WORKFLOW_CACHE_DIR) if run_dir is not None else None
    if missing and preflight:
        if settings is not None and settings.api_key:
            workflows.update(_with_client(
                settings, lambda client: fetch_workflows(client, missing, cache)))
        elif cache is not None:
            for wid in missing:
                cached = cache.get(wid)
                if cached is not None:
                    workflows[wid] = cached
    for wid, api_json in workflows.items():
        prepared.hashes[wid] = workflow_hash(api_json)
    still_missing = [w for w in ids if w not in workflows]
    problems: list[Problem] = []
    total = 0
    if preflight and not still_missing:
        found = check_rows(rows, workflows, bound=manifest.bound)
        problems.extend(found)
        total += found.total
        prepared.checked = True
    elif preflight:
        prepared.skipped = (
            f"no API-format JSON for workflow {', '.join(still_missing)}: pass --workflow-json "
            "FILE (or set RUNNINGHUB_API_KEY) to check node ids, field names and value types"
        )
    base_dir = Path(manifest.source).resolve().parent
    paths, upload_problems = find_uploads(rows, base_dir, workflows or None, bound=manifest.bound)
    problems.extend(upload_problems)
    total += upload_problems.total
    if problems:
        if total > len(problems):
            problems.append(Problem(None, None, f"... {total - len(problems)} more problems"))
        raise ManifestError(manifest.source, problems)
    if paths and upload:
        if settings is None or not settings.api_key or run_dir is None:
            raise InputError(
                f"{len(paths)} input file(s) must be uploaded before the run: this needs an API key"
            )
        uploads = UploadCache(run_dir / UPLOAD_CACHE_FILE)
        mapping = _with_client(settings, lambda client: upload_all(client, paths, uploads))
        prepared.uploaded = len(set(mapping.values()))
        prepared.rows = [
            make_row(r.index, r.number, r.row_id, r.workflow_id,
                     substitute(r.node_info_list, mapping), r.inputs, r.options)
            if any(isinstance(i.get("fieldValue"), str) and i["fieldValue"] in mapping
                   for i in r.node_info_list)
            else r
            for r in rows
        ]
    prepared.warnings.extend(drift_warnings(Path(manifest.source), prepared.hashes))
    return prepared


def drift_warnings(manifest_path: Path, hashes: dict[str, str]) -> list[str]:
    """Warnings when ``manifest_path`` is another run's output and its workflows changed since."""
    from pipeline.store import RunStore

    run_dir = manifest_path.resolve().parent
    if not hashes or not RunStore.exists(run_dir):
        return []
    try:
        store = RunStore.open(run_dir, readonly=True)
    except Exception:  # an unreadable neighbour is no reason to stop this run
        return []
    try:
        recorded = store.get_meta("workflow_hashes") or {}
    finally:
        store.close()
    return [
        f"workflow {wid} changed since {run_dir} ran it (sha256 {recorded[wid][:12]} then, "
        f"{digest[:12]} now): the reproduction may not match the original outputs"
        for wid, digest in hashes.items()
        if wid in recorded and recorded[wid] != digest
    ]
