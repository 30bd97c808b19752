"""BigBird: block-sparse attention with sliding, global and random blocks (HF `BigBirdBlockSparseAttention`)."""

from __future__ import annotations

import torch

import etkd_kernels as ek

from . import HFFamily, Option, Pattern, register, register_family
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


@torch.compiler.disable  # drawn once per (length, device) and cached on the module
def _hf_layout(module, settings: dict, seq: int, heads: int, device) -> ek.BlockLayout:
    cache = module.__dict__.setdefault("_etkd_layouts", {})
    key = (seq, str(device))
    if key not in cache:
        layer = getattr(module, "layer_idx", None) or 0
        cache[key] = ek.bigbird_layout(
            seq,
            int(settings["block_size"]),
            num_window_blocks=int(settings.get("num_window_blocks", 3)),
            num_global_blocks=int(settings.get("num_global_blocks", 2)),
            num_random_blocks=int(settings.get("num_random_blocks", 3)),
            seed=int(settings.get("seed", 0)) + layer,
            num_heads=heads,
        ).to(device)
    return cache[key]


def hf_attention(module, query, key, value, settings, kwargs, common):
    """`etkd_block_sparse` (`etkd.hf`): settings `block_size`, `num_random_blocks`, `num_window_blocks`,
    `num_global_blocks`, `seed` (a BigBird layout drawn per layer from seed + layer index)."""
    layout = _hf_layout(module, settings, query.shape[2], query.shape[1], query.device)
    return ek.block_sparse_attention(query, key, value, layout, **common)


PATTERN = register(Pattern(
    "bigbird", "block_sparse", adapter, ("block_size", "num_random_blocks", "random_seed"),
    hf_name="etkd_block_sparse",
    hf_settings={"block_size": "block_size", "num_random_blocks": "num_random_blocks", "seed": "random_seed"},
    label="BigBird {BLOCK}, 3+2+{RANDOM_BLOCKS} blocks", hf_model_type="big_bird",
    hf_attention=hf_attention, hf_required=("block_size",),
    options={"block_size": Option("block size"), "num_random_blocks": Option("random blocks per row")},
))  # fmt: skip

# HF BigBird: block_sparse checkpoints are this pattern, original_full ones full attention.
register_family(HFFamily(
    "big_bird", "BigBird", "bert", pooler="pooler", holds_full=True,
    from_config=lambda c: dict(
        rescale_embeddings=c.rescale_embeddings, block_size=c.block_size, num_random_blocks=c.num_random_blocks,
        attention="bigbird" if c.attention_type == "block_sparse" else "full",
    ),
    to_config=lambda cfg: dict(
        attention_type="block_sparse" if cfg.attention == "bigbird" else "original_full",
        block_size=cfg.block_size, num_random_blocks=cfg.num_random_blocks,
        rescale_embeddings=cfg.rescale_embeddings,
    ),
    unsupported={"BigBirdForQuestionAnswering": "has its own MLP head; load BigBirdModel instead"},
))  # fmt: skip
