# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this machine ships a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: all env lsg-env test test-fast lint demo bench gpu-check clean

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Third-party packages install the normal way, with build isolation: some ship only an sdist (seqeval) whose
# metadata comes out wrong when built against the venv's setuptools, and pip then silently picks an old release.
# Only etkd itself is built without isolation (it compiles against the venv's torch) and without deps (they are
# in place by then). The dependency list is read from pyproject.toml, the one place it is written.
# `pip check` fails the step if what got installed does not fit together.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.cpp csrc/*/*/*.h)
	$(BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))' > $(VENV)/requirements.txt
	$(BIN)/pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja -r $(VENV)/requirements.txt
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

env: $(STAMP)

# The LSG oracle's side environment: lsg-converter 0.1.9's model code imports only under transformers 4.40
# (it star-imports names later releases stopped exporting), so it runs in a venv of its own, with the same
# pinned torch. Used by the `slow` parity test of tests/test_lsg_model.py, by `etkd bench`'s lsg-converter rows
# and by benchmarks/lsg_peer.py (which recorded tests/data/lsg_golden/ once).
LSG_VENV := .venv-lsg
LSG_SPEC := transformers==4.40.2 tokenizers==0.19.1 lsg-converter==0.1.9
$(LSG_VENV)/.installed:
	$(PY) -m venv $(LSG_VENV)
	$(LSG_VENV)/bin/pip install -q --upgrade pip
	$(LSG_VENV)/bin/pip install -q "$(TORCH_SPEC)" $(LSG_SPEC) safetensors
	$(LSG_VENV)/bin/pip check
	touch $@

lsg-env: $(LSG_VENV)/.installed

lint: $(STAMP)
	$(BIN)/ruff check etkd_kernels models distill benchmarks tests
	$(BIN)/ruff format --check etkd_kernels models distill benchmarks tests

# The Triton interpreter is switched on per process (TRITON_INTERPRET is read when kernels are defined), so
# its tests run in a pytest process of their own and every other test sees the normal CPU dispatch.
test: $(STAMP)
	$(MAKE) lint
	$(BIN)/python -m pytest -q --durations=15 tests --ignore=tests/test_triton_kernels.py --ignore=tests/test_triton_lsg.py
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/test_triton_kernels.py tests/test_triton_lsg.py tests/test_support_matrix.py -k triton

# The one-shot acceptance run for a machine with a GPU (parity of everything vs the fp32 reference, large
# shapes, timings): writes gpu_check.json and exits non-zero on any parity failure.
gpu-check: $(STAMP)
	$(BIN)/python -m etkd_kernels.gpu_check --out gpu_check.json

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
	rm -rf $(VENV) $(LSG_VENV) build *.egg-info etkd_kernels/*.so
