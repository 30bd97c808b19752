"""LSG's local + global part as blocks (its sparse keys are not block-aligned)."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from ..masks import BlockLayout
from . import empty_layout, num_blocks

__all__ = ["lsg_layout"]


def lsg_layout(seq_len: int, block_size: int = 128, num_global_blocks: int = 1) -> BlockLayout:
    """The block-level layout of LSG's local + global part, for the block-sparse op and kernels.

    Query block i sees key blocks i-1, i, i+1 (LSG's local window: its own block and one each side), and
    the first `num_global_blocks` blocks are global (they see every block and every block sees them).
    This is a superset of `lsg_attention`'s local + global keys when num_global_tokens <=
    num_global_blocks * block_size (the whole first block(s) become global, not just the global tokens)
    and has no sparse (compressed) keys: those are not block-aligned, see `etkd_kernels.reference.lsg`.
    """
    nb = num_blocks(seq_len, block_size)
    check_positive_int(num_global_blocks, "num_global_blocks", minimum=0)
    if nb == 0:
        return empty_layout(block_size, "lsg")
    if num_global_blocks > nb:
        raise ValueError(
            f"num_global_blocks: expected at most {nb} (blocks of seq_len {seq_len}), got {num_global_blocks}"
        )
    idx = torch.arange(nb)
    mask = (idx[:, None] - idx[None, :]).abs() <= 1
    glob = idx < num_global_blocks
    mask |= glob[:, None] | glob[None, :]
    return BlockLayout(mask[None], block_size, "lsg")
