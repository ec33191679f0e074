# Two entry points, each does the whole set-up on a fresh machine:
#   make demo   -- small LLaMA pretraining run with Grass on Shakespeare (progress bar + table)
#   make test   -- the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grassfx-installed

.PHONY: demo test setup clean lint compat

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (the package itself only asks for torch>=2.6).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,train]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m grassfx.train --demo

test: $(STAMP)
	$(PY) -m pytest -q -x tests

# Static checks: ruff (rules in pyproject.toml) and mypy over the public API, pinned versions.
RUFF_VERSION ?= 0.17.6
MYPY_VERSION ?= 2.4.1
lint: $(STAMP)
	$(PY) -m pip install -q ruff==$(RUFF_VERSION) mypy==$(MYPY_VERSION)
	$(PY) -m ruff check .
	$(PY) -m mypy

# A fast subset of the tests against each torch version listed, each in a venv of its own
# under .venv-compat/ (several GB per version); results in benchmarks/results/compat.json.
COMPAT_TORCH ?= 2.13.0 2.14.1
compat:
	$(PYTHON) tools/compat.py $(COMPAT_TORCH)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
