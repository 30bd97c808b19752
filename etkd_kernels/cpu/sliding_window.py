"""Sliding-window attention on the `cpu` backend: thin calls into csrc/cpu/sliding_window.cpp."""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)


def forward(q, k, v, p):
    return torch.ops.etkd_cpu.sliding_window_fwd(
        q, k, v, p.window, p.global_mask, p.qg, p.kg, p.vg, p.key_padding_mask, p.scale
    )


def backward(grad_out, q, k, v, out, lse, p):
    grads = torch.ops.etkd_cpu.sliding_window_bwd(
        grad_out.contiguous(), q, k, v, out, lse, p.window, p.global_mask, p.qg, p.kg, p.vg, p.key_padding_mask,
        p.scale,
    )  # fmt: skip
    return tuple(grads) + (None,) * (6 - len(grads))
