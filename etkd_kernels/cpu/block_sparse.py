"""Block-sparse attention on the `cpu` backend: thin calls into csrc/cpu/block_sparse.cpp.

The kernel walks each query block's list of allowed key blocks (`cached_lut`), so empty blocks cost nothing.
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels.cpu import note_tile_path
from etkd_kernels.masks import cached_lut


def forward(q, k, v, p):
    note_tile_path("block_sparse", q)
    lut, counts = cached_lut(p.layout)
    return torch.ops.etkd_cpu.block_sparse_fwd(
        q, k, v, lut, counts, p.block_size, p.key_padding_mask, p.scale, p.dropout_p, p.seed, p.offset
    )


def backward(grad_out, q, k, v, out, lse, p):
    lut, counts = cached_lut(p.layout)
    dq, dk, dv = torch.ops.etkd_cpu.block_sparse_bwd(
        grad_out, q, k, v, out, lse, lut, counts, p.block_size, p.key_padding_mask, p.scale,
        p.dropout_p, p.seed, p.offset,
    )  # fmt: skip
    return dq, dk, dv
