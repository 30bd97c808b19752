"""`make bench`: every pattern x provider x seq len x (forward, forward+backward) through pytest-benchmark.

The setups and providers are `etkd.benchmarks.providers` (the same as `python -m etkd.benchmarks.core`);
each row's extra_info carries the achieved GFLOP/s, the machine's matmul rate and the environment, and with
`--memory` the peak extra memory of one call measured in a fresh process. Timings are never asserted.
"""

from __future__ import annotations

import functools

import pytest

from etkd.benchmarks import providers as P
from etkd.benchmarks.core import matmul_gflops
from etkd.benchmarks.harness import Timing, environment, run_fresh

PROVIDERS = ["hf", "hf-core", *(f"etkd-{b}" for b in P.BACKENDS), "sdpa", "flex", "flash-attn"]


@functools.cache
def _setup(pattern: str, seq: int, dtype: str) -> P.Setup:
    return P.build(pattern, seq, dtype=dtype)


@functools.cache
def _roofline(dtype: str) -> float:
    return matmul_gflops(dtype=P.DTYPES[dtype])


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pattern", P.PATTERNS)
def test_attention(benchmark, request, pattern, provider, mode, seq):
    dtype = request.config.getoption("--dtype")
    setup = _setup(pattern, seq, dtype)
    if provider not in setup.providers:
        pytest.skip(setup.skipped.get(provider, f"{provider} does not implement {pattern}"))
    if mode == "fwd_bwd" and provider in setup.forward_only:
        pytest.skip(setup.forward_only[provider])
    benchmark.group = f"{pattern} seq={seq} {dtype} {mode}"
    benchmark.pedantic(setup.call(provider, mode), rounds=3, warmup_rounds=1, iterations=1)
    t = Timing.of(list(benchmark.stats.stats.data))
    benchmark.extra_info.update(
        {
            "p20_s": t.p20,
            "p80_s": t.p80,
            "useful_gflops_per_s": setup.flops_of(mode) / t.median / 1e9,
            "matmul_gflops_per_s": _roofline(dtype),
            "environment": environment(setup.device).as_dict(),
        }
    )
    if request.config.getoption("--memory"):
        spec = {**setup.build_args, "provider": provider, "mode": mode}
        benchmark.extra_info["peak_extra_mib"] = run_fresh("etkd.benchmarks.providers:peak_memory", spec).get(
            "peak_mib"
        )
