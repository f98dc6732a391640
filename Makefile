# sftjob — everything a newcomer needs: `make demo`, `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup tools demo test test-fast lint bench schema clean

setup: $(STAMP)

# torch first (its CPU wheel), then DeepSpeed and the rest from the runtime + dev lockfiles without compiling
# ops, then the package itself (editable: `sftjob --version` reads its metadata). The image installs the runtime
# lockfile only, plus its CUDA pins (requirements-cuda13.lock / requirements-cuda12.lock).
$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$$(grep -E '^torch==' requirements.lock)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# helm, kubernetes-validate, checkov, hadolint, hera: pinned, into tools/bin + tools/venv (idempotent).
tools:
	PY=$(PY) bash tools/install.sh

demo: setup
	$(BIN)/sftjob demo

# The suite in TEST_WORKERS processes (pytest-xdist): much of it waits (on subprocesses, the store, a watchdog,
# a grace period), so more workers than cores pays (measured: the heaviest 99 tests, 2,443 s serially, took
# 1,512 s in 3 workers on 2 cores). A module stays on one worker (--dist loadscope: its module-scoped
# fixtures are built once), the longest first (tests/timings.json, tests/conftest.py).
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: setup tools
	$(BIN)/python -m pytest -q -ra --durations=20 $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check job tests bench

bench: setup
	$(BIN)/python bench/prep.py
	$(BIN)/python bench/s3.py

schema: setup
	$(BIN)/sftjob schema --helm > charts/sftjob/values.schema.json
	$(BIN)/sftjob schema --markdown > docs/knobs.md
	$(BIN)/sftjob schema --chart-readme > charts/sftjob/README.md

clean:
	rm -rf $(VENV) demo-out .pytest_cache build *.egg-info
