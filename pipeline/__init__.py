"""rhbatch: resumable, never-pay-twice batch runs of ComfyUI workflows on RunningHub.

The Python surface, for a script or a notebook::

    from pipeline import ManifestArgs, Selection, resolve_settings, retry_rows, run_batch

    settings = resolve_settings(concurrency=4)          # the key from RUNNINGHUB_API_KEY
    summary = run_batch(ManifestArgs(Path("sweep.csv")), "outputs/sweep", settings)
    plan, again = retry_rows("outputs/sweep", settings, Selection(codes=(805,)))

Every error rhbatch raises is a :class:`RhbatchError` (the tree is drawn in ``pipeline.errors``).
The names below are imported when first used, so ``import pipeline`` (and ``rhbatch --help``)
stays quick: the run machinery takes several times as long to import as the command line does.
"""

from __future__ import annotations

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Library logging stays silent unless the CLI (--verbose, the run log) attaches a handler.
_logging.getLogger("rhbatch").addHandler(_logging.NullHandler())

_WHERE = {
    "ManifestArgs": "pipeline.batch",
    "RhbatchError": "pipeline.errors",
    "RunSummary": "pipeline.runner",
    "RunStatus": "pipeline.status",
    "Selection": "pipeline.retry",
    "Settings": "pipeline.config",
    "export_run": "pipeline.export",
    "load_manifest": "pipeline.manifest",
    "resolve_settings": "pipeline.config",
    "retry_rows": "pipeline.retry",
    "run_batch": "pipeline.batch",
    "run_status": "pipeline.status",
}

__all__ = [
    "ManifestArgs",
    "RhbatchError",
    "RunStatus",
    "RunSummary",
    "Selection",
    "Settings",
    "__version__",
    "export_run",
    "load_manifest",
    "resolve_settings",
    "retry_rows",
    "run_batch",
    "run_status",
]

if TYPE_CHECKING:
    from pipeline.batch import ManifestArgs, run_batch
    from pipeline.config import Settings, resolve_settings
    from pipeline.errors import RhbatchError
    from pipeline.export import export_run
    from pipeline.manifest import load_manifest
    from pipeline.retry import Selection, retry_rows
    from pipeline.runner import RunSummary
    from pipeline.status import RunStatus, run_status


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
