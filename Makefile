# Two entry points: `make train` and `make test`; each creates the environment on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU-only machines install this pinned wheel first; GPU machines keep (or get) their CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup train demo test lint format bench clean-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.setup-done: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.setup-done

# The main job: exp018 on the bundled synthetic data (generated on first use) or on the
# competition files in data/. PRESET=quick finishes on a CPU; PRESET=gpu is the full run.
PRESET ?= quick
train: setup
	$(BIN)/python codes/exp/exp018/train.py preset=$(PRESET)

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
