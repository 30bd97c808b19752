"""`cpu`: fused C++ kernels from csrc/cpu (OpenMP + ATen vectorization), loaded lazily."""

from __future__ import annotations

import functools

import torch

NAME = "cpu"
DESCRIPTION = "fused C++ kernels (csrc/cpu), OpenMP + SIMD, fp32"
# op -> module in this package; a pattern appears here once its kernel exists.
OPS: dict[str, str] = {
    "sliding_window": "sliding_window",
    "block_sparse": "block_sparse",
    "lsg": "lsg",
    "nystrom": "nystrom",
    "full": "full",
}
AUTO_DEVICES = ("cpu",)
DTYPES = (torch.float32,)


@functools.cache
def unavailable_reason() -> str | None:
    import platform

    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return "this x86 CPU has no AVX2, which the fused C++ kernels are compiled for"
    try:
        from etkd_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"compiled extension etkd_kernels._C is not built ({exc}); reinstall without ETKD_NO_EXT=1"
    return None


def not_supported_reasons(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    why = []
    if device.type != "cpu":
        why.append(f"needs CPU tensors, got {device.type}")
    if dtype not in DTYPES:
        why.append(f"supports {', '.join(map(str, DTYPES))}, got {dtype}")
    return why
