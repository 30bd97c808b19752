"""Block layout builders: each returns a `BlockLayout` (bool (heads or 1, blocks, blocks) + block size).

A layout covers ceil(seq_len / block_size) blocks; the ops pad the sequence to that many blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_positive_int
from .masks import BlockLayout


def _num_blocks(seq_len: int, block_size: int) -> int:
    check_positive_int(seq_len, "seq_len")
    check_positive_int(block_size, "block_size")
    return -(-seq_len // block_size)


def longformer_layout(
    seq_len: int,
    block_size: int = 64,
    num_window_blocks: int = 3,
    global_block_indices: Sequence[int] = (0,),
) -> BlockLayout:
    """Longformer as blocks: a band of `num_window_blocks` (odd) blocks around the diagonal, and global
    blocks that attend to, and are attended by, every block."""
    nb = _num_blocks(seq_len, block_size)
    check_positive_int(num_window_blocks, "num_window_blocks")
    if num_window_blocks % 2 == 0:
        raise ValueError(f"num_window_blocks: expected an odd int (the band is symmetric), got {num_window_blocks}")
    idx = torch.arange(nb)
    mask = (idx[:, None] - idx[None, :]).abs() <= num_window_blocks // 2
    for g in global_block_indices:
        if not -nb <= g < nb:
            raise ValueError(f"global_block_indices: block {g} is outside the {nb} blocks of seq_len {seq_len}")
        mask[g, :] = True
        mask[:, g] = True
    return BlockLayout(mask[None], block_size, "longformer")


def fixed_layout(
    seq_len: int,
    block_size: int = 64,
    num_local_blocks: int = 4,
    num_global_blocks: int = 1,
) -> BlockLayout:
    """Sparse Transformer's "fixed" pattern (bidirectional): blocks attend within their segment of
    `num_local_blocks` blocks, and the last `num_global_blocks` blocks of every segment are summary
    blocks every query attends to."""
    nb = _num_blocks(seq_len, block_size)
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
