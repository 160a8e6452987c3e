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
# laplace-torch, for the tests of curvops.integrations.laplace (docs/laplace.md, "Installation"):
# its declared dependencies include torchvision, whose PyPI wheels do not import beside a CPU
# build of torch, and torchmetrics imports torchvision whenever it is installed. laplace-torch
# imports no torchvision itself, so it and the backends it imports go in without dependencies,
# followed by the dependencies they do import.
LAPLACE_NO_DEPS := laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 \
	curvlinops-for-pytorch==3.0.1
LAPLACE_DEPS := "opt-einsum>=3.3" "torchmetrics>=1.0" "einops>=0.3" "unfoldNd>=0.2" \
	"einconv>=0.1" "linear_operator>=0.5"

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
	$(PY) -m pip install -q --no-deps $(LAPLACE_NO_DEPS)
	$(PY) -m pip install -q $(LAPLACE_DEPS)
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
