"""Sphinx configuration of the dropblock_jax documentation site.

Build it with ``make docs`` (the HTML lands in ``docs/_build/html``). The Markdown pages
of ``docs/`` are the site's pages, as they are on GitHub; the API reference comes from
the docstrings; the notebooks of ``notebooks/`` are executed during the build. The build
needs no network: no intersphinx inventory is fetched.
"""

import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

# Set before the notebook kernels start (they inherit this environment) and before
# Keras is imported by autodoc. The notebooks compile many small programs: LLVM's
# optimization passes dominate their compile time on CPU and change neither the random
# bits nor the printed results (the test suite runs with the same flag).
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
# The Keras layer runs on the JAX backend only; Keras reads this when first imported.
os.environ.setdefault("KERAS_BACKEND", "jax")
# jupyter_core warns (an error under -W) unless it is told to use the platformdirs paths.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
# A non-interactive backend inherited from a shell would turn every plt.show() of the
# notebooks into a warning and no picture; the kernel's inline backend draws them.
if os.environ.get("MPLBACKEND", "").lower() == "agg":
    del os.environ["MPLBACKEND"]

import dropblock_jax  # noqa: E402

project = "dropblock-jax"
author = "The dropblock_jax Authors"
copyright = "2026, The dropblock_jax Authors"
release = dropblock_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "public_api",
    "signatures",
]

# The notebooks live in notebooks/ at the top of the repository, where GitHub shows
# them with their stored outputs. Sphinx reads only files under its source directory,
# so each build copies them into docs/notebooks/ (git-ignored); a file is rewritten only
# when it changed, so an incremental build rereads only what changed.
NOTEBOOKS_SOURCE = ROOT / "notebooks"
NOTEBOOKS_COPY = DOCS / "notebooks"
NOTEBOOKS_COPY.mkdir(exist_ok=True)
for _stale in NOTEBOOKS_COPY.glob("*.ipynb"):
    if not (NOTEBOOKS_SOURCE / _stale.name).exists():
        _stale.unlink()
for _notebook in sorted(NOTEBOOKS_SOURCE.glob("*.ipynb")):
    _copy = NOTEBOOKS_COPY / _notebook.name
    if not _copy.exists() or _copy.read_bytes() != _notebook.read_bytes():
        shutil.copyfile(_notebook, _copy)

root_doc = "index"
exclude_patterns = ["_build", "_templates", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# Warnings are errors (make docs passes -W, Read the Docs fail_on_warning) and every
# reference must resolve, in every build, whatever the command line. The only exceptions
# are the types of the standard library, NumPy, JAX, Flax, Equinox and Keras that the signatures
# name: their references resolve only through intersphinx inventories downloaded from
# those projects' sites, and this build downloads nothing. They are matched by package
# rather than one by one because the private modules that define them (jax.Array lives
# in jax.jaxlib._jax today) move between releases; a reference to a misspelt name of
# this package still fails.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"collections\.abc\.\w+"),
    ("py:class", r"(jax|jaxlib)\..+"),
    ("py:class", r"flax\..+"),
    ("py:class", r"equinox\..+"),
    ("py:class", r"keras\..+"),
    ("py:class", r"numpy\..+"),
]

# MyST: Markdown pages with colon fences, dollar math and heading anchors, so that
# links such as [text](arguments.md#block-alignment) resolve.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# myst-nb executes every notebook on every build (its stored outputs are replaced), so the
# site shows what the current code draws; an error, or anything written to stderr (a
# warning), fails the build under -W.
nb_execution_mode = "force"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = "warn"
nb_merge_streams = True

# autodoc: signatures in full, types in the signature, members in source order.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike"}
autosummary_generate = True
autosummary_imported_members = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The dataclass fields' types are in the signature already, where the ArrayLike alias
# holds; an Attributes section would spell the whole union out.
napoleon_attr_annotations = False

html_theme = "sphinx_book_theme"
html_title = f"dropblock-jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []

# The modules whose every public name the API reference must document (checked by
# docs/_ext/public_api.py; a missing one fails the build).
public_api_modules = [
    "dropblock_jax",
    "dropblock_jax.nnx",
    "dropblock_jax.equinox",
    "dropblock_jax.models",
    "dropblock_jax.keras",
]
