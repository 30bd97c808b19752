"""Full (dense) attention: BERT/RoBERTa's own, the default pattern."""

from __future__ import annotations

import etkd_kernels as ek

from . import Pattern, register


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # Attention dropout on the probabilities, as BERT/RoBERTa apply it.
    return ek.full_attention(
        q, k, v, key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend
    )


PATTERN = register(
    Pattern("full", "full", adapter, hf_name="etkd_full", label="full attention", hf_model_type="")
)
