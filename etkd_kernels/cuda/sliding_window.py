"""Sliding-window (Longformer) attention on the fused CUDA kernels of csrc/cuda/sliding_window.cu.

Same contract as `etkd_kernels.reference.sliding_window` (which defines the semantics): q, k, v and the
optional global projections qg, kg, vg are (batch, heads, seq, head_dim) tensors of one dtype
(float16/bfloat16/float32, head_dim 32/64/128); masks are (batch, seq) bool; lse is (batch, heads, seq)
float32, +inf for rows that see no key.
"""

from __future__ import annotations

import importlib

import torch


def _ops():
    """torch.ops.etkd_cuda, registered by importing the extension on first use (no import-time probe)."""
    if not hasattr(torch.ops.etkd_cuda, "sliding_window_fwd"):
        try:
            importlib.import_module("etkd_kernels._C_cuda")
        except ImportError as exc:
            raise RuntimeError(
                "the cuda backend needs the compiled extension etkd_kernels._C_cuda, which is not built "
                f"({exc}); install with a CUDA build of torch and a CUDA toolkit, or use another backend"
            ) from exc
    return torch.ops.etkd_cuda


def dropout(p) -> tuple[float, int, int]:
    """(dropout_p, seed, offset) of params `p` for the kernels (csrc/common/philox.h: the RNG contract of
    etkd_kernels/_shared/); p == 0 runs the dropout-free kernels."""
    return float(p.dropout_p), int(p.seed), int(p.offset)


def forward(q, k, v, p) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, S, D), lse (B, H, S) float32); p: `ops.sliding_window.SlidingWindowParams`."""
    return _ops().sliding_window_fwd(
        q,
        k,
        v,
        int(p.window),
        p.global_mask,
        p.qg,
        p.kg,
        p.vg,
        p.key_padding_mask,
        float(p.scale),
        *dropout(p),
    )


def backward(grad_out, q, k, v, out, lse, p) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dqg, dkg, dvg); the last three are None when p.qg is None."""
    dq, dk, dv, dqg, dkg, dvg = _ops().sliding_window_bwd(
        grad_out, q, k, v, out, lse, int(p.window), p.global_mask, p.qg, p.kg, p.vg, p.key_padding_mask,
        float(p.scale), *dropout(p),
    )  # fmt: skip
    if p.qg is None:  # the schema returns empty tensors for absent global gradients
        return dq, dk, dv, None, None, None
    return dq, dk, dv, dqg, dkg, dvg
