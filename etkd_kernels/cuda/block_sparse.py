"""Block-sparse attention on the fused CUDA kernels of csrc/cuda/block_sparse.cu.

Same contract as `etkd_kernels.reference.block_sparse`: q, k, v (batch, heads, seq, head_dim) with
seq == n_blocks * block_size (the public op pads first); layout (heads or 1, q_blocks, k_blocks) bool.
The kernels read a look-up table of allowed key blocks per query block instead of the dense layout:
`etkd_kernels.masks.cached_lut` builds it (int32 (Hl, nqb, max_nnz), ascending, plus int32 counts; entries
past the count are never read), once per layout tensor and version, shared with every other backend.
"""

from __future__ import annotations

import torch

from ..masks import cached_lut
from .sliding_window import _ops, dropout


def _check(q: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    b, h, s, _ = q.shape
    if block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size}")
    if layout.dim() != 3 or layout.shape[0] not in (1, h) or s % block_size:
        raise ValueError(
            f"layout: expected (1 or {h}, {s // block_size}, {s // block_size}) for seq {s} and block_size "
            f"{block_size}, got {tuple(layout.shape)}"
        )
    if layout.shape[1] * block_size != s or layout.shape[2] * block_size != s:
        raise ValueError(f"layout: {tuple(layout.shape)} blocks of {block_size} do not cover seq {s}")


def forward(q, k, v, p) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, S, D), lse (B, H, S) float32; rows that see no key: out 0, lse +inf);
    p: `ops.block_sparse.BlockSparseParams`."""
    _check(q, p.layout, p.block_size)
    lut, count = cached_lut(p.layout.to(device=q.device, dtype=torch.bool))
    return _ops().block_sparse_fwd(
        q, k, v, lut, count, int(p.block_size), p.key_padding_mask, float(p.scale), *dropout(p)
    )


def backward(grad_out, q, k, v, out, lse, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv)."""
    _check(q, p.layout, p.block_size)
    lut, count = cached_lut(p.layout.to(device=q.device, dtype=torch.bool))
    return tuple(
        _ops().block_sparse_bwd(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            lut,
            count,
            int(p.block_size),
            p.key_padding_mask,
            float(p.scale),
            *dropout(p),
        )
    )
