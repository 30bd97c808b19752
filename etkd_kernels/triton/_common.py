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

# Shipped autotune configs: (BLOCK over the program's own rows, BLOCK over the loop's rows, num_warps,
# num_stages), per pass and per class of tile: 16-bit inputs with a head tile up to 64 or of 128, and fp32
# (exact FMA, no tensor cores, so every value of a tile lives in registers). Chosen so that no config
# spills registers or exceeds shared memory when compiled for sm_80 and sm_90 (tests/test_triton_compile.py).
# Dropped because they spilled when compiled here (stack bytes per thread, bf16 d64 sm_80 unless noted):
# fwd (128, 64, 4, 3) 32-40 B; fwd (64, 64, 4, 3) at fp16 d128 sm_80 8-16 B (no spill on sm_90); bwd dK/dV (64, 64, 4, 2) 16-512 B, (64, 64, 8, 2) 8-496 B, (64, 32, 4, 2)
# 16 B (block-sparse), (32, 64, 4, 2) 8 B at fp16 d128 sm_90, fp32 (32, 32, 4, 1) 16 B; and, from the
# review of issue 15, every 128-row or 128-key tile at head_dim 128 (56-944 B) and bwd (128, 128, 8, 2).
SHIPPED = {
    "fwd": {
        "d64": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        "d128": [(64, 64, 8, 3), (64, 32, 4, 3)],
        "fp32": [(32, 32, 4, 2)],
    },
    "bwd": {
        "d64": [(32, 64, 4, 2), (32, 32, 4, 2)],
        "d128": [(32, 64, 8, 2), (32, 32, 4, 2)],
        "fp32": [(32, 32, 8, 1), (16, 32, 4, 1)],
    },
}
FWD_CONFIGS = sorted({c for table in SHIPPED["fwd"].values() for c in table})
BWD_CONFIGS = sorted({c for table in SHIPPED["bwd"].values() for c in table})


def configs(pass_: str) -> list[triton.Config]:
    """Every config `pass_` ("fwd" or "bwd") ships, for `triton.autotune`.

    Which of them a launch may use is decided per launch (`launch`, `shipped`): the class of its tile on a
    GPU, one forced config in the acceptance run (`forced_config`), and a single 16x16 tile under the
    interpreter (autotuning there only multiplies the run time) — never at import time.
    """
    out = []
    for p, o, w, s in FWD_CONFIGS if pass_ == "fwd" else BWD_CONFIGS:
        cfg = triton.Config({"BLOCK_P": p, "BLOCK_O": o}, num_warps=w, num_stages=s)
        cfg.etkd_pass = pass_
        out.append(cfg)
    return out


def _entry(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_P"], c.kwargs["BLOCK_O"], c.num_warps, c.num_stages


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
