"""One way to define every etkd op with torch.library, from the pattern's params dataclass.

Each pattern is two custom ops, `etkd::<op>_fwd(q, k, v, <settings>, backend) -> (out, lse)` and
`etkd::<op>_bwd(grad_out, q, k, v, out, lse, <settings>, backend) -> Tensor[]`, plus fake kernels and
`register_autograd` tying them together. `backend` is the name the caller asked for (the public op applies
`use_backend` and ETKD_BACKEND when it is called: `dispatch.requested_backend`); the forward resolves it to a
backend once, and its backward runs that same backend object (`ctx.impl`, xformers' `ctx.op_bw`), whatever
context or thread autograd runs the backward in. In a compiled graph the forward runs as a graph node whose
choice the autograd context cannot see; there the backward op resolves the same requested name for the same
tensors (`auto` depends on device, dtype and shape only, so it picks the same backend). <settings> are the fields of the pattern's frozen dataclass, in
order: the schema is flat (torch.library needs it), and the implementation packs the settings back into
the dataclass, so every backend has `forward(q, k, v, params)` and `backward(grad_out, q, k, v, out, lse,
params)` and reads them by name. A field with `metadata={"grad": True}` (a tensor input beside q, k, v, like
Longformer's global projections) gets a gradient after dq, dk, dv when it is given. Gradients of backends
come back as a list with empty tensors standing for "no gradient" (custom ops cannot return None).

A sequence of length 0 is answered here for every backend (after the backend is resolved, so an unusable
explicit backend still raises): the outputs and gradients are the fake kernels' empty tensors, which hold
no element. No kernel is launched with an empty grid.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from ..dispatch import Problem, resolve

LIB = "etkd"
# Field annotations (strings: the op modules use `from __future__ import annotations`) -> schema types.
_SCHEMA_TYPES = {
    "int": "int",
    "float": "float",
    "str": "str",
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
}


def none_to_empty(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    return [like.new_empty(0) if g is None else g for g in grads]


def empty_to_none(grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    # "No gradient" is a 1-d empty tensor; a real gradient is 4-d even when empty (seq 0).
    return [None if g.dim() == 1 and g.numel() == 0 else g for g in grads]


# The backend the last forward on this thread resolved, keyed by its output, for the autograd context set up
# right after it on the same thread (torch runs setup_context straight after the forward implementation).
_chosen = threading.local()


def _remember(out: torch.Tensor, impl) -> None:
    _chosen.last = (weakref.ref(out), impl)


def _chosen_for(out: torch.Tensor):
    """The backend module that computed `out`, or None (a forward traced with fake tensors, not run)."""
    ref, impl = getattr(_chosen, "last", (None, None))
    _chosen.last = (None, None)
    return impl if ref is not None and ref() is out else None


def define(op: str, params: type, lse: bool = True) -> Callable:
    """Define `etkd::{op}_fwd`/`_bwd` with the fields of the dataclass `params` as settings; return the
    forward op. `lse=False`: the forward returns `out` alone and the backward gets no `lse`."""
    fields = dataclasses.fields(params)
    for f in fields:
        if f.type not in _SCHEMA_TYPES:
            raise TypeError(
                f"{params.__name__}.{f.name}: annotation {f.type!r} is not one of {list(_SCHEMA_TYPES)}"
            )
    n = len(fields)
    tensor_fields = [i for i, f in enumerate(fields) if _SCHEMA_TYPES[f.type].startswith("Tensor")]
    grad_fields = [i for i, f in enumerate(fields) if f.metadata.get("grad")]
    settings = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields)
    saved = "Tensor out, Tensor lse" if lse else "Tensor out"
    fwd_name, bwd_name = f"{LIB}::{op}_fwd", f"{LIB}::{op}_bwd"
    torch.library.define(
        fwd_name,
        f"(Tensor q, Tensor k, Tensor v, {settings}, str backend) -> {'(Tensor, Tensor)' if lse else 'Tensor'}",
    )
    torch.library.define(
        bwd_name,
        f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, {saved}, {settings}, str backend) -> Tensor[]",
    )

    def fwd_fake(q, *args):
        out = torch.empty_like(q)
        return (out, q.new_empty(q.shape[:3], dtype=torch.float32)) if lse else out

    def bwd_fake(grad_out, q, k, v, *args):
        given = args[-1 - n : -1]
        return [torch.empty_like(t) for t in (q, k, v, *(given[i] for i in grad_fields)) if t is not None]

    def fwd_impl(q, k, v, *args):
        impl = resolve(op, Problem.of(q), backend=args[-1])  # the one choice of a backend for this call
        if q.shape[2] == 0:
            out = fwd_fake(q, k, v, *args)
        else:
            out = impl.forward(q, k, v, params(*args[:-1]))
            # The fake kernels promise contiguous outputs; a backend may hand back another layout (ATen's CPU
            # flash kernel's lse, autograd's transposed gradients). Free when already contiguous.
            out = tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()
        _remember(out[0] if lse else out, impl)
        return out

    def run_backward(impl, grad_out, q, *args):
        """`impl`'s backward on the flat arguments of the backward op (without its backend name)."""
        if q.shape[2] == 0:
            return bwd_fake(grad_out, q, *args, None)
        grads = impl.backward(grad_out, q, *args[:-n], params(*args[-n:]))
        return none_to_empty([None if g is None else g.contiguous() for g in grads], q)

    def bwd_impl(grad_out, q, *args):
        return run_backward(resolve(op, Problem.of(q), backend=args[-1]), grad_out, q, *args[:-1])

    def setup_context(ctx, inputs, output):
        q, k, v, *given, backend = inputs
        outs = output if lse else (output,)
        ctx.save_for_backward(q, k, v, *outs, *(given[i] for i in tensor_fields))
        # Tensors go through save_for_backward (version checks, no reference cycles); the rest is kept as is.
        ctx.given = [None if i in tensor_fields else s for i, s in enumerate(given)]
        ctx.backend = backend
        ctx.impl = _chosen_for(outs[0])  # the backend the forward ran; None when it was only traced

    def backward(ctx, grad_out, *_):
        q, k, v, *rest = ctx.saved_tensors
        outs, tensors = rest[: len(rest) - len(tensor_fields)], rest[len(rest) - len(tensor_fields) :]
        given = list(ctx.given)
        for i, t in zip(tensor_fields, tensors):
            given[i] = t
        args = (grad_out.contiguous(), q, k, v, *outs, *given)
        if ctx.impl is not None:  # eager: the forward's own backend, no second choice
            grads = run_backward(ctx.impl, *args)
        else:  # a compiled graph: the backward op, resolving the forward's requested name
            grads = bwd_op(*args, ctx.backend)
        dq, dk, dv, *extra = empty_to_none(grads)
        grads = [None] * n
        for i, g in zip(grad_fields, extra):
            grads[i] = g
        return dq, dk, dv, *grads, None

    torch.library.impl(fwd_name, "default")(fwd_impl)
    torch.library.impl(bwd_name, "default")(bwd_impl)
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)
    bwd_op = getattr(torch.ops.etkd, f"{op}_bwd").default
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    return getattr(torch.ops.etkd, f"{op}_fwd").default
