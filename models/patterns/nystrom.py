"""Nyström attention: softmax attention through landmarks and an iterative pseudo-inverse (HF Nystromformer)."""

from __future__ import annotations

import etkd_kernels as ek

from . import HFFamily, Option, Pattern, register, register_family


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    cfg = attn.config
    # No attention dropout: HF's NystromformerSelfAttention defines it but never applies it.
    out = ek.nystrom_attention(
        q, k, v, min(cfg.num_landmarks, q.shape[2]), pinv_iterations=cfg.pinv_iterations,
        pinv_init=cfg.pinv_init, key_padding_mask=key_padding_mask, backend=backend,
    )  # fmt: skip
    if attn.conv is not None:
        # HF's depthwise conv over the sequence of each head's values: (b, h, s, d) -> (b, h, s, d).
        out = out + attn.conv(v)
    return out


def hf_attention(module, query, key, value, settings, kwargs, common):
    """`etkd_nystrom` (`etkd.hf`): settings `num_landmarks`, `pinv_iterations`, `pinv_init`."""
    return ek.nystrom_attention(
        query, key, value, min(int(settings["num_landmarks"]), query.shape[2]),
        pinv_iterations=int(settings.get("pinv_iterations", 6)), pinv_init=settings.get("pinv_init", "per_head"),
        **common,
    )  # fmt: skip


PATTERN = register(Pattern(
    "nystrom", "nystrom", adapter, ("num_landmarks", "pinv_iterations", "pinv_init", "conv_kernel_size"),
    hf_name="etkd_nystrom",
    hf_unsupported=lambda config: (
        "a Nystrom conv term has no place in a BERT/RoBERTa class" if config.conv_kernel_size is not None else None
    ),
    hf_settings={k: k for k in ("num_landmarks", "pinv_iterations", "pinv_init")},
    label="Nyström {LANDMARKS} landmarks", hf_model_type="nystromformer",
    hf_attention=hf_attention, hf_required=("num_landmarks",),
    options={"num_landmarks": Option("landmarks")},
    convert_resets={"conv_kernel_size": None},  # HF's conv term is kept only from a Nyström source
))  # fmt: skip

# HF Nystromformer: positions from row 2 (its table has 2 more rows than max_position_embeddings).
register_family(HFFamily(
    "nystromformer", "Nystromformer", "nystromformer", position_offset=2, pooling_arg=False,
    from_config=lambda c: dict(
        attention="nystrom", num_landmarks=c.num_landmarks, conv_kernel_size=c.conv_kernel_size,
        pinv_init="per_head" if c.inv_coeff_init_option else "hf_global",
        extra={"segment_means_seq_len": c.segment_means_seq_len},
    ),
    to_config=lambda cfg: dict(
        num_landmarks=cfg.num_landmarks, conv_kernel_size=cfg.conv_kernel_size,
        inv_coeff_init_option=cfg.pinv_init != "hf_global",
        segment_means_seq_len=cfg.extra.get("segment_means_seq_len", cfg.max_tokens),
    ),
))  # fmt: skip
