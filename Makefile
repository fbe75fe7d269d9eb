# The two commands a newcomer needs: `make run` and `make test`.
# Each creates or refreshes the virtual environment and installs the project first.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip does not silently pull a multi-GB build you did not
# ask for; override with e.g. `make run TORCH_SPEC=torch` or a CUDA wheel index of your choice.
TORCH_SPEC ?= torch==2.13.0
# Every other dependency is pinned by constraints.txt (the ranges in pyproject.toml stay loose for
# library users); `make lock` re-resolves and rewrites it.
CONSTRAINTS ?= constraints.txt
EXTRAS := dev,lightgbm,dask
STAMP := $(VENV)/.alphaloom-installed
CONFIG ?= configs/default.yaml

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: install run test lint format bench lock clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: install
	$(VENV)/bin/alphaloom run --config $(CONFIG)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	PYTHON=$(abspath $(PY)) bash scripts/lint_imports.sh

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	for script in benchmarks/*.py; do \
	  echo "== $$script"; \
	  $(PY) $$script || { echo "bench failed: $$script"; exit 1; }; \
	done

# Re-resolve every dependency in a throwaway venv and rewrite constraints.txt (torch is pinned by
# TORCH_SPEC instead, so a CUDA build can be chosen at install time). Commit the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.lock-venv/bin/python -m pip install --quiet ".[$(EXTRAS)]"
	{ echo "# pip constraints for make install: written by 'make lock' on $$(date -u +%F)"; \
	  .lock-venv/bin/python -m pip freeze --exclude torch --exclude alphaloom; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .lock-venv

clean:
	rm -rf outputs mlruns mlartifacts mlflow.db mlflow.db.lock .pytest_cache
