"""`triton`: fused Triton kernels (FlashAttention-2 style). GPUs, or the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..dispatch import Capabilities, backend_ops

NAME = "triton"
DESCRIPTION = "fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"
OPS = backend_ops(__file__)  # module <op> here holds forward/backward
AUTO_DEVICES = ("cuda",)  # the interpreter is a correctness tool, never picked by `auto`
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # tiles over head_dim are the next power of two (masked); 256 would not fit shared memory


@functools.cache
def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'etkd[triton]')"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capabilities(op: str) -> Capabilities:
    # Read at call time, never at import: the interpreter is a process-wide switch a test may set late.
    interp = interpreting()
    return Capabilities(
        devices=("cuda", "cpu") if interp else ("cuda",),
        dtypes=DTYPES,
        max_head_dim=MAX_HEAD_DIM,
        device_note="" if interp else "CPU tensors need TRITON_INTERPRET=1 (interpreter, slow)",
        dropout=True,  # every kernel regenerates the RNG contract's mask (_common.keep_mask)
    )
