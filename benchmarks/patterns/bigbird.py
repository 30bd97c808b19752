"""BigBird in the benchmarks: blocks of 64 with 3 window, 2 global and 3 random blocks (the paper's size), with
HF's `BigBirdBlockSparseAttention` driven one way for the parity tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn

import etkd_kernels as ek

from ..hf_reference import projections
from . import Bench, PatternInputs, cached_projections, hf_providers, inputs, register

BLOCK, RANDOM_BLOCKS = 64, 3


def bigbird_module(
    hidden: int, heads: int, block_size: int, num_random_blocks: int, seed: int = 0, max_positions: int = 4096
) -> nn.Module:
    """HF BigBirdBlockSparseAttention. `seed` seeds its random-block generator; `max_positions` matters at
    seq 1024/3072/4096, where HF switches to the paper's legacy plan sized by it."""
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    cfg = BigBirdConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_type="block_sparse",
        block_size=block_size,
        num_random_blocks=num_random_blocks,
        max_position_embeddings=max_positions,
        attention_probs_dropout_prob=0.0,
    )
    return BigBirdBlockSparseAttention(cfg, seed=seed)


def record_random_blocks(module: nn.Module) -> nn.Module:
    """Make the module keep the random block indices it draws (whichever of HF's two generators its plan
    uses), for `recorded_random_blocks`."""
    module.recorded = {}
    for name in ("_bigbird_block_rand_mask_with_head", "_bigbird_block_rand_mask"):
        orig = getattr(module, name)

        def wrap(*args, _orig=orig, _name=name, **kwargs):
            res = _orig(*args, **kwargs)
            module.recorded.setdefault(_name, []).append(res)
            return res

        setattr(module, name, wrap)
    return module


def recorded_random_blocks(module: nn.Module, num_blocks: int):
    """The (heads, num_blocks - 2, r) random block indices of the module's last-recorded forward."""
    import numpy as np

    rec = module.recorded
    if "_bigbird_block_rand_mask_with_head" in rec:
        return np.stack(rec["_bigbird_block_rand_mask_with_head"][0])
    return np.stack([a[: num_blocks - 2] for a in rec["_bigbird_block_rand_mask"]])  # legacy: one per head


def run_bigbird(module: nn.Module, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """HF BigBirdBlockSparseAttention on x (batch, seq, hidden), seq a multiple of the block size."""
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel

    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        real.to(x.dtype), module.block_size
    )
    return module(
        x,
        band_mask=band,
        from_mask=from_mask,
        to_mask=to_mask,
        from_blocked_mask=blocked,
        to_blocked_mask=blocked,
    )[0]


def block_pairs(layout: ek.BlockLayout, heads: int) -> int:
    """Scores of a block layout over all heads (a layout shared by the heads counts once per head)."""
    nnz = int(layout.mask.sum()) * layout.block_size**2
    return nnz * (heads if layout.num_heads == 1 else 1)


def setup(setup, x, real, glob) -> PatternInputs:
    mod = bigbird_module(setup.hidden, setup.heads, BLOCK, RANDOM_BLOCKS).to(setup.device, setup.dtype)
    mod.eval()
    hf_providers(setup, x, mod, ("query", "key", "value"), run_bigbird, real)
    layout = ek.bigbird_layout(setup.seq, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS, seed=0)
    layout = layout.to(setup.device)
    op = lambda b, **kw: (lambda q, k, v: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=b, **kw))  # fmt: skip
    dense = layout.mask[0]
    return PatternInputs(
        tuple(t.detach().contiguous() for t in projections(mod, x, setup.heads)), op,
        4.0 * setup.batch * setup.head_dim * block_pairs(layout, setup.heads),
        mask_mod=lambda b, h, qi, ki: dense[qi // BLOCK, ki // BLOCK],
    )  # fmt: skip


def dropout_core(setup, p: float):
    # transformers 5.25: only the full-attention BigBirdSelfAttention has `self.dropout`; the block-sparse
    # module applies no attention dropout at all, so this row is HF without dropout, and says so.
    x, real, _ = inputs(setup.batch, setup.seq, setup.hidden, setup.device, setup.dtype)
    mod = bigbird_module(setup.hidden, setup.heads, BLOCK, RANDOM_BLOCKS).to(setup.device, setup.dtype)
    core = cached_projections(mod, ("query", "key", "value")).train()
    note = "BigBirdBlockSparseAttention, train: HF applies no attention dropout in block_sparse mode"
    return (lambda x: run_bigbird(core, x, real)), (x,), note


register(Bench(
    "bigbird", setup, sizes={"BLOCK": BLOCK, "RANDOM_BLOCKS": RANDOM_BLOCKS},
    settings={"block_size": BLOCK, "num_random_blocks": RANDOM_BLOCKS}, positions="big_bird",
    dropout_core=dropout_core,
    model_note="HF's eval mode repeats random block 0 where ours draws seeded random blocks, so the whole "
    "models differ beyond rounding (tests/test_models_hf.py compares them on HF's own random blocks)",
))  # fmt: skip
