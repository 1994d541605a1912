PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A second environment pinned to the minimum versions pyproject.toml declares.
MIN_VENV := .venv-min
MIN_BIN := $(MIN_VENV)/bin
MIN_TESTS := tests/test_functional.py tests/test_linen.py tests/test_nnx.py tests/test_mask.py \
	tests/test_errors.py tests/test_api.py tests/test_statistics.py tests/test_equinox.py \
	tests/test_random.py tests/test_lowering.py tests/test_keras.py tests/test_stable_masks.py \
	tests/test_properties.py

# What ruff lints and format-checks; the notebooks and Markdown pages are checked by running them.
LINT_PATHS := dropblock_jax tests benchmarks examples conftest.py docs

.PHONY: test test-env test-env-min lint test-latest test-min docs docs-env docs-build notebooks demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(MIN_BIN)/python:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/python -m pip install --quiet --upgrade pip

# The installs run one after the other (both write the package's build metadata into the
# source tree), then the linters (seconds, so a lint error fails before the suites start);
# the two suites then run side by side, each printing when it ends: a pytest process leaves
# much of a second core idle. The documentation site (which executes the notebooks) is
# built on whichever lane frees first.
test: test-env test-env-min lint
	$(MAKE) --no-print-directory --output-sync=target -j2 test-latest test-min docs-build

test-env: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

test-env-min: $(MIN_BIN)/python
	$(MIN_BIN)/python -m pip install --quiet --constraint requirements-min.txt -e '.[test]'

# ruff: lint and format check; mypy: the types of dropblock_jax (configured in pyproject.toml).
lint: test-env
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test-latest:
	$(BIN)/python -m pytest

test-min:
	$(MIN_BIN)/python -m pytest $(MIN_TESTS)

# The documentation site, in docs/_build/html (open index.html). docs-build runs the notebooks;
# -W: a warning is an error (conf.py makes every reference one that must resolve),
# --keep-going: all of them are listed.
docs: docs-env
	$(MAKE) --no-print-directory docs-build

docs-env: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'

docs-build:
	rm -rf docs/_build docs/_autosummary
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Runs the notebooks and stores them with their outputs (the pictures GitHub shows).
notebooks: docs-env
	$(BIN)/python docs/execute_notebooks.py

demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	$(BIN)/python -m dropblock_jax.demo

bench: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/resnet.py

clean:
	rm -rf $(VENV) $(MIN_VENV) demo_output build dist *.egg-info docs/_build docs/_autosummary docs/notebooks
