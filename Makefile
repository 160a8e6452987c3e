# Set-up and entry points. Each target creates the virtual environment on first use and
# installs only what it needs (stamp files in the venv; any order works from a fresh clone).
#   make tour   - the main job: a curvature analysis of a CNN on scikit-learn's digits
#   make test   - lint + the full test suite (what CI runs)
#   make bench  - the CPU benchmark suite (writes benchmarks/RESULTS.md)
#   make docs   - the documentation site (mkdocs, strict)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on the project's machines this resolves to a local CPU wheel in seconds.
TORCH ?= torch==2.13.0
# extras of the development set-up (make test, docs, bench)
DEV_EXTRAS ?= tour,test,docs

# the bare venv with torch
$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	touch $@

# what `curvops tour` needs: the package and its `tour` extra
$(VENV)/.tour: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[tour]"
	touch $@

# everything for tests, docs and benchmarks
$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[$(DEV_EXTRAS)]"
	touch $@

.PHONY: install tour test bench docs
install: $(VENV)/.dev

tour: $(VENV)/.tour
	$(VENV)/bin/curvops tour --out curvops-tour

test: $(VENV)/.dev
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest

bench: $(VENV)/.dev
	$(PY) -m benchmarks

docs: $(VENV)/.dev
	$(VENV)/bin/mkdocs build --strict
