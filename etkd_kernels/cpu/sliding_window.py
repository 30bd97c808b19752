"""Sliding-window attention on the `cpu` backend: thin calls into csrc/cpu/sliding_window.cpp.

The global-token list is `GlobalTokens.of` (etkd_kernels.masks), the one builder every backend reads; it is
cached per mask, so a forward and its backward share it.
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels.cpu import note_tile_path
from etkd_kernels.masks import GlobalTokens


def _globals(global_mask, key_padding_mask):
    if global_mask is None:
        return None, None, None
    glob = GlobalTokens.of(global_mask, key_padding_mask)
    return glob.mask, glob.index, glob.count


def forward(q, k, v, p):
    note_tile_path("sliding_window", q)
    return torch.ops.etkd_cpu.sliding_window_fwd(
        q, k, v, p.window, *_globals(p.global_mask, p.key_padding_mask), p.qg, p.kg, p.vg, p.key_padding_mask,
        p.scale, p.dropout_p, p.seed, p.offset,
    )  # fmt: skip


def backward(grad_out, q, k, v, out, lse, p):
    grads = torch.ops.etkd_cpu.sliding_window_bwd(
        grad_out, q, k, v, out, lse, p.window, *_globals(p.global_mask, p.key_padding_mask),
        p.qg, p.kg, p.vg, p.key_padding_mask, p.scale, p.dropout_p, p.seed, p.offset,
    )  # fmt: skip
    return tuple(grads) + (None,) * (6 - len(grads))
