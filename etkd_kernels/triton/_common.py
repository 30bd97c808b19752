"""Pieces every Triton kernel file shares: tile configs, head_dim handling, launch guards, the delta kernel.

Imported only when the triton backend is resolved (never at `import etkd_kernels` time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl

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


def configs(pass_: str) -> list[triton.Config]:
    """Every config `pass_` (a key of SHIPPED) ships, for `triton.autotune`.

    Which of them a launch may use is decided per launch (`launch`, `shipped`): the class of its tile on a
    GPU, one forced config in the acceptance run (`forced_config`), and a single 16x16 tile under the
    interpreter (autotuning there only multiplies the run time) — never at import time.
    """
    out = []
    for p, o, w, s, *reg in sorted({c for table in SHIPPED[pass_].values() for c in table}):
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


def shipped(kernel, block_d: int, fp32: bool) -> list[triton.Config]:
    """The configs an autotuned kernel may use for head tile `block_d` and the input dtype class."""
    every = getattr(kernel, "etkd_every", None)
    if every is None:
        every = kernel.etkd_every = list(kernel.configs)
    wanted = SHIPPED[every[0].etkd_pass][tile_class(block_d, fp32)]
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
    ship = shipped(kernel, kwargs["BLOCK_D"], kwargs["CT"] == tl.float32)
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
            kernel[grid](
                *[part(t) for t in args],
                **{k: part(v) if k in per_batch else v for k, v in kwargs.items()},
            )


# ----------------------------------------------------------------------------------------------------------
# Pieces of the attention kernels (inlined by the compiler; the same IR as writing them out)


@triton.jit
def load_rows(ptr, rows, ok, dd, dmask, D, CT: tl.constexpr):
    """The (rows, BLOCK_D) tile ptr[rows, :D] in CT, zeros where `ok` (per row) or `dmask` (per column) is
    false. `ptr` already points at the (batch, head) slice."""
    return tl.load(ptr + rows[:, None] * D + dd[None, :], mask=ok[:, None] & dmask[None, :], other=0.0).to(CT)


@triton.jit
def softmax_step(q, k, v, ok, m, row_sum, acc, scale2, CT: tl.constexpr, PREC: tl.constexpr):
    """One FlashAttention-2 forward step over a key tile, in the log2 domain (scale2 = scale * log2 e):
    scores q k^T where `ok`, the running row max `m`, row sums and the unnormalised output `acc` updated."""
    s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay NaN-free
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    row_sum = row_sum * alpha + tl.sum(p, 1)
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
def finish_store(m, row_sum, acc, OUT, LSE, obase, lbase, pos, rows, dd, dmask, D):
    """The end of every forward program: softmax_finish, then out (row pos at OUT + obase + pos * D, in OUT's
    dtype) and lse (at LSE + lbase + pos) stored where `rows` holds."""
    out, lse = softmax_finish(m, row_sum, acc)
    tl.store(OUT + obase + pos[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] & dmask[None, :])  # fmt: skip
    tl.store(LSE + lbase + pos, lse, mask=rows)


@triton.jit
def dq_step(q, do, k, v, ok, lse2, delta, dq, scale2, CT: tl.constexpr, PREC: tl.constexpr):
    """Backward over a key tile for the program's query rows: P recomputed from lse2 (log2 domain), dS, and
    dq += dS k (unscaled). Returns (dq, P, dS) (LSG's fused backward also forms dK/dV from P and dS)."""
    p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale2 - lse2[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    return dq + tl.dot(ds.to(CT), k, input_precision=PREC), p, ds


@triton.jit
def dkv_step(k, v, q, do, ok, lse2, delta, dk, dv, scale2, CT: tl.constexpr, PREC: tl.constexpr):
    """Backward over a query tile for the program's key rows (transposed P): dv += P^T dO, dk += dS^T q
    (unscaled)."""
    pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * scale2 - lse2[None, :]), 0.0)
    dv += tl.dot(pt.to(CT), do, input_precision=PREC)
    dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
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
