"""Sliding-window attention on the `cpu` backend: thin calls into csrc/cpu/sliding_window.cpp.

The global-token list is `GlobalTokens.of` (etkd_kernels.masks), the one builder every backend reads; it is
cached per mask, so a forward and its backward share it.
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels.masks import GlobalTokens


def _globals(global_mask, key_padding_mask):
    if global_mask is None:
        return None, None, None
    glob = GlobalTokens.of(global_mask, key_padding_mask)
    return glob.mask, glob.index, glob.count


def forward(q, k, v, window, global_mask, qg, kg, vg, key_padding_mask, scale):
    return torch.ops.etkd_cpu.sliding_window_fwd(
        q, k, v, window, *_globals(global_mask, key_padding_mask), qg, kg, vg, key_padding_mask, scale
    )


def backward(grad_out, q, k, v, out, lse, window, global_mask, qg, kg, vg, key_padding_mask, scale):
    grads = torch.ops.etkd_cpu.sliding_window_bwd(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        window,
        *_globals(global_mask, key_padding_mask),
        qg,
        kg,
        vg,
        key_padding_mask,
        scale,
    )
    return tuple(grads) + (None,) * (6 - len(grads))
