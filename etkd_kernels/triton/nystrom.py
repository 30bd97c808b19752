"""Triton Nystromformer attention: the landmark softmax x matmul products fused, the pseudo-inverse in torch.

Semantics are `etkd_kernels/reference/nystrom.py`'s. The two (seq x landmarks) products are attention with
unequal query/key lengths, so one fused dense kernel (online softmax, saved lse, FA2 backward) serves both:

    K3 @ v       = attn(q~, k, v, key padding)      (L queries over seq keys)
    K1 @ X       = attn(q, k~, X)                    (seq queries over L landmark keys), X = pinv(K2) @ (K3 @ v)

K2 = softmax(s q~ k~^T) (L x L), the Newton-Schulz pseudo-inverse and the segment means are small and go
through torch GEMMs (the functions the reference uses, etkd_kernels/_shared/nystrom.py, so rounding matches). The
backward is written out (`backward`): the fused kernels' own backward for the two large products, autograd
only over the small (L x L) part: no (seq x L) matrix is ever stored. Low-precision inputs: landmarks and X
are cast to the input dtype before the kernels
(the reference keeps them fp32), so fp16/bf16 results differ from it by a few ulps more than the others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._shared import compute_dtype
from .._shared.nystrom import iterative_pinv, segment_means
from . import _common as cm

_KEY = ["SQB", "SKB", "BLOCK_D", "DROPOUT"]  # sequence buckets


@triton.jit
def _own_rows(H, SQ, SK, D, N, BLOCK_P: tl.constexpr):
    """The program's ids and offsets (`program_ids`, with `kbase` the (batch, head) offset in k and v), its
    BLOCK_P rows (queries, or keys for dK/dV) and which of them exist (< N)."""
    pid, bh, b, qbase, lbase = cm.program_ids(H, SQ, D)
    pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    return bh, b, qbase, lbase, bh.to(tl.int64) * SK * D, pos, pos < N


@triton.jit
def _key_tile(K, V, kbase, start, b, SK, valid, REAL, dd, dmask, D, CT: tl.constexpr, HAS_MASK: tl.constexpr,
              BLOCK_O: tl.constexpr):  # fmt: skip
    """Key tile at `start`: its columns j, the visible (query, key) pairs, and its k and v rows."""
    j = start + tl.arange(0, BLOCK_O)
    jin = j < SK
    seen = jin
    if HAS_MASK:
        seen = jin & (tl.load(REAL + b * SK + j, mask=jin, other=0) != 0)
    k = cm.load_rows(K + kbase, j, jin, dd, dmask, D, CT)
    v = cm.load_rows(V + kbase, j, jin, dd, dmask, D, CT)
    return j, valid[:, None] & seen[None, :], k, v


@triton.autotune(configs=cm.configs("fwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _fwd(
    Q, K, V, OUT, LSE, REAL, scale2, SQ, SK, SQB, SKB, D, JCOL,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    HAS_MASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    bh, b, qbase, lbase, kbase, pos, valid = _own_rows(H, SQ, SK, D, SQ, BLOCK_P)
    dd, dmask, q, m, row_sum, acc = cm.fwd_prologue(Q, qbase, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for start in range(0, SK, BLOCK_O):
        j, ok, k, v = _key_tile(K, V, kbase, start, b, SK, valid, REAL, dd, dmask, D, CT, HAS_MASK, BLOCK_O)
        m, row_sum, acc = cm.softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT, PREC, pos[:, None], (JCOL + j)[None, :],
                                          bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.finish_store(m, row_sum, acc, OUT, LSE, qbase, lbase, pos, valid, dd, dmask, D)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, REAL, scale2, scale, SQ, SK, SQB, SKB, D, JCOL,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    HAS_MASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    bh, b, qbase, lbase, kbase, pos, valid = _own_rows(H, SQ, SK, D, SQ, BLOCK_P)
    dd, dmask, q, do, lse2, delta, dq = cm.dq_prologue(
        Q, DO, LSE, DELTA, qbase, lbase, pos, valid, valid, D, CT, BLOCK_P, BLOCK_D
    )
    for start in range(0, SK, BLOCK_O):
        j, ok, k, v = _key_tile(K, V, kbase, start, b, SK, valid, REAL, dd, dmask, D, CT, HAS_MASK, BLOCK_O)
        dq, _, _ = cm.dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT, PREC, pos[:, None], (JCOL + j)[None, :],
                              bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.store_rows(DQ, qbase, pos, valid, dd, dmask, D, dq * scale)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dkv(
    Q, K, V, DO, LSE, DELTA, DK, DV, REAL, scale2, scale, SQ, SK, SQB, SKB, D, JCOL,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    HAS_MASK: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    bh, b, qbase, lbase, kbase, pos, valid = _own_rows(H, SQ, SK, D, SK, BLOCK_P)
    own = valid
    if HAS_MASK:
        own = valid & (tl.load(REAL + b * SK + pos, mask=valid, other=0) != 0)
    dd, dmask, k, v, dk, dv = cm.dkv_prologue(K, V, kbase, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for start in range(0, SQ, BLOCK_O):
        i = start + tl.arange(0, BLOCK_O)
        iok = i < SQ
        q, do, lse2, delta = cm.query_tile(Q, DO, LSE, DELTA, qbase, lbase, i, iok, dd, dmask, D, CT)
        dk, dv = cm.dkv_step(k, v, q, do, own[:, None] & iok[None, :], lse2, delta, dk, dv, scale2, CT, PREC,
                             i[None, :], (JCOL + pos)[:, None], bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale,
                             DROPOUT)  # fmt: skip
    cm.store_rows(DK, kbase, pos, valid, dd, dmask, D, dk * scale)
    cm.store_rows(DV, kbase, pos, valid, dd, dmask, D, dv)


def _meta(q, k, kpm, scale, drop, jcol):
    """Launch arguments; `drop` (the op's params, or None) applies dropout to this product, its key j being the
    dropout column jcol + j (`etkd_kernels/reference/nystrom.py`)."""
    b, h, sq, d = q.shape
    real = (
        kpm.to(torch.int8).contiguous()
        if kpm is not None
        else torch.zeros(1, dtype=torch.int8, device=q.device)
    )
    return dict(
        **cm.kernel_args(q, scale, drop), JCOL=jcol, REAL=real, SQ=sq, SK=k.shape[2], SQB=cm.seq_bucket(sq),
        SKB=cm.seq_bucket(k.shape[2]), HAS_MASK=kpm is not None,
    )  # fmt: skip


def _rows(n):
    return lambda meta: triton.cdiv(n, meta["BLOCK_P"])


def _per_batch(kpm):
    return ("REAL",) if kpm is not None else ()


def _attn_fwd(q, k, v, kpm, scale, drop=None, jcol=0):
    """(out, lse) of dropout(softmax(scale * q k^T, keys masked by kpm)) v, fused (see `_meta`)."""
    b, h, sq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    cm.launch(_fwd, _rows(sq), q, (q, k, v, out, lse), _meta(q, k, kpm, scale, drop, jcol), _per_batch(kpm))
    return out, lse


def _attn_bwd(do, q, k, v, out, lse, kpm, scale, drop=None, jcol=0):
    """(dq, dk, dv) of `_attn_fwd`, recomputing P from lse."""
    sq = q.shape[2]
    do = do.contiguous()
    dlt = cm.delta(do, out)
    meta = {**_meta(q, k, kpm, scale, drop, jcol), "scale": scale}
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cm.launch(_bwd_dq, _rows(sq), q, (q, k, v, do, lse, dlt, dq), meta, _per_batch(kpm))
    cm.launch(_bwd_dkv, _rows(k.shape[2]), q, (q, k, v, do, lse, dlt, dk, dv), meta, _per_batch(kpm))
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    """dropout(softmax(scale * q k^T, keys masked by kpm)) v for q (B, H, SQ, D), k/v (B, H, SK, D); fused both
    ways (`drop`, `jcol`: see `_meta`)."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, scale, drop, jcol):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _attn_fwd(q, k, v, kpm, scale, drop, jcol)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.scale, ctx.drop, ctx.jcol = scale, drop, jcol
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(grad_out, q, k, v, out, lse, kpm, ctx.scale, ctx.drop, ctx.jcol)
        return dq, dk, dv, None, None, None, None


def attend(q, k, v, num_landmarks, pinv_iterations, key_padding_mask, scale, pinv_init, drop=None):
    """Dropout (`drop`: the op's params, or None) on the probabilities of the exact case (key columns) and on
    K1 (landmark l = column seq + l), where the reference applies it."""
    cm.head_block(q.shape[-1])  # rejects unsupported head_dim with a clear message
    s = q.shape[2]
    if num_landmarks == s:
        out = _Attention.apply(q, k, v, key_padding_mask, scale, drop, 0)
    else:
        ct = compute_dtype(q.dtype)
        ql, kl = segment_means(q.to(ct), num_landmarks), segment_means(k.to(ct), num_landmarks)
        k2 = torch.softmax((ql @ kl.transpose(-1, -2)) * scale, dim=-1)  # (b, h, L, L): small, torch
        k3v = _Attention.apply(ql.to(q.dtype), k, v, key_padding_mask, scale, None, 0)  # K3 @ v, fused
        x = iterative_pinv(k2, pinv_iterations, pinv_init) @ k3v.to(ct)
        out = _Attention.apply(q, kl.to(q.dtype), x.to(q.dtype), None, scale, drop, s)  # K1 @ X, fused
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[:, None, :, None], out, torch.zeros_like(out))
    return out


def forward(q, k, v, p):
    with torch.no_grad():
        return attend(
            q, k, v, p.num_landmarks, p.pinv_iterations, p.key_padding_mask, p.scale, p.pinv_init, p
        )


def _spread(dl, s, num_landmarks):
    """Adjoint of segment_means: each of the s tokens gets its segment's gradient / the segment's size."""
    c = -(-s // num_landmarks)
    n = dl.shape[2]
    counts = torch.full((n, 1), float(c), dtype=dl.dtype, device=dl.device)
    counts[-1] = s - (n - 1) * c
    return (dl / counts).repeat_interleave(c, dim=2)[:, :, :s]


def backward(grad_out, q, k, v, out, p):
    """Written out by hand: the two (seq x landmarks) products go through the fused kernels' backward (P
    recomputed from lse, never stored); only the (landmarks x landmarks) K2 and pseudo-inverse are
    differentiated by autograd, on small tensors."""
    num_landmarks, pinv_iterations, key_padding_mask = p.num_landmarks, p.pinv_iterations, p.key_padding_mask
    scale, pinv_init = p.scale, p.pinv_init
    s = q.shape[2]
    if num_landmarks == s:
        with torch.inference_mode(False), torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = attend(*leaves, num_landmarks, pinv_iterations, key_padding_mask, scale, pinv_init, p)
            return torch.autograd.grad(out, leaves, grad_out)
    dt_in = q.dtype
    ct = compute_dtype(dt_in)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if key_padding_mask is not None:  # padded output rows are set to zero: no gradient flows from them
        grad_out = grad_out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
    ql, kl = segment_means(q.to(ct), num_landmarks), segment_means(k.to(ct), num_landmarks)
    with torch.inference_mode(False), torch.enable_grad():
        qll, kll = ql.detach().requires_grad_(True), kl.detach().requires_grad_(True)
        z = iterative_pinv(
            torch.softmax((qll @ kll.transpose(-1, -2)) * scale, dim=-1), pinv_iterations, pinv_init
        )
    zd = z.detach()
    ql_in, kl_in = ql.to(dt_in).contiguous(), kl.to(dt_in).contiguous()
    t, lse3 = _attn_fwd(ql_in, k, v, key_padding_mask, scale)  # T = K3 @ v
    x = (zd @ t.to(ct)).to(dt_in).contiguous()  # X = Z T
    o1, lse1 = _attn_fwd(q, kl_in, x, None, scale, p, s)  # K1 @ X again, for its lse
    dq, dkl, dx = _attn_bwd(grad_out, q, kl_in, x, o1, lse1, None, scale, p, s)
    dx = dx.to(ct)
    dt = zd.transpose(-1, -2) @ dx  # X = Z T
    dql2, dkl2 = torch.autograd.grad(z, (qll, kll), dx @ t.to(ct).transpose(-1, -2))
    dql3, dk, dv = _attn_bwd(dt.to(dt_in), ql_in, k, v, t, lse3, key_padding_mask, scale)
    dq = dq.to(ct) + _spread(dql2 + dql3.to(ct), s, num_landmarks)
    dk = dk.to(ct) + _spread(dkl2 + dkl.to(ct), s, num_landmarks)
    return dq.to(dt_in), dk.to(dt_in), dv
