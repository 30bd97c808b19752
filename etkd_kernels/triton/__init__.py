"""`triton`: fused Triton kernels (FlashAttention-2 style). GPUs, or the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

NAME = "triton"
DESCRIPTION = "fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"
OPS: dict[str, str] = {
    "sliding_window": "sliding_window",
    "block_sparse": "block_sparse",
    "lsg": "lsg",
    "nystrom": "nystrom",
}
AUTO_DEVICES = ("cuda",)  # the interpreter is a correctness tool, never picked by `auto`
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'etkd[triton]')"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    why = []
    if device.type == "cpu" and not interpreting():
        why.append("CPU tensors need TRITON_INTERPRET=1 (interpreter, slow)")
    elif device.type not in ("cpu", "cuda"):
        why.append(f"needs CUDA tensors, got {device.type}")
    if dtype not in DTYPES:
        why.append(f"supports float16/bfloat16/float32, got {dtype}")
    return why
