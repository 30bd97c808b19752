"""Longformer: a sliding window of `window` keys per layer, plus global tokens (HF `LongformerSelfAttention`)."""

from __future__ import annotations

import torch

import etkd_kernels as ek

from ..precision import linear
from . import HFFamily, Option, Pattern, register, register_family


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, s, h*d) -> (b, h, s, d)."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def _global_queries(attn, x: torch.Tensor, global_mask: torch.Tensor) -> torch.Tensor:
    """(b, s, d): the global query projection at the global rows, zero elsewhere. The op reads qg at global rows
    only, so, as HF's LongformerSelfAttention (`query_global` of the global rows' hidden states), the projection
    runs on those rows alone: a (b*s, d) x (d, d) GEMM (and two in the backward) becomes one per global token."""
    rows = linear(attn.qg, x[global_mask])  # (n_global, d); linear: fp32 GEMM where bf16 ones are slow
    # rows' dtype, not x's: under autocast the projection computes in bf16.
    return rows.new_zeros(x.shape[:2] + rows.shape[-1:]).masked_scatter(global_mask[..., None], rows)


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # Attention dropout on the local and global probabilities, as HF's LongformerSelfAttention.
    global_qkv = None
    if global_mask is not None and attn.qg is not None:
        h = attn.config.num_heads
        global_qkv = (
            _heads(_global_queries(attn, x, global_mask), h),
            _heads(linear(attn.kg, x), h),
            _heads(linear(attn.vg, x), h),
        )
    return ek.sliding_window_attention(
        q, k, v, attn.window, global_mask=global_mask, global_qkv=global_qkv,
        key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


def hf_attention(module, query, key, value, settings, kwargs, common):
    """`etkd_sliding_window` (`etkd.hf`): settings `window` (an int, or one per layer); global tokens from the
    `global_attention_mask=` keyword HF passes through ((batch, seq), 1 = global)."""
    glob = kwargs.get("global_attention_mask")
    if glob is not None:
        glob = glob.to(query.device) > 0
        if common["key_padding_mask"] is not None:
            glob = glob & common["key_padding_mask"]
    return ek.sliding_window_attention(query, key, value, int(settings["window"]), global_mask=glob, **common)


PATTERN = register(Pattern(
    "longformer", "sliding_window", adapter, ("window", "global_projections"),
    hf_name="etkd_sliding_window", hf_settings={"window": "window"}, label="sliding window {WINDOW} + 1 global",
    hf_model_type="longformer", hf_attention=hf_attention, hf_required=("window",),
    options={"window": Option("attention_window (even)")},
    convert_settings={"global_projections": True},  # started as copies of the local projections
    convert_resets={"global_projections": False},  # a model converted to another pattern has none
    global_tokens=True, global_projections=True,
    classification_globals=1,  # HF LongformerForSequenceClassification makes [CLS] global
))  # fmt: skip


def _from_config(c) -> dict:
    w = c.attention_window
    return dict(attention="longformer", window=list(w) if isinstance(w, (list, tuple)) else w,
                global_projections=True)  # fmt: skip


def _to_weights(cfg, sd: dict) -> None:
    """HF Longformer always has global projections: without ours, start them from the local ones (Longformer's
    recipe)."""
    if cfg.global_projections:
        return
    for key in list(sd):
        for local, glob in (("query", "query_global"), ("key", "key_global"), ("value", "value_global")):
            if f".attention.self.{local}." in key:
                sd[key.replace(f".self.{local}.", f".self.{glob}.")] = sd[key]


register_family(HFFamily(
    "longformer", "Longformer", "longformer", fairseq=True, from_config=_from_config,
    to_config=lambda cfg: {"attention_window": cfg.window}, to_weights=_to_weights,
))  # fmt: skip
