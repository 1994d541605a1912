"""The sdist and the wheel build, hold what they should, and the wheel runs on its own."""

import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE = "dropblock_jax"


def _run(*command, timeout=300, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist, and the wheel built from it (``python -m build``'s default)."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_the_wheel_holds_the_package_and_nothing_else(dist):
    _, wheel = dist
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = PYPROJECT["project"]["name"].replace("-", "_") + "-"
    assert all(n.startswith((f"{PACKAGE}/", dist_info)) for n in names), names
    for module in ["__init__.py", "py.typed", "linen.py", "nnx.py", "equinox.py", "demo/__main__.py"]:
        assert f"{PACKAGE}/{module}" in names
    folders = ("tests/", "notebooks/", "benchmarks/", "docs/")
    unwanted = [n for n in names if any(f in n for f in folders) or "conftest" in n]
    unwanted += [n for n in names if n.endswith((".ipynb", ".png", ".jpg"))]
    assert not unwanted
    # The license travels with the wheel, named in its metadata.
    (license_file,) = [n for n in names if n.startswith(dist_info) and n.endswith("/licenses/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()
    (metadata,) = [n for n in names if n.startswith(dist_info) and n.endswith("/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_the_sdist_holds_the_sources(dist):
    sdist, _ = dist
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for name in ["pyproject.toml", "README.md", "LICENSE", f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed"]:
        assert name in names
    assert {"examples/train.py", "examples/requirements.txt"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_examples_are_in_the_sdist_only(dist):
    _, wheel = dist
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if "examples/" in n]


def test_the_minimum_pins_are_the_declared_minimums():
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = PYPROJECT["project"]["dependencies"] + extras["equinox"] + extras["keras"]
    pins = [
        Requirement(line)
        for line in (ROOT / "requirements-min.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pinned = {r.name: Version(next(iter(r.specifier)).version) for r in pins}
    lower_bounds = {}
    for requirement in map(Requirement, declared):
        (spec,) = requirement.specifier
        assert spec.operator == ">=", requirement
        lower_bounds[requirement.name] = Version(spec.version)
    assert pinned == lower_bounds


def test_the_wheel_installs_and_runs_with_only_the_runtime_dependencies(dist, tmp_path):
    _, wheel = dist
    env = tmp_path / "env"
    _run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    # The test environment's pip installs into the fresh one: the wheel and what its
    # metadata requires, no extras.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel)
    check = textwrap.dedent(
        f"""
        import importlib.util
        import jax, jax.numpy as jnp
        import {PACKAGE}, {PACKAGE}.linen, {PACKAGE}.nnx
        assert "site-packages" in {PACKAGE}.__file__, {PACKAGE}.__file__
        for extra in ["equinox", "pytest", "sklearn", "matplotlib", "nbclient"]:
            assert importlib.util.find_spec(extra) is None, extra
        y = {PACKAGE}.drop_block(jax.random.key(0), jnp.ones((2, 8, 8, 3)), 0.8, 3)
        assert y.shape == (2, 8, 8, 3) and bool((y == 0).any())
        try:
            import {PACKAGE}.equinox
        except ImportError as error:
            print(error)
        """
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = _run(python, "-c", check, cwd=tmp_path, env=clean)
    assert "pip install dropblock-jax[equinox]" in result.stdout
