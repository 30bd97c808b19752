"""LSG: local, sparse and global attention as lsg-converter's LSG RoBERTa/BERT models run it."""

from __future__ import annotations

import etkd_kernels as ek

from . import Pattern, register


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # LSG RoBERTa: the encoder has prepended num_global_tokens global embeddings (lsg-converter's model files).
    # Attention dropout on the probabilities, as lsg-converter applies it.
    cfg = attn.config
    return ek.lsg_attention(
        q, k, v, block_size=cfg.block_size, sparse_block_size=cfg.sparse_block_size,
        sparsity_factor=cfg.sparsity_factor, sparsity_type=cfg.sparsity_type,
        num_global_tokens=cfg.num_global_tokens, key_padding_mask=key_padding_mask, variant="model",
        dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


PATTERN = register(Pattern(
    "lsg", "lsg", adapter,
    ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type", "num_global_tokens",
     "pool_with_global", "mask_first_token", "adaptive"),
    hf_name="etkd_lsg",
    hf_unsupported=lambda config: (
        "LSG RoBERTa's global embeddings (prepended tokens) have no place in a BERT/RoBERTa class; write it as "
        "lsg-converter's checkpoint (save_pretrained(dir, format='lsg'), --format lsg)"
    ),
    hf_settings={k: k for k in ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type",
                                "num_global_tokens")},
    label="LSG {LSG_BLOCK} (+{LSG_BLOCK} pooled each side)",
))  # fmt: skip
