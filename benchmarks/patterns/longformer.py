"""Longformer's sliding window in the benchmarks: window 512 + 1 global token (the paper's size), with HF's
`LongformerSelfAttention` (separate global projections) driven one way for the parity tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import etkd_kernels as ek

from ..hf_reference import projections
from . import Bench, PatternInputs, cached_projections, hf_providers, inputs, register

WINDOW = 512
GLOBAL_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")


def longformer_module(hidden: int, heads: int, window: int) -> nn.Module:
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_window=[window],
        attention_probs_dropout_prob=0.0,
    )
    return LongformerSelfAttention(cfg, layer_id=0).eval()


def run_longformer(
    module: nn.Module, x: torch.Tensor, real: torch.Tensor, glob: torch.Tensor
) -> torch.Tensor:
    """HF LongformerSelfAttention on x (batch, seq, hidden). HF needs seq to be a multiple of the window:
    pad with masked tokens as LongformerModel does, and cut the result back."""
    b, s, _ = x.shape
    extra = (-s) % (module.one_sided_attn_window_size * 2)
    xp = F.pad(x, (0, 0, 0, extra))
    realp = F.pad(real, (0, extra), value=False)
    globp = F.pad(glob, (0, extra), value=False)
    ext = torch.zeros(b, s + extra, dtype=x.dtype, device=x.device)
    ext[~realp] = -10000.0
    ext[globp] = 10000.0
    out = module(
        xp,
        attention_mask=ext,
        is_index_masked=~realp,
        is_index_global_attn=globp,
        is_global_attn=bool(globp.any()),
    )[0]
    return out[:, :s]


def longformer_qkv(module: nn.Module, x: torch.Tensor):
    h = module.num_heads
    q, k, v = projections(module, x, h)
    g = projections(module, x, h, ("query_global", "key_global", "value_global"))
    return q, k, v, g


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


def setup(setup, x, real, glob) -> PatternInputs:
    mod = longformer_module(setup.hidden, setup.heads, WINDOW).to(setup.device, setup.dtype)
    hf_providers(setup, x, mod, GLOBAL_PROJECTIONS, run_longformer, real, glob)
    q, k, v, g = longformer_qkv(mod, x)
    op = lambda b, **kw: (lambda q, k, v, *g: ek.sliding_window_attention(
        q, k, v, WINDOW, global_mask=glob, global_qkv=tuple(g), key_padding_mask=real, backend=b, **kw))  # fmt: skip
    w, gl = WINDOW // 2, glob[0]
    return PatternInputs(
        tuple(t.detach().contiguous() for t in (q, k, v, *g)), op, setup.score_flops(band_pairs(setup.seq, WINDOW, 1)),
        mask_mod=lambda b, h, qi, ki: ((qi - ki).abs() <= w) | gl[ki] | gl[qi], window=(w, w),
    )  # fmt: skip


def dropout_core(setup, p: float):
    x, real, glob = inputs(setup.batch, setup.seq, setup.hidden, setup.device, setup.dtype)
    mod = longformer_module(setup.hidden, setup.heads, WINDOW).to(setup.device, setup.dtype)
    mod.dropout = p  # LongformerSelfAttention keeps attention_probs_dropout_prob as a float
    core = cached_projections(mod, GLOBAL_PROJECTIONS).train()
    return (lambda x: run_longformer(core, x, real, glob)), (x,), f"LongformerSelfAttention, train, p={p}"


register(Bench(
    "longformer", setup, sizes={"WINDOW": WINDOW}, settings={"window": WINDOW, "global_projections": True},
    positions="longformer", dropout_core=dropout_core,
    model_default=True,  # the whole-model comparisons' default: the paper's long-document model
))  # fmt: skip
