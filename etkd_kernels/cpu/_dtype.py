"""Convert on load for cpu kernels that compute in float32 only (today: Nystrom's, whose pseudo-inverse needs
fp32): 16-bit tensor arguments go in as float32, tensor results come back in the input dtype."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_HALF = (torch.bfloat16, torch.float16)


def in_float32(fn: Callable) -> Callable:
    """Wrap a backend `forward`/`backward`: 16-bit floating tensor args -> float32, results -> their dtype."""

    @functools.wraps(fn)
    def wrapper(*args):
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if dtype not in _HALF:
            return fn(*args)
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args)
        res = fn(*args)
        if isinstance(res, torch.Tensor):
            return res.to(dtype)
        return tuple(
            r.to(dtype) if isinstance(r, torch.Tensor) and r.dtype == torch.float32 else r for r in res
        )

    return wrapper
