# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this machine ships a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: all env test test-fast lint demo bench clean

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cpp)
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy ninja setuptools wheel
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check etkd_kernels models distill benchmarks tests
	$(BIN)/ruff format --check etkd_kernels models distill benchmarks tests

test: $(STAMP)
	$(MAKE) lint
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/etkd demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info etkd_kernels/*.so
