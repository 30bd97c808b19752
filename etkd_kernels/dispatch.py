"""Backend selection.

Every backend is a subpackage of `etkd_kernels` (`reference`, `cpu`, `triton`, `cuda`) exposing

    NAME: str
    OPS: tuple[str, ...]                       # the ops it has a kernel for: module <backend>.<op> holds
                                               # forward/backward
    AUTO_DEVICES: tuple[str, ...] | None       # device types `auto` may pick it for (None: any)
    unavailable_reason() -> str | None         # None when built and importable
    capabilities(op) -> Capabilities           # what its kernel for `op` takes, as data

The capabilities are the only statement of what a backend can run: `auto`, `support_matrix`, the errors of
an explicitly requested backend and the generated test matrix all read them, so no limit is written twice.

`resolve()` turns a requested name ("auto" or a backend) into the backend module that will run, and
raises with every backend's reason when nothing fits. Selection precedence: an explicit `backend=`
argument, then the innermost `use_backend(...)` context, then the `ETKD_BACKEND` environment variable,
then `auto`, which walks `PRIORITY` for the tensors' device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pkgutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from ._caller import caller_stacklevel

BACKENDS = ("reference", "cpu", "triton", "cuda")
NAMES = ("auto", *BACKENDS)  # what a user may ask for (`backend=`, `use_backend`, ETKD_BACKEND, --backend)
# `auto` walks this list and takes the first backend that can run. Triton on a CPU only runs under the
# interpreter, which is a correctness tool, so it never wins `auto` there (its own reasons say so).
PRIORITY = ("cuda", "triton", "cpu", "reference")


def ops_in(folder: str) -> tuple[str, ...]:
    """The op names that have a module `<op>.py` in `folder` (a package directory; `_`-prefixed modules are
    helpers), sorted. A backend's `OPS` is `ops_in(<its directory>)` filtered to `OPS`: a kernel module is
    what declares that the backend has the op."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules([folder]) if not m.name.startswith("_")))


# Every op, once: the public op modules of `etkd_kernels/ops/` (one per op); the reference backend defines them
# all (its OPS is this tuple).
OPS = ops_in(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops"))


def backend_ops(package_file: str) -> tuple[str, ...]:
    """The ops a backend package has a kernel module for (`<op>.py` beside its `__init__.py`)."""
    here = set(ops_in(os.path.dirname(os.path.abspath(package_file))))
    return tuple(op for op in OPS if op in here)


_local = threading.local()
_warned: set[tuple[str, str, torch.dtype]] = set()
_OTHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Problem:
    """What a call asks of a kernel: the tensors' device and dtype and the shape limits kernels care about."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    batch_heads: int | None = None
    seq: int | None = None
    dropout: bool = False  # dropout_p > 0

    @classmethod
    def of(cls, q: torch.Tensor, dropout: bool = False) -> Problem:
        b, h, s, d = q.shape
        return cls(q.device, q.dtype, d, b * h, s, dropout)


@dataclass(frozen=True)
class Capabilities:
    """What one backend's kernel for one op accepts. `None` means "no limit" for the optional fields.

    head_dims: the exact head sizes compiled (e.g. template instances); max_head_dim: any size up to this.
    max_batch_heads / max_seq: launch-grid and index-width limits of the kernel.
    needs_build: False when the op runs on torch alone (the backend's compiled part is not needed).
    dropout: the kernel applies attention dropout (dropout_p > 0, the RNG contract of `etkd_kernels._shared`).
    strided: forward/backward take q, k, v and grad_out with any strides whose last dim is contiguous (e.g. the
    (batch, seq, heads, head_dim) head-split views of a projection, transposed) and return out and the gradients
    in the layout `torch.empty_like` gives q, k, v; else the op layer hands them contiguous tensors.
    checks_finite: forward rejects NaN/Inf in q, k, v itself, every element, with `_checks.check_finite`'s error (a
    ValueError naming the first such input, q, k, v in that order), so the op layer skips its own check (one more
    pass over the inputs) for the ops that ask it to (`ops._common.run`: finite).
    """

    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    max_batch_heads: int | None = None
    max_seq: int | None = None
    needs_build: bool = True
    device_note: str = ""
    dropout: bool = False
    strided: bool = False
    checks_finite: bool = False

    def reasons(self, p: Problem) -> list[str]:
        why = []
        if self.devices is not None and p.device.type not in self.devices:
            note = f" ({self.device_note})" if self.device_note else ""
            why.append(f"needs {'/'.join(self.devices)} tensors, got {p.device.type}{note}")
        if p.dtype not in self.dtypes:
            why.append(f"supports {', '.join(str(d).split('.')[-1] for d in self.dtypes)}, got {p.dtype}")
        if p.head_dim is not None:
            if self.head_dims is not None and p.head_dim not in self.head_dims:
                why.append(f"head_dim must be one of {self.head_dims}, got {p.head_dim}")
            if self.max_head_dim is not None and p.head_dim > self.max_head_dim:
                why.append(f"head_dim must be <= {self.max_head_dim}, got {p.head_dim}")
        if (
            p.batch_heads is not None
            and self.max_batch_heads is not None
            and p.batch_heads > self.max_batch_heads
        ):
            why.append(f"batch * heads must be <= {self.max_batch_heads}, got {p.batch_heads}")
        if p.seq is not None and self.max_seq is not None and p.seq > self.max_seq:
            why.append(f"seq must be <= {self.max_seq}, got {p.seq}")
        if p.dropout and not self.dropout:
            why.append("has no dropout kernel (dropout_p > 0) for this op yet")
        return why


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, or what it is when available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"etkd_kernels.{name}")


def check_name(name: str, argname: str = "backend") -> str:
    """`name` if it is "auto" or a backend; else a ValueError naming `argname`. The one check of a backend
    name: the ops, `use_backend`, ETKD_BACKEND, `set_attention_backend` and the CLI flags all call it."""
    if name not in NAMES:
        raise ValueError(
            f"{argname}: unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKENDS)}"
        )
    return name


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
    check_name(name)
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
    check_name(backend)
    if backend != "auto":
        return backend
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("ETKD_BACKEND", "auto").strip() or "auto"
    check_name(env, "ETKD_BACKEND")
    return env


def capabilities(name: str, op: str) -> Capabilities | None:
    """Backend `name`'s declared capabilities for `op` (None when it has no kernel for it)."""
    mod = _module(name)
    return mod.capabilities(op) if op in mod.OPS else None


def reasons(
    name: str, op: str, problem: Problem | torch.device, dtype: torch.dtype | None = None
) -> list[str]:
    """Why backend `name` cannot run `op` for `problem` (or for `device`, `dtype`): empty when it can."""
    problem = _problem(problem, dtype)
    mod = _module(name)
    caps = capabilities(name, op)
    if caps is None:
        return [f"{name} has no {op} kernel"]
    if caps.needs_build:
        why = mod.unavailable_reason()
        if why is not None:
            return [why]
    return caps.reasons(problem)


def _problem(device: torch.device | Problem, dtype: torch.dtype | None) -> Problem:
    return device if isinstance(device, Problem) else Problem(torch.device(device), dtype)


def strided_inputs(impl: ModuleType, op: str) -> bool:
    """Whether the implementation module `resolve` returned takes strided inputs (`Capabilities.strided`)."""
    caps = capabilities(name_of(impl), op)
    return caps is not None and caps.strided


def checks_finite(impl: ModuleType, op: str) -> bool:
    """Whether the implementation module `resolve` returned checks its inputs for NaN/Inf itself
    (`Capabilities.checks_finite`)."""
    caps = capabilities(name_of(impl), op)
    return caps is not None and caps.checks_finite


def resolve(
    op: str, device: torch.device | Problem, dtype: torch.dtype | None = None, backend: str = "auto"
) -> ModuleType:
    """The implementation module (with `forward`/`backward`) of `op` for the requested backend.

    `device` is a device (with `dtype`) or a `Problem`, which also carries the shape limits kernels check.
    """
    p = _problem(device, dtype)
    where = f"{p.device}/{p.dtype}" + ("" if p.head_dim is None else f"/head_dim {p.head_dim}")
    name = requested_backend(backend)
    if name != "auto":
        why = reasons(name, op, p)
        if why:
            raise RuntimeError(f"backend {name!r} cannot run {op} on {where}: " + "; ".join(why))
        return _impl(name, op)
    rejected = []
    for cand in PRIORITY:
        auto_devices = _module(cand).AUTO_DEVICES
        if auto_devices is not None and p.device.type not in auto_devices:
            rejected.append(f"{cand}: not chosen by auto for {p.device.type} tensors")
            continue
        why = reasons(cand, op, p)
        if not why:
            if cand == "reference":
                _warn_slow_fallback(op, p)
            return _impl(cand, op)
        rejected.append(f"{cand}: {'; '.join(why)}")
    raise RuntimeError(f"no backend can run {op} on {where}:\n  " + "\n  ".join(rejected))


def _impl(name: str, op: str) -> ModuleType:
    return importlib.import_module(f"etkd_kernels.{name}.{op}")


def _warn_slow_fallback(op: str, p: Problem) -> None:
    """`auto` fell back to `reference`: warn once per (op, device, dtype, dropout) if a fused backend would have
    taken the same call in another dtype (the silent 7-10x slowdown of issue 14) or without dropout."""
    device, dtype = p.device, p.dtype
    key = (op, device.type, dtype, p.dropout)
    if key in _warned:
        return
    # A fused backend `auto` would pick for this device is not usable at all (not compiled, compiled for
    # another torch, failed to load): the fallback is never silent; its reason says how to get the kernels.
    unbuilt = [
        f"{cand}: {why}"
        for cand in PRIORITY
        if cand != "reference"
        and (_module(cand).AUTO_DEVICES is None or device.type in _module(cand).AUTO_DEVICES)
        and (caps := capabilities(cand, op)) is not None
        and caps.needs_build
        and (why := _module(cand).unavailable_reason()) is not None
    ]
    if unbuilt:
        _warned.add(key)
        warnings.warn(
            f"etkd: {op} on {device.type}/{dtype} runs on the slow `reference` backend; "
            + "; ".join(unbuilt),
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
        return
    alternatives = [
        (str(other), dataclasses.replace(p, dtype=other)) for other in _OTHER_DTYPES if other != dtype
    ]
    if p.dropout:
        alternatives.append(("dropout_p = 0", dataclasses.replace(p, dropout=False)))
    takers = {
        cand: [what for what, alt in alternatives if not reasons(cand, op, alt)]
        for cand in PRIORITY
        if cand != "reference"
        and (_module(cand).AUTO_DEVICES is None or device.type in _module(cand).AUTO_DEVICES)
    }
    takers = {cand: dts for cand, dts in takers.items() if dts}
    if not takers:
        return
    _warned.add(key)
    why = "; ".join(f"{cand}: {'; '.join(reasons(cand, op, p))}" for cand in takers)
    would = "; ".join(f"{cand} takes {', '.join(dts)}" for cand, dts in takers.items())
    warnings.warn(
        f"etkd: {op} on {device.type}/{dtype}{' with dropout_p > 0' if p.dropout else ''} runs on the slow "
        f"`reference` backend ({why}); {would}"
        + (
            ": cast the inputs (e.g. .float()),"
            if any(w != "dropout_p = 0" for ws in takers.values() for w in ws)
            else ";"
        )
        + " or pass backend='reference' to choose this path explicitly",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def name_of(impl: ModuleType) -> str:
    """The backend name of an implementation module `resolve` returned (etkd_kernels.<backend>.<op>)."""
    return impl.__name__.split(".")[1]


def selected_backend_name(
    op: str, device: torch.device | Problem, dtype: torch.dtype | None = None, backend: str = "auto"
) -> str:
    """Name of the backend `resolve` would pick (for logs, benchmarks and `etkd_kernels.info`)."""
    return name_of(resolve(op, device, dtype, backend))


def support_matrix(
    device: torch.device, dtype: torch.dtype, head_dim: int | None = None
) -> dict[str, dict[str, str]]:
    """op -> backend -> "ok" or the reasons it cannot run, for the given device, dtype (and head_dim)."""
    p = Problem(torch.device(device), dtype, head_dim)
    return {
        op: {name: ("ok" if not (why := reasons(name, op, p)) else "; ".join(why)) for name in BACKENDS}
        for op in OPS
    }
