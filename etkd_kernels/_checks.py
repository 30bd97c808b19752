"""Argument checks shared by every op, run once before dispatch (never repeated inside a backend)."""

from __future__ import annotations

import torch

from ._env import flag

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str] = ("q", "k", "v")
) -> None:
    """q, k, v: tensors of one floating dtype on one device, each (batch, heads, seq, head_dim), same shape."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected rank 4 (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}"
            )
    for name, t in zip(names[1:], (k, v)):
        if t.shape != q.shape:
            if k.shape == v.shape:  # the first is the odd one out: name it, not the second
                raise ValueError(f"{names[0]}: expected shape {tuple(k.shape)} like {names[1]} and {names[2]}, "
                                 f"got {tuple(q.shape)}")  # fmt: skip
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} like {names[0]}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like {names[0]}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like {names[0]}, got {t.device}")
    if q.shape[0] == 0:
        raise ValueError(f"{names[0]}: empty batch (batch size 0) is not a valid input")
    if q.shape[-1] == 0 or q.shape[1] == 0:
        raise ValueError(f"{names[0]}: heads and head_dim must be positive, got shape {tuple(q.shape)}")


def check_token_mask(mask: torch.Tensor | None, name: str, q: torch.Tensor) -> torch.Tensor | None:
    """A (batch, seq) bool mask on q's device (None passes through)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor (batch, seq), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool (True = {_meaning(name)}), got {mask.dtype}")
    b, _, s, _ = q.shape
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"{name}: expected shape (batch, seq) = {(b, s)}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"{name}: expected device {q.device}, got {mask.device}")
    return mask.contiguous()


def _meaning(name: str) -> str:
    return "global token" if "global" in name else "real token"


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    return scale


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_finite(**tensors: torch.Tensor | None) -> None:
    """NaN/Inf inputs are rejected with a ValueError naming the argument.

    Documented choice: attention would spread a single NaN over every query that sees it, so we refuse it at
    the door. The check costs one reduction per input (O(seq*head_dim), small next to attention) and is
    skipped while torch.compile traces, where a data-dependent branch would break the graph. A sum is NaN
    or +-Inf when any element is, so a finite sum proves every element finite in one streaming pass (no
    bool temporary as in `isfinite(t).all()`); only a non-finite sum, which finite values can also give by
    overflow, is decided exactly by `aminmax` (min and max propagate NaN). On the head-split views the
    models pass (b, s, h, d) transposed to (b, h, s, d), the sum is 11x faster than `aminmax` (1 x 12 x
    4096 x 64 fp32, 1 thread, Xeon family 6 model 207: 0.85 vs 9.4 ms; 2.4x on a contiguous tensor).

    Deciding it needs the answer on the host. On the CPU that costs nothing extra; on a GPU it is a device
    synchronisation per call, which at small batch costs more than the kernel, so there the check runs only
    when the environment sets `ETKD_CHECK_FINITE=1` (read per call). Meta and fake tensors (FakeTensorMode,
    torch.export, shape propagation) hold no values: skipped.

    A backend whose kernel makes this check itself (`Capabilities.checks_finite`: the cpu nystrom kernel, fused into
    its own passes over q, k, v; csrc/cpu/nystrom.cpp: throw_non_finite) raises this same error, text and type; the
    op layer then skips this pass (`ops._common.run`). Such a kernel checks in a torch.compile'd graph too, where
    this function is skipped (checked: a compiled nystrom_attention on `cpu` raises this error, on `reference` not).
    """
    if _compiling():
        return
    for name, t in tensors.items():
        if t is None or not t.is_floating_point() or t.numel() == 0 or not finite_check_on(t.device):
            continue
        if _is_fake(t):
            continue
        t = t.detach()
        if bool(torch.isfinite(t.sum())):
            continue
        lo, hi = torch.aminmax(t)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(f"{name}: contains NaN or Inf; etkd ops reject non-finite inputs")


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor without data: a FakeTensor, or any tensor while a FakeTensorMode is active."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or torch._guards.detect_fake_mode() is not None


def finite_check_on(device: torch.device) -> bool:
    """Whether `check_finite` inspects tensors on `device` (always on the CPU, opt-in elsewhere)."""
    if device.type == "meta":
        return False
    if on_host(device):
        return True
    return flag("ETKD_CHECK_FINITE")


def on_host(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` from Python is free (no device synchronisation).

    The one place the op path decides it (tests/test_host_sync.py patches it to pretend to be on a GPU).
    """
    return device.type == "cpu"


def check_dropout(dropout_p: float, seed: int | None, offset: int | None) -> tuple[float, int, int]:
    """The dropout keywords of every op -> (p, seed, offset) for the params. 0 <= p < 1; seed in [0, 2^63) and
    offset in [0, 2^63) (the counter uses offset mod 2^32). A missing seed (or offset) is -1: the op draws it from
    torch's default generator when it runs (`ops/_define.py`), so torch.manual_seed reproduces a run and successive
    calls differ; a given seed without an offset means offset 0."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    for name, value in (("dropout_seed", seed), ("dropout_offset", offset)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int in [0, 2**63) or None, got {type(value).__name__}")
        if not 0 <= value < 2**63:
            raise ValueError(f"{name}: expected an int in [0, 2**63) or None, got {value}")
    if offset is None:
        offset = -1 if seed is None else 0
    return dropout_p, -1 if seed is None else seed, offset
