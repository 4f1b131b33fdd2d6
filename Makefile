# Two commands: `make demo` (the main job on built-in data) and `make test` (lint, then the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install dev-install lint clean onednn

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime install (marker file so reruns are instant).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# oneDNN's 3D convolutions for JAX on the CPU (lnfm/models/onednn.py), built where the system has
# oneDNN (libdnnl-dev); a no-op once built for this source and jaxlib. A root shell with apt-get
# installs libdnnl-dev first; ONEDNN=0 skips both.
ONEDNN ?= 1
onednn: $(VENV)/.installed
	@if [ "$(ONEDNN)" = 1 ]; then \
	  if ! echo '#include <dnnl.hpp>' | $${CXX:-g++} -E -x c++ - -o /dev/null 2>/dev/null \
	     && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "apt-get install libdnnl-dev"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libdnnl-dev >/dev/null \
	      || echo "libdnnl-dev not installed: 3D convolutions keep XLA's forms"; \
	  fi; \
	  $(BIN)/python -m lnfm.models.onednn build --if-available; \
	fi

# torch is pinned to the local CPU wheel first, so nothing pulls a CUDA build.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed onednn
dev-install: $(VENV)/.installed-dev onednn

# The dev extra brings the MONAI U-Net the demo compares LNFM with.
demo: $(VENV)/.installed-dev onednn
	$(BIN)/python -m lnfm demo --out $(DEMO_DIR)

# Lint first: a layering or style break fails fast, before the suite runs. The second pytest run is
# a user's fresh clone: the tests that depend on ../shared/data again, with it hidden. Both runs share
# one JAX compilation cache (tests/conftest.py makes one per run otherwise), so the second compiles
# nothing the first already did; it is removed afterwards, and a cache set by the caller is kept.
test: lint onednn
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
