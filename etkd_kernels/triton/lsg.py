"""Triton LSG attention, FlashAttention-2 style, forward and backward.

The compressed (sparse) keys are built with a few torch ops (`etkd_kernels._shared.lsg.extra_keys`, from the
reference's definition) into an extra key source KX = [global keys, compressed keys] (B, H, G + T, D) with a
per-head mask. Block pass: a program owns a tile of BLOCK_P rows inside one query block n and runs one online
softmax over the local keys [(n - 1) B, (n + 2) B) of K (global and padded keys masked) and the
G + 2 * sparse_block_size slots of KX its block sees (the globals, then the two sparse windows, read from
STARTS). Global pass (GLOBAL=True): the global rows attend to every real key. The backward recomputes P from
the saved lse, writes dQ per program and accumulates dK/dV (and dKX/dVX) with fp32 atomics: a key is seen
by three query blocks and by the global rows, and a compressed key by up to 2 * sparse_block_size / step
blocks, so there is no single owner without a transposed walk.
Rows that see no key and padded rows give out 0, lse +inf (natural log, float32 (B, H, S)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._shared.lsg import all_query_rows, extra_keys
from . import _common as cm

_KEY = ["SB", "BS", "NX", "BLOCK_D", "GLOBAL", "DROPOUT"]  # SB: seq bucket


@triton.jit
def _own_rows(pid, b, QMASK, S, BS, NB, G, GLOBAL: tl.constexpr, BLOCK_P: tl.constexpr):
    """The program's rows, which exist and which are computed (QMASK), the local key range [lo, hi) and the
    query block (for STARTS). Global pass: rows [0, G) and every key; block pass: a BLOCK_P tile of query
    block qb and the keys of blocks qb - 1 .. qb + 1."""
    if GLOBAL:
        pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = pos < G
        lo, hi = 0, S
        qb = 0
    else:
        n_sub_p = tl.cdiv(BS, BLOCK_P)
        qb = pid // n_sub_p
        r = (pid % n_sub_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = r < BS
        pos = qb * BS + r
        lo, hi = tl.maximum(qb - 1, 0) * BS, tl.minimum(qb + 2, NB) * BS
    own = valid & (tl.load(QMASK + b * S + pos, mask=valid, other=0) != 0)
    return pos, valid, own, lo, hi, qb


@triton.jit
def _program(QMASK, STARTS, H, S, D, BS, NB, SX, G, GLOBAL: tl.constexpr, BLOCK_P: tl.constexpr):
    """What both kernels start from: `program_ids`, the (batch, head) offset in KX/VX, the own rows and local
    key range (`_own_rows`), and the starts of the query block's left and right sparse windows."""
    pid, bh, b, base, lbase = cm.program_ids(H, S, D)
    pos, valid, own, lo, hi, qb = _own_rows(pid, b, QMASK, S, BS, NB, G, GLOBAL, BLOCK_P)
    left = tl.load(STARTS + qb * 2)
    right = tl.load(STARTS + qb * 2 + 1)
    return bh, b, base, lbase, bh.to(tl.int64) * SX * D, pos, valid, own, lo, hi, left, right


@triton.jit
def _local_keys(j0, b, hi, own, KMASK, S, K, V, base, dd, dmask, D, CT: tl.constexpr, BLOCK_O: tl.constexpr):
    """Local key tile at j0: rows, which exist (the loads' mask), visible (query, key) pairs, k and v tiles."""
    j = j0 + tl.arange(0, BLOCK_O)
    jin = j < hi
    ok = own[:, None] & (jin & (tl.load(KMASK + b * S + j, mask=jin, other=0) != 0))[None, :]
    k = cm.load_rows(K + base, j, jin, dd, dmask, D, CT)
    return j, jin, ok, k, cm.load_rows(V + base, j, jin, dd, dmask, D, CT)


@triton.jit
def _extra_keys(c0, bh, left, right, own, OKX, SX, G, T, SBS, NX, KX, VX, xbase, dd, dmask, D, CT: tl.constexpr,
                BLOCK_O: tl.constexpr):  # fmt: skip
    """Extra-key tile at slot c0 (G globals, then the left and right sparse windows): KX rows, which exist,
    visible (query, key) pairs, k and v tiles."""
    c = c0 + tl.arange(0, BLOCK_O)
    sp = tl.where(c < G + SBS, left + (c - G), right + (c - G - SBS))
    x = tl.where(c < G, c, G + sp)
    xin = (c < NX) & ((c < G) | ((sp >= 0) & (sp < T)))
    ok = own[:, None] & (xin & (tl.load(OKX + bh.to(tl.int64) * SX + x, mask=xin, other=0) != 0))[None, :]
    k = cm.load_rows(KX + xbase, x, xin, dd, dmask, D, CT)
    return x, xin, ok, k, cm.load_rows(VX + xbase, x, xin, dd, dmask, D, CT)


@triton.jit
def _extra_col(x, G, XCOL):
    """The dropout column of extra-key slot x: a global key is its own position (slot x < G is token x), a
    compressed key t = x - G is column XCOL + t (`etkd_kernels/reference/lsg.py` defines them)."""
    return tl.where(x < G, x, XCOL + (x - G))


@triton.jit
def _add_dkv(DK, DV, base, j, jin, dd, dmask, D, q, do, p, ds, scale, CT: tl.constexpr, PREC: tl.constexpr):
    """This program's dK/dV contribution to key rows j (fp32 atomics: a key has no single owner)."""
    offs = base + j[:, None] * D + dd[None, :]
    kvmask = jin[:, None] & dmask[None, :]
    tl.atomic_add(DK + offs, tl.dot(tl.trans(ds).to(CT), q, input_precision=PREC) * scale, mask=kvmask)
    tl.atomic_add(DV + offs, tl.dot(tl.trans(p).to(CT), do, input_precision=PREC), mask=kvmask)


@triton.autotune(configs=cm.configs("fwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _fwd(
    Q, K, V, KX, VX, OUT, LSE, KMASK, QMASK, OKX, STARTS, scale2, S, SB, D, H, BS, NB, SX, G, T, SBS, NX, XCOL,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, GLOBAL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, xbase, pos, valid, own, lo, hi, left, right = _program(
        QMASK, STARTS, H, S, D, BS, NB, SX, G, GLOBAL, BLOCK_P
    )
    dd, dmask, q, m, row_sum, acc = cm.fwd_prologue(Q, base, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for j0 in range(lo, hi, BLOCK_O):
        j, jin, ok, k, v = _local_keys(j0, b, hi, own, KMASK, S, K, V, base, dd, dmask, D, CT, BLOCK_O)
        m, row_sum, acc = cm.softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT, PREC, pos[:, None], j[None, :],
                                          bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    for c0 in range(0, NX, BLOCK_O):
        x, xin, ok, k, v = _extra_keys(c0, bh, left, right, own, OKX, SX, G, T, SBS, NX, KX, VX, xbase, dd, dmask,
                                       D, CT, BLOCK_O)  # fmt: skip
        m, row_sum, acc = cm.softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT, PREC, pos[:, None],
                                          _extra_col(x, G, XCOL)[None, :], bh + rng_bh0, rng_k0, rng_k1, rng_off,
                                          rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.finish_store(m, row_sum, acc, OUT, LSE, base, lbase, pos, valid, dd, dmask, D)


@triton.autotune(configs=cm.configs("bwd_lsg"), key=_KEY, reset_to_zero=["DK", "DV", "DKX", "DVX"])
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd(
    Q, K, V, KX, VX, DO, LSE, DELTA, DQ, DK, DV, DKX, DVX, KMASK, QMASK, OKX, STARTS, scale2, scale,
    S, SB, D, H, BS, NB, SX, G, T, SBS, NX, XCOL,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, GLOBAL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, xbase, pos, valid, own, lo, hi, left, right = _program(
        QMASK, STARTS, H, S, D, BS, NB, SX, G, GLOBAL, BLOCK_P
    )
    dd, dmask, q, do, lse2, delta, dq = cm.dq_prologue(
        Q, DO, LSE, DELTA, base, lbase, pos, valid, own, D, CT, BLOCK_P, BLOCK_D
    )
    for j0 in range(lo, hi, BLOCK_O):
        j, jin, ok, k, v = _local_keys(j0, b, hi, own, KMASK, S, K, V, base, dd, dmask, D, CT, BLOCK_O)
        dq, p, ds = cm.dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT, PREC, pos[:, None], j[None, :],
                               bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
        _add_dkv(DK, DV, base, j, jin, dd, dmask, D, q, do, p, ds, scale, CT, PREC)
    for c0 in range(0, NX, BLOCK_O):
        x, xin, ok, k, v = _extra_keys(c0, bh, left, right, own, OKX, SX, G, T, SBS, NX, KX, VX, xbase, dd, dmask,
                                       D, CT, BLOCK_O)  # fmt: skip
        dq, p, ds = cm.dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT, PREC, pos[:, None],
                               _extra_col(x, G, XCOL)[None, :], bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr,
                               rng_scale, DROPOUT)  # fmt: skip
        _add_dkv(DKX, DVX, xbase, x, xin, dd, dmask, D, q, do, p, ds, scale, CT, PREC)
    cm.store_rows(DQ, base, pos, valid & own, dd, dmask, D, dq * scale)


# ----------------------------------------------------------------------------------------------------------
# Host side


def _prepare(q, k, v, p):
    b, h, s, d = q.shape
    g, block_size, sparse_block_size, scale = p.num_global_tokens, p.block_size, p.sparse_block_size, p.scale
    kpm = p.key_padding_mask
    real = kpm if kpm is not None else torch.ones(b, s, dtype=torch.bool, device=q.device)
    kx, vx, ok, starts = extra_keys(
        q, k, v, block_size, sparse_block_size, p.sparsity_factor, p.sparsity_type, g, real, scale, p.variant
    )
    sx = kx.shape[2]
    sbs = sparse_block_size if sx > g else 0
    usable = real.clone()
    usable[:, :g] = False
    nb = s // block_size
    if starts.numel() == 0:
        starts = torch.zeros(nb, 2, dtype=torch.long)
    meta = dict(
        **cm.kernel_args(q, scale, p), XCOL=s, S=s, SB=cm.seq_bucket(s), BS=block_size, NB=nb, SX=sx, G=g, T=sx - g,
        SBS=sbs,
    )  # fmt: skip
    # Query rows the block pass computes: the usable ones, or every non-global one (`all_query_rows`).
    rows = usable
    if all_query_rows(p.sparsity_type, p.variant):
        rows = (torch.arange(s, device=q.device) >= g)[None].expand(b, s)
    masks = tuple(t.to(torch.int8).contiguous() for t in (usable, real, rows))
    return kx, vx, ok.to(torch.int8).contiguous(), starts.to(q.device).contiguous(), masks, meta


def _block_tiles(meta):
    return lambda m: meta["NB"] * triton.cdiv(meta["BS"], m["BLOCK_P"])


def _global_tiles(meta):
    return lambda m: triton.cdiv(meta["G"], m["BLOCK_P"])


def forward(q, k, v, p):
    b, h, s, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = p.num_global_tokens
    with torch.no_grad():
        kx, vx, okx, starts, (usable, real, rows), meta = _prepare(q, k, v, p)
    kx, vx = kx.to(q.dtype).contiguous(), vx.to(q.dtype).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    # Launched through `launch` (device guard, batch split past 65,535 programs on grid axis y, configs
    # chosen per launch); STARTS (per query block, not per batch) goes by keyword so it is never sliced.
    kw = dict(STARTS=starts, NX=g + 2 * meta["SBS"], GLOBAL=False, **meta)
    cm.launch(_fwd, _block_tiles(meta), q, (q, k, v, kx, vx, out, lse, usable, rows, okx), kw)
    if g > 0:
        kw.update(NX=0, GLOBAL=True)
        cm.launch(_fwd, _global_tiles(meta), q, (q, k, v, kx, vx, out, lse, real, real, okx), kw)
    return out, lse


def backward(grad_out, q, k, v, out, lse, p):
    b, h, s, d = q.shape
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    g = p.num_global_tokens
    dlt = cm.delta(do, out.contiguous())  # rowsum(dO * O), (B, H, S) float32
    lse = lse.contiguous()
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        kx, vx, okx, starts, (usable, real, rows), meta = _prepare(*leaves, p)
    kxc, vxc = kx.detach().to(q.dtype).contiguous(), vx.detach().to(q.dtype).contiguous()
    dq = torch.zeros_like(q)
    dk, dv = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    dkx, dvx = (torch.zeros(kx.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    args = (q, k, v, kxc, vxc, do, lse, dlt, dq, dk, dv, dkx, dvx)
    kw = dict(STARTS=starts, scale=p.scale, NX=g + 2 * meta["SBS"], GLOBAL=False, **meta)
    cm.launch(_bwd, _block_tiles(meta), q, (*args, usable, rows, okx), kw)
    if g > 0:
        dqg = torch.zeros_like(q)
        kw.update(NX=0, GLOBAL=True)
        cm.launch(_bwd, _global_tiles(meta), q, (*args[:8], dqg, *args[9:], real, real, okx), kw)
        dq = dq + dqg
    dq, dk, dv = dq.float(), dk, dv
    dk[:, :, :g] += dkx[:, :, :g]
    dv[:, :, :g] += dvx[:, :, :g]
    if kx.shape[2] > g:  # the compressed keys' gradients flow back through their construction
        with torch.inference_mode(False), torch.enable_grad():
            grads = torch.autograd.grad(
                (kx[:, :, g:], vx[:, :, g:]), leaves, (dkx[:, :, g:], dvx[:, :, g:]), allow_unused=True
            )
        dq, dk, dv = (a if gr is None else a + gr.float() for a, gr in zip((dq, dk, dv), grads))
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
