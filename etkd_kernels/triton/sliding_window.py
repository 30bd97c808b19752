"""Triton sliding-window attention with global tokens (Longformer), FlashAttention-2 style.

Semantics are `etkd_kernels/reference/sliding_window.py`'s. Every token has a kind: 0 padding, 1 real local,
2 real global (a global token that is padding counts as padding, as in the reference). Then

  local query rows (kind 1) see the band keys |i - j| <= w of kind 1 plus the compact list of global keys;
  global query rows (kind 2) see every real key, with qg/kg/vg when given (else q/k/v);
  padded query rows: out 0, lse +inf.

Two kernels per pass, each launched with flags that pick its rows and loops:
  * `_fwd` / `_bwd_dq` (a program owns query rows): a loop over key tiles (the band around its tile, or all
    keys) and, optionally, a loop over the compact global-key list.
  * `_bwd_dkv` (a program owns key rows): a loop over query tiles (band or all) and, optionally, a loop over
    the compact global-query list. No atomics: each output row is written by exactly one program.
The program's own rows are a contiguous tile, or gathered from the global list (GATHER). Scores live in
the log2 domain (scale * log2 e folded in); lse is saved in natural log, float32, (B, H, S).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import GlobalTokens
from . import _common as cm

LOCAL, GLOBAL, REAL, ALL = 2, 4, 6, 7  # bit sets over kinds (bit k = kind k allowed); kind 0 = padding
_KEY = ["SB", "BLOCK_D", "W", "GATHER", "RANGE", "BAND", "LIST", "DROPOUT"]  # SB: seq bucket

# Range tiles and global-list tiles share one loop (a scalar branch, `_other_rows`, picks the indices), so
# the body is written once per kernel.


@triton.jit
def _program(H, S, D, W, KIND, IDX, CNT, G, GATHER: tl.constexpr, OWN: tl.constexpr, RANGE: tl.constexpr,
             BAND: tl.constexpr, LIST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
    """What every kernel here starts from: `program_ids`, its own rows (`_own_rows`) and its loop (`_loop`)."""
    pid, bh, b, base, lbase = cm.program_ids(H, S, D)
    pos, valid, kind, own = _own_rows(pid, b, S, KIND, IDX, CNT, G, GATHER, OWN, BLOCK_P)
    n_own = tl.sum(own.to(tl.int32), 0)
    lo, n_range, cnt, n_iter = _loop(pid, b, S, W, CNT, n_own, RANGE, BAND, LIST, BLOCK_P, BLOCK_O)
    return bh, b, base, lbase, pos, valid, kind, own, lo, n_range, cnt, n_iter


@triton.jit
def _own_rows(pid, b, S, KIND, IDX, CNT, G, GATHER: tl.constexpr, OWN: tl.constexpr, BLOCK: tl.constexpr):
    """Positions of the program's own rows, which of them exist, their kinds, and which are of kind OWN."""
    r = pid * BLOCK + tl.arange(0, BLOCK)
    if GATHER:
        valid = r < tl.load(CNT + b)
        pos = tl.load(IDX + b * G + r, mask=valid, other=0)
    else:
        valid = r < S
        pos = r
    kind = tl.load(KIND + b * S + pos, mask=valid, other=0)
    return pos, valid, kind, valid & ((kind & OWN) != 0)


@triton.jit
def _loop(pid, b, S, W, CNT, n_own, RANGE: tl.constexpr, BAND: tl.constexpr, LIST: tl.constexpr,
          BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
    """(lo, number of range tiles, list length, total tiles) of the loop over the other side: the band
    around the tile (or every row) then the compact global list; nothing when the tile owns no row."""
    lo = 0
    n_range = 0
    cnt = 0
    if RANGE:
        if BAND:
            first = pid * BLOCK_P
            lo = tl.maximum(first - W, 0) // BLOCK_O * BLOCK_O
            n_range = tl.cdiv(tl.minimum(first + BLOCK_P + W, S) - lo, BLOCK_O)
        else:
            n_range = tl.cdiv(S, BLOCK_O)
    if LIST:
        cnt = tl.load(CNT + b)
    n_range = tl.where(n_own > 0, n_range, 0)
    cnt = tl.where(n_own > 0, cnt, 0)
    return lo, n_range, cnt, n_range + tl.cdiv(cnt, BLOCK_O)


@triton.jit
def _other_rows(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G,
                OTHER: tl.constexpr, BAND: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
    """Loop step `it`: the other side's rows (a range tile, or a tile of the compact global list), which of
    them exist (the loads' mask), and the (own row, other row) pairs inside the pattern."""
    if it < n_range:
        j = lo + it * BLOCK_O + tl.arange(0, BLOCK_O)
        jin = j < S
        ok = own[:, None] & (jin & ((tl.load(KIND + b * S + j, mask=jin, other=0) & OTHER) != 0))[None, :]
        if BAND:
            ok = ok & (tl.abs(pos[:, None] - j[None, :]) <= W)
    else:
        t = (it - n_range) * BLOCK_O + tl.arange(0, BLOCK_O)
        jin = t < cnt
        j = tl.load(IDX + b * G + t, mask=jin, other=0)
        ok = own[:, None] & jin[None, :]
    return j, jin, ok


@triton.jit
def _key_tile(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G, K, V, base, dd, dmask, D, CT: tl.constexpr,
              OTHER: tl.constexpr, BAND: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
    """Loop step `it` of a program that owns query rows: the key rows (`_other_rows`), the (query, key) pairs
    inside the pattern, and the k and v tiles."""
    j, jin, ok = _other_rows(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G, OTHER, BAND, BLOCK_O)
    k = cm.load_rows(K + base, j, jin, dd, dmask, D, CT)
    v = cm.load_rows(V + base, j, jin, dd, dmask, D, CT)
    return j, ok, k, v


@triton.autotune(configs=cm.configs("fwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _fwd(
    Q, K, V, OUT, LSE, KIND, IDX, CNT, scale2, S, SB, D, H, G, W,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0,
    GATHER: tl.constexpr, RANGE: tl.constexpr, BAND: tl.constexpr, LIST: tl.constexpr,
    OWN: tl.constexpr, OTHER: tl.constexpr, STORE: tl.constexpr, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, pos, valid, kind, own, lo, n_range, cnt, n_iter = _program(
        H, S, D, W, KIND, IDX, CNT, G, GATHER, OWN, RANGE, BAND, LIST, BLOCK_P, BLOCK_O
    )
    dd, dmask, q, m, row_sum, acc = cm.fwd_prologue(Q, base, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for it in range(0, n_iter):
        j, ok, k, v = _key_tile(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G, K, V, base, dd, dmask, D,
                                CT, OTHER, BAND, BLOCK_O)  # fmt: skip
        m, row_sum, acc = cm.softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT, PREC, pos[:, None], j[None, :],
                                          bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    store = valid & ((kind & STORE) != 0)
    cm.finish_store(m, row_sum, acc, OUT, LSE, base, lbase, pos, store, dd, dmask, D)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KIND, IDX, CNT, scale2, scale, S, SB, D, H, G, W,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0,
    GATHER: tl.constexpr, RANGE: tl.constexpr, BAND: tl.constexpr, LIST: tl.constexpr,
    OWN: tl.constexpr, OTHER: tl.constexpr, STORE: tl.constexpr, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    bh, b, base, lbase, pos, valid, kind, own, lo, n_range, cnt, n_iter = _program(
        H, S, D, W, KIND, IDX, CNT, G, GATHER, OWN, RANGE, BAND, LIST, BLOCK_P, BLOCK_O
    )
    dd, dmask, q, do, lse2, delta, dq = cm.dq_prologue(
        Q, DO, LSE, DELTA, base, lbase, pos, valid, own, D, CT, BLOCK_P, BLOCK_D
    )
    for it in range(0, n_iter):
        j, ok, k, v = _key_tile(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G, K, V, base, dd, dmask, D,
                                CT, OTHER, BAND, BLOCK_O)  # fmt: skip
        dq, _, _ = cm.dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT, PREC, pos[:, None], j[None, :],
                              bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    cm.store_rows(DQ, base, pos, valid & ((kind & STORE) != 0), dd, dmask, D, dq * scale)


@triton.autotune(configs=cm.configs("bwd"), key=_KEY)
@triton.jit(do_not_specialize=cm.RNG_ARGS)
def _bwd_dkv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KIND, IDX, CNT, scale2, scale, S, SB, D, H, G, W,
    rng_k0, rng_k1, rng_off, rng_thr, rng_scale, rng_bh0,
    GATHER: tl.constexpr, RANGE: tl.constexpr, BAND: tl.constexpr, LIST: tl.constexpr,
    OWN: tl.constexpr, OTHER: tl.constexpr, STORE: tl.constexpr, DROPOUT: tl.constexpr,
    CT: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    # Own rows are keys; the loop runs over query rows (band/all tiles, then the global-query list).
    bh, b, base, lbase, pos, valid, kind, own, lo, n_range, cnt, n_iter = _program(
        H, S, D, W, KIND, IDX, CNT, G, GATHER, OWN, RANGE, BAND, LIST, BLOCK_P, BLOCK_O
    )
    dd, dmask, k, v, dk, dv = cm.dkv_prologue(K, V, base, pos, valid, D, CT, BLOCK_P, BLOCK_D)
    for it in range(0, n_iter):
        i, iok, ok = _other_rows(it, lo, n_range, cnt, b, S, W, pos, own, KIND, IDX, G, OTHER, BAND, BLOCK_O)
        q, do, lse2, delta = cm.query_tile(Q, DO, LSE, DELTA, base, lbase, i, iok, dd, dmask, D, CT)
        dk, dv = cm.dkv_step(k, v, q, do, ok, lse2, delta, dk, dv, scale2, CT, PREC, i[None, :], pos[:, None],
                             bh + rng_bh0, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT)  # fmt: skip
    store = valid & ((kind & STORE) != 0)
    cm.store_rows(DK, base, pos, store, dd, dmask, D, dk * scale)
    cm.store_rows(DV, base, pos, store, dd, dmask, D, dv)


# ----------------------------------------------------------------------------------------------------------
# Host side


def _kinds(q: torch.Tensor, global_mask, key_padding_mask):
    """Token kinds as bits (B, S) int8 (1 padding, 2 local, 4 global) and the global list (idx (B, S) int32,
    global positions first; cnt (B,) int32) or None. Built on q's device with no host synchronisation: the
    global-row launches cover the whole list width and programs past a batch row's count exit at once."""
    b, _, s, _ = q.shape
    real = (
        key_padding_mask
        if key_padding_mask is not None
        else torch.ones(b, s, dtype=torch.bool, device=q.device)
    )
    glob = None if global_mask is None else GlobalTokens.of(global_mask, key_padding_mask)
    kind = real.to(torch.int8)
    if glob is not None:
        kind = kind + glob.mask.to(torch.int8)
    kind = torch.bitwise_left_shift(torch.ones_like(kind), kind).contiguous()
    if glob is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return kind, dummy, dummy, None
    return kind, glob.index, glob.count, glob


def _meta(q: torch.Tensor, window: int, scale: float, kinds, p) -> dict:
    kind, idx, cnt, glob = kinds
    b, h, s, d = q.shape
    return dict(
        **cm.kernel_args(q, scale, p), KIND=kind, IDX=idx, CNT=cnt, S=s, SB=cm.seq_bucket(s),
        G=s if glob is not None else 1, W=window // 2,
    )  # fmt: skip


_PER_BATCH = ("KIND", "IDX", "CNT")


def _rows(n: int):
    return lambda meta: triton.cdiv(n, meta["BLOCK_P"])


def _flags(gather, rng, band, lst, own, other, store):
    return dict(GATHER=gather, RANGE=rng, BAND=band, LIST=lst, OWN=own, OTHER=other, STORE=store)


def forward(q, k, v, p):
    window, global_mask, key_padding_mask, scale = p.window, p.global_mask, p.key_padding_mask, p.scale
    qg, kg, vg = p.qg, p.kg, p.vg
    b, h, s, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kinds = _kinds(q, global_mask, key_padding_mask)
    g = kinds[3] is not None
    meta = _meta(q, window, scale, kinds, p)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    # Local and padded query rows: the band of local keys plus the compact list of global keys.
    flags = _flags(False, True, True, g, LOCAL, LOCAL, ALL - GLOBAL if g else ALL)
    cm.launch(_fwd, _rows(s), q, (q, k, v, out, lse), {**meta, **flags}, _PER_BATCH)
    if g:
        # Global query rows: every real key, with the global projections when given.
        qq, kk, vv = (q, k, v) if qg is None else (qg.contiguous(), kg.contiguous(), vg.contiguous())
        flags = _flags(True, True, False, False, GLOBAL, REAL, ALL)
        cm.launch(_fwd, _rows(s), q, (qq, kk, vv, out, lse), {**meta, **flags}, _PER_BATCH)
    return out, lse


def backward(grad_out, q, k, v, out, lse, p):
    window, global_mask, key_padding_mask, scale = p.window, p.global_mask, p.key_padding_mask, p.scale
    qg, kg, vg = p.qg, p.kg, p.vg
    b, h, s, d = q.shape
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    kinds = _kinds(q, global_mask, key_padding_mask)
    g = kinds[3] is not None
    meta = {**_meta(q, window, scale, kinds, p), "scale": scale}
    dlt = cm.delta(do, out.contiguous())  # rowsum(dO * O), (B, H, S) float32
    lse = lse.contiguous()
    same = qg is None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def run(kernel, tensors, *flag_args):
        cm.launch(kernel, _rows(s), q, tensors, {**meta, **_flags(*flag_args)}, _PER_BATCH)

    # dq of local rows (and of global rows' q, which is unused when separate projections exist: zeros).
    local_store = ALL - GLOBAL if (g and same) else ALL
    run(_bwd_dq, (q, k, v, do, lse, dlt, dq), False, True, True, g, LOCAL, LOCAL, local_store)
    # dk, dv of local keys: band of local queries, plus global queries when they share the projections.
    run(_bwd_dkv, (q, k, v, do, lse, dlt, dk, dv), False, True, True, g and same, LOCAL, LOCAL,
        ALL - GLOBAL if g else ALL)  # fmt: skip
    if not g:
        return (
            dq,
            dk,
            dv,
            *((None,) * 3 if same else (torch.zeros_like(qg), torch.zeros_like(kg), torch.zeros_like(vg))),
        )
    # dk, dv of global keys: every local query (and every global one when projections are shared).
    run(
        _bwd_dkv,
        (q, k, v, do, lse, dlt, dk, dv),
        True,
        True,
        False,
        False,
        GLOBAL,
        REAL if same else LOCAL,
        ALL,
    )
    if same:
        run(_bwd_dq, (q, k, v, do, lse, dlt, dq), True, True, False, False, GLOBAL, REAL, ALL)
        return dq, dk, dv, None, None, None
    qg, kg, vg = qg.contiguous(), kg.contiguous(), vg.contiguous()
    dqg, dkg, dvg = torch.zeros_like(qg), torch.empty_like(kg), torch.empty_like(vg)
    run(_bwd_dq, (qg, kg, vg, do, lse, dlt, dqg), True, True, False, False, GLOBAL, REAL, ALL)
    run(_bwd_dkv, (qg, kg, vg, do, lse, dlt, dkg, dvg), False, False, False, True, REAL, REAL, ALL)
    return dq, dk, dv, dqg, dkg, dvg
