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
from . import _common as cm

_KEY = ["SB", "BS", "BLOCK_D", "DROPOUT"]  # SB: seq bucket


@triton.jit
def _program(REAL, LUT, CNT, S, D, H, BS, NB, WIDTH, LUT_HS, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    """What every kernel here starts from: `program_ids`, the program's rows (a BLOCK_P tile of layout block
    `blk`), which of them are real, its LUT row (a pointer), how many blocks the row lists (0 when none of the
    program's rows is real) and how many BLOCK_O sub-tiles a block of the other side has."""
    pid, bh, b, base, lbase = cm.program_ids(H, S, D)
    n_sub_p = tl.cdiv(BS, BLOCK_P)
    blk = pid // n_sub_p
    r = (pid % n_sub_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = r < BS
    pos = blk * BS + r
    own = valid & (tl.load(REAL + b * S + pos, mask=valid, other=0) != 0)
    n_blocks = tl.where(tl.sum(own.to(tl.int32), 0) > 0, tl.load(CNT + (bh % H) * LUT_HS * NB + blk), 0)
    lut = LUT + (bh % H) * LUT_HS * NB * WIDTH + blk * WIDTH
    return bh, b, base, lbase, pos, valid, own, lut, n_blocks, tl.cdiv(BS, BLOCK_O)


@triton.jit
def _sub_tile(blk, it, n_sub_o, BS, BLOCK_O: tl.constexpr):
    """Rows of loop step `it` inside layout block `blk` (sub-tile it % n_sub_o), and which exist."""
    c = (it % n_sub_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    return blk * BS + c, c < BS


@triton.jit
def _key_tile(blk, it, n_sub_o, BS, b, S, own, REAL, K, V, base, dd, dmask, D, CT: tl.constexpr,
              BLOCK_O: tl.constexpr):  # fmt: skip
    """Loop step `it` of a program that owns query rows: key rows j in layout block `blk`, the visible (query,
    key) pairs, and the k and v tiles."""
    j, jin = _sub_tile(blk, it, n_sub_o, BS, BLOCK_O)
    ok = own[:, None] & (jin & (tl.load(REAL + b * S + j, mask=jin, other=0) != 0))[None, :]
    k = cm.load_rows(K + base, j, jin, dd, dmask, D, CT)
    return j, ok, k, cm.load_rows(V + base, j, jin, dd, dmask, D, CT)


@triton.autotune(configs=cm.configs("fwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _fwd(
    Q, K, V, OUT, LSE, REAL, LUT, CNT, scale2, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
    LUT_BLOCK: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, pos, valid, own, lut, n_blocks, n_sub_o = _program(
        REAL, LUT, CNT, S, D, H, BS, NB, WIDTH, LUT_HS, BLOCK_P, BLOCK_O
    )
    dd, dmask, q, m, row_sum, acc = cm.fwd_prologue(Q, base, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    # The LUT row is loaded once, as a vector, and each key block picked out of it in registers: the K/V
    # addresses then depend on no load inside the loop, so Triton's pipeliner prefetches K/V num_stages - 1
    # iterations ahead. A scalar LUT load in the loop made the K/V loads indirect, which halves that distance
    # ((num_stages - 1) // 2: one iteration at 3 stages, and a wait for every copy at the top of each
    # iteration, in the sm_90 TTGIR). The backward kernels keep the scalar load: there the vector cost
    # registers (spills at 16-bit d32/d64 sm_80, fp32 d128) and at 2 stages the prefetch distance is 1 either way.
    slot = tl.arange(0, LUT_BLOCK)
    row = tl.load(lut + slot, mask=slot < n_blocks, other=0)
    for it in range(0, n_blocks * n_sub_o):
        blk = tl.sum(tl.where(slot == it // n_sub_o, row, 0), 0)
        j, ok, k, v = _key_tile(blk, it, n_sub_o, BS, b, S, own, REAL, K, V, base, dd, dmask, D, CT, BLOCK_O)
        m, row_sum, acc = cm.softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT, PREC, pos[:, None], j[None, :],
                                          bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.finish_store(m, row_sum, acc, OUT, LSE, base, lbase, pos, valid, dd, dmask, D)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, REAL, LUT, CNT, scale2, scale, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, pos, valid, own, lut, n_blocks, n_sub_o = _program(
        REAL, LUT, CNT, S, D, H, BS, NB, WIDTH, LUT_HS, BLOCK_P, BLOCK_O
    )
    dd, dmask, q, do, lse2, delta, dq = cm.dq_prologue(
        Q, DO, LSE, DELTA, base, lbase, pos, valid, own, D, CT, BLOCK_P, BLOCK_D
    )
    for it in range(0, n_blocks * n_sub_o):
        blk = tl.load(lut + it // n_sub_o)
        j, ok, k, v = _key_tile(blk, it, n_sub_o, BS, b, S, own, REAL, K, V, base, dd, dmask, D, CT, BLOCK_O)
        dq, _, _ = cm.dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT, PREC, pos[:, None], j[None, :],
                              bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.store_rows(DQ, base, pos, valid, dd, dmask, D, dq * scale)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dkv(
    Q, K, V, DO, LSE, DELTA, DK, DV, REAL, LUT, CNT, scale2, scale, S, SB, D, H, BS, NB, WIDTH, LUT_HS,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    # Own rows are keys of a key block; LUT here is the transposed layout's (query blocks per key block).
    bh, b, base, lbase, pos, valid, own, lut, n_blocks, n_sub_o = _program(
        REAL, LUT, CNT, S, D, H, BS, NB, WIDTH, LUT_HS, BLOCK_P, BLOCK_O
    )
    dd, dmask, k, v, dk, dv = cm.dkv_prologue(K, V, base, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for it in range(0, n_blocks * n_sub_o):
        i, iok = _sub_tile(tl.load(lut + it // n_sub_o), it, n_sub_o, BS, BLOCK_O)
        ok = own[:, None] & iok[None, :]  # padded query rows have lse = +inf, so p = 0 there
        q, do, lse2, delta = cm.query_tile(Q, DO, LSE, DELTA, base, lbase, i, iok, dd, dmask, D, CT)
        dk, dv = cm.dkv_step(k, v, q, do, ok, lse2, delta, dk, dv, scale2, CT, PREC, i[None, :], pos[:, None],
                             bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.store_rows(DK, base, pos, valid, dd, dmask, D, dk * scale)
    cm.store_rows(DV, base, pos, valid, dd, dmask, D, dv)


# ----------------------------------------------------------------------------------------------------------
# Host side


def _prepare(
    q: torch.Tensor, layout: torch.Tensor, block_size: int, key_padding_mask, scale: float, p, transpose=False
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
        **cm.kernel_args(q, scale, p), REAL=real.to(torch.int8).contiguous(), LUT=lut, CNT=cnt, S=s, SB=cm.seq_bucket(s),
        BS=block_size, NB=nb, WIDTH=lut.shape[-1], LUT_HS=int(layout.shape[0] > 1),
    )  # fmt: skip


def _tiles(nb: int, block_size: int):
    return lambda meta: nb * triton.cdiv(block_size, meta["BLOCK_P"])


def forward(q, k, v, p):
    layout, block_size, key_padding_mask, scale = p.layout, p.block_size, p.key_padding_mask, p.scale
    b, h, s, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    meta = _prepare(q, layout, block_size, key_padding_mask, scale, p)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    meta["LUT_BLOCK"] = triton.next_power_of_2(max(meta["WIDTH"], 1))  # the forward holds its LUT row
    cm.launch(_fwd, _tiles(meta["NB"], block_size), q, (q, k, v, out, lse), meta, ("REAL",))
    return out, lse


def backward(grad_out, q, k, v, out, lse, p):
    layout, block_size, key_padding_mask, scale = p.layout, p.block_size, p.key_padding_mask, p.scale
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    dlt = cm.delta(do, out.contiguous())  # rowsum(dO * O), (B, H, S) float32
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _prepare(q, layout, block_size, key_padding_mask, scale, p)
    tiles = _tiles(meta["NB"], block_size)
    cm.launch(_bwd_dq, tiles, q, (q, k, v, do, lse, dlt, dq), {**meta, "scale": scale}, ("REAL",))
    meta_t = _prepare(q, layout, block_size, key_padding_mask, scale, p, transpose=True)
    cm.launch(_bwd_dkv, tiles, q, (q, k, v, do, lse, dlt, dk, dv), {**meta_t, "scale": scale}, ("REAL",))
    return dq, dk, dv
