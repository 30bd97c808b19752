"""`python -m etkd.benchmarks.bench_isa` on whatever CPU runs the tests: the CPU's model and flags first, the targets
it cannot run (AVX-512 ones on an AVX2-only CPU such as a Zen 3 EPYC) skipped with the reason instead of failing.
No timing is asserted."""

from __future__ import annotations

import argparse

import pytest

from etkd.benchmarks import bench_isa

cpu = pytest.importorskip("etkd_kernels.cpu")
if cpu.unavailable_reason() is not None:
    pytest.skip(f"the cpu kernels are not available: {cpu.unavailable_reason()}", allow_module_level=True)

from etkd_kernels import _C  # noqa: E402

TARGETS = ["avx2", "avx512", "avx512_bf16"]


def _args(**kw) -> argparse.Namespace:
    base = {"isas": None, "blas": False, "mkl_avx2": False, "no_amx": False, "profile": False}
    return argparse.Namespace(**{**base, **kw})


def test_every_target_runs_or_says_why_not():
    runs = set(_C.supported_isas())
    configs, skipped = bench_isa._configs(_args(isas=TARGETS, no_amx=True, mkl_avx2=True))
    for isa in TARGETS:
        if isa in runs:
            assert configs[isa] == {"ETKD_CPU_ISA": isa} and isa not in skipped
        else:
            assert isa not in configs and (
                "this CPU cannot run target" in skipped[isa] or "is not built here" in skipped[isa]
            ), skipped
    assert ("avx512_bf16+noamx" in configs) == ("avx512_bf16" in runs)
    if "avx512_bf16" not in runs:
        assert skipped["avx512_bf16+noamx"].endswith("no bf16 tile products to take off AMX"), skipped
    assert configs["avx2+mkl_avx2"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    default, _ = bench_isa._configs(_args())  # the default: every target this CPU runs, nothing skipped
    assert list(default) == list(_C.supported_isas())


def test_the_cpu_comes_first_and_an_unrunnable_target_is_no_error(capsys):
    argv = ["--isas", *TARGETS, "--no-amx", "--seq", "256", "--rounds", "1", "--repeats", "1",
            "--patterns", "sliding_window", "--dtypes", "fp32", "--threads", "1"]  # fmt: skip
    assert bench_isa.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(family " in lines[0] and "SIMD flags: " in lines[0] and "avx2" in lines[0], lines[:2]
    assert lines[1].startswith("# torch ") and ("MKL" in lines[1] or "BLAS" in lines[1]), lines[:2]
    for isa in set(TARGETS) - set(_C.supported_isas()):
        assert any(ln.startswith(f"# {isa}: skipped: ") for ln in lines), lines
    assert any(ln.startswith("| sliding_window/fp32/fwd | ") for ln in lines), lines
