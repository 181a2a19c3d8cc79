"""``pipeline``'s public surface: the names a Python user imports, pinned, each one real, and
imported only when first used (``import pipeline`` stays as quick as the command line needs)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = [
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


def test_all_is_pinned_and_sorted():
    assert pipeline.__all__ == PUBLIC
    assert pipeline.__all__ == sorted(pipeline.__all__)


def test_every_public_name_resolves_to_what_its_module_defines():
    from pipeline import batch, config, errors, export, manifest, retry, runner, status

    homes = {"ManifestArgs": batch, "run_batch": batch, "Settings": config,
             "resolve_settings": config, "RhbatchError": errors, "export_run": export,
             "load_manifest": manifest, "Selection": retry, "retry_rows": retry,
             "RunSummary": runner, "RunStatus": status, "run_status": status}
    assert set(homes) == set(PUBLIC) - {"__version__"}
    for name, module in homes.items():
        assert getattr(pipeline, name) is getattr(module, name), name
    assert isinstance(pipeline.__version__, str)
    assert issubclass(pipeline.RhbatchError, Exception)
    assert set(PUBLIC) <= set(dir(pipeline))


def test_an_unknown_name_is_an_attribute_error():
    try:
        pipeline.run_everything  # noqa: B018
    except AttributeError as exc:
        assert str(exc) == "module 'pipeline' has no attribute 'run_everything'"
    else:
        raise AssertionError("pipeline.run_everything resolved")


def test_import_pipeline_loads_none_of_the_run_machinery():
    probe = ("import sys, pipeline; "
             "print(sorted(m for m in ('pipeline.batch', 'pipeline.runner', 'pipeline.client', "
             "'pipeline.manifest', 'pandas', 'httpx') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNINGHUB_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_settings_are_frozen_and_their_task_options_read_only():
    options = {"instanceType": "plus"}
    settings = pipeline.resolve_settings(env={}, task_options=options)
    options["webappId"] = "1"  # the caller's dict is copied, not kept
    assert dict(settings.task_options) == {"instanceType": "plus"}
    with pytest.raises(TypeError):
        settings.task_options["webhookUrl"] = "https://example.com/hook"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 3  # type: ignore[misc]
    replaced = dataclasses.replace(settings, task_options={**settings.task_options, "x": 1})
    assert dict(replaced.task_options) == {"instanceType": "plus", "x": 1}
    with pytest.raises(TypeError):
        replaced.task_options["y"] = 2  # type: ignore[index]
