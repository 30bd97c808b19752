"""BigBird: block-sparse attention with sliding, global and random blocks (HF `BigBirdBlockSparseAttention`)."""

from __future__ import annotations

import torch

import etkd_kernels as ek

from . import Pattern, register
from .full import adapter as full


@torch.compiler.disable  # built once per length and cached; a compiled model breaks the graph only then
def _layout(cfg, seq: int, seed: int) -> ek.BlockLayout:
    return ek.bigbird_layout(
        seq, cfg.block_size, num_random_blocks=cfg.num_random_blocks, seed=seed, num_heads=cfg.num_heads
    )


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    cfg = attn.config
    bs, r, s = cfg.block_size, cfg.num_random_blocks, q.shape[2]
    if s <= (5 + 2 * r) * bs:
        # Too short for the block pattern; HF's BigBirdModel switches to full attention here too (and its
        # full path applies attention dropout).
        return full(attn, x, q, k, v, key_padding_mask, global_mask, backend)
    if attn.rand_attn is not None:
        # Fixed random blocks (heads, nb - 2, r), e.g. HF's own indices for exact parity.
        layout = ek.bigbird_layout(s, bs, num_random_blocks=r, rand_attn=attn.rand_attn)
    else:
        # Seeded per layer and cached per length, so a model gives the same output on every call.
        key = ("bigbird", s, str(q.device))
        if key not in attn.cache:
            attn.cache[key] = _layout(cfg, s, cfg.random_seed + attn.layer_index).to(q.device)
        layout = attn.cache[key]
    # No attention dropout here: HF's BigBirdBlockSparseAttention applies none (its full fallback does).
    return ek.block_sparse_attention(q, k, v, layout, key_padding_mask=key_padding_mask, backend=backend)


PATTERN = register(Pattern(
    "bigbird", "block_sparse", adapter, ("block_size", "num_random_blocks", "random_seed"),
    hf_name="etkd_block_sparse",
    hf_settings={"block_size": "block_size", "num_random_blocks": "num_random_blocks", "seed": "random_seed"},
    label="BigBird {BLOCK}, 3+2+{RANDOM_BLOCKS} blocks", hf_model_type="big_bird",
))  # fmt: skip
