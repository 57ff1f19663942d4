# Two entry points: `make train` and `make test`; each creates the environment on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU-only machines install this pinned wheel first; GPU machines keep (or get) their CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup train runs demo test lint format bench clean-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The classical blend member (codes/classical/minirocket.py) runs aeon's MiniRocket. aeon 1.6.0 pins
# numba<0.64, which needs an older numpy than the one pinned here; installed without its pins, with
# a newer numba, it works (docs/real_imu.md). The tests of that member need it; nothing else does.
CLASSICAL_SPEC ?= aeon==1.6.0 numba==0.68.1 llvmlite==0.50.0 Deprecated==1.3.1 wrapt==2.5.2

$(VENV)/.setup-done: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -c "import aeon" 2>/dev/null || $(BIN)/python -m pip install --no-deps $(CLASSICAL_SPEC)
	touch $@

setup: $(VENV)/.setup-done

# The main job: exp018 on the bundled synthetic data (generated on first use) or on the
# competition files in data/. VARIANT=quick (exp018's CPU-sized variant, in its config.py)
# finishes on a CPU; `make train VARIANT=` trains config.py's defaults (the full run).
# MACHINE=auto|cpu|gpu picks configs/machine/; ARGS adds overrides (ARGS="trainer.epochs=3").
EXP ?= exp018
VARIANT ?= quick
MACHINE ?= auto
ARGS ?=
train: setup
	$(BIN)/python codes/exp/$(EXP)/train.py $(if $(VARIANT),variant=$(VARIANT)) machine=$(MACHINE) $(ARGS)

# every run under outputs/: experiment, run, CV, IMU-only CV, date, git commit
runs: setup
	$(BIN)/python -m codes.common.run_table

demo: setup
	$(BIN)/python -m codes.common.demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/bench_ingest.py

clean-cache:
	rm -rf data/cache data/synthetic/cache
