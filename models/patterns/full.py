"""Full (dense) attention: BERT/RoBERTa's own, the default pattern."""

from __future__ import annotations

import etkd_kernels as ek

from . import HFFamily, Pattern, register, register_family


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # Attention dropout on the probabilities, as BERT/RoBERTa apply it.
    return ek.full_attention(
        q, k, v, key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend
    )


# `etkd.hf`'s `etkd_full` is written in etkd.hf itself (it computes padded rows as HF's eager code does).
PATTERN = register(
    Pattern("full", "full", adapter, hf_name="etkd_full", label="full attention", hf_model_type="")
)
# The checkpoint families of full attention (`hf_model_type` "": a model exports to the family it came from).
register_family(HFFamily("bert", "Bert", "bert", head_style="bert", holds_full=True))
register_family(HFFamily("roberta", "Roberta", "roberta", fairseq=True, holds_full=True))
