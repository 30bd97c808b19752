"""Nystrom attention on the `cpu` backend.

Forward: `nystrom_fwd` of csrc/cpu/nystrom.cpp does the whole computation (landmark means, K2 softmax,
Newton-Schulz pseudo-inverse, K3 @ v, K1 @ X) in three parallel loops, with no per-op dispatch. Backward:
`nystrom_bwd`, written out by hand (Newton-Schulz iterations included): per (batch, head) it recomputes K3 per key
tile (from the forward's log-sum-exp per landmark) and, unless the forward kept it (`keep_k1`), K1 per query tile,
on the target's own kernels, and runs the chain rule back; K3 (seq x landmarks) exists only tile by tile. q, k, v are read at any row strides (`Capabilities.strided`: a model's head-split views of its stacked q/k/v
projection, every pass over them in place), out and dq, dk, dv written in their layouts. landmarks == seq (exact softmax attention) differentiates the fused
`softmax(scale * a @ b^T, masked) @ c` kernel instead. Attention dropout (dropout_p > 0) drops entries of K1 (query
row i, landmark l: column seq + l), in the forward's query tiles and in the backward's recomputed K1, or the
probabilities of the exact case (key columns), as etkd_kernels/reference/nystrom.py defines it.
"""

from __future__ import annotations

import os

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels._env import EnvironmentValueError
from etkd_kernels._shared import recompute_backward
from etkd_kernels.cpu._dtype import in_float32


class _SoftmaxMatmul(torch.autograd.Function):
    """softmax(scale * a @ b^T, keys masked by key_mask) @ c; a (B, H, M, D), b and c (B, H, N, D); dropout
    (p, seed, offset) on the probabilities, rows and columns their positions in a and b."""

    @staticmethod
    def forward(ctx, a, b, c, key_mask, scale, dropout):
        a, b, c = a.contiguous(), b.contiguous(), c.contiguous()
        out, lse = torch.ops.etkd_cpu.softmax_matmul_fwd(a, b, c, key_mask, scale, *dropout)
        ctx.save_for_backward(a, b, c, out, lse)
        ctx.key_mask, ctx.scale, ctx.dropout = key_mask, scale, dropout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, c, out, lse = ctx.saved_tensors
        da, db, dc = torch.ops.etkd_cpu.softmax_matmul_bwd(
            grad_out.contiguous(), a, b, c, out, lse, ctx.key_mask, ctx.scale, *ctx.dropout
        )
        return da, db, dc, None, None, None


def softmax_matmul(a, b, c, key_mask, scale, dropout=(0.0, 0, 0)):
    return _SoftmaxMatmul.apply(a, b, c, key_mask, scale, dropout)


def exact(q, k, v, key_padding_mask, scale, dropout):
    """num_landmarks == seq: exact softmax attention by the fused kernel, padded query rows zero. (The landmark case
    runs in nystrom_fwd / nystrom_bwd whole, not as a composite of softmax_matmul calls.)"""
    out = softmax_matmul(q, k, v, key_padding_mask, scale, dropout)
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[:, None, :, None], out, torch.zeros_like(out))
    return out


def _dropout(p):
    """(dropout_p, seed, offset) as the kernels take them: on K1 (query i, landmark l: column seq + l), or on the
    probabilities of the exact case (key columns), as etkd_kernels/reference/nystrom.py draws them."""
    return p.dropout_p, p.seed, p.offset


K1_MODES = ("auto", "keep", "recompute")


def keep_k1() -> bool:
    """Whether the forward keeps K1 (seq x landmarks per head, fp32: 12 MiB at 12 x 4096 x 64 landmarks) for the
    backward instead of the backward recomputing its scores and softmax. ETKD_CPU_NYSTROM_K1 (read per call):
    `keep`, `recompute`, or `auto` (the default): keep on targets whose own products are narrower than AVX-512's
    16-float vectors (avx2, generic), where the saved product costs twice as much as on AVX-512 and outweighs writing
    and re-reading K1; recompute on AVX-512 (measured break-even there; README's Nystrom notes)."""
    mode = os.environ.get("ETKD_CPU_NYSTROM_K1", "").strip() or "auto"
    if mode not in K1_MODES:
        raise EnvironmentValueError(f"ETKD_CPU_NYSTROM_K1={mode}: expected {', '.join(K1_MODES)}")
    if mode != "auto":
        return mode == "keep"
    return _C.own_tile_width() != 16


def k1_description() -> str:
    """What `keep_k1` chooses here, and why, for `etkd info`."""
    mode = os.environ.get("ETKD_CPU_NYSTROM_K1", "").strip() or "auto"
    kept = "kept from the forward" if keep_k1() else "recomputed in the backward"
    why = (
        f"ETKD_CPU_NYSTROM_K1={mode}"
        if mode != "auto"
        else "auto by target; ETKD_CPU_NYSTROM_K1=keep|recompute"
    )
    return f"Nystrom K1 {kept} ({why})"


def saved_like(q, p):
    """What `forward` keeps for `backward` (etkd_kernels.ops._define: `saved`): per (batch, head), T = K3 @ v and the
    landmarks q~, k~, each (landmarks, head_dim padded to whole 16-float vectors), and K3's log-sum-exp per landmark
    (landmarks padded to whole vectors), float32; nothing for the exact landmarks == seq case. K1 and K3 ((seq,
    landmarks) each) are recomputed by the backward; K1 (before dropout, landmarks padded) follows when `keep_k1()`."""
    b, h, s, d = q.shape
    if p.num_landmarks == s:
        return q.new_empty(0, dtype=torch.float32)
    c = max(1, -(-s // p.num_landmarks))  # seq 0: no landmark
    n = -(-s // c)
    dp, np_ = -(-d // 16) * 16, -(-n // 16) * 16  # csrc/cpu/nystrom.cpp: saved_floats, k1_floats
    return q.new_empty(b, h, 3 * n * dp + np_ + (s * np_ if keep_k1() else 0), dtype=torch.float32)


@in_float32(keep=(1,))
def forward(q, k, v, p):
    with torch.no_grad():
        if p.num_landmarks == q.shape[2]:
            return exact(q, k, v, p.key_padding_mask, p.scale, _dropout(p)), saved_like(q, p)
        return torch.ops.etkd_cpu.nystrom_fwd(
            q,  # q, k, v read at any row strides (a model's head-split views); out in q's layout
            k,
            v,
            p.num_landmarks,
            p.pinv_iterations,
            p.key_padding_mask,
            p.scale,
            p.pinv_init == "hf_global",
            *_dropout(p),
            keep_k1(),
        )


@in_float32
def backward(grad_out, q, k, v, out, saved, p):
    num_landmarks, pinv_iterations, key_padding_mask = p.num_landmarks, p.pinv_iterations, p.key_padding_mask
    scale, pinv_init = p.scale, p.pinv_init
    if num_landmarks == q.shape[2]:
        return recompute_backward(exact, grad_out, (q, k, v), key_padding_mask, scale, _dropout(p))
    return torch.ops.etkd_cpu.nystrom_bwd(
        grad_out,  # read at any strides (csrc/cpu/nystrom.cpp)
        q,  # at any row strides; dq, dk, dv come back in q's, k's, v's layouts
        k,
        v,
        saved,
        num_landmarks,
        pinv_iterations,
        key_padding_mask,
        scale,
        pinv_init == "hf_global",
        *_dropout(p),
    )
