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

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/npbml demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check npbml tasks scripts tests

test: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
