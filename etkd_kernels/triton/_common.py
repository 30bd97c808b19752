"""Pieces every Triton kernel file shares: tile configs, head_dim handling, launch guards and arguments, the
@triton.jit pieces of the attention kernels, the delta kernel. The kernel files import this module as `cm` and
call `cm.<name>` (one vocabulary, not one import list per file): Triton resolves a module attribute in a
kernel like a global name and hashes the helper into the kernel's cache key.

Imported only when the triton backend is resolved (never at `import etkd_kernels` time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl

from .._shared import dropout_scale, dropout_threshold
from . import MAX_HEAD_DIM, interpreting

# log2(e): scores live in the log2 domain (exp2 is the fast instruction); kernels read it as a constexpr,
# the host as `LOG2E.value`.
LOG2E = tl.constexpr(1.4426950408889634)
MAX_GRID_Y = 65535  # CUDA's limit on grid axis y, where batch * heads goes


def seq_bucket(seq: int) -> int:
    """Autotune key for a sequence length: the next power of two, so a new length re-tunes only when it
    crosses one (tile choices depend on the order of magnitude of the length, not its exact value)."""
    return triton.next_power_of_2(max(int(seq), 1))


def head_block(head_dim: int) -> int:
    """Tile width over head_dim: the next power of two >= head_dim (at least 16 for tl.dot), masked loads."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim: the triton kernels support head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are cast to fp32 first.

    The interpreter computes bf16 arithmetic wrong (numpy has no bfloat16: a bf16 tl.dot of 16x16 returns
    garbage there), so under TRITON_INTERPRET=1 bf16 tiles are widened to fp32 before every product; loads
    and stores stay bf16. On a GPU bf16/fp16 tiles go to the tensor cores as they are (fp32 accumulation).
    """
    return interpreting() and dtype == torch.bfloat16


def compute_type(dtype: torch.dtype) -> tl.constexpr:
    """Element type the kernels feed to tl.dot: the input's, or fp32 when `upcast` says so."""
    return (
        tl.float32
        if upcast(dtype)
        else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)
    )


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (not TF32) so they match the fp32 oracle to ~1e-6."""
    return "ieee" if dtype == torch.float32 or upcast(dtype) else "tf32"


INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 16, "BLOCK_O": 16}, num_warps=1, num_stages=1)

# Shipped autotune configs: (BLOCK over own rows, BLOCK over the loop's rows, num_warps, num_stages[, maxnreg])
# per pass and class of tile (16-bit with a head tile <= 64 or of 128; fp32: exact FMA, every value in registers),
# chosen so that none spills or exceeds shared memory for sm_80/sm_90 (tests/test_triton_compile.py, `-m slow`).
# maxnreg (PTX .maxnreg) where it was measured to help: without it ptxas spilled 8-24 B at 72-168 registers.
# Dropped (stack bytes per thread, bf16 d64 sm_80 unless noted): fwd (128, 64, 4, 3) 32-40 B; (64, 64, 4, 3) at
# fp16 d128 sm_80 8-16 B; fp32 (32, 32, 4|8, 2), (16, 16, 4, 2) at d128 8-96 B; bwd (64, 64, 4, 2) 16-512 B, (64, 64, 8, 2) 8-496 B,
# (64, 32, 4, 2) 16 B, (32, 64, 4, 2) 8 B at fp16 d128 sm_90; fp32 (32, 32, 8, 1), (16, 32, 4, 1) 8-320 B at d128;
# from the review of issue 15, every 128-row or 128-key tile at d128 (56-944 B).
SHIPPED = {
    "fwd": {
        "d64": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        "d128": [(64, 64, 8, 3), (64, 32, 4, 3)],
        "fp32": [(16, 32, 8, 2, 255)],
    },
    "bwd": {
        "d64": [(32, 64, 4, 2), (32, 32, 4, 2)],
        "d128": [(32, 64, 8, 2), (32, 32, 4, 2)],
        "fp32": [(16, 32, 8, 1, 255), (16, 16, 4, 1, 255)],
    },
    # LSG's backward is one kernel holding dQ and a dK/dV partial per key tile (fp32 atomics) at once, so it
    # gets its own tiles. At "bwd"'s it spilled bf16 d64 sm_80 (32, 64, 4, 2) 264 B, fp32 (32, 32, 8, 1) 24 B;
    # its 16-bit d32 tiles spilled 8-16 B at 128-168 registers without maxnreg (187-198 with it, no spill);
    # at d128 sm_80, (32, 32, 4, 2) spilled 152 B and (16, 32, 4, 2) 48 B at 255 registers: 8 warps there
    # ((32, 32, 8, 2) 243 registers; (16, 32, 8, 2) 16 B at 128 on sm_90, r255: 150). fp32: "bwd"'s tiles fit
    # too (the older (16, 16, 4, 1) spilled 8 B at 128 registers without maxnreg: 143 with it).
    "bwd_lsg": {
        "d64": [(32, 32, 4, 2, 255), (16, 32, 4, 2, 255)],
        "d128": [(32, 32, 8, 2), (16, 32, 8, 2, 255)],
        "fp32": [(16, 32, 8, 1, 255), (16, 16, 4, 1, 255)],
    },
}


# With dropout on P (DROPOUT=True) the forward also holds a Philox4x32-10 state per score of its tile. At the
# 16-bit tiles above that spilled (tests/triton_targets.py, per thread: sliding_window._fwd bf16 d64 sm_80
# (128, 64, 8, 3) 24 B, (64, 64, 4, 3) 112 B; fp16 d128 sm_90 (64, 64, 8, 3) 16 B, (64, 32, 4, 3) 16 B;
# block_sparse._fwd fp16 d128 (64, 64, 8, 3) 32 B), so dropout launches take these tiles: 8-16 scores a thread.
DROPOUT_SHIPPED = {
    "fwd": {
        "d64": [(32, 64, 4, 3), (32, 32, 4, 3)],
        "d128": [(64, 32, 8, 3), (32, 64, 4, 3)],
    },
}


def configs(pass_: str) -> list[triton.Config]:
    """Every config `pass_` (a key of SHIPPED) ships, for `triton.autotune`.

    Which of them a launch may use is decided per launch (`launch`, `shipped`): the class of its tile on a
    GPU, one forced config in the acceptance run (`forced_config`), and a single 16x16 tile under the
    interpreter (autotuning there only multiplies the run time) — never at import time.
    """
    tables = [*SHIPPED[pass_].values(), *DROPOUT_SHIPPED.get(pass_, {}).values()]
    out = []
    for p, o, w, s, *reg in sorted({c for table in tables for c in table}):
        cfg = triton.Config(
            {"BLOCK_P": p, "BLOCK_O": o}, num_warps=w, num_stages=s, maxnreg=reg[0] if reg else None
        )
        cfg.etkd_pass = pass_
        out.append(cfg)
    return out


def _entry(c: triton.Config) -> tuple[int, ...]:
    """The SHIPPED tuple of a config: (BLOCK_P, BLOCK_O, num_warps, num_stages[, maxnreg])."""
    reg = (c.maxnreg,) if c.maxnreg else ()
    return c.kwargs["BLOCK_P"], c.kwargs["BLOCK_O"], c.num_warps, c.num_stages, *reg


def tile_class(block_d: int, dtype_is_fp32: bool) -> str:
    return "fp32" if dtype_is_fp32 else ("d64" if block_d <= 64 else "d128")


_forced: list[int] = []


@contextlib.contextmanager
def forced_config(index: int):
    """Inside the block every autotuned kernel runs its shipped config number `index` (modulo the count)
    instead of autotuning: the GPU acceptance run checks every shipped config this way."""
    _forced.append(index)
    try:
        yield
    finally:
        _forced.pop()


def shipped(kernel, block_d: int, fp32: bool, dropout: bool = False) -> list[triton.Config]:
    """The configs an autotuned kernel may use for head tile `block_d`, the input dtype class and dropout."""
    every = getattr(kernel, "etkd_every", None)
    if every is None:
        every = kernel.etkd_every = list(kernel.configs)
    pass_, cls = every[0].etkd_pass, tile_class(block_d, fp32)
    wanted = SHIPPED[pass_][cls]
    if dropout:
        wanted = DROPOUT_SHIPPED.get(pass_, {}).get(cls, wanted)
    return [c for c in every if _entry(c) in wanted]


def _select_configs(kernel, kwargs: dict) -> None:
    """Point an autotuned kernel at the configs this launch may use (see `configs`)."""
    if not hasattr(kernel, "configs"):
        return  # a plain @triton.jit kernel
    if not hasattr(kernel, "etkd_every"):
        kernel.etkd_every = list(kernel.configs)  # what ships, kept before the list is narrowed
    if interpreting():
        kernel.configs = [INTERPRETER_CONFIG]
        return
    ship = shipped(kernel, kwargs["BLOCK_D"], kwargs["CT"] == tl.float32, kwargs.get("DROPOUT", False))
    kernel.configs = [ship[_forced[-1] % len(ship)]] if _forced else ship


def _device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launch(
    kernel,
    tiles: Callable[[dict], int],
    q: torch.Tensor,
    args: Iterable,
    kwargs: dict,
    per_batch: tuple[str, ...] = (),
) -> None:
    """`kernel[(tiles(meta), batch * heads)](*args, **kwargs)` on q's device.

    batch * heads goes on grid axis y, which CUDA caps at 65,535: larger launches are split over the batch.
    Every positional argument is a per-batch tensor (batch first) and is sliced with it, as are the keyword
    tensors named in `per_batch`; the kernels index rows relative to their own slice (b = program_id(1) // H).
    """
    b, h = q.shape[:2]
    if h > MAX_GRID_Y:
        raise ValueError(f"q: the triton kernels support at most {MAX_GRID_Y} heads, got {h}")
    args = list(args)
    step = MAX_GRID_Y // h
    _select_configs(kernel, kwargs)
    with _device(q):
        for b0 in range(0, b, step):
            b1 = min(b, b0 + step)
            part = (lambda t: t) if (b0, b1) == (0, b) else (lambda t: t[b0:b1])
            grid = lambda meta, n=(b1 - b0) * h: (tiles(meta), n)
            kw = {k: part(v) if k in per_batch else v for k, v in kwargs.items()}
            if "rng_bh0" in kw:  # the dropout counter's batch * heads row is absolute, not per slice
                kw["rng_bh0"] = b0 * h
            kernel[grid](*[part(t) for t in args], **kw)


# ----------------------------------------------------------------------------------------------------------
# Attention dropout: the RNG contract of etkd_kernels/_shared/ (`philox4x32_10`, `dropout_keep`), bit for bit.
# Triton's tl.randint keys Philox on (seed, offset) with a counter of its own layout, so the contract's
# counter (j >> 3, i, b * H + h, offset) goes through this Philox4x32-10 (Random123's constants and rounds).


@triton.jit
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1), all uint32 (broadcastable)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, tl.full((), 0xD2511F53, tl.uint32))
        hi1 = tl.umulhi(c2, tl.full((), 0xCD9E8D57, tl.uint32))
        lo0 = c0 * tl.full((), 0xD2511F53, tl.uint32)
        lo1 = c2 * tl.full((), 0xCD9E8D57, tl.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + tl.full((), 0x9E3779B9, tl.uint32)
        k1 = k1 + tl.full((), 0xBB67AE85, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def keep_mask(i, j, bh, rng_k0, rng_k1, rng_off, rng_thr):
    """The dropout keep-mask of (query row i, key column j) pairs (broadcast: i (P, 1), j (1, O) or the
    transpose), for program (batch * heads) row bh: one Philox call per 8 key columns, 16 bits a column,
    kept iff those bits >= rng_thr. rng_k0/k1/off are the uint32 words of the seed and offset, passed as
    int32 bit patterns (see `rng_args`)."""
    iu, ju = tl.broadcast(i.to(tl.uint32), j.to(tl.uint32))
    r0, r1, r2, r3 = philox(
        ju >> 3,
        iu,
        iu * 0 + bh.to(tl.uint32),
        iu * 0 + rng_off.to(tl.uint32, bitcast=True),
        rng_k0.to(tl.uint32, bitcast=True),
        rng_k1.to(tl.uint32, bitcast=True),
    )
    w = (ju & 7) >> 1
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return ((r >> ((ju & 1) * 16)) & 0xFFFF) >= rng_thr


# The dropout arguments every attention kernel takes after its own scalars (and DROPOUT among its constexprs);
# never specialised, so a seed's value (== 1, divisible by 16) never compiles a second kernel.
RNG_ARGS = ["rng_k0", "rng_k1", "rng_off", "rng_thr", "rng_scale", "rng_bh0"]


def _i32(x: int) -> int:
    """A uint32 word as the int32 with the same bits: Triton types a Python int >= 2**31 as int64, which
    would compile a second kernel for half the seeds."""
    return x - (1 << 32) if x >= 1 << 31 else x


def rng_args(p) -> dict:
    """Keyword arguments of the dropout contract for a kernel launch from the op's params `p` (dropout_p, seed,
    offset; None = no dropout): DROPOUT (constexpr; False = the kernels without dropout, bit for bit), the key
    and offset words, the 16-bit threshold and the 1/(1-p) scale (computed in double, applied in fp32).
    rng_bh0 (the first batch * heads row of a launch) is set per launch by `launch`."""
    p_drop = 0.0 if p is None else float(p.dropout_p)
    seed, offset = (0, 0) if p_drop == 0.0 else (int(p.seed), int(p.offset))
    return dict(
        DROPOUT=p_drop > 0.0,
        rng_k0=_i32(seed & 0xFFFFFFFF),
        rng_k1=_i32((seed >> 32) & 0xFFFFFFFF),
        rng_off=_i32(offset & 0xFFFFFFFF),
        rng_thr=dropout_threshold(p_drop),
        rng_scale=dropout_scale(p_drop),
        rng_bh0=0,
    )


def kernel_args(q: torch.Tensor, scale: float, p) -> dict:
    """The launch arguments every attention kernel takes beside its own: the dropout contract's (`rng_args`; `p`
    the op's params, or None for no dropout), scale2 (the score scale in the log2 domain), q's head_dim D and
    heads H, the tl.dot operand type CT and precision PREC, and the head tile width BLOCK_D."""
    d = q.shape[-1]
    return dict(
        **rng_args(p), scale2=scale * LOG2E.value, D=d, H=q.shape[1],
        CT=compute_type(q.dtype), PREC=precision(q.dtype), BLOCK_D=head_block(d),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Pieces of the attention kernels (inlined by the compiler; the same IR as writing them out)


@triton.jit
def load_rows(ptr, rows, ok, dd, dmask, D, CT: tl.constexpr):
    """The (rows, BLOCK_D) tile ptr[rows, :D] in CT, zeros where `ok` (per row) or `dmask` (per column) is
    false. `ptr` already points at the (batch, head) slice."""
    return tl.load(ptr + rows[:, None] * D + dd[None, :], mask=ok[:, None] & dmask[None, :], other=0.0).to(CT)


@triton.jit
def softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT: tl.constexpr, PREC: tl.constexpr,
                 i, j, bh, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT: tl.constexpr):  # fmt: skip
    """One FlashAttention-2 forward step over a key tile, in the log2 domain (scale2 = scale * log2 e):
    scores q k^T where `ok`, the running row max `m`, row sums and the unnormalised output `acc` updated.
    DROPOUT: the row sums see every probability, P @ V only the kept ones (positions i (P, 1), j (1, O) of
    program row bh, `keep_mask`), scaled by rng_scale = 1/(1-p)."""
    s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay NaN-free
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    row_sum = row_sum * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep_mask(i, j, bh, rng_k0, rng_k1, rng_off, rng_thr), p * rng_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(CT), v, input_precision=PREC)
    return m_new, row_sum, acc


@triton.jit
def softmax_finish(m, row_sum, acc):
    """(out, lse) of the online softmax: out = acc / row sum, lse in natural log; rows that saw no key give
    out 0 and lse +inf."""
    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, row_sum, 1.0))) / LOG2E, float("inf"))
    return out, lse


@triton.jit
def store_rows(PTR, base, pos, rows, dd, dmask, D, x):
    """x (rows, BLOCK_D) stored in PTR's dtype at PTR + base + pos * D where `rows` (per row) and `dmask` hold."""
    tl.store(PTR + base + pos[:, None] * D + dd[None, :], x.to(PTR.dtype.element_ty),
             mask=rows[:, None] & dmask[None, :])  # fmt: skip


@triton.jit
def finish_store(m, row_sum, acc, OUT, LSE, obase, lbase, pos, rows, dd, dmask, D):
    """The end of every forward program: softmax_finish, then out (row pos at OUT + obase + pos * D, in OUT's
    dtype) and lse (at LSE + lbase + pos) stored where `rows` holds."""
    out, lse = softmax_finish(m, row_sum, acc)
    store_rows(OUT, obase, pos, rows, dd, dmask, D, out)
    tl.store(LSE + lbase + pos, lse, mask=rows)


@triton.jit
def program_ids(H, S, D):
    """(pid, bh, b, base, lbase) of a program: its tile along grid axis 0, its batch * heads row bh and batch
    b (of the launch's slice), and the element offsets of its (batch, head) in the (B, H, S, D) tensors and in
    the (B, H, S) ones (lse, delta)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    return pid, bh, bh // H, bh.to(tl.int64) * S * D, bh.to(tl.int64) * S


# The prologues of the three kinds of program (they own query rows for the forward and dQ, key rows for
# dK/dV): the head_dim columns (dd, dmask), the own rows' tiles and the zeroed accumulators.


@triton.jit
def fwd_prologue(Q, base, pos, valid, D, CT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dd, dmask, q, m, row_sum, acc) of a forward program: q rows `pos` (zeros where not `valid`) and the
    online softmax's state."""
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = load_rows(Q + base, pos, valid, dd, dmask, D, CT)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    return dd, dmask, q, m, tl.zeros([BLOCK_P], tl.float32), tl.zeros([BLOCK_P, BLOCK_D], tl.float32)


@triton.jit
def dq_prologue(Q, DO, LSE, DELTA, base, lbase, pos, valid, own, D, CT: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """(dd, dmask, q, do, lse2, delta, dq) of a dQ program: its rows of q and dO, lse in the log2 domain
    (+inf where not `own`) and delta (rowsum(dO * O)) at LSE/DELTA + lbase + pos, dq zeroed."""
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = load_rows(Q + base, pos, valid, dd, dmask, D, CT)
    do = load_rows(DO + base, pos, valid, dd, dmask, D, CT)
    lse2 = tl.load(LSE + lbase + pos, mask=own, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + lbase + pos, mask=own, other=0.0)
    return dd, dmask, q, do, lse2, delta, tl.zeros([BLOCK_P, BLOCK_D], tl.float32)


@triton.jit
def dkv_prologue(K, V, base, pos, valid, D, CT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dd, dmask, k, v, dk, dv) of a dK/dV program: its key rows of k and v, dk and dv zeroed."""
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    k = load_rows(K + base, pos, valid, dd, dmask, D, CT)
    v = load_rows(V + base, pos, valid, dd, dmask, D, CT)
    acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    return dd, dmask, k, v, acc, acc


@triton.jit
def query_tile(Q, DO, LSE, DELTA, base, lbase, i, iok, dd, dmask, D, CT: tl.constexpr):
    """The loop side of a dK/dV program: query rows i of q and dO, their lse (log2 domain) and delta."""
    q = load_rows(Q + base, i, iok, dd, dmask, D, CT)
    do = load_rows(DO + base, i, iok, dd, dmask, D, CT)
    lse2 = tl.load(LSE + lbase + i, mask=iok, other=float("inf")) * LOG2E
    return q, do, lse2, tl.load(DELTA + lbase + i, mask=iok, other=0.0)


@triton.jit
def dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT: tl.constexpr, PREC: tl.constexpr,
            i, j, bh, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT: tl.constexpr):  # fmt: skip
    """Backward over a key tile for the program's query rows: P recomputed from lse2 (log2 domain), dS, and
    dq += dS k (unscaled). Returns (dq, P as P @ V saw it, dS) (LSG's fused backward also forms dK/dV from
    them). DROPOUT regenerates the forward's mask M: dS = P * (dP * M / (1-p) - delta)."""
    p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale2 - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    pv = p
    if DROPOUT:
        kept = keep_mask(i, j, bh, rng_k0, rng_k1, rng_off, rng_thr)
        dp = tl.where(kept, dp * rng_scale, 0.0)
        pv = tl.where(kept, p * rng_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(CT), k, input_precision=PREC), pv, ds


@triton.jit
def dkv_step(k, v, q, do, ok, lse2, delta, dk, dv, scale2, CT: tl.constexpr, PREC: tl.constexpr,
             i, j, bh, rng_k0, rng_k1, rng_off, rng_thr, rng_scale, DROPOUT: tl.constexpr):  # fmt: skip
    """Backward over a query tile for the program's key rows (transposed P: key rows j (P, 1), query
    columns i (1, O)): dv += (P M / (1-p))^T dO, dk += dS^T q (unscaled)."""
    pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * scale2 - lse2[None, :]), 0.0)
    pv = pt
    if DROPOUT:
        kept = keep_mask(i, j, bh, rng_k0, rng_k1, rng_off, rng_thr)
        pv = tl.where(kept, pt * rng_scale, 0.0)
    dv += tl.dot(pv.to(CT), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    if DROPOUT:
        dpt = tl.where(kept, dpt * rng_scale, 0.0)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(CT), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _delta_kernel(DO, OUT, DELTA, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (dd < D)[None, :]
    offs = rows[:, None] * D + dd[None, :]
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(do * o, 1), mask=rows < R)


def delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in float32, (..., rows): the backward's softmax correction term, one fused pass with no
    fp32 copies of dO and O. Both contiguous, same shape (..., head_dim)."""
    d = out.shape[-1]
    res = torch.empty(out.shape[:-1], dtype=torch.float32, device=out.device)
    rows = res.numel()
    if rows == 0:
        return res
    block_r = 16 if interpreting() else 64
    with _device(out):
        _delta_kernel[(triton.cdiv(rows, block_r),)](
            do, out, res, rows, d, BLOCK_R=block_r, BLOCK_D=head_block(d)
        )
    return res
