"""`cuda`: fused CUDA kernels from csrc/cuda, built only where a CUDA torch and toolkit exist."""

from __future__ import annotations

import functools

import torch

NAME = "cuda"
DESCRIPTION = "fused CUDA kernels (csrc/cuda), fp16/bf16/fp32"
OPS: dict[str, str] = {"sliding_window": "sliding_window", "block_sparse": "block_sparse"}
AUTO_DEVICES = ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)  # template instantiations in csrc/cuda (the binding rejects others by name)


@functools.cache
def unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU build; the CUDA extension is built only with a CUDA torch (or FORCE_CUDA=1)"
    try:
        from etkd_kernels import _C_cuda  # noqa: F401
    except ImportError as exc:
        return f"CUDA extension etkd_kernels._C_cuda is not built ({exc})"
    return None


def not_supported_reasons(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    why = []
    if device.type != "cuda":
        why.append(f"needs CUDA tensors, got {device.type}")
    if dtype not in DTYPES:
        why.append(f"supports float16/bfloat16/float32, got {dtype}")
    return why
