# make test: the linters, the whole suite at the newest versions, the suite at the minimum
# versions pyproject.toml declares, the documentation site. Each step installs what it needs.
PYTHON ?= python3
# The extras the tests use; the tools come from pyproject.toml's [dependency-groups].
EXTRAS := equinox,keras,demo,docs,imagenet
# What ruff lints and format-checks; the notebooks and Markdown pages are checked by running them.
LINT_PATHS := dropblock_jax tests benchmarks examples conftest.py docs
# pip byte-compiles every module it installs, most of which no test imports: Python
# compiles (and caches) the ones that are imported instead.
PIP_INSTALL := -m pip install --quiet --no-compile --progress-bar off
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Two pytest-xdist workers, one a core; each module runs on one worker, so that its
# fixtures (a wheel, a ResNet-50, the example's trainings) are built once.
PYTEST_WORKERS := -n 2 --dist loadscope

.PHONY: test test-env test-env-min lint test-latest test-min docs notebooks demo bench clean

test: lint test-latest test-min docs

# .venv: the newest releases. --group needs pip >= 25.1, which the first step installs.
.venv/bin/python:
	$(PYTHON) -m venv .venv
	.venv/bin/python $(PIP_INSTALL) --upgrade pip

test-env: .venv/bin/python
	.venv/bin/python $(PIP_INSTALL) --group test --group lint -e '.[$(EXTRAS)]'

# .venv-min: the minimum versions of the runtime dependencies and of the layers' extras,
# pinned in requirements-min.txt.
.venv-min/bin/python:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python $(PIP_INSTALL) --upgrade pip

test-env-min: .venv-min/bin/python
	.venv-min/bin/python $(PIP_INSTALL) --constraint requirements-min.txt --group test -e '.[$(EXTRAS)]'

# ruff: lint and format check; mypy: the types of dropblock_jax (configured in pyproject.toml).
lint: test-env
	.venv/bin/ruff check $(LINT_PATHS)
	.venv/bin/ruff format --check $(LINT_PATHS)
	.venv/bin/mypy

test-latest: test-env
	.venv/bin/python -m pytest $(PYTEST_WORKERS)

# Every test but those that run the repository's programs (marked launches): the demo,
# the benchmarks and the examples have their own requirements, not the package's minimums.
test-min: test-env-min
	.venv-min/bin/python -m pytest $(PYTEST_WORKERS) -m 'not launches'

# The documentation site, in docs/_build/html (open index.html); it executes the notebooks.
# -W: a warning is an error (conf.py makes every reference one that must resolve),
# --keep-going: all of them are listed.
docs: test-env
	rm -rf docs/_build docs/_autosummary
	.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Runs the notebooks and stores them with their outputs (the pictures GitHub shows).
notebooks: test-env
	.venv/bin/python docs/execute_notebooks.py

demo: .venv/bin/python
	.venv/bin/python $(PIP_INSTALL) -e '.[demo]'
	.venv/bin/python -m dropblock_jax.demo

bench: .venv/bin/python
	.venv/bin/python $(PIP_INSTALL) -e '.[demo]'
	.venv/bin/python benchmarks/bench.py
	.venv/bin/python benchmarks/resnet.py

clean:
	rm -rf .venv .venv-min demo_output build dist *.egg-info docs/_build docs/_autosummary docs/notebooks
