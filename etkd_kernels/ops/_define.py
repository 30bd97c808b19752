"""One way to define every etkd op with torch.library, from the pattern's params dataclass.

Each pattern is two custom ops, `etkd::<op>_fwd(q, k, v, <settings>, backend) -> (out, lse, rng)` and
`etkd::<op>_bwd(grad_out, q, k, v, out, lse, rng, <settings>, backend) -> Tensor[]`, plus fake kernels and
`register_autograd` tying them together. An op defined with `saved=True` has one more forward output before
`rng`, `saved`, which its backward gets after `out` (and `lse`): whatever the backend that ran the forward keeps
for its backward (a backend module declares it by `saved_like(q, params)`, an empty tensor of the shape and dtype
its forward returns there, so the fake kernels know it too; a backend without it keeps nothing: a 0-element
tensor). The ops' overload is named after their schemas (`etkd.<op>_fwd.s<hash>`, `defined(name)` finds it), so an
on-disk torch.compile cache never reuses a graph traced against another version of them. `backend` is the name the caller asked for (the public op applies
`use_backend` and ETKD_BACKEND when it is called: `dispatch.requested_backend`); the forward resolves it to a
backend once (the public op's `run` resolves it and hands the choice over by `call`; a direct call of the op
resolves in its implementation) and saves that backend (`ctx.impl`, as xformers' `ctx.op_bw`); the backward op is called with
its explicit name, so it runs on that backend whatever context or thread autograd runs the backward in. In a
compiled graph the forward runs as a graph node whose choice the autograd context cannot see; there the
backward op resolves the same requested name for the same tensors (`auto` depends on device, dtype and shape
only, so it picks the same backend). <settings> are the fields of the pattern's frozen dataclass, in order:
the schema is flat (torch.library needs it), and the implementation packs the settings back into
the dataclass, so every backend has `forward(q, k, v, params)` and `backward(grad_out, q, k, v, out, lse,
params)` and reads them by name. A field with `metadata={"grad": True}` (a tensor input beside q, k, v, like
the global tokens' own q/k/v projections) gets a gradient after dq, dk, dv when it is given. Gradients of backends
come back as a list with empty tensors standing for "no gradient" (custom ops cannot return None).

The settings every op has (key_padding_mask, scale and the dropout contract's dropout_p, seed, offset) are
`CommonParams`, the base of every params dataclass: its fields are keyword-only in the constructor and come
after the op's own fields in the schema (`schema_fields`), so an op declares only its own.

Attention dropout: the schema's settings end in `dropout_p`, `seed`, `offset`. A seed (or offset) of -1 means
"not given": the forward implementation draws it from torch's default CPU generator when it runs (only when
dropout_p > 0), so compiled graphs draw anew on every call instead of baking a seed in, and torch.manual_seed
reproduces a run. The forward returns the (seed, offset) it used as `rng`, an int64 CPU tensor of 2 elements
(reading it costs no device synchronisation), which the backward gets, so it regenerates the same keep-mask.

A sequence of length 0 is answered here for every backend (after the backend is resolved, so an unusable
explicit backend still raises): the outputs and gradients are the fake kernels' empty tensors, which hold
no element. No kernel is launched with an empty grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from ..dispatch import Problem, name_of, resolve, strided_inputs

LIB = "etkd"
# Field annotations (strings: the op modules use `from __future__ import annotations`) -> schema types.
_SCHEMA_TYPES = {
    "int": "int",
    "float": "float",
    "str": "str",
    "bool": "bool",
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
}


def none_to_empty(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    return [like.new_empty(0) if g is None else g for g in grads]


def empty_to_none(grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    # "No gradient" is a 1-d empty tensor; a real gradient is 4-d even when empty (seq 0).
    return [None if g.dim() == 1 and g.numel() == 0 else g for g in grads]


def layout_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t`, shaped like `ref`, in the layout the fake kernels promise for it (`torch.empty_like(ref)`'s: ref's strides
    when ref is dense, else contiguous): `t` itself when it has it, else a copy. A backend taking strided inputs
    (`Capabilities.strided`) writes its outputs that way; the others get contiguous inputs, so contiguous is it."""
    if ref.is_contiguous():
        return t.contiguous()
    want = torch.empty_like(ref, device="meta").stride()
    return t if t.stride() == want else torch.empty_like(ref, dtype=t.dtype).copy_(t)


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


# The backend `call` resolved for the forward op it is calling on this thread: (op name, q, backend module), read
# by that op's implementation instead of resolving a second time (issue 26: one resolution per call).
_handed = threading.local()


def op_name(fwd_op: torch._ops.OpOverload) -> str:
    """The pattern's op name (e.g. "sliding_window") of a forward op `define` returned."""
    return _OP_NAMES[fwd_op]


def call(fwd_op: torch._ops.OpOverload, impl, q, k, v, settings: Sequence, backend: str):
    """`fwd_op(q, k, v, *settings, backend)` whose implementation runs the backend module `impl` (the caller's
    one `resolve` of this call, from which it also decided the inputs' layout) without resolving again; impl None:
    the op resolves `backend` itself (while torch.compile traces, where the choice is made in the graph)."""
    if impl is None:
        return fwd_op(q, k, v, *settings, backend)
    _handed.choice = (_OP_NAMES[fwd_op], q, impl)
    try:
        return fwd_op(q, k, v, *settings, backend)
    finally:
        _handed.choice = None


def _handed_for(op: str, q: torch.Tensor):
    """The backend module `call` resolved for this forward of `op` on q, or None (a direct call of the op)."""
    choice = getattr(_handed, "choice", None)
    return choice[2] if choice is not None and choice[0] == op and choice[1] is q else None


_OP_NAMES: dict[torch._ops.OpOverload, str] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonParams:
    """The settings every op has, inherited by each op's frozen params dataclass, which declares only its own
    fields (keyword-only here, so an op's own fields may have defaults and still come first positionally).
    key_padding_mask: (batch, seq) bool, True = real token; scale: the score scale; dropout_p, seed, offset: the
    dropout contract (module docstring)."""

    key_padding_mask: torch.Tensor | None
    scale: float
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0


_COMMON = tuple(f.name for f in dataclasses.fields(CommonParams))


def schema_fields(params: type | CommonParams) -> list[dataclasses.Field]:
    """The fields of a params dataclass (or instance) in schema order: the op's own, then `CommonParams`'."""
    fields = dataclasses.fields(params)
    return [f for f in fields if f.name not in _COMMON] + [f for f in fields if f.name in _COMMON]


def settings_of(p: CommonParams) -> list:
    """The fields of a params dataclass instance, in schema order (the forward op's settings arguments)."""
    return [getattr(p, f.name) for f in schema_fields(p)]


def defined(name: str) -> torch._ops.OpOverload:
    """The op `define` registered as `etkd::<name>` (e.g. "nystrom_fwd"), whatever its schema's overload name."""
    packet = getattr(torch.ops.etkd, name)
    (overload,) = packet.overloads()
    return getattr(packet, overload)


def saved_like(impl, q: torch.Tensor, p: CommonParams) -> torch.Tensor:
    """The (empty) tensor backend module `impl`'s forward returns as `saved` for these inputs: its `saved_like`, or
    a 0-element float32 tensor when it keeps nothing."""
    f = getattr(impl, "saved_like", None)
    return f(q, p) if f is not None else q.new_empty(0, dtype=torch.float32)


def define(op: str, params: type, lse: bool = True, saved: bool = False, saved_revision: int = 0) -> Callable:
    """Define `etkd::{op}_fwd`/`_bwd` with the fields of the dataclass `params` (a `CommonParams`) as settings;
    return the forward op. `lse=False`: the forward returns `out` alone and the backward gets no `lse`.
    `saved=True`: the forward also returns the backend's `saved` tensor (module docstring), which the backward
    gets; a backend that declares `saved_like` returns it from `forward` (after out and lse) and takes it in
    `backward` (after out and lse), the others are called as without it. `saved_revision`: bumped whenever a
    backend's `saved` changes shape, so the overload's name (below) changes with it."""
    if not (isinstance(params, type) and issubclass(params, CommonParams)):
        raise TypeError(f"{params!r}: expected a dataclass deriving from CommonParams")
    fields = schema_fields(params)
    for f in fields:
        if f.type not in _SCHEMA_TYPES:
            raise TypeError(
                f"{params.__name__}.{f.name}: annotation {f.type!r} is not one of {list(_SCHEMA_TYPES)}"
            )
    n = len(fields)
    names = [f.name for f in fields]

    def make(settings: Sequence) -> CommonParams:
        """The params of the op's flat settings arguments (schema order)."""
        return params(**dict(zip(names, settings)))

    tensor_fields = [i for i, f in enumerate(fields) if _SCHEMA_TYPES[f.type].startswith("Tensor")]
    grad_fields = [i for i, f in enumerate(fields) if f.metadata.get("grad")]
    settings = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields)
    kept = ["out", *(["lse"] if lse else []), *(["saved"] if saved else [])]
    fwd_schema = f"(Tensor q, Tensor k, Tensor v, {settings}, str backend) -> ({', '.join(['Tensor'] * (len(kept) + 1))})"
    bwd_schema = (
        f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, {', '.join(f'Tensor {t}' for t in kept)}, Tensor rng, "
        f"{settings}, str backend) -> Tensor[]"
    )
    # The overload is named after the schemas: torch.compile's on-disk caches key a graph by its traced code, which
    # names the op and its overload but not its outputs, so a graph compiled against an earlier version of an op
    # (e.g. before `saved` was added, or with `saved` of another shape: saved_revision) would be reused with the wrong
    # outputs.
    key = fwd_schema + bwd_schema + (f" saved r{saved_revision}" if saved_revision else "")
    tag = "s" + hashlib.sha1(key.encode()).hexdigest()[:12]
    fwd_name, bwd_name = f"{LIB}::{op}_fwd.{tag}", f"{LIB}::{op}_bwd.{tag}"
    torch.library.define(fwd_name, fwd_schema)
    torch.library.define(bwd_name, bwd_schema)

    def problem(q, settings) -> Problem:
        return Problem.of(q, dropout=make(settings).dropout_p > 0)

    def fwd_fake(q, *args, impl=None):
        out = torch.empty_like(q)
        rng = torch.empty(2, dtype=torch.int64, device="cpu")
        res = [out]
        if lse:
            res.append(q.new_empty(q.shape[:3], dtype=torch.float32))
        if saved:
            impl = impl if impl is not None else resolve(op, problem(q, args[2:-1]), backend=args[-1])
            res.append(saved_like(impl, q, make(args[2:-1])))
        return (*res, rng)

    def bwd_fake(grad_out, q, k, v, *args):
        given = args[-1 - n : -1]
        return [torch.empty_like(t) for t in (q, k, v, *(given[i] for i in grad_fields)) if t is not None]

    def fwd_impl(q, k, v, *args):
        p = make(args[:-1])
        if p.dropout_p > 0 and (p.seed < 0 or p.offset < 0):
            seed, offset = torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64).tolist()
            p = dataclasses.replace(
                p,
                seed=seed if p.seed < 0 else p.seed,
                offset=offset & 0xFFFFFFFF if p.offset < 0 else p.offset,
            )
        rng = torch.tensor([p.seed, p.offset], dtype=torch.int64)
        # the one choice of a backend for this call: `call`'s, else made here
        impl = _handed_for(op, q) or resolve(op, Problem.of(q, dropout=p.dropout_p > 0), backend=args[-1])
        if q.shape[2] == 0:
            out = fwd_fake(q, k, v, *args, impl=impl)[:-1]
        else:
            ref = q
            if not strided_inputs(
                impl, op
            ):  # `run` made them contiguous; a direct call of the op may not have
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out = impl.forward(q, k, v, p)
            out = tuple(out) if isinstance(out, tuple) else (out,)
            if saved and not hasattr(impl, "saved_like"):
                out = (*out, saved_like(impl, q, p))
            # The fake kernels promise out in q's layout (empty_like) and the rest contiguous; a backend may hand
            # back another layout (ATen's CPU flash kernel's lse). Free when already so.
            out = (layout_like(out[0], ref), *(t.contiguous() for t in out[1:]))
        _remember(out[0], impl)
        return (*out, rng)

    def backward_params(args):
        """The params of the backward op's flat arguments (without its backend name), with the (seed, offset)
        its forward used (the `rng` just before the settings)."""
        p = make(args[-n:])
        if p.dropout_p > 0:
            seed, offset = args[-n - 1].tolist()
            p = dataclasses.replace(p, seed=seed, offset=offset)
        return p

    def run_backward(impl, grad_out, q, *args):
        """`impl`'s backward on the flat arguments of the backward op (without its backend name)."""
        if q.shape[2] == 0:
            return bwd_fake(grad_out, q, *args, None)
        given = args[-n:]
        refs = [
            q,
            *args[:2],
            *(given[i] for i in grad_fields),
        ]  # the fake kernel's layouts: empty_like of these
        tensors = args[: -n - 1]  # k, v, out, [lse], [saved]
        if saved and not hasattr(impl, "saved_like"):
            tensors = tensors[:-1]
        if not strided_inputs(impl, op):
            grad_out, q = grad_out.contiguous(), q.contiguous()
            tensors = tuple(t.contiguous() for t in tensors)
        grads = impl.backward(grad_out, q, *tensors, backward_params(args))
        refs += [None] * (len(grads) - len(refs))
        return none_to_empty(
            [
                None if g is None else g.contiguous() if r is None else layout_like(g, r)
                for g, r in zip(grads, refs)
            ],
            q,
        )

    def bwd_impl(grad_out, q, *args):
        return run_backward(
            resolve(op, problem(q, args[-1 - n : -1]), backend=args[-1]), grad_out, q, *args[:-1]
        )

    def setup_context(ctx, inputs, output):
        q, k, v, *given, backend = inputs
        outs = output  # out, [lse], [saved], rng
        ctx.save_for_backward(q, k, v, *outs, *(given[i] for i in tensor_fields))
        # Tensors go through save_for_backward (version checks, no reference cycles); the rest is kept as is.
        ctx.given = [None if i in tensor_fields else s for i, s in enumerate(given)]
        ctx.backend = backend
        ctx.impl = _chosen_for(outs[0])  # the backend the forward ran; None when it was only traced
        # Only out's gradient is read: no zero tensors for lse's and saved's (the cpu Nystrom's saved holds K1 on
        # some targets: a q-sized fill per backward).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, *_):
        if grad_out is None:  # out does not reach the loss (only lse or saved did): no gradient for anything
            return (None,) * (n + 4)
        q, k, v, *rest = ctx.saved_tensors
        outs, tensors = rest[: len(rest) - len(tensor_fields)], rest[len(rest) - len(tensor_fields) :]
        given = list(ctx.given)
        for i, t in zip(tensor_fields, tensors):
            given[i] = t
        # Eager: the backend the forward ran, named explicitly (an explicit name is that backend, whatever
        # context is live); a compiled graph: the forward's requested name, resolved for the same tensors.
        backend = ctx.backend if ctx.impl is None else name_of(ctx.impl)
        dq, dk, dv, *extra = empty_to_none(bwd_op(grad_out, q, k, v, *outs, *given, backend))
        grads = [None] * n
        for i, g in zip(grad_fields, extra):
            grads[i] = g
        return dq, dk, dv, *grads, None

    torch.library.impl(fwd_name, "default")(fwd_impl)
    torch.library.impl(bwd_name, "default")(bwd_impl)
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)
    bwd_op = getattr(getattr(torch.ops.etkd, f"{op}_bwd"), tag)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    fwd_op = getattr(getattr(torch.ops.etkd, f"{op}_fwd"), tag)
    _OP_NAMES[fwd_op] = op
    return fwd_op
