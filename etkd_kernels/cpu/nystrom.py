"""Nystrom attention on the `cpu` backend.

Forward: `nystrom_fwd` of csrc/cpu/nystrom.cpp does the whole computation (landmark means, K2 softmax,
Newton-Schulz pseudo-inverse, K3 @ v, K1 @ X) in one parallel loop over (batch, head), with no per-op
dispatch. Backward: `nystrom_bwd`, written out by hand (Newton-Schulz iterations included): per
(batch, head) it recomputes the forward with whole-head BLAS products and runs the chain rule back; the
(seq x landmarks) matrices exist only in one thread's scratch while its head is processed, nothing of that
size is kept from the forward. landmarks == seq (exact softmax attention) differentiates the fused
`softmax(scale * a @ b^T, masked) @ c` kernel instead.
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels._shared import iterative_pinv, recompute_backward, segment_means
from etkd_kernels.cpu._dtype import in_float32


class _SoftmaxMatmul(torch.autograd.Function):
    """softmax(scale * a @ b^T, keys masked by key_mask) @ c; a (B, H, M, D), b and c (B, H, N, D)."""

    @staticmethod
    def forward(ctx, a, b, c, key_mask, scale):
        a, b, c = a.contiguous(), b.contiguous(), c.contiguous()
        out, lse = torch.ops.etkd_cpu.softmax_matmul_fwd(a, b, c, key_mask, scale)
        ctx.save_for_backward(a, b, c, out, lse)
        ctx.key_mask, ctx.scale = key_mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, c, out, lse = ctx.saved_tensors
        da, db, dc = torch.ops.etkd_cpu.softmax_matmul_bwd(
            grad_out.contiguous(), a, b, c, out, lse, ctx.key_mask, ctx.scale
        )
        return da, db, dc, None, None


def softmax_matmul(a, b, c, key_mask, scale):
    return _SoftmaxMatmul.apply(a, b, c, key_mask, scale)


def attend(q, k, v, num_landmarks, pinv_iterations, key_padding_mask, scale, pinv_init):
    s = q.shape[2]
    if num_landmarks == s:
        out = softmax_matmul(q, k, v, key_padding_mask, scale)  # exact softmax attention
    else:
        ql, kl = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
        k2 = torch.softmax((ql @ kl.transpose(-1, -2)) * scale, dim=-1)  # (b, h, L, L)
        x = iterative_pinv(k2, pinv_iterations, pinv_init) @ softmax_matmul(ql, k, v, key_padding_mask, scale)
        out = softmax_matmul(q, kl, x, None, scale)
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[:, None, :, None], out, torch.zeros_like(out))
    return out


@in_float32
def forward(q, k, v, p):
    with torch.no_grad():
        if p.num_landmarks == q.shape[2]:
            return attend(
                q, k, v, p.num_landmarks, p.pinv_iterations, p.key_padding_mask, p.scale, p.pinv_init
            )
        return torch.ops.etkd_cpu.nystrom_fwd(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            p.num_landmarks,
            p.pinv_iterations,
            p.key_padding_mask,
            p.scale,
            p.pinv_init == "hf_global",
        )


@in_float32
def backward(grad_out, q, k, v, out, p):
    num_landmarks, pinv_iterations, key_padding_mask = p.num_landmarks, p.pinv_iterations, p.key_padding_mask
    scale, pinv_init = p.scale, p.pinv_init
    if num_landmarks == q.shape[2]:
        return recompute_backward(
            attend, grad_out, (q, k, v), num_landmarks, pinv_iterations, key_padding_mask, scale, pinv_init
        )
    if key_padding_mask is not None:  # padded output rows are set to zero: no gradient flows from them
        grad_out = grad_out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
    return torch.ops.etkd_cpu.nystrom_bwd(
        grad_out.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        num_landmarks,
        pinv_iterations,
        key_padding_mask,
        scale,
        pinv_init == "hf_global",
    )
