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

.PHONY: demo test setup clean test-latest lock lint compat gpu-check

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

# The GPU check (docs/gpu-check.md): GPU tests, Triton gradients against eager, step time and peak
# memory at d 2048 and 4096, the 13B-under-40-GB fit; one JSON (benchmarks/results/gpu_check.json)
# the README's GPU rows come from. Without a CUDA device: a dry run (build/gpu_check_dry_run.json).
# Its Python, the first that applies:
#   make gpu-check PY=/path/python   -- a Python with a CUDA torch and this checkout installed
#   make gpu-check GPU_PYTHON=...    -- the same, from the environment
#   nvidia-smi present               -- .venv-gpu, built here: torch 2.13.0 from the default index
#                                       (its CUDA build; GPU_TORCH_INDEX=URL picks another index), then the lock
#   otherwise                        -- .venv (CPU torch): the dry run
# GPU_CHECK_ARGS passes options on, e.g. GPU_CHECK_ARGS='--sections correctness'.
GPU_VENV ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.grassfx-installed
GPU_TORCH_INDEX ?=
GPU_CHECK_ARGS ?=
NVIDIA_SMI := $(shell command -v nvidia-smi 2>/dev/null)
ifeq ($(origin PY),command line)
GPU_CHECK_PY := $(PY)
GPU_CHECK_DEPS :=
else ifneq ($(GPU_PYTHON),)
GPU_CHECK_PY := $(GPU_PYTHON)
GPU_CHECK_DEPS :=
else ifneq ($(NVIDIA_SMI),)
GPU_CHECK_PY := $(GPU_VENV)/bin/python
GPU_CHECK_DEPS := $(GPU_STAMP)
else
GPU_CHECK_PY := $(PY)
GPU_CHECK_DEPS := $(STAMP)
endif

$(GPU_STAMP): pyproject.toml $(LOCK)
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -c $(LOCK) --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q torch==2.13.0 $(if $(GPU_TORCH_INDEX),--index-url $(GPU_TORCH_INDEX))
	$(GPU_VENV)/bin/python -m pip install -q -c $(LOCK) -e '.[test,train]'
	$(GPU_VENV)/bin/python -c "import torch; assert torch.version.cuda, f'torch {torch.__version__} is not a CUDA build'"
	touch $(GPU_STAMP)

gpu-check: $(GPU_CHECK_DEPS)
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(if $(NVIDIA_SMI),--require-gpu) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
