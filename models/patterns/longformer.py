"""Longformer: a sliding window of `window` keys per layer, plus global tokens (HF `LongformerSelfAttention`)."""

from __future__ import annotations

import torch

import etkd_kernels as ek

from . import Pattern, register


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, s, h*d) -> (b, h, s, d)."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # Attention dropout on the local and global probabilities, as HF's LongformerSelfAttention.
    global_qkv = None
    if global_mask is not None and attn.qg is not None:
        h = attn.config.num_heads
        global_qkv = (_heads(attn.qg(x), h), _heads(attn.kg(x), h), _heads(attn.vg(x), h))
    return ek.sliding_window_attention(
        q, k, v, attn.window, global_mask=global_mask, global_qkv=global_qkv,
        key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


PATTERN = register(Pattern(
    "longformer", "sliding_window", adapter, ("window", "global_projections"),
    hf_name="etkd_sliding_window", hf_settings={"window": "window"}, label="sliding window {WINDOW} + 1 global",
    hf_model_type="longformer",
))  # fmt: skip
