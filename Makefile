PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest

demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	$(BIN)/python -m dropblock_jax.demo

bench: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/resnet.py

clean:
	rm -rf $(VENV) demo_output build *.egg-info
