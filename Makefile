# Single entry point. Every target bootstraps the virtual environment in .venv on first use.
#   make demo   - the main job on the built-in synthetic data
#   make test   - the default test suite (what CI runs first)
#   make test-slow - the slower end-to-end tests (CI runs them too)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-all demo lint bench clean-venv help

help:
	@echo "make setup      create .venv and install the toolkit with its dev extras (+ system libs)"
	@echo "make demo       run the main job on the built-in synthetic data (outputs in runs/demo)"
	@echo "make test       run the default test suite"
	@echo "make test-slow  run the slow end-to-end tests"
	@echo "make lint       ruff check"
	@echo "make bench      run the benchmark suite (bench/)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m shared.sysdeps
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Exit code 5 = no test selected, which is fine for the optional slow subset only.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
