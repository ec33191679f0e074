# Two entry points, each does the whole set-up on a fresh machine:
#   make demo   -- small LLaMA pretraining run with Grass on Shakespeare (progress bar + table)
#   make test   -- the test suite
# The set-up installs every package at the version in requirements/lock.txt.
# Not run by CI:
#   make test-latest -- a fast subset against the newest releases (torch stays 2.13.0)
#   make lock        -- regenerate requirements/lock.txt from a fresh venv
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grassfx-installed
LOCK := requirements/lock.txt
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock

.PHONY: demo test setup clean test-latest lock lint compat

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	# The CPU build of torch 2.13.0 (the package itself asks for torch>=2.13).
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,train]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m grassfx.train --demo

# The suite, then the static checks (ruff, mypy over the public API; pinned in the lock).
test: $(STAMP)
	$(PY) -m pytest -q -x tests
	$(MAKE) --no-print-directory lint

# Upstream moved? Newest releases of everything but torch, a fast subset of the tests.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -c requirements/latest.txt torch
	$(LATEST_VENV)/bin/python -m pip install -q -c requirements/latest.txt -e '.[test,train]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|kernels|accelerate)=='
	$(LATEST_VENV)/bin/python -m pytest -q -m 'not slow' tests/instrument tests/optim tests/compiler/test_model_zoo.py

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -c requirements/latest.txt torch
	$(LOCK_VENV)/bin/python -m pip install -q -c requirements/latest.txt -e '.[test,train]'
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -vE '^(setuptools|wheel)==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# Static checks: ruff (rules in pyproject.toml) and mypy over the public API, at the lock's versions.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# A fast subset of the tests against each torch version listed, each in a venv of its own
# under .venv-compat/ (several GB per version); results in benchmarks/results/compat.json.
COMPAT_TORCH ?= 2.13.0 2.14.1
compat:
	$(PYTHON) tools/compat.py $(COMPAT_TORCH)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
