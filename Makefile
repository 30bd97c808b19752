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
	# seqeval ships only an sdist, which builds with version 0.0.0 without build isolation (setuptools 84):
	# install it isolated first, so the editable install below finds it.
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy ninja setuptools wheel "seqeval>=1.2"
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

# make bench                         quick size (seq 1024): every pattern x provider, fwd and fwd+bwd; saves
#                                    JSON under .benchmarks/ and prints README's benchmark table from it
# make bench BENCH_ARGS="--paper-sizes --memory"          the paper's sizes, with peak memory per row
# make bench BENCH_ARGS="--seq-lens 4096 --memory"       README's table (seq 4096, peak memory)
# make bench BENCH_ARGS="--dtype bf16"                    bf16 inputs
# make bench BENCH_ARGS="--benchmark-compare=0001 --benchmark-compare-fail=median:25%"   flag regressions
BENCH_ARGS ?=
bench: $(STAMP)
	mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks/suite -p no:cacheprovider --benchmark-only --benchmark-autosave \
		--benchmark-json=.benchmarks/latest.json --benchmark-columns=median,iqr,rounds \
		--benchmark-sort=name $(BENCH_ARGS)
	$(BIN)/python -m etkd.benchmarks.core --from-pytest-benchmark .benchmarks/latest.json

clean:
	rm -rf $(VENV) build *.egg-info etkd_kernels/*.so
