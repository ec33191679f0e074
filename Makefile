# Two entry points, each does the whole set-up on a fresh machine:
#   make demo   -- small LLaMA pretraining run with Grass on Shakespeare (progress bar + table)
#   make test   -- the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grassfx-installed

.PHONY: demo test setup clean

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

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
