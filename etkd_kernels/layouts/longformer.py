"""Longformer as blocks: a band around the diagonal plus global blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_positive_int
from ..masks import BlockLayout
from . import empty_layout, num_blocks

__all__ = ["longformer_layout"]


def longformer_layout(
    seq_len: int,
    block_size: int = 64,
    num_window_blocks: int = 3,
    global_block_indices: Sequence[int] = (0,),
) -> BlockLayout:
    """Longformer as blocks: a band of `num_window_blocks` (odd) blocks around the diagonal, and global
    blocks that attend to, and are attended by, every block."""
    nb = num_blocks(seq_len, block_size)
    check_positive_int(num_window_blocks, "num_window_blocks")
    if num_window_blocks % 2 == 0:
        raise ValueError(
            f"num_window_blocks: expected an odd int (the band is symmetric), got {num_window_blocks}"
        )
    if nb == 0:
        return empty_layout(block_size, "longformer")
    idx = torch.arange(nb)
    mask = (idx[:, None] - idx[None, :]).abs() <= num_window_blocks // 2
    for g in global_block_indices:
        if not -nb <= g < nb:
            raise ValueError(
                f"global_block_indices: block {g} is outside the {nb} blocks of seq_len {seq_len}"
            )
        mask[g, :] = True
        mask[:, g] = True
    return BlockLayout(mask[None], block_size, "longformer")
