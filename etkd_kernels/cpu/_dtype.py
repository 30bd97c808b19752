"""Convert on load for cpu kernels that compute in float32 only (the op modules whose wrappers are decorated with
`in_float32`; e.g. an iterative pseudo-inverse needs fp32): 16-bit tensor arguments go in as float32, tensor
results come back in the input dtype. The first such call per (op, dtype) says so (no silent slow path: a 16-bit
caller gets fp32 compute and memory for the op's working set, not a 16-bit speed-up)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from etkd_kernels._caller import caller_stacklevel

_HALF = (torch.bfloat16, torch.float16)
_told: set[tuple[str, torch.dtype]] = set()


def _say_converted(op: str, dtype: torch.dtype) -> None:
    if (op, dtype) in _told:
        return
    _told.add((op, dtype))
    name = str(dtype).removeprefix("torch.")
    warnings.warn(
        f"etkd {op}: the cpu kernel computes in float32 only; {name} inputs are converted to float32 on load and "
        f"results cast back to {name} (fp32 speed and memory for this op, not a {name} speed-up)",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def in_float32(fn: Callable | None = None, *, keep: tuple[int, ...] = ()) -> Callable:
    """Wrap a backend `forward`/`backward`: 16-bit floating tensor args -> float32, results -> the input dtype
    (results at the indices in `keep`, e.g. a forward's float32 lse, stay float32)."""
    if fn is None:
        return functools.partial(in_float32, keep=keep)

    op = fn.__module__.rsplit(".", 1)[-1]

    @functools.wraps(fn)
    def wrapper(*args):
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if dtype not in _HALF:
            return fn(*args)
        _say_converted(op, dtype)
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args)
        res = fn(*args)
        if isinstance(res, torch.Tensor):
            return res.to(dtype)
        return tuple(
            r.to(dtype) if isinstance(r, torch.Tensor) and r.dtype == torch.float32 and i not in keep else r
            for i, r in enumerate(res)
        )

    return wrapper
