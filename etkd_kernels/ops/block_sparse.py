"""`block_sparse_attention`: exact softmax restricted to the allowed blocks of a block layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._checks import check_qkv
from ..masks import BlockLayout
from ._common import OpOptions, common_settings, public_op, run
from ._define import CommonParams, define

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(frozen=True)
class BlockSparseParams(CommonParams):
    """What every backend's forward/backward gets besides the tensors (see `block_sparse_attention`).
    layout: the (heads or 1, q_blocks, k_blocks) bool mask of a `BlockLayout` whose block size is block_size."""

    layout: torch.Tensor
    block_size: int


_fwd_op = define("block_sparse", BlockSparseParams)


def as_layout(
    layout: BlockLayout | torch.Tensor, seq_len: int, heads: int, device: torch.device
) -> BlockLayout:
    """Check `layout` against a (heads, seq_len) input and return it as a BlockLayout on `device`."""
    if isinstance(layout, torch.Tensor):
        if layout.dtype != torch.bool or layout.dim() != 3:
            raise TypeError(
                f"layout: expected a BlockLayout or a bool tensor (heads or 1, q_blocks, k_blocks), "
                f"got {layout.dtype} tensor of shape {tuple(layout.shape)}"
            )
        nb = layout.shape[1]
        if nb == 0 and seq_len == 0:
            return BlockLayout(layout, 1).to(device)  # an empty sequence with an empty layout
        if nb == 0 or seq_len % nb:
            raise ValueError(
                f"layout: a plain tensor's block size is seq_len / q_blocks, but seq_len {seq_len} is not a "
                f"multiple of q_blocks {nb}; pass a BlockLayout (it carries its block size) instead"
            )
        layout = BlockLayout(layout, seq_len // nb)
    elif not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout or a bool tensor, got {type(layout).__name__}")
    nb = -(-seq_len // layout.block_size)
    if layout.q_blocks != nb or layout.k_blocks != nb:
        raise ValueError(
            f"layout: expected ({nb}, {nb}) blocks for seq_len {seq_len} with block_size {layout.block_size}, "
            f"got ({layout.q_blocks}, {layout.k_blocks})"
        )
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout: expected 1 or {heads} heads, got {layout.num_heads}")
    return layout.to(device)


@public_op()
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | torch.Tensor,
    **options: Unpack[OpOptions],
) -> torch.Tensor:
    """Exact softmax attention restricted to the allowed (query block, key block) pairs of `layout`.

    q, k, v: (batch, heads, seq, head_dim). layout: a `BlockLayout` from a builder of `etkd_kernels.layouts`
    (one per pattern, e.g. `bigbird_layout`) or a bool tensor (heads or 1, q_blocks, k_blocks)
    whose block size is seq / q_blocks. A seq that is not a multiple of the block size is padded inside.
    key_padding_mask: (batch, seq) bool, True = real token. Returns (batch, heads, seq, head_dim); rows that
    see no real key (padded queries among them) are zeros.
    {dropout}

    Plain-PyTorch meaning: softmax(scale * q @ k.T masked by layout.to_dense() & key_padding_mask) @ v.
    """
    check_qkv(q, k, v)
    layout = as_layout(layout, q.shape[2], q.shape[1], q.device)
    common, backend = common_settings(q, k, v, options)
    p = BlockSparseParams(layout.mask.contiguous(), layout.block_size, **common)
    return run(_fwd_op, q, k, v, p, backend, multiple=layout.block_size)
