"""The sdist and the wheel build, hold what they should, and the wheel runs on its own.

Every ``pip install`` line in the repository works today: the package is not on a package
index, so none installs it from one by name, and extras are quoted (zsh expands ``[...]``).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import PYPROJECT, ROOT

# Builds and installs the wheel: newest versions only (make test-min leaves it out).
pytestmark = pytest.mark.launches
PACKAGE = "dropblock_jax"
DISTRIBUTION = "dropblock-jax"
# The command after ``pip install``, up to the end of its line, code span or string.
INSTALL_COMMAND = re.compile(r"\bpip3? install\b([^\n`]*)")
# A shell word: quoted parts and unquoted characters (a lone quote, which closes the string
# the command is written in, is no part of it).
WORD = re.compile(r"""(?:'[^']*'|"[^"]*"|[^\s'"])+""")
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# Options of pip install that take a value, and those whose value is a requirements file.
OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--python",
    "--prefix",
    "--root",
    "--src",
    "--platform",
}
REQUIREMENT_FILE_OPTIONS = {"-r", "--requirement"}
SCANNED_SUFFIXES = {".md", ".py", ".ipynb", ".txt", ".rst", ".toml", ".cfg", ".yml", ".yaml", ".sh"}


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
    # examples/train.py imports the ImageNet example's pod package.
    assert {"examples/imagenet/__init__.py", "examples/imagenet/pod/__init__.py"} <= names
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
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile", wheel)
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
    # The ImportError names a way to get Equinox that works (see the install line check below).
    assert "needs Equinox" in result.stdout and INSTALL_COMMAND.search(result.stdout), result.stdout
    assert not install_line_problems(result.stdout), result.stdout


def _is_local(target: str) -> bool:
    """A path, a wheel or sdist file, or a URL: pip installs it without asking an index by name."""
    return target.startswith((".", "/", "~", "$")) or "/" in target or target.endswith((".whl", ".tar.gz", ".zip"))


def _names_the_package_from_the_index(text: str) -> bool:
    try:
        requirement = Requirement(text)
    except ValueError:
        return False
    return requirement.name.lower().replace("_", "-") == DISTRIBUTION and requirement.url is None


def install_line_problems(text: str, root: pathlib.Path = ROOT) -> list[str]:
    """What is wrong with each ``pip install`` command in ``text``."""
    problems = []
    for match in INSTALL_COMMAND.finditer(text):
        command = re.split(r"&&|\|\||;|\s#", match.group(1))[0]
        words = WORD.findall(command)
        installs_a_local_copy = False
        requirement_files = []
        expects_value = None
        for word in words:
            unquoted = QUOTED.sub("", word)
            if "[" in unquoted:
                problems.append(f"{match.group(0).strip()!r}: quote {word} (zsh expands [...])")
            target = word.replace("'", "").replace('"', "").replace("\\", "")
            if target not in (".", ".."):  # the end of a sentence or a call, not a path
                target = target.rstrip(".,:;)")
            if expects_value:
                if expects_value in REQUIREMENT_FILE_OPTIONS:
                    requirement_files.append(target)
                expects_value = None
                continue
            if target.startswith("-"):
                option = target.split("=", 1)[0]
                if option in REQUIREMENT_FILE_OPTIONS | OPTIONS_WITH_VALUE and "=" not in target:
                    expects_value = option
                elif option in REQUIREMENT_FILE_OPTIONS:
                    requirement_files.append(target.split("=", 1)[1])
                continue
            if _is_local(target):
                installs_a_local_copy = True
            elif _names_the_package_from_the_index(target):
                problems.append(f"{match.group(0).strip()!r}: {DISTRIBUTION} is not on PyPI")
        for name in requirement_files:
            path = root / name
            if not path.is_file():
                problems.append(f"{match.group(0).strip()!r}: no requirements file {name}")
                continue
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if _names_the_package_from_the_index(line) and not installs_a_local_copy:
                    problems.append(f"{match.group(0).strip()!r}: {name} asks PyPI for {line}, where it is not")
    return problems


def _scanned_text(path: pathlib.Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n".join("".join(cell["source"]) for cell in cells)
    return path.read_text()


def _scanned_files() -> list[pathlib.Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    paths = [ROOT / name for name in listed if name]
    return [p for p in paths if p.is_file() and (p.suffix in SCANNED_SUFFIXES or p.name == "Makefile")]


def test_every_install_line_in_the_repository_works_today():
    files = _scanned_files()
    assert {"README.md", "Makefile", "pyproject.toml"} <= {p.name for p in files}
    problems = [
        f"{path.relative_to(ROOT)}:{_scanned_text(path)[: match.start()].count(chr(10)) + 1}: {problem}"
        for path in files
        for match in INSTALL_COMMAND.finditer(_scanned_text(path))
        for problem in install_line_problems(match.group(0))
    ]
    assert not problems, "\n".join(problems)


PIP = "pip" + " install"  # spelt in two so that this file holds no install line of its own


def test_the_install_line_check_tells_working_lines_from_broken_ones(tmp_path):
    (tmp_path / "bare.txt").write_text(f"optax>=0.2\n{DISTRIBUTION}  # the package\n")
    (tmp_path / "others.txt").write_text("optax>=0.2\n")
    working = [
        f"{PIP} .",
        f"{PIP} '.[keras]'",
        f'python -m {PIP} --quiet -e ".[docs]"',
        f"{PIP} dist/dropblock_jax-*.whl -r bare.txt && python train.py",
        f"{PIP} -U 'jax[tpu]' . -r bare.txt",
        f"{PIP} -r others.txt",
        f"`{PIP} 'equinox>=0.13.1'`",
        f"{PIP} '{DISTRIBUTION}[keras] @ git+https://example.org/dropblock_jax.git'",
        f"{PIP} jax  # not {DISTRIBUTION}[keras]",
    ]
    broken = [
        f"{PIP} {DISTRIBUTION}",
        f"{PIP} -U {PACKAGE}",
        f"`{PIP} '{DISTRIBUTION}[demo]'`.",
        f'raise ImportError("needs Keras: {PIP} {DISTRIBUTION}[keras]")',
        f"{PIP} '.[keras]' jax[tpu]",
        f"{PIP} -r bare.txt",
        f"{PIP} --requirement=bare.txt",
        f"{PIP} -r missing.txt",
    ]
    assert {line: install_line_problems(line, tmp_path) for line in working} == {line: [] for line in working}
    assert all(install_line_problems(line, tmp_path) for line in broken), {
        line: install_line_problems(line, tmp_path) for line in broken
    }
