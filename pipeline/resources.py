"""Where rhbatch finds the files it ships: JSON Schemas, example manifests, simulator workflows.

Every lookup of a shipped file goes through this module, and through :mod:`importlib.resources`.

Layouts:

- installed from a wheel (``pip install .``, a built wheel, pipx): the build maps the repository's
  top-level ``schemas/`` and ``manifests/`` into the package as ``pipeline/_data/schemas/`` and
  ``pipeline/_data/manifests/`` (``[tool.setuptools] package-dir`` in pyproject.toml);
- an editable install or a bare checkout: ``pipeline/_data/`` does not exist and the same files are
  read from ``schemas/`` and ``manifests/`` beside the ``pipeline/`` folder (setuptools' editable
  finder cannot map a folder without ``__init__.py`` into a package, so the mapping does not apply);
- both: the simulator's workflows are ``pipeline/sim/workflows/*.json``.

This module imports nothing from rhbatch, so anything may import it.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from pipeline.errors import ResourceMissing

SCHEMAS = "schemas"
MANIFESTS = "manifests"
DATA_DIR = "_data"  # inside the package, in a wheel
SIM_WORKFLOWS = ("sim", "workflows")
MANIFEST_SUFFIXES = (".csv", ".json", ".jsonl", ".txt", ".yaml", ".yml", ".parquet")

_extracted = contextlib.ExitStack()  # files copied out of a zip import, removed at exit
atexit.register(_extracted.close)


def _data_dir(kind: str) -> Traversable:
    """``pipeline/_data/<kind>`` when installed from a wheel, else the checkout's ``<kind>/``."""
    package = resources.files("pipeline")
    installed = package.joinpath(DATA_DIR, kind)
    if installed.is_dir() or not isinstance(package, Path):
        return installed
    return package.parent / kind


def _sim_workflows() -> Traversable:
    return resources.files("pipeline").joinpath(*SIM_WORKFLOWS)


def _find(folder: Traversable, name: str, what: str) -> Path:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    item = folder.joinpath(name)
    if not item.is_file():
        raise ResourceMissing(f"The {what} {name} is missing from the installation: reinstall rhbatch")
    if isinstance(item, Path):
        return item
    return _extracted.enter_context(resources.as_file(item))


def _names(folder: Traversable, suffixes: tuple[str, ...]) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(i.name for i in folder.iterdir() if i.is_file() and i.name.endswith(suffixes))


def schema_path(name: str) -> Path:
    """A shipped JSON Schema, e.g. ``schema_path("manifest.schema.json")``."""
    return _find(_data_dir(SCHEMAS), name, "schema")


def example_manifest_path(name: str) -> Path:
    """A shipped example manifest or sweep spec, e.g. ``example_manifest_path("demo_sweep.csv")``."""
    return _find(_data_dir(MANIFESTS), name, "example manifest")


def sim_workflow_path(name: str) -> Path:
    """A workflow in API format that the simulator serves, e.g. ``sim_workflow_path("text2img.json")``."""
    return _find(_sim_workflows(), name, "simulator workflow")


def schema_names() -> list[str]:
    """The shipped schemas' file names."""
    return _names(_data_dir(SCHEMAS), (".json",))


def example_manifest_names() -> list[str]:
    """The shipped example manifests' and sweep specs' file names."""
    return _names(_data_dir(MANIFESTS), MANIFEST_SUFFIXES)


def sim_workflow_names() -> list[str]:
    """The simulator's workflows' file names."""
    return _names(_sim_workflows(), (".json",))
