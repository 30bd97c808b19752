"""Nystrom attention on the `cpu` backend.

Forward: `nystrom_fwd` of csrc/cpu/nystrom.cpp does the whole computation (landmark means, K2 softmax,
Newton-Schulz pseudo-inverse, K3 @ v, K1 @ X) in three parallel loops, with no per-op dispatch. Backward:
`nystrom_bwd`, written out by hand (Newton-Schulz iterations included): per (batch, head) it recomputes K3 per key
tile (from the forward's log-sum-exp per landmark) and K1 per query tile, unless the forward kept them (`kept`), on
the target's own kernels, and runs the chain rule back. q, k, v are read at any row strides (`Capabilities.strided`: a model's head-split views of its stacked q/k/v
projection, every pass over them in place), out and dq, dk, dv written in their layouts. landmarks == seq (exact softmax attention) differentiates the fused
`softmax(scale * a @ b^T, masked) @ c` kernel instead. Attention dropout (dropout_p > 0) drops entries of K1 (query
row i, landmark l: column seq + l), in the forward's query tiles and in the backward's recomputed K1, or the
probabilities of the exact case (key columns), as etkd_kernels/reference/nystrom.py defines it. NaN/Inf in q, k, v:
`nystrom_fwd` rejects them itself, in its own passes over them (`Capabilities.checks_finite`: the op layer then skips
its separate sums), with `_checks.check_finite`'s error.
"""

from __future__ import annotations

import os

import torch

from etkd_kernels._checks import check_finite
from etkd_kernels._env import NYSTROM_KEEP, EnvironmentValueError
from etkd_kernels._shared import recompute_backward
from etkd_kernels.cpu._dtype import in_float32


def _ops():
    """torch.ops.etkd_cpu, the extension loaded on first use (so `check_keep_environment` needs no build)."""
    from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)

    return torch.ops.etkd_cpu


class _SoftmaxMatmul(torch.autograd.Function):
    """softmax(scale * a @ b^T, keys masked by key_mask) @ c; a (B, H, M, D), b and c (B, H, N, D); dropout
    (p, seed, offset) on the probabilities, rows and columns their positions in a and b."""

    @staticmethod
    def forward(ctx, a, b, c, key_mask, scale, dropout):
        a, b, c = a.contiguous(), b.contiguous(), c.contiguous()
        out, lse = _ops().softmax_matmul_fwd(a, b, c, key_mask, scale, *dropout)
        ctx.save_for_backward(a, b, c, out, lse)
        ctx.key_mask, ctx.scale, ctx.dropout = key_mask, scale, dropout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, c, out, lse = ctx.saved_tensors
        da, db, dc = _ops().softmax_matmul_bwd(
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


# What the forward keeps for the backward beyond its fixed part (nystrom_fwd's `keep` bits: 1 K1, 2 K3).
KEEP_MODES = {"none": 0, "k1": 1, "k3": 2, "k1,k3": 3}


def kept() -> int:
    """Which (seq x landmarks) matrices the forward keeps for the backward instead of the backward recomputing them
    (fp32, 12 MiB each at 12 heads x 4096 x 64 landmarks): bit 1 K1 (its scores product and softmax), bit 2 K3 (its
    scores product and exps). ETKD_CPU_NYSTROM_KEEP (read per call): none, k1, k3, k1,k3, or auto (the default):
    both, on every target (A/B at 1 thread, this Xeon, fwd+bwd CPU ms none -> k1,k3: avx2 101.8 -> 94.7, avx512_bf16
    61.7 -> 56.4, avx512 62.1 -> 54.4; README's Nystrom notes). Only where a backward will read them: `_keeps`."""
    mode = _keep_mode()
    if mode == "auto":
        return 3
    if mode not in KEEP_MODES:
        raise EnvironmentValueError(f"{NYSTROM_KEEP}={mode}: expected auto, {', '.join(KEEP_MODES)}")
    return KEEP_MODES[mode]


def _keep_mode() -> str:
    return os.environ.get(NYSTROM_KEEP, "").strip().replace(" ", "") or "auto"


def check_keep_environment() -> None:
    """ETKD_CPU_NYSTROM_KEEP checked up front (`etkd`'s environment check before a command runs), as the first
    Nystrom call would check it: raises EnvironmentValueError naming the variable and its values. Needs no build of
    the cpu kernels.

    A forward run with grad mode on and an input requiring grad keeps K1 and K3 until its output's graph is freed even
    when no backward follows (e.g. `model.eval()` without `torch.no_grad()`): as every autograd op keeps what its
    backward reads, so no warning; `torch.no_grad()` / `torch.inference_mode()` keep nothing."""
    kept()


def _keeps(p) -> int:
    """`kept()` for a forward whose `saved` a backward will read (p.for_backward, decided by the op before the call:
    grad mode on and an input requiring grad), else 0: inference would only write the matrices."""
    return kept() if p.for_backward else 0


def keep_description() -> str:
    """What `kept` chooses here, and why, for `etkd info`."""
    mode, got = _keep_mode(), kept()
    said = " and ".join(m for m, bit in (("K1", 1), ("K3", 2)) if got & bit)
    what = f"{said} kept from the forward" if got else "K1 and K3 recomputed in the backward"
    why = f"{NYSTROM_KEEP}={mode}" if mode != "auto" else f"auto; {NYSTROM_KEEP}=none|k1|k3|k1,k3"
    return f"Nystrom {what} when differentiated ({why})"


def saved_like(q, p):
    """What `forward` keeps for `backward` (etkd_kernels.ops._define: `saved`): per (batch, head), T = K3 @ v and the
    landmarks q~, k~, each (landmarks, head_dim padded to whole 16-float vectors), and K3's log-sum-exp per landmark
    (landmarks padded to whole vectors), float32; nothing for the exact landmarks == seq case. Then what `kept()`
    says: K1 (seq x landmarks padded, before dropout); K3's exps (the same size) and their maxima per 128-key tile."""
    b, h, s, d = q.shape
    if p.num_landmarks == s:
        return q.new_empty(0, dtype=torch.float32)
    c = max(1, -(-s // p.num_landmarks))  # seq 0: no landmark
    n = -(-s // c)
    dp, np_ = -(-d // 16) * 16, -(-n // 16) * 16  # csrc/cpu/nystrom.cpp: saved_floats, k1_floats, k3_floats
    keep, tiles = _keeps(p), -(-s // 128)  # 128: kLmTile, landmark_attend's key tile
    extra = (s * np_ if keep & 1 else 0) + ((s + tiles) * np_ if keep & 2 else 0)
    return q.new_empty(b, h, 3 * n * dp + np_ + extra, dtype=torch.float32)


@in_float32(keep=(1,))
def forward(q, k, v, p):
    with torch.no_grad():
        if p.num_landmarks == q.shape[2]:
            # the backend checks NaN/Inf inputs itself (Capabilities.checks_finite): nystrom_fwd in its passes, here
            # the op layer's check
            check_finite(q=q, k=k, v=v)
            return exact(q, k, v, p.key_padding_mask, p.scale, _dropout(p)), saved_like(q, p)
        return _ops().nystrom_fwd(
            q,  # q, k, v read at any row strides (a model's head-split views); out in q's layout
            k,
            v,
            p.num_landmarks,
            p.pinv_iterations,
            p.key_padding_mask,
            p.scale,
            p.pinv_init == "hf_global",
            *_dropout(p),
            _keeps(p),
        )


@in_float32
def backward(grad_out, q, k, v, out, saved, p):
    num_landmarks, pinv_iterations, key_padding_mask = p.num_landmarks, p.pinv_iterations, p.key_padding_mask
    scale, pinv_init = p.scale, p.pinv_init
    if num_landmarks == q.shape[2]:
        return recompute_backward(exact, grad_out, (q, k, v), key_padding_mask, scale, _dropout(p))
    return _ops().nystrom_bwd(
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
