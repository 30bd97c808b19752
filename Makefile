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

# The Triton interpreter is switched on per process (TRITON_INTERPRET is read when kernels are defined), so
# its tests run in a pytest process of their own and every other test sees the normal CPU dispatch.
test: $(STAMP)
	$(MAKE) lint
	$(BIN)/python -m pytest -q tests --ignore=tests/test_triton_kernels.py
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/test_triton_kernels.py

demo: $(STAMP)
	$(BIN)/etkd demo

# make bench                         quick size (seq 1024), saves JSON under .benchmarks/, prints the table
# make bench BENCH_ARGS="--paper-sizes --memory"          the paper's sizes, with peak memory per row
# make bench BENCH_ARGS="--benchmark-compare=0001 --benchmark-compare-fail=median:25%"   flag regressions
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-autosave \
		--benchmark-columns=median,iqr,rounds --benchmark-sort=name $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info etkd_kernels/*.so
