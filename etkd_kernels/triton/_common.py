"""Pieces every Triton kernel file shares: tile configs, the dot helper, head_dim handling.

Imported only when the triton backend is resolved (never at `import etkd_kernels` time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


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


def configs(primary: str, other: str, gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs: `gpu` entries (BLOCK primary, BLOCK other, num_warps, num_stages) on a GPU; a single
    16x16 tile under the interpreter (autotuning there only multiplies the run time)."""
    if interpreting():
        return [triton.Config({primary: 16, other: 16}, num_warps=1, num_stages=1)]
    return [triton.Config({primary: p, other: o}, num_warps=w, num_stages=s) for p, o, w, s in gpu]


# (BLOCK over the program's own rows, BLOCK over the loop's rows, num_warps, num_stages): A100/H100 sizes
# as in FlashAttention-2's Triton tutorial; configs that exceed shared memory are skipped by the autotuner.
FWD_CONFIGS = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 128, 4, 2),
    (64, 32, 4, 4),
]
BWD_CONFIGS = [
    (64, 64, 4, 2),
    (64, 64, 8, 3),
    (128, 64, 8, 2),
    (64, 32, 4, 3),
    (32, 64, 4, 2),
    (128, 128, 8, 2),
]
