"""What a user installing the package gets: one version, the type marker, the licence, the scenarios.

The wheel and the source distribution are built here with the project's own build backend
(hatchling, in-process: no network, about a second), and their contents are checked.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import bayes_dgme

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCENARIOS = sorted(p.name for p in (ROOT / "models").glob("*.toml"))


def test_version_matches_installed_metadata():
    assert bayes_dgme.__version__ == importlib.metadata.version("bayes_dgme")


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project, "the version must be written only in bayes_dgme/__init__.py"
    assert "version" in project["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "bayes_dgme/__init__.py"
    init = (ROOT / "bayes_dgme" / "__init__.py").read_text(encoding="utf-8")
    assert init.count("__version__ =") == 1


def test_dask_is_an_extra_and_not_imported():
    deps = " ".join(PYPROJECT["project"]["dependencies"]).lower()
    assert "dask" not in deps and "distributed" not in deps
    assert any("dask[distributed]" in d for d in PYPROJECT["project"]["optional-dependencies"]["dask"])
    # the `test` extra pulls it in, so CI runs the Dask tests
    assert any("dask" in d for d in PYPROJECT["project"]["optional-dependencies"]["test"])
    code = "import sys, bayes_dgme as bd; bd.load_scenario('d1_exact'); print(any(m.split('.')[0] in ('dask', " \
           "'distributed') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", "importing bayes_dgme must not import Dask"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel and an sdist built from the working tree by hatchling's PEP 517 hooks."""
    backend = pytest.importorskip("hatchling.build", reason="hatchling (the build backend) is in the test extra")
    out = tmp_path_factory.mktemp("dist")
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        wheel = out / backend.build_wheel(str(out))
        sdist = out / backend.build_sdist(str(out))
    finally:
        os.chdir(cwd)
    return wheel, sdist


def test_wheel_contents(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
        license_files = [n for n in names if "/licenses/" in n]
        license_text = zf.read(license_files[0]).decode() if license_files else ""
    assert "bayes_dgme/py.typed" in names
    assert "MIT License" in license_text, license_files
    for name in SCENARIOS:
        assert f"bayes_dgme/models/{name}" in names, name
    assert meta["Version"] == bayes_dgme.__version__
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist")
    dask = [r for r in requires if r.lower().startswith("dask")]
    assert dask and all("extra ==" in r for r in dask), dask
    assert not any(n.startswith(("tests/", "docs/", "site/")) for n in names)
    # every file of the package ships: modules, data sets, the type marker
    package = ROOT / "bayes_dgme"
    files = [p.relative_to(ROOT).as_posix() for p in package.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    missing = sorted(set(files) - names)
    assert not missing, f"not in the wheel: {missing}"


def test_sdist_contents(built):
    _, sdist = built
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for want in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "bayes_dgme/py.typed",
                 *(f"models/{s}" for s in SCENARIOS)):
        assert want in names, want
    assert not any(n.startswith((".venv/", "site/")) for n in names)
