"""A built wheel carries the schemas, example manifests and simulator workflows, and rhbatch finds
them there: the layout of ``pip install .``, a wheel or pipx, not of this checkout (issue #13)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import resources

ROOT = Path(__file__).resolve().parent.parent
# What the build reads; copied so that building never writes build/ or *.egg-info into the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "pipeline", "schemas", "manifests")
SCHEMAS = sorted(p.name for p in (ROOT / "schemas").glob("*.json"))
MANIFESTS = sorted(p.name for p in (ROOT / "manifests").iterdir()
                   if p.is_file() and p.name.endswith(resources.MANIFEST_SUFFIXES))
SIM_WORKFLOWS = sorted(p.name for p in (ROOT / "pipeline" / "sim" / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(src), "-w", str(dist)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = dist.glob("rhbatch-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files as an installer lays them out in site-packages."""
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` importing rhbatch from ``site`` only, from a directory outside the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNINGHUB_")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _shipped_manifest(site: Path, cwd: Path, name: str) -> Path:
    proc = _run_installed(site, cwd, "-c",
                          f"import pipeline.resources as r; print(r.example_manifest_path({name!r}))")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.is_relative_to(site), path
    return path


def test_the_wheel_holds_every_package_schema_example_and_sim_workflow(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SCHEMAS == ["manifest.schema.json", "sweep.schema.json"]
    assert "demo_sweep.csv" in MANIFESTS and SIM_WORKFLOWS == ["img2img.json", "text2img.json"]
    for name in SCHEMAS:
        assert f"pipeline/_data/schemas/{name}" in names
    for name in MANIFESTS:
        assert f"pipeline/_data/manifests/{name}" in names
    for name in SIM_WORKFLOWS:
        assert f"pipeline/sim/workflows/{name}" in names
    # [tool.setuptools] packages is a list: a package missing from it would not ship.
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
    for module in (ROOT / "pipeline").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    # Nothing from the checkout but the package itself.
    assert {n.split("/")[0] for n in names} == {"pipeline", "rhbatch-0.1.0.dist-info"}


def test_resources_find_the_shipped_files_in_the_installed_layout(unpacked, tmp_path):
    code = (
        "import json, pipeline, pipeline.resources as r\n"
        "print(json.dumps({'package': pipeline.__file__,"
        " 'schemas': {n: str(r.schema_path(n)) for n in r.schema_names()},"
        " 'manifests': {n: str(r.example_manifest_path(n)) for n in r.example_manifest_names()},"
        " 'workflows': {n: str(r.sim_workflow_path(n)) for n in r.sim_workflow_names()}}))\n"
    )
    proc = _run_installed(unpacked, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert Path(found["package"]) == unpacked / "pipeline" / "__init__.py"
    assert sorted(found["schemas"]) == SCHEMAS
    assert sorted(found["manifests"]) == MANIFESTS
    assert sorted(found["workflows"]) == SIM_WORKFLOWS
    for kind, folder in (("schemas", ROOT / "schemas"), ("manifests", ROOT / "manifests"),
                         ("workflows", ROOT / "pipeline" / "sim" / "workflows")):
        for name, path in found[kind].items():
            assert Path(path).is_relative_to(unpacked), path
            assert Path(path).read_bytes() == (folder / name).read_bytes()


def test_the_installed_commands_work_outside_the_checkout(unpacked, tmp_path):
    manifest = _shipped_manifest(unpacked, tmp_path, "demo_sweep.csv")
    validated = _run_installed(unpacked, tmp_path, "-m", "pipeline", "validate", str(manifest))
    assert validated.returncode == 0, validated.stderr
    assert "16 rows OK" in validated.stdout

    spec = _shipped_manifest(unpacked, tmp_path, "sweep_example.yaml")
    swept = _run_installed(unpacked, tmp_path, "-m", "pipeline", "sweep", str(spec),
                           "-o", str(tmp_path / "sweep.csv"))
    assert swept.returncode == 0, swept.stderr
    assert "Wrote 24 rows" in swept.stdout

    ran = _run_installed(unpacked, tmp_path, "-m", "pipeline", "demo", "--out", str(tmp_path / "demo"))
    assert ran.returncode == 0, ran.stderr
    assert "Demo finished: 16 rows" in ran.stderr
    assert (tmp_path / "demo" / "results.jsonl").is_file()


def test_the_checkout_layout_finds_the_top_level_folders():
    """Editable installs and bare checkouts read schemas/ and manifests/ where they are."""
    assert resources.schema_path("manifest.schema.json") == ROOT / "schemas" / "manifest.schema.json"
    assert resources.example_manifest_path("demo_sweep.csv") == ROOT / "manifests" / "demo_sweep.csv"
    assert resources.sim_workflow_path("text2img.json") == ROOT / "pipeline/sim/workflows/text2img.json"
    assert resources.schema_names() == SCHEMAS
    assert resources.example_manifest_names() == MANIFESTS
    with pytest.raises(resources.ResourceMissing,
                       match="The schema nope.json is missing from the installation: reinstall rhbatch"):
        resources.schema_path("nope.json")
    with pytest.raises(ValueError):
        resources.example_manifest_path("../pyproject.toml")
