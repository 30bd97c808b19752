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

FLOPs (`Setup.flops`, forward): 4 * head_dim per score the pattern defines (2 for QK^T, 2 for PV), summed
over heads and batch; fwd+bwd counts 3.5x that (the backward recomputes QK^T and does dV, dP, dQ, dK).
Nystrom: 4 * head_dim * (2 * seq * L + L^2) per head: the QK-type products K1 (seq x L), K3 (L x seq) and
the L x L landmark kernel, and the value products K3 V, pinv(K2) (K3 V) and K1 (...); the Newton-Schulz
pseudo-inverse (~48 L^3 per head, about 9% at seq 4096, L 64) is not counted.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import etkd_kernels as ek
from etkd.models.patterns import PATTERNS as REGISTRY
from etkd_kernels.dispatch import BACKENDS, Problem, reasons

from . import hf_reference as hr
from .harness import PeakMemory

MODES = ("fwd", "fwd_bwd")
BACKWARD_FLOP_FACTOR = 3.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Pattern settings at the paper's sizes: Longformer window 512 + 1 global token; BigBird block 64 with 3
# window, 2 global and 3 random blocks; LSG blocks of 128 (+ 128 pooled sparse tokens each side, factor 2);
# Nystrom 64 landmarks.
WINDOW, BLOCK, RANDOM_BLOCKS, LSG_BLOCK, LANDMARKS = 512, 64, 3, 128, 64
# The same as `EncoderConfig` fields, for the whole models `etkd bench` builds (benchmarks/bench.py).
PAPER_SETTINGS = {
    "longformer": {"window": WINDOW},
    "bigbird": {"block_size": BLOCK, "num_random_blocks": RANDOM_BLOCKS},
    "lsg": {"block_size": LSG_BLOCK, "sparse_block_size": LSG_BLOCK, "sparsity_factor": 2},
    "nystrom": {"num_landmarks": LANDMARKS},
}


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


class _Cached(torch.nn.Module):
    """A projection layer that computes its output once and then returns a copy of it (HF modifies some in
    place; copying 4096 x 768 costs ~1 ms), taking gradients when its input does."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer, self.out = layer, None

    def forward(self, x):
        if self.out is None or self.out.requires_grad != x.requires_grad:
            with torch.no_grad():
                self.out = self.layer(x).requires_grad_(x.requires_grad)
        self.out.grad = None
        return self.out.clone()


def cached_projections(module: torch.nn.Module, names) -> torch.nn.Module:
    """A shallow copy of an HF attention module whose projection layers return precomputed outputs."""
    core = copy.copy(module)
    core._modules = dict(module._modules)
    for n in names:
        core._modules[n] = _Cached(module._modules[n])
    return core


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


# --- FLOP counts: scores each pattern defines ---------------------------------------------------------------


def band_pairs(seq: int, window: int, num_global: int) -> int:
    """Scores of a symmetric band of `window` (window // 2 each side) plus the first `num_global` tokens as
    global rows (every key) and global columns (every query)."""
    w = window // 2
    g = min(num_global, seq)
    pairs = g * seq  # global rows
    for i in range(g, seq):
        lo, hi = max(0, i - w), min(seq, i + w + 1)
        pairs += hi - lo + min(g, lo)  # the band, and the global keys left of it
    return pairs


def block_pairs(layout: ek.BlockLayout, heads: int) -> int:
    """Scores of a block layout over all heads (a layout shared by the heads counts once per head)."""
    nnz = int(layout.mask.sum()) * layout.block_size**2
    return nnz * (heads if layout.num_heads == 1 else 1)


def lsg_pairs(seq: int, block: int, sparse_block: int, factor: int, num_global: int) -> int:
    """Scores of LSG attention as `etkd_kernels.reference.lsg` defines it, per head (sparse keys counted at
    their full 2 * sparse_block; compressed positions with no usable token are rarer than 1 in a block)."""
    nb = -(-seq // block)
    g = min(num_global, seq)
    step, total = block // factor, -(-seq // factor)
    pairs = g * seq
    for n in range(nb):
        rows = max(0, min(seq, (n + 1) * block) - max(g, n * block))
        lo, hi = max(g, (n - 1) * block), min(seq, (n + 2) * block)
        local = max(0, hi - lo)
        left = max(0, min(total, (n - 1) * step) - max(0, (n - 1) * step - sparse_block))
        right = max(0, min(total, (n + 2) * step + sparse_block) - max(0, (n + 2) * step))
        pairs += rows * (g + local + left + right)
    return pairs


def nystrom_pairs(seq: int, landmarks: int) -> int:
    return 2 * seq * landmarks + landmarks * landmarks


# --- the registry -------------------------------------------------------------------------------------------


def _inputs(batch, seq, hidden, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    real = torch.ones(batch, seq, dtype=torch.bool, device=device)
    glob = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    glob[:, 0] = True
    return x, real, glob


@dataclass
class PatternInputs:
    """What a pattern's setup gives `build`: the shared q/k/v (and extra tensors), the etkd call per backend
    name (`op(backend, **op_kwargs)`: extra keywords of the op, e.g. dropout_p, on top of the pattern's settings),
    the forward FLOPs, FlexAttention's mask and flash-attn's (left, right) band where they exist."""

    args: tuple
    op: Callable[..., Callable]
    flops: float
    mask_mod: Callable | None = None
    window: tuple[int, int] | None = None


# pattern name (a `models.patterns` registry name) -> its setup `fn(setup, x, real, glob) -> PatternInputs`,
# which also adds the HF providers (or says in `setup.skipped` why there are none).
SETUPS: dict[str, Callable] = {}


def setup_of(name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        REGISTRY[name]  # a KeyError here: the registry has no such pattern
        SETUPS[name] = fn
        return fn

    return add


def _hf_providers(setup: Setup, x: torch.Tensor, module: torch.nn.Module, names: tuple[str, ...], run: Callable,
                  *extra) -> None:  # fmt: skip
    """`hf` (HF's module on the hidden states x) and `hf-core` (its projections `names` precomputed)."""
    core = cached_projections(module, names)
    setup.providers["hf"] = (lambda x: run(module, x, *extra), (x,))
    setup.providers["hf-core"] = (lambda x: run(core, x, *extra), (x,))


@setup_of("longformer")
def _longformer(setup: Setup, x, real, glob) -> PatternInputs:
    mod = hr.longformer_module(setup.hidden, setup.heads, WINDOW).to(setup.device, setup.dtype)
    names = ("query", "key", "value", "query_global", "key_global", "value_global")
    _hf_providers(setup, x, mod, names, hr.run_longformer, real, glob)
    q, k, v, g = hr.longformer_qkv(mod, x)
    op = lambda b, **kw: (lambda q, k, v, *g: ek.sliding_window_attention(
        q, k, v, WINDOW, global_mask=glob, global_qkv=tuple(g), key_padding_mask=real, backend=b, **kw))  # fmt: skip
    w, gl = WINDOW // 2, glob[0]
    return PatternInputs(
        tuple(t.detach().contiguous() for t in (q, k, v, *g)), op, setup.score_flops(band_pairs(setup.seq, WINDOW, 1)),
        mask_mod=lambda b, h, qi, ki: ((qi - ki).abs() <= w) | gl[ki] | gl[qi], window=(w, w),
    )  # fmt: skip


@setup_of("bigbird")
def _bigbird(setup: Setup, x, real, glob) -> PatternInputs:
    mod = hr.bigbird_module(setup.hidden, setup.heads, BLOCK, RANDOM_BLOCKS).to(setup.device, setup.dtype)
    mod.eval()
    _hf_providers(setup, x, mod, ("query", "key", "value"), hr.run_bigbird, real)
    layout = ek.bigbird_layout(setup.seq, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS, seed=0)
    layout = layout.to(setup.device)
    op = lambda b, **kw: (lambda q, k, v: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=b, **kw))  # fmt: skip
    dense = layout.mask[0]
    return PatternInputs(
        tuple(t.detach().contiguous() for t in hr.projections(mod, x, setup.heads)), op,
        4.0 * setup.batch * setup.head_dim * block_pairs(layout, setup.heads),
        mask_mod=lambda b, h, qi, ki: dense[qi // BLOCK, ki // BLOCK],
    )  # fmt: skip


@setup_of("lsg")
def _lsg(setup: Setup, x, real, glob) -> PatternInputs:
    why = "transformers has no LSG attention (lsg-converter's is a test-only oracle)"
    setup.skipped["hf"] = setup.skipped["hf-core"] = why
    qkv = torch.randn(3, setup.batch, setup.seq, setup.hidden).to(setup.device, setup.dtype)
    op = lambda b, **kw: (lambda q, k, v: ek.lsg_attention(q, k, v, block_size=LSG_BLOCK, sparse_block_size=LSG_BLOCK, key_padding_mask=real, backend=b, **kw))  # fmt: skip
    flops = setup.score_flops(lsg_pairs(setup.seq, LSG_BLOCK, LSG_BLOCK, 2, 1))
    return PatternInputs(tuple(hr.split_heads(t, setup.heads) for t in qkv), op, flops)


@setup_of("nystrom")
def _nystrom(setup: Setup, x, real, glob) -> PatternInputs:
    mod = hr.nystrom_module(setup.hidden, setup.heads, setup.seq, LANDMARKS).to(setup.device, setup.dtype)
    _hf_providers(setup, x, mod, ("query", "key", "value"), hr.run_nystrom, real)
    op = lambda b, **kw: (lambda q, k, v: ek.nystrom_attention(q, k, v, LANDMARKS, key_padding_mask=real, pinv_init="hf_global", backend=b, **kw))  # fmt: skip
    return PatternInputs(
        tuple(t.detach().contiguous() for t in hr.projections(mod, x, setup.heads)), op,
        setup.score_flops(nystrom_pairs(setup.seq, LANDMARKS)),
    )  # fmt: skip


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
