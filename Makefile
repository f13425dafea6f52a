# Two entry points for a fresh machine: `make demo` (main job) and `make test` (lint + tests).
# Both create .venv when missing. torch is installed from TORCH_SPEC only when the venv cannot
# import it; the default pins the CPU wheel this project is developed against. On a machine whose
# PyPI would resolve that pin to a CUDA build, override it, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=
# `make test` ends with the learn2learn integration tests (tests/l2l), run in a separate venv that
# scripts/install_learn2learn.sh builds once per machine in L2L_VENV (outside the clone) and reuses
# while its stamp is current; the clone goes on PYTHONPATH, it is never installed into that venv.
# They are a required part of `make test` (a failed build fails it); `make test L2L=0` skips them
# for a quick local run.
L2L ?= 1
L2L_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/npbml/venv-l2l

.PHONY: setup demo test test-l2l lint structure typecheck bench clean check-wheel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/npbml demo $(DEMO_ARGS)

# Build the wheel, install it into a temporary venv (reusing .venv's torch) and run a short demo
# from a temporary folder: the demo must not need the checkout (scripts/check_wheel.sh, ~40 s;
# part of `make test`).
check-wheel: setup
	scripts/check_wheel.sh $(BIN)/python

lint: setup
	$(BIN)/ruff check npbml tasks scripts tests

# Structure: import-linter's contracts (.importlinter: no import cycles among the modules and
# packages of npbml/ and tasks/, function-level imports included; library code never imports a
# driver; tasks/ never npbml) and no function over 80 lines (scripts/tools/function_length.py).
structure: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/tools/function_length.py --max 80 npbml tasks

# Static types of npbml/ and tasks/ ([tool.mypy] in pyproject.toml); part of `make test`.
typecheck: setup
	$(BIN)/mypy

# NPBML_REQUIRE_DATA=1: a test skipped for missing data fails instead (tests/conftest.py); every
# real-data test reads the Omniglot zips bundled with the package, so nothing may skip for data.
test: setup lint structure typecheck
	NPBML_REQUIRE_DATA=1 $(BIN)/python -m pytest -q --ignore=tests/l2l
	@$(MAKE) --no-print-directory check-wheel
ifeq ($(L2L),0)
	@echo "make test: SKIPPED the learn2learn tests (tests/l2l) because L2L=0; CI runs them"
else
	@$(MAKE) --no-print-directory test-l2l
endif

# The shared flock on the venv's folder keeps a concurrent job from rebuilding it under the tests.
test-l2l:
	@L2L_INSTALL_PROJECT=0 PYTHON="$(PYTHON)" scripts/install_learn2learn.sh "$(L2L_VENV)" || { \
	  echo "make test: ERROR: building the learn2learn venv $(L2L_VENV) failed (failed step above)." >&2; \
	  echo "  tests/l2l are a required part of make test: fix the build (docs/learn2learn.md), or skip" >&2; \
	  echo "  them for a local run with: make test L2L=0" >&2; exit 1; }
	NPBML_REQUIRE_DATA=1 PYTHONPATH="$(CURDIR)" $$(command -v flock >/dev/null && echo flock -s "$(dir $(L2L_VENV))") \
	  "$(L2L_VENV)/bin/python" -m pytest -q tests/l2l

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
