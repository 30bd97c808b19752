"""Sparse Transformer's fixed pattern as blocks: segments of local blocks and their summary blocks."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from ..masks import BlockLayout
from . import num_blocks

__all__ = ["fixed_layout"]


def fixed_layout(
    seq_len: int,
    block_size: int = 64,
    num_local_blocks: int = 4,
    num_global_blocks: int = 1,
) -> BlockLayout:
    """Sparse Transformer's "fixed" pattern (bidirectional): blocks attend within their segment of
    `num_local_blocks` blocks, and the last `num_global_blocks` blocks of every segment are summary
    blocks every query attends to."""
    nb = num_blocks(seq_len, block_size)
    check_positive_int(num_local_blocks, "num_local_blocks")
    check_positive_int(num_global_blocks, "num_global_blocks", minimum=0)
    if num_global_blocks > num_local_blocks:
        raise ValueError(
            f"num_global_blocks: expected at most num_local_blocks ({num_local_blocks}), got {num_global_blocks}"
        )
    idx = torch.arange(nb)
    seg = idx // num_local_blocks
    mask = seg[:, None] == seg[None, :]
    summary = (idx % num_local_blocks) >= num_local_blocks - num_global_blocks
    mask |= summary[None, :]
    return BlockLayout(mask[None], block_size, "fixed")
