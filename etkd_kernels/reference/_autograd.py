"""Backward by recomputation: the reference backend differentiates its own forward with autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recompute_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    grad_out: torch.Tensor,
    inputs: Sequence[torch.Tensor | None],
    *args,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `fn(*inputs, *args)[0]` (or of its only output) w.r.t. each non-None input."""
    with torch.enable_grad():
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
