"""Math that the reference (the oracle) and the fused backends share, so no backend imports another's
internals: the compute dtype, backward by recomputation, and Nystromformer's landmarks and pseudo-inverse
(whose semantics `etkd_kernels/reference/nystrom.py` documents)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The oracle computes in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recompute_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    grad_out: torch.Tensor,
    inputs: Sequence[torch.Tensor | None],
    *args,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `fn(*inputs, *args)[0]` (or of its only output) w.r.t. each non-None input.

    Runs with grad mode on and inference mode off: compiled graphs may call the backward op inside either.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves, *args)
        if isinstance(out, tuple):
            out = out[0]
        wrt = [t for t in leaves if t is not None]
        if out.requires_grad:
            grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
        else:  # the output does not depend on the inputs (e.g. a layout with no allowed block)
            grads = [None] * len(wrt)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
        else:
            g = next(it)
            res.append(torch.zeros_like(t) if g is None else g)
    return tuple(res)


def segment_means(x: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """x (b, h, s, d) -> (b, h, L', d): means over contiguous segments of ceil(s / L) tokens.

    L' = ceil(s / ceil(s / L)) (= L when L divides s); the last segment may be shorter.
    """
    b, h, s, d = x.shape
    c = -(-s // num_landmarks)
    n = -(-s // c)
    if n * c == s:
        # HF's exact expression (same rounding) when the segments tile the sequence.
        return x.reshape(b, h, n, c, d).mean(dim=-2)
    sums = F.pad(x, (0, 0, 0, n * c - s)).reshape(b, h, n, c, d).sum(dim=-2)
    counts = torch.full((n, 1), float(c), dtype=x.dtype, device=x.device)
    counts[-1] = s - (n - 1) * c
    return sums / counts


def iterative_pinv(m: torch.Tensor, iterations: int, pinv_init: str) -> torch.Tensor:
    """HF's Newton-Schulz pseudo-inverse of the row-stochastic (b, h, L, L) matrices `m`."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    col_sums = m.sum(dim=-2)  # (b, h, L); softmax rows make ||m||_inf = 1, so this is ||m||_1's column sums
    if pinv_init == "hf_global":
        coeff = 1 / col_sums.max()
    else:
        coeff = 1 / col_sums.amax(dim=-1)[..., None, None]
    z = coeff * m.transpose(-1, -2)
    for _ in range(iterations):
        mz = m @ z
        # Same association and constants as HF so fp32 rounding matches as closely as possible.
        z = (0.25 * z) @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z
