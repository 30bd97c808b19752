"""`cuda`: fused CUDA kernels from csrc/cuda, built only where a CUDA torch and toolkit exist."""

from __future__ import annotations

import functools

import torch

from ..dispatch import Capabilities, backend_ops

NAME = "cuda"
DESCRIPTION = "fused CUDA kernels (csrc/cuda), fp16/bf16/fp32"
# `full` is torch's own SDPA (FlashAttention / memory-efficient kernels), so it needs no compiled extension.
OPS = backend_ops(__file__)  # module <op> here holds forward/backward
AUTO_DEVICES = ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Template instantiations of `dispatch_head_dim` in csrc/cuda/kernels.h (tests/test_cuda_sources.py checks
# that this list and the C++ switch agree), the grid.y limit of the launches, the binding's int32 seq bound.
HEAD_DIMS = (32, 64, 128)
MAX_BATCH_HEADS = 65535
MAX_SEQ = (1 << 30) - 1


@functools.cache
def unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU build; the CUDA extension is built only with a CUDA torch (or FORCE_CUDA=1)"
    try:
        from etkd_kernels import _C_cuda  # noqa: F401
    except ImportError as exc:
        return f"CUDA extension etkd_kernels._C_cuda is not built ({exc})"
    return None


def capabilities(op: str) -> Capabilities:
    if op == "full":
        # SDPA's own dropout draws from torch's CUDA generator, not the RNG contract: no dropout here.
        return Capabilities(devices=("cuda",), dtypes=DTYPES, needs_build=False)
    return Capabilities(
        devices=("cuda",),
        dtypes=DTYPES,
        head_dims=HEAD_DIMS,
        max_batch_heads=MAX_BATCH_HEADS,
        max_seq=MAX_SEQ,
        dropout=True,  # csrc/common/philox.h in the tile engine (compile-checked here, run only on a GPU)
    )
