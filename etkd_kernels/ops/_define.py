"""One way to define every etkd op with torch.library.

Each pattern is two custom ops, `etkd::<op>_fwd` and `etkd::<op>_bwd`, whose implementations look up the
backend at run time (so `use_backend` swaps kernels even inside a compiled graph), plus fake kernels and
`register_autograd` tying them together. Gradients of backends come back as a list with empty tensors
standing for "no gradient" (custom ops cannot return None).

A sequence of length 0 is answered here for every backend (after the backend is resolved, so an unusable
explicit backend still raises): the outputs and gradients are the fake kernels' empty tensors, which hold
no element. No kernel is launched with an empty grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..dispatch import Problem, resolve

LIB = "etkd"


def none_to_empty(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    return [like.new_empty(0) if g is None else g for g in grads]


def empty_to_none(grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    # "No gradient" is a 1-d empty tensor; a real gradient is 4-d even when empty (seq 0).
    return [None if g.dim() == 1 and g.numel() == 0 else g for g in grads]


def define(
    op: str,
    fwd_schema: str,
    bwd_schema: str,
    fwd_fake: Callable,
    bwd_fake: Callable,
    setup_context: Callable,
    backward: Callable,
) -> tuple[Callable, Callable]:
    """Define `etkd::{op}_fwd`/`_bwd`; their last argument is the requested backend name."""
    fwd_name, bwd_name = f"{LIB}::{op}_fwd", f"{LIB}::{op}_bwd"
    torch.library.define(fwd_name, fwd_schema)
    torch.library.define(bwd_name, bwd_schema)

    def fwd_impl(q, *args):
        impl = resolve(op, Problem.of(q), backend=args[-1])
        if q.shape[2] == 0:
            return fwd_fake(q, *args)
        out = impl.forward(q, *args[:-1])
        # The fake kernels promise contiguous outputs; a backend may hand back another layout (ATen's CPU
        # flash kernel's lse, autograd's transposed gradients). Free when already contiguous.
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()

    def bwd_impl(grad_out, q, *args):
        impl = resolve(op, Problem.of(q), backend=args[-1])
        if q.shape[2] == 0:
            return bwd_fake(grad_out, q, *args)
        grads = impl.backward(grad_out, q, *args[:-1])
        return none_to_empty([None if g is None else g.contiguous() for g in grads], q)

    torch.library.impl(fwd_name, "default")(fwd_impl)
    torch.library.impl(bwd_name, "default")(bwd_impl)
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)
    fwd_op = getattr(torch.ops.etkd, f"{op}_fwd").default
    bwd_op = getattr(torch.ops.etkd, f"{op}_bwd").default
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    return fwd_op, bwd_op


def fake_out_lse(q: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
