# Two commands: `make demo` (the main job on built-in data) and `make test` (lint, then the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install dev-install lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime install (marker file so reruns are instant).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# torch is pinned to the local CPU wheel first, so nothing pulls a CUDA build.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev-install: $(VENV)/.installed-dev

# The dev extra brings the MONAI U-Net the demo compares LNFM with.
demo: $(VENV)/.installed-dev
	$(BIN)/python -m lnfm demo --out $(DEMO_DIR)

# Lint first: a layering or style break fails fast, before the suite runs. The second pytest run is
# a user's fresh clone: the tests that depend on ../shared/data again, with it hidden. Both runs share
# one JAX compilation cache (tests/conftest.py makes one per run otherwise), so the second compiles
# nothing the first already did; it is removed afterwards, and a cache set by the caller is kept.
test: lint
	@set -e; cache="$${JAX_COMPILATION_CACHE_DIR:-$$(mktemp -d /tmp/lnfm-tests-jax-cache-XXXXXX)}"; \
	[ -n "$$JAX_COMPILATION_CACHE_DIR" ] || trap 'rm -rf "$$cache"' EXIT; \
	export JAX_COMPILATION_CACHE_DIR="$$cache"; \
	echo "$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)"; \
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS); \
	echo "LNFM_SHARED_DATA= $(BIN)/python -m pytest -n 2 -m shared $(PYTEST_ARGS)"; \
	LNFM_SHARED_DATA= $(BIN)/python -m pytest -n 2 -m shared $(PYTEST_ARGS)

# ruff, and the import-layer contracts of pyproject.toml ([tool.importlinter]).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check lnfm tests data_prep pretrain finetune launch bench
	$(BIN)/lint-imports

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
