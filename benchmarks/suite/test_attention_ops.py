"""pytest-benchmark suite: each pattern x provider x seq len x (forward, forward+backward).

Quick size by default (seq 1024); `--paper-sizes` runs 512..8192; `--memory` adds the peak extra memory
of each row, measured in a subprocess. Run through `make bench`. Timings are never asserted.
"""

from __future__ import annotations

import functools

import pytest
import torch

from etkd.benchmarks.cases import CASES, matmul_gflops
from etkd.benchmarks.memory import measure

PROVIDERS = ["hf", "etkd-reference", "etkd-cpu", "etkd-triton", "etkd-cuda", "sdpa", "flex"]


@functools.cache
def _case(name: str, seq: int):
    return CASES[name](seq)


@functools.cache
def _roofline() -> float:
    return matmul_gflops()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_attention(benchmark, request, case_name, provider, mode, seq):
    case = _case(case_name, seq)
    if provider not in case.providers:
        pytest.skip(case.skipped.get(provider, f"{provider} does not implement {case_name}"))
    if provider == "flex" and mode == "fwd_bwd" and case.x.device.type == "cpu":
        pytest.skip("FlexAttention has no backward on the CPU")
    backward = mode == "fwd_bwd"
    fn = case.run(provider, backward)
    benchmark.group = f"{case_name} seq={seq} {mode}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    flops = case.useful_flops * (3.5 if backward else 1.0)  # bwd ~ 2.5x the forward's GEMM work
    benchmark.extra_info.update(
        {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "useful_gflops_per_s": flops / median / 1e9,
            "matmul_gflops_per_s": _roofline(),
        }
    )
    if request.config.getoption("--memory"):
        benchmark.extra_info["peak_extra_mib"] = measure(case_name, provider, seq, backward)
