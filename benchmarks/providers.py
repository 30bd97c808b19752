"""The provider registry: per attention pattern, every implementation that can compute it here, on shared inputs.

`build(pattern, seq, ...)` returns a `Setup`: the inputs made once, the pattern's FLOP count, and per
provider a callable with its arguments. Providers:

  hf          HF's own attention module, its q/k/v projections included (input: hidden states)
  hf-core     the same module with each projection replaced by its precomputed output: everything HF
              does after the projections, forward and backward, and nothing else
  etkd-<b>    the etkd op on backend <b>, for every backend in `etkd_kernels.dispatch.BACKENDS` that
              accepts the op, device and dtype (a new backend appears here by itself)
  sdpa        dense `scaled_dot_product_attention`: the full-attention baseline
  flex        compiled FlexAttention with the pattern's mask (forward only on a CPU)
  flash-attn  flash-attn on a GPU when installed: `window_size` for the band (no globals), else dense

Every provider except `hf` takes the same q/k/v (from HF's projection layers where HF has the pattern), so a
ratio compares attention cores. What cannot run is listed in `Setup.skipped` with the reason.

Each pattern's setup (its inputs, HF module, etkd call, FLOP count and masks, at the paper's sizes) is its
module in `benchmarks/patterns/` (a `Bench` record); `PATTERNS` is the registry's names that have one.

FLOPs (`Setup.flops`, forward): 4 * head_dim per score the pattern defines (2 for QK^T, 2 for PV), summed
over heads and batch; fwd+bwd counts 3.5x that (the backward recomputes QK^T and does dV, dP, dQ, dK). A
pattern whose products are not scores (landmarks) says how it counts in its module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from etkd.models.patterns import PATTERNS as REGISTRY
from etkd_kernels.dispatch import BACKENDS, Problem, reasons

from .harness import PeakMemory
from .patterns import BENCHES, PatternInputs, cached_projections
from .patterns import inputs as _inputs

__all__ = [
    "PatternInputs",
    "build",
    "cached_projections",
]  # the setups' vocabulary, from benchmarks/patterns/

MODES = ("fwd", "fwd_bwd")
BACKWARD_FLOP_FACTOR = 3.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The paper's sizes by the names the registry's benchmark labels use (each pattern's `Bench.sizes`).
SIZES = {k: v for b in BENCHES.values() for k, v in b.sizes.items()}
# The same as `EncoderConfig` fields, for the whole models `etkd bench` builds (benchmarks/bench.py).
PAPER_SETTINGS = {name: b.settings for name, b in BENCHES.items()}


def fwd_bwd_call(f: Callable, args: tuple) -> Callable[[], None]:
    """A no-argument forward + backward of `f(*args)` (gradient of the sum) on fresh leaf copies of the
    floating-point arguments, their gradients cleared each call."""
    leaves = tuple(a.detach().clone().requires_grad_(True) if a.is_floating_point() else a for a in args)

    def run():
        for t in leaves:
            t.grad = None
        f(*leaves).float().sum().backward()

    return run


@dataclass
class Setup:
    pattern: str
    seq: int
    heads: int
    head_dim: int
    batch: int
    device: torch.device
    dtype: torch.dtype
    flops: float = 0.0  # forward; see the module docstring
    providers: dict[str, tuple[Callable, tuple]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    forward_only: dict[str, str] = field(default_factory=dict)  # provider -> why it has no backward
    build_args: dict = field(default_factory=dict)  # JSON-able: `build(**build_args)` makes it again
    etkd_op: Callable[..., Callable] | None = None  # PatternInputs.op: etkd on a backend, extra keywords

    def call(self, provider: str, mode: str) -> Callable[[], None]:
        """A no-argument callable: forward under no_grad ("fwd") or forward + backward ("fwd_bwd")."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if provider not in self.providers:
            why = self.skipped.get(provider, f"unknown provider; this setup has {sorted(self.providers)}")
            raise ValueError(f"provider {provider!r}: {why}")
        if mode == "fwd_bwd" and provider in self.forward_only:
            raise ValueError(f"provider {provider!r}: {self.forward_only[provider]}")
        f, args = self.providers[provider]
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    f(*args)

            return run
        return fwd_bwd_call(f, args)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def score_flops(self, scores_per_head: int) -> float:
        """Forward FLOPs of `scores_per_head` scores in every head and batch row (4 * head_dim each)."""
        return 4.0 * self.batch * self.heads * self.head_dim * scores_per_head

    def flops_of(self, mode: str) -> float:
        return self.flops * (BACKWARD_FLOP_FACTOR if mode == "fwd_bwd" else 1.0)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flash_attn_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flash-attn runs on CUDA GPUs only"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    return None


# --- the registry -------------------------------------------------------------------------------------------

# pattern name -> its setup `fn(setup, x, real, glob) -> PatternInputs` (benchmarks/patterns/<name>.py)
SETUPS: dict[str, Callable] = {name: b.setup for name, b in BENCHES.items()}
# The patterns `build` sets up, in the registry's order; their ops and labels are the registry's.
PATTERNS = tuple(name for name in REGISTRY if name in SETUPS)


def build(
    pattern: str,
    seq: int,
    heads: int = 12,
    head_dim: int = 64,
    batch: int = 1,
    backends: list[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> Setup:
    """Every provider of `pattern` at this size; `backends` limits the etkd ones (default: all in BACKENDS)."""
    if pattern not in SETUPS:
        raise ValueError(f"pattern: expected one of {', '.join(PATTERNS)}, got {pattern!r}")
    device = torch.device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    torch.manual_seed(0)
    x, real, glob = _inputs(batch, seq, heads * head_dim, device, dtype)
    setup = Setup(pattern, seq, heads, head_dim, batch, device, dtype)
    setup.build_args = {"pattern": pattern, "seq": seq, "heads": heads, "head_dim": head_dim, "batch": batch,
                        "backends": backends, "device": str(device), "dtype": DTYPE_NAMES[dtype]}  # fmt: skip
    inputs = SETUPS[pattern](setup, x, real, glob)
    args, op, mask_mod, window = inputs.args, inputs.op, inputs.mask_mod, inputs.window
    setup.flops, setup.etkd_op = inputs.flops, op
    op_name = REGISTRY[pattern].op

    for b in backends or BACKENDS:
        why = reasons(b, op_name, Problem.of(args[0]))  # device, dtype, head_dim, sizes
        if why:
            setup.skipped[f"etkd-{b}"] = "; ".join(why)
        else:
            setup.providers[f"etkd-{b}"] = (op(b), args)
    setup.providers["sdpa"] = (lambda q, k, v, *_: F.scaled_dot_product_attention(q, k, v), args)
    if mask_mod is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(mask_mod, None, None, seq, seq, device=device)
        scale = head_dim**-0.5
        setup.providers["flex"] = (lambda q, k, v, *_: _compiled_flex()(q, k, v, block_mask=bm, scale=scale), args)  # fmt: skip
        if device.type == "cpu":
            setup.forward_only["flex"] = "FlexAttention has no backward on a CPU"
    else:
        setup.skipped["flex"] = f"no FlexAttention mask for {pattern} (its keys are pooled, not a subset)"
    why = _flash_attn_reason(device)
    if why:
        setup.skipped["flash-attn"] = why
    else:
        from flash_attn import flash_attn_func

        band = window or (-1, -1)  # (-1, -1): dense

        def fa(q, k, v, *_):  # flash-attn takes (batch, seq, heads, head_dim)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=band)

        setup.providers["flash-attn"] = (fa, args)
    return setup


def peak_memory(spec: dict) -> dict:
    """Peak extra MiB of one call of one provider (after a warm-up call, which compiles and fills caches).
    Run through `harness.run_fresh("etkd.benchmarks.providers:peak_memory", spec)`: spec holds `build`'s
    arguments plus `provider` and `mode`."""
    spec = dict(spec)
    provider, mode = spec.pop("provider"), spec.pop("mode")
    setup = build(**spec)
    run = setup.call(provider, mode)
    run()
    with PeakMemory(setup.device) as peak:
        run()
    return {"peak_mib": peak.peak_mib, "exact": peak.exact}
