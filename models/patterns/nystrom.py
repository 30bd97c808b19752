"""Nyström attention: softmax attention through landmarks and an iterative pseudo-inverse (HF Nystromformer)."""

from __future__ import annotations

import etkd_kernels as ek

from . import Pattern, register


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


PATTERN = register(Pattern(
    "nystrom", "nystrom", adapter, ("num_landmarks", "pinv_iterations", "pinv_init", "conv_kernel_size"),
    hf_name="etkd_nystrom",
    hf_unsupported=lambda config: (
        "a Nystrom conv term has no place in a BERT/RoBERTa class" if config.conv_kernel_size is not None else None
    ),
    hf_settings={k: k for k in ("num_landmarks", "pinv_iterations", "pinv_init")},
    label="Nyström {LANDMARKS} landmarks", hf_model_type="nystromformer",
))  # fmt: skip
