"""Triton block-sparse attention over any block layout, FlashAttention-2 style.

Semantics: softmax(scale * q k^T masked by layout.to_dense() & key_padding_mask) v; rows that see no real
key and padded query rows give out 0, lse +inf (saved float32 (B, H, S), natural log). The op pads seq to a
multiple of the block size before calling here, so S == q_blocks * block_size.

A program owns a tile of BLOCK_P rows inside one layout block (a block of any size is cut into tiles, the
last one masked) and loops over the non-empty blocks of its row of the layout, read from `layout_lut`,
each cut into BLOCK_O tiles. dK/dV programs own key tiles and walk the transposed layout's LUT (the query
blocks that see their key block), so every output row has one writer and no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import cached_lut
from ._common import (
    LOG2E,
    compute_type,
    configs,
    delta,
    head_block,
    launch,
    precision,
    seq_bucket,
)

_KEY = ["SB", "BS", "BLOCK_D"]  # SB: seq bucket

# Loop bodies are inlined (no @triton.jit helpers inside loops): see sliding_window.py for why.


@triton.autotune(configs=configs("fwd"), key=_KEY)
@triton.jit
def _fwd(
    Q, K, V, OUT, LSE, REAL, LUT, CNT, scale2, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    n_sub_p = tl.cdiv(BS, BLOCK_P)
    n_sub_o = tl.cdiv(BS, BLOCK_O)
    qb = pid // n_sub_p
    r = (pid % n_sub_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = r < BS
    pos = qb * BS + r
    own = valid & (tl.load(REAL + b * S + pos, mask=valid, other=0) != 0)
    base = bh.to(tl.int64) * S * D
    lut = LUT + (bh % H) * LUT_HS * NB * WIDTH + qb * WIDTH
    n_blocks = tl.where(tl.sum(own.to(tl.int32), 0) > 0, tl.load(CNT + (bh % H) * LUT_HS * NB + qb), 0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(
        Q + base + pos[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
    ).to(CT)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for it in range(0, n_blocks * n_sub_o):
        kb = tl.load(lut + it // n_sub_o)
        c = (it % n_sub_o) * BLOCK_O + tl.arange(0, BLOCK_O)
        j = kb * BS + c
        jin = c < BS
        ok = own[:, None] & (jin & (tl.load(REAL + b * S + j, mask=jin, other=0) != 0))[None, :]
        kvmask = jin[:, None] & dmask[None, :]
        k = tl.load(K + base + j[:, None] * D + dd[None, :], mask=kvmask, other=0.0).to(CT)
        v = tl.load(V + base + j[:, None] * D + dd[None, :], mask=kvmask, other=0.0).to(CT)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay NaN-free
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(CT), v, input_precision=PREC)
        m = m_new
    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, row_sum, 1.0))) / LOG2E, float("inf"))
    tl.store(
        OUT + base + pos[:, None] * D + dd[None, :],
        out.to(OUT.dtype.element_ty),
        mask=valid[:, None] & dmask[None, :],
    )
    tl.store(LSE + bh.to(tl.int64) * S + pos, lse, mask=valid)


@triton.autotune(configs=configs("bwd"), key=_KEY)
@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, REAL, LUT, CNT, scale2, scale, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    n_sub_p = tl.cdiv(BS, BLOCK_P)
    n_sub_o = tl.cdiv(BS, BLOCK_O)
    qb = pid // n_sub_p
    r = (pid % n_sub_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = r < BS
    pos = qb * BS + r
    own = valid & (tl.load(REAL + b * S + pos, mask=valid, other=0) != 0)
    base = bh.to(tl.int64) * S * D
    lut = LUT + (bh % H) * LUT_HS * NB * WIDTH + qb * WIDTH
    n_blocks = tl.where(tl.sum(own.to(tl.int32), 0) > 0, tl.load(CNT + (bh % H) * LUT_HS * NB + qb), 0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    rmask = valid[:, None] & dmask[None, :]
    q = tl.load(Q + base + pos[:, None] * D + dd[None, :], mask=rmask, other=0.0).to(CT)
    do = tl.load(DO + base + pos[:, None] * D + dd[None, :], mask=rmask, other=0.0).to(CT)
    lse2 = tl.load(LSE + bh.to(tl.int64) * S + pos, mask=own, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * S + pos, mask=own, other=0.0)
    dq = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for it in range(0, n_blocks * n_sub_o):
        kb = tl.load(lut + it // n_sub_o)
        c = (it % n_sub_o) * BLOCK_O + tl.arange(0, BLOCK_O)
        j = kb * BS + c
        jin = c < BS
        ok = own[:, None] & (jin & (tl.load(REAL + b * S + j, mask=jin, other=0) != 0))[None, :]
        kvmask = jin[:, None] & dmask[None, :]
        k = tl.load(K + base + j[:, None] * D + dd[None, :], mask=kvmask, other=0.0).to(CT)
        v = tl.load(V + base + j[:, None] * D + dd[None, :], mask=kvmask, other=0.0).to(CT)
        p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale2 - lse2[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq += tl.dot(ds.to(CT), k, input_precision=PREC)
    tl.store(DQ + base + pos[:, None] * D + dd[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.autotune(configs=configs("bwd"), key=_KEY)
@triton.jit
def _bwd_dkv(
    Q, K, V, DO, LSE, DELTA, DK, DV, REAL, LUT, CNT, scale2, scale, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    # Own rows are keys of key block kb; LUT here is the transposed layout's (query blocks per key block).
    pid, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    n_sub_p = tl.cdiv(BS, BLOCK_P)
    n_sub_o = tl.cdiv(BS, BLOCK_O)
    kb = pid // n_sub_p
    r = (pid % n_sub_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = r < BS
    pos = kb * BS + r
    own = valid & (tl.load(REAL + b * S + pos, mask=valid, other=0) != 0)
    base = bh.to(tl.int64) * S * D
    lbase = bh.to(tl.int64) * S
    lut = LUT + (bh % H) * LUT_HS * NB * WIDTH + kb * WIDTH
    n_blocks = tl.where(tl.sum(own.to(tl.int32), 0) > 0, tl.load(CNT + (bh % H) * LUT_HS * NB + kb), 0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    rmask = valid[:, None] & dmask[None, :]
    k = tl.load(K + base + pos[:, None] * D + dd[None, :], mask=rmask, other=0.0).to(CT)
    v = tl.load(V + base + pos[:, None] * D + dd[None, :], mask=rmask, other=0.0).to(CT)
    dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for it in range(0, n_blocks * n_sub_o):
        qb = tl.load(lut + it // n_sub_o)
        c = (it % n_sub_o) * BLOCK_O + tl.arange(0, BLOCK_O)
        i = qb * BS + c
        iok = c < BS
        ok = own[:, None] & iok[None, :]  # padded query rows have lse = +inf, so p = 0 there
        qmask = iok[:, None] & dmask[None, :]
        q = tl.load(Q + base + i[:, None] * D + dd[None, :], mask=qmask, other=0.0).to(CT)
        do = tl.load(DO + base + i[:, None] * D + dd[None, :], mask=qmask, other=0.0).to(CT)
        lse2 = tl.load(LSE + lbase + i, mask=iok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + lbase + i, mask=iok, other=0.0)
        pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * scale2 - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(CT), do, input_precision=PREC)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
        dk += tl.dot(dst.to(CT), q, input_precision=PREC)
    offs = base + pos[:, None] * D + dd[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=rmask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# Host side


def _prepare(
    q: torch.Tensor, layout: torch.Tensor, block_size: int, key_padding_mask, scale: float, transpose=False
):
    b, h, s, d = q.shape
    nb = layout.shape[1]
    if nb * block_size != s or layout.shape[2] != nb:
        raise ValueError(
            f"layout: expected ({nb}, {nb}) blocks of {block_size} for seq {s}, got {tuple(layout.shape)}"
        )
    lut, cnt = cached_lut(layout.to(q.device), transpose)  # built once per layout tensor, on q's device
    real = (
        key_padding_mask
        if key_padding_mask is not None
        else torch.ones(b, s, dtype=torch.bool, device=q.device)
    )
    return dict(
        REAL=real.to(torch.int8).contiguous(), LUT=lut, CNT=cnt, scale2=scale * LOG2E.value, S=s, SB=seq_bucket(s),
        D=d, H=h, BS=block_size, NB=nb, WIDTH=lut.shape[-1], LUT_HS=int(layout.shape[0] > 1),
        CT=compute_type(q.dtype), PREC=precision(q.dtype), BLOCK_D=head_block(d),
    )  # fmt: skip


def _tiles(nb: int, block_size: int):
    return lambda meta: nb * triton.cdiv(block_size, meta["BLOCK_P"])


def forward(q, k, v, p):
    layout, block_size, key_padding_mask, scale = p.layout, p.block_size, p.key_padding_mask, p.scale
    b, h, s, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    meta = _prepare(q, layout, block_size, key_padding_mask, scale)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    launch(_fwd, _tiles(meta["NB"], block_size), q, (q, k, v, out, lse), meta, ("REAL",))
    return out, lse


def backward(grad_out, q, k, v, out, lse, p):
    layout, block_size, key_padding_mask, scale = p.layout, p.block_size, p.key_padding_mask, p.scale
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    dlt = delta(do, out.contiguous())  # rowsum(dO * O), (B, H, S) float32
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _prepare(q, layout, block_size, key_padding_mask, scale)
    tiles = _tiles(meta["NB"], block_size)
    launch(_bwd_dq, tiles, q, (q, k, v, do, lse, dlt, dq), {**meta, "scale": scale}, ("REAL",))
    meta_t = _prepare(q, layout, block_size, key_padding_mask, scale, transpose=True)
    launch(_bwd_dkv, tiles, q, (q, k, v, do, lse, dlt, dk, dv), {**meta_t, "scale": scale}, ("REAL",))
    return dq, dk, dv
