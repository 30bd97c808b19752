"""Sparse Transformer's "fixed" pattern as a block layout: blocks attend within their segment of
`num_local_blocks` blocks and to the last `num_global_blocks` (summary) blocks of every segment. No HF model
has it."""

from __future__ import annotations

import torch

import etkd_kernels as ek

from . import Pattern, register


@torch.compiler.disable  # built once per length and cached; a compiled model breaks the graph only then
def _layout(cfg, seq: int) -> ek.BlockLayout:
    return ek.fixed_layout(seq, cfg.block_size, cfg.num_local_blocks, cfg.num_global_blocks)


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    key = ("fixed", q.shape[2], str(q.device))
    if key not in attn.cache:
        attn.cache[key] = _layout(attn.config, q.shape[2]).to(q.device)
    # No HF model has this pattern: attention dropout on the probabilities, as in BERT and the Sparse Transformer.
    return ek.block_sparse_attention(
        q, k, v, attn.cache[key], key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend
    )


PATTERN = register(Pattern(
    "fixed", "block_sparse", adapter, ("block_size", "num_local_blocks", "num_global_blocks"),
    label="fixed: {BLOCK}-token blocks, segments of 4 with 1 summary block",
))  # fmt: skip
