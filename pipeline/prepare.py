"""Before the first coin: check every row against its workflow, upload input files, spot drift.

``prepare_rows`` runs after the manifest has loaded and before anything is stored or submitted
(``load_and_prepare`` runs both, so that what loading found and what these checks find are
reported together, each kind capped at ``PROBLEMS_SHOWN_PER_KIND`` with a count of the rest):

1. find each workflow's API JSON: ``--workflow-json [ID=]FILE`` first, then the run's cache, then
   ``getJsonApiFormat`` (when a key is available);
2. preflight every row (:func:`pipeline.preflight.check_rows`) and every referenced file
   (:func:`pipeline.uploads.find_uploads`), raising one ManifestError with all problems; columns
   that feed no node are a warning naming the input each probably meant (``cfg``: ``3.cfg``),
   or with ``strict`` a problem;
3. upload the referenced files once per content hash and substitute the returned fileNames, so
   the stored ``nodeInfoList`` is exactly what is sent;
4. report drift: when reproducing from another run's output manifest whose run directory recorded
   the workflow hashes, warn if a workflow changed since.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.catalogue import load_catalogue
from pipeline.client import AccountStatus, RunningHubClient
from pipeline.config import Settings, redact
from pipeline.errors import InputError, Problem, RunStopped, TransientApiError, UsageError
from pipeline.manifest import (
    PROBLEMS_SHOWN_PER_KIND,
    Manifest,
    ManifestProblems,
    ProblemGroup,
    Row,
    make_row,
)
from pipeline.manifest import workflow_ids as distinct_workflow_ids
from pipeline.preflight import check_rows, check_with_catalogue, targets_named
from pipeline.safetext import escape_controls
from pipeline.store import RunStore, check_run_subdir
from pipeline.uploads import UPLOAD_CACHE_FILE, UploadCache, find_uploads, substitute, upload_all
from pipeline.workflows import WorkflowCache, fetch_workflows, load_workflow_file, workflow_hash

WORKFLOW_CACHE_DIR = "workflows"
T = TypeVar("T")


@dataclass
class Prepared:
    rows: Sequence[Row]
    hashes: dict[str, str] = field(default_factory=dict)
    checked: bool = False  # preflight ran against every workflow
    skipped: str | None = None  # why it did not
    warnings: list[str] = field(default_factory=list)
    catalogue: dict[str, Any] | None = None  # the node catalogue checked against (Catalogue.meta())
    coverage: str | None = None  # how many fields it could check


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


def with_client(settings: Settings, work: Callable[[RunningHubClient], Awaitable[T]]) -> T:
    """Run ``work(client)`` with a client of ``settings``, in an event loop of its own."""

    async def main() -> T:
        async with RunningHubClient(settings) as client:
            return await work(client)

    return asyncio.run(main())


def read_account(settings: Settings) -> AccountStatus:
    """``rhbatch account``: the account's balance and live task count."""
    return with_client(settings, lambda client: client.account_status())


def load_workflow(workflow_id: str | None, workflow_file: str | Path | None,
                  settings: Settings | None) -> dict[str, Any]:
    """``rhbatch inspect``: a workflow's API-format JSON, from ``workflow_file`` if given, else
    fetched with getJsonApiFormat (which needs ``settings`` with the key)."""
    if workflow_file:
        return load_workflow_file(workflow_file)
    if not workflow_id or settings is None:
        raise UsageError("Name a WORKFLOW_ID, or pass --workflow-json FILE")
    return with_client(settings, lambda client: client.workflow_json(workflow_id))


def _with_client(settings: Settings, work: Callable[[RunningHubClient], Awaitable[T]]) -> T:
    """Run ``work(client)``; a service that cannot be reached stops the run with the fix."""
    try:
        return with_client(settings, work)
    except TransientApiError as exc:
        raise RunStopped(
            f"RunningHub is unreachable: {redact(exc)}; check the network and "
            f"{settings.base_url}, then run the same command again to resume"
        ) from None


def load_checked(load: Callable[[], Manifest]) -> tuple[Manifest, Sequence[ProblemGroup]]:
    """``load()``, and what it found wrong: a manifest that could be read as rows but has problems
    comes back as the rows that later checks can still judge, with its problems, for
    :func:`prepare_rows` (``earlier``) to report together with its own. A manifest that is not a
    table of rows at all raises at once. Whatever the later checks find, rows with problems are
    never stored: ``prepare_rows`` raises while ``earlier`` holds any."""
    try:
        return load(), ()
    except ManifestProblems as exc:
        if exc.manifest is None:
            raise
        return exc.manifest, exc.groups


def load_and_prepare(
    load: Callable[[], Manifest],
    *,
    settings: Settings | None,
    workflow_files: Sequence[str] = (),
    run_dir: Path | None = None,
    preflight: bool = True,
    upload: bool = True,
    strict: bool = False,
    object_info: str | Path | None = None,
) -> tuple[Manifest, Prepared]:
    """Load a manifest with ``load`` and prepare its rows, reporting in one pass: a manifest whose
    rows break the schema or its bindings is still preflighted (the rows that can be judged) and
    its input files checked, and one ManifestError lists every problem, capped per kind."""
    manifest, earlier = load_checked(load)
    prepared = prepare_rows(manifest, settings=settings, workflow_files=workflow_files,
                            run_dir=run_dir, preflight=preflight, upload=upload, strict=strict,
                            earlier=earlier, object_info=object_info)
    return manifest, prepared


def prepare_rows(
    manifest: Manifest,
    *,
    settings: Settings | None,
    workflow_files: Sequence[str] = (),
    run_dir: Path | None = None,
    preflight: bool = True,
    upload: bool = True,
    strict: bool = False,
    earlier: Sequence[ProblemGroup] = (),
    object_info: str | Path | None = None,
) -> Prepared:
    """Check and ready ``manifest``'s rows; raises ManifestError with every problem found, those
    of ``earlier`` (what loading found) first. ``strict`` refuses columns that feed no node."""
    rows = manifest.rows
    ids = distinct_workflow_ids(rows)
    prepared = Prepared(rows=rows)
    workflows: dict[str, dict[str, Any]] = parse_workflow_files(workflow_files, ids)
    missing = [w for w in ids if w not in workflows]
    if run_dir is not None:
        check_run_subdir(run_dir / WORKFLOW_CACHE_DIR)  # never a link out of the run
    cache = WorkflowCache(run_dir / WORKFLOW_CACHE_DIR) if run_dir is not None else None
    fetched: dict[str, dict[str, Any]] = {}
    if missing and preflight:
        if cache is not None:
            for wid in missing:
                cached = cache.get(wid)
                if cached is not None:
                    workflows[wid] = cached
        to_fetch = [w for w in missing if w not in workflows]
        if to_fetch and settings is not None and settings.api_key:
            fetched = _with_client(settings, lambda client: fetch_workflows(client, to_fetch, None))
            workflows.update(fetched)
    for wid, api_json in workflows.items():
        prepared.hashes[wid] = workflow_hash(api_json)
    still_missing = [w for w in ids if w not in workflows]
    groups = list(earlier)
    unsent = unsent_columns(manifest, workflows.values())
    if unsent and strict:
        groups = _with_binding_problems(groups, [
            Problem(None, column, f"feeds no node, so it would never be sent (--strict refuses "
                                  f"it): {_send_fix(column, hint)}")
            for column, hint in unsent])
    elif unsent:
        prepared.warnings.append(
            "columns that feed no node are not sent: "
            + ", ".join(f"{c} (did you mean {' or '.join(h)}?)" if h else c for c, h in unsent)
            + "; to send one, bind it with --bind COLUMN=NODE.FIELD or rename it to NODE.FIELD "
              "(--strict refuses such columns)")
    if preflight and not still_missing:
        found = check_rows(rows, workflows, bound=manifest.bound, limit=PROBLEMS_SHOWN_PER_KIND)
        groups.append(ProblemGroup("preflight", tuple(found), found.total))
        prepared.checked = True
        catalogue = load_catalogue(object_info)
        by_node = check_with_catalogue(rows, workflows, catalogue, bound=manifest.bound,
                                       limit=PROBLEMS_SHOWN_PER_KIND,
                                       already=[p for g in groups for p in g.problems])
        groups.append(ProblemGroup("node catalogue", tuple(by_node.problems), by_node.problems.total))
        prepared.warnings.extend(by_node.warnings)
        prepared.catalogue = catalogue.meta()
        prepared.coverage = f"{catalogue.describe()}: {by_node.coverage}"
    elif preflight:
        prepared.skipped = (
            f"no API-format JSON for workflow {', '.join(still_missing)}: pass --workflow-json "
            "FILE (or set RUNNINGHUB_API_KEY) to check node ids, field names and value types"
        )
    base_dir = Path(manifest.source).resolve().parent
    paths, upload_problems = find_uploads(rows, base_dir, workflows or None, bound=manifest.bound,
                                          limit=PROBLEMS_SHOWN_PER_KIND)
    groups.append(ProblemGroup("file", tuple(upload_problems), upload_problems.total))
    if any(g.total for g in groups):
        raise ManifestProblems(escape_controls(manifest.source), groups)
    if cache is not None:  # cached only now: a refused manifest leaves nothing in the run directory
        for wid, api_json in fetched.items():
            cache.put(wid, api_json)
    if paths and upload:
        if settings is None or not settings.api_key or run_dir is None:
            raise InputError(
                f"{len(paths)} input file(s) must be uploaded before the run: this needs an API key"
            )
        uploads = UploadCache(run_dir / UPLOAD_CACHE_FILE)
        mapping = _with_client(settings, lambda client: upload_all(client, paths, uploads))
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


def unsent_columns(manifest: Manifest, workflows: Iterable[Mapping[str, Any]] = ()
                   ) -> list[tuple[str, list[str]]]:
    """The columns that feed no node (and are never sent), each with the workflow inputs it
    probably meant (``cfg`` -> ``3.cfg``). An output manifest has none: its input columns are the
    earlier run's inputs, kept as metadata, and its recorded nodeInfoList is what is sent."""
    if manifest.from_results or not manifest.unbound:
        return []
    known = list(workflows)
    return [(column, targets_named(column, known)) for column in manifest.unbound]


def _send_fix(column: str, hint: Sequence[str]) -> str:
    target = hint[0] if len(hint) == 1 else "NODE.FIELD"
    fix = f"bind it with --bind {column}={target}, or rename the column to {target}"
    return fix + (f" ({' or '.join(hint)}?)" if len(hint) > 1 else "")


def _with_binding_problems(groups: list[ProblemGroup], problems: list[Problem]) -> list[ProblemGroup]:
    """``groups`` with ``problems`` added to the binding group (listed first), capped as usual."""
    for i, group in enumerate(groups):
        if group.kind == "binding":
            listed = (*group.problems, *problems)[:PROBLEMS_SHOWN_PER_KIND]
            groups[i] = ProblemGroup("binding", listed, group.total + len(problems))
            return groups
    return [ProblemGroup("binding", tuple(problems[:PROBLEMS_SHOWN_PER_KIND]), len(problems)),
            *groups]


def drift_warnings(manifest_path: Path, hashes: dict[str, str]) -> list[str]:
    """Warnings when ``manifest_path`` is another run's output and its workflows changed since."""
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
