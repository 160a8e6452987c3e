# Set-up and entry points. Each target creates the virtual environment on first use.
#   make tour   - the main job: a curvature analysis of a CNN on scikit-learn's digits
#   make test   - lint + the full test suite (what CI runs)
#   make bench  - the CPU benchmark suite (writes benchmarks/RESULTS.md)
#   make docs   - the documentation site (mkdocs, strict)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on the project's machines this resolves to a local CPU wheel in seconds.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,tour,docs]"
	touch $@

.PHONY: install tour test bench docs
install: $(VENV)/.installed

tour: $(VENV)/.installed
	$(VENV)/bin/curvops tour --out curvops-tour

test: $(VENV)/.installed
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m benchmarks

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict
