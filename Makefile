# cspine-triage: `make run` starts the service, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip

.PHONY: run test test-gpu lint typecheck demo bench audit-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The stamps depend on pyproject.toml so a changed dependency list reinstalls.
$(VENV)/.runtime-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev,train]'
	touch $@ $(VENV)/.runtime-installed

run: $(VENV)/.runtime-installed
	$(BIN)/triage db upgrade
	$(BIN)/triage serve

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The `gpu` tests (CUDA execution provider), which `make test` deselects where there is none:
# on a GPU machine with onnxruntime-gpu installed in the venv.
test-gpu: $(VENV)/.dev-installed
	TEST_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check service tests models bench harness setup.py
	$(BIN)/mypy

demo: $(VENV)/.runtime-installed
	$(BIN)/triage demo generate --studies 4 --seed 1 --out var/demo

bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench.run_all

# Known vulnerabilities in the installed dependencies. Needs the network (PyPI's advisory data
# or OSV); --strict fails when a package could not be audited, so an offline run is not green.
audit-deps: $(VENV)/.dev-installed
	$(BIN)/pip-audit --strict --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) var .pytest_cache
