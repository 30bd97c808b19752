"""Backend selection.

Every backend is a subpackage of `etkd_kernels` (`reference`, `cpu`, `triton`, `cuda`) exposing

    NAME: str
    OPS: dict[str, str]                        # op name -> module (relative) holding forward/backward
    unavailable_reason() -> str | None         # None when built and importable
    not_supported_reasons(op, device, dtype) -> list[str]

`resolve()` turns a requested name ("auto" or a backend) into the backend module that will run, and
raises with every backend's reason when nothing fits. Selection precedence: an explicit `backend=`
argument, then the innermost `use_backend(...)` context, then the `ETKD_BACKEND` environment variable,
then `auto`, which walks `PRIORITY` for the tensors' device.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# `auto` walks this list and takes the first backend that can run. Triton on a CPU only runs under the
# interpreter, which is a correctness tool, so it never wins `auto` there (its own reasons say so).
PRIORITY = ("cuda", "triton", "cpu", "reference")
OPS = ("sliding_window", "block_sparse", "lsg", "nystrom", "full")

_local = threading.local()
_warned: set[tuple[str, str, torch.dtype]] = set()
_OTHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, or what it is when available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"etkd_kernels.{name}")


def _check_name(name: str, argname: str = "backend") -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"{argname}: unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKENDS)}"
        )


def available_backends() -> dict[str, BackendInfo]:
    """What is built and usable on this machine, and why not where not (no GPU probe at import time)."""
    out = {}
    for name in BACKENDS:
        reason = _module(name).unavailable_reason()
        out[name] = BackendInfo(name, reason is None, reason or _module(name).DESCRIPTION)
    return out


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the etkd ops inside the block with backend `name` (unless a call passes `backend=` itself)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend(backend: str = "auto") -> str:
    """The name the caller asked for, after the context manager and ETKD_BACKEND are taken into account."""
    _check_name(backend)
    if backend != "auto":
        return backend
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("ETKD_BACKEND", "auto").strip() or "auto"
    _check_name(env, "ETKD_BACKEND")
    return env


def reasons(name: str, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    mod = _module(name)
    why = mod.unavailable_reason()
    if why is not None:
        return [why]
    if op not in mod.OPS:
        return [f"{name} has no {op} kernel"]
    return list(mod.not_supported_reasons(op, device, dtype))


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> ModuleType:
    """The implementation module (with `forward`/`backward`) of `op` for the requested backend."""
    name = requested_backend(backend)
    if name != "auto":
        why = reasons(name, op, device, dtype)
        if why:
            raise RuntimeError(f"backend {name!r} cannot run {op} on {device}/{dtype}: " + "; ".join(why))
        return importlib.import_module(f"etkd_kernels.{name}.{_module(name).OPS[op]}")
    rejected = []
    for cand in PRIORITY:
        auto_devices = _module(cand).AUTO_DEVICES
        if auto_devices is not None and device.type not in auto_devices:
            rejected.append(f"{cand}: not chosen by auto for {device.type} tensors")
            continue
        why = reasons(cand, op, device, dtype)
        if not why:
            if cand == "reference":
                _warn_slow_fallback(op, device, dtype)
            return importlib.import_module(f"etkd_kernels.{cand}.{_module(cand).OPS[op]}")
        rejected.append(f"{cand}: {'; '.join(why)}")
    raise RuntimeError(f"no backend can run {op} on {device}/{dtype}:\n  " + "\n  ".join(rejected))


def _warn_slow_fallback(op: str, device: torch.device, dtype: torch.dtype) -> None:
    """`auto` fell back to `reference`: warn once per (op, device, dtype) if a fused backend would have taken
    the same call in another dtype (the silent 7-10x slowdown of issue 14)."""
    key = (op, device.type, dtype)
    if key in _warned:
        return
    takers = {
        cand: [
            str(other) for other in _OTHER_DTYPES if other != dtype and not reasons(cand, op, device, other)
        ]
        for cand in PRIORITY
        if cand != "reference"
        and (_module(cand).AUTO_DEVICES is None or device.type in _module(cand).AUTO_DEVICES)
    }
    takers = {cand: dts for cand, dts in takers.items() if dts}
    if not takers:
        return
    _warned.add(key)
    why = "; ".join(f"{cand}: {'; '.join(reasons(cand, op, device, dtype))}" for cand in takers)
    would = "; ".join(f"{cand} takes {', '.join(dts)}" for cand, dts in takers.items())
    warnings.warn(
        f"etkd: {op} on {device.type}/{dtype} runs on the slow `reference` backend ({why}); {would}: cast the "
        "inputs (e.g. .float()), or pass backend='reference' to choose this path explicitly",
        RuntimeWarning,
        stacklevel=2,
    )


def selected_backend_name(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """Name of the backend `resolve` would pick (for logs, benchmarks and `etkd_kernels.info`)."""
    return resolve(op, device, dtype, backend).__name__.split(".")[1]


def support_matrix(device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, str]]:
    """op -> backend -> "ok" or the reasons it cannot run, for the given device and dtype."""
    return {
        op: {
            name: ("ok" if not (why := reasons(name, op, device, dtype)) else "; ".join(why))
            for name in BACKENDS
        }
        for op in OPS
    }
