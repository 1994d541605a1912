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

# The newest-version suite is two pytest processes, so that make -j2 spreads it over two
# cores with the minimum-version suite and the documentation site: the modules that
# launch programs in subprocesses (the ImageNet example's trainings, the demo, the
# benchmarks, several processes of a pod, a wheel built and installed), which run one at a
# time so that the processes of one launch never wait on those of another; and every other
# module, new ones included. Together they collect what a plain `pytest` collects.
LAUNCH_TESTS := $(wildcard tests/test_imagenet*.py) tests/test_demo.py tests/test_benchmarks.py \
	tests/test_multihost.py tests/test_sharding.py tests/test_packaging.py tests/test_docs.py

# What ruff lints and format-checks; the notebooks and Markdown pages are checked by running them.
LINT_PATHS := dropblock_jax tests benchmarks examples conftest.py docs

# pip byte-compiles every module it installs, most of which no test imports: Python
# compiles (and caches) the ones that are imported instead.
PIP_INSTALL := -m pip install --quiet --no-compile --progress-bar off
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test test-deps test-deps-min test-env test-env-min lint test-latest test-latest-launches \
	test-latest-others test-min docs docs-env docs-build notebooks demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP_INSTALL) --upgrade pip

$(MIN_BIN)/python:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/python $(PIP_INSTALL) --upgrade pip

# The installs take two steps. First what '.[test]' requires, read from pyproject.toml
# (its own extras expanded), which both environments download and install at once;
# then the package itself, editable, one environment after the other: that step writes
# the package's build metadata into the source tree, and finds everything else installed.
# The linters run next (seconds, so a lint error fails before the suites start). The
# suites then run two at a time, the longest first, and the documentation site (which
# executes the notebooks) when a core frees; more at once would have the processes of a
# multi-process test time out waiting for each other. Each prints its output when it
# ends, and make test ends by printing pytest's summary line of every suite again.
test:
	$(MAKE) --no-print-directory --output-sync=target -j2 test-env test-env-min lint
	@logs=$$(mktemp -d); \
	$(MAKE) --no-print-directory --output-sync=target -k -j2 LANE_LOGS=$$logs test-latest test-min docs-build; \
	status=$$?; \
	for suite in test-latest-launches test-latest-others test-min; do \
		if [ -s $$logs/$$suite ]; then echo "$$suite:"; tail -n 1 $$logs/$$suite; fi; \
	done; \
	rm -rf $$logs; exit $$status

define TEST_REQUIREMENTS
import re, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()
extras, seen, requirements = ["test"], set(), list(project["dependencies"])
while extras:
    extra = extras.pop()
    if extra not in seen:
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            name, wanted = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement).groups()
            if canonical(name) == canonical(project["name"]):
                extras += [e.strip() for e in (wanted or "").split(",") if e.strip()]
            else:
                requirements.append(requirement)
print("\n".join(requirements))
endef

test-deps test-deps-min: export TEST_REQUIREMENTS := $(TEST_REQUIREMENTS)

test-deps: $(BIN)/python
	$(BIN)/python -c "$$TEST_REQUIREMENTS" > $(VENV)/test-requirements.txt
	$(BIN)/python $(PIP_INSTALL) -r $(VENV)/test-requirements.txt

test-deps-min: $(MIN_BIN)/python
	$(MIN_BIN)/python -c "$$TEST_REQUIREMENTS" > $(MIN_VENV)/test-requirements.txt
	$(MIN_BIN)/python $(PIP_INSTALL) --constraint requirements-min.txt -r $(MIN_VENV)/test-requirements.txt

test-env: test-deps
	$(BIN)/python $(PIP_INSTALL) -e '.[test]'

# After test-env when both are asked for: two builds at once would write the same files.
test-env-min: test-deps-min $(filter test-env,$(MAKECMDGOALS))
	$(MIN_BIN)/python $(PIP_INSTALL) --constraint requirements-min.txt -e '.[test]'

# ruff: lint and format check; mypy: the types of dropblock_jax (configured in pyproject.toml).
lint: test-env
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Under make test, a suite's output also goes to a file, whose last line is pytest's summary.
ifdef LANE_LOGS
keep_log = > $(LANE_LOGS)/$@ 2>&1; status=$$?; cat $(LANE_LOGS)/$@; exit $$status
endif

test-latest: test-latest-launches test-latest-others

test-latest-launches:
	$(BIN)/python -m pytest $(LAUNCH_TESTS) $(keep_log)

test-latest-others:
	$(BIN)/python -m pytest $(addprefix --ignore=,$(LAUNCH_TESTS)) $(keep_log)

test-min:
	$(MIN_BIN)/python -m pytest $(MIN_TESTS) $(keep_log)

# The documentation site, in docs/_build/html (open index.html). docs-build runs the notebooks;
# -W: a warning is an error (conf.py makes every reference one that must resolve),
# --keep-going: all of them are listed.
docs: docs-env
	$(MAKE) --no-print-directory docs-build

docs-env: $(BIN)/python
	$(BIN)/python $(PIP_INSTALL) -e '.[docs]'

docs-build:
	rm -rf docs/_build docs/_autosummary
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Runs the notebooks and stores them with their outputs (the pictures GitHub shows).
notebooks: docs-env
	$(BIN)/python docs/execute_notebooks.py

demo: $(BIN)/python
	$(BIN)/python $(PIP_INSTALL) -e '.[demo]'
	$(BIN)/python -m dropblock_jax.demo

bench: $(BIN)/python
	$(BIN)/python $(PIP_INSTALL) -e '.[test]'
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/resnet.py

clean:
	rm -rf $(VENV) $(MIN_VENV) demo_output build dist *.egg-info docs/_build docs/_autosummary docs/notebooks
