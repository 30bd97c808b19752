"""What the public op wrappers share: the keywords every op takes (`OpOptions`) and their checks, the dropout
paragraph of their docstrings, the call into the defined op (padding a sequence to a block multiple and back)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import torch
import torch.nn.functional as F

from .._checks import check_dropout, check_finite, check_scale, check_token_mask
from ..dispatch import Problem, checks_finite, requested_backend, resolve, strided_inputs
from ._define import CommonParams, call, op_name, settings_of

if TYPE_CHECKING:
    from typing_extensions import Unpack  # noqa: F401  (the public ops' `**options: Unpack[OpOptions]`)


class OpOptions(TypedDict, total=False):
    """The keywords every public op takes after its own, declared `**options: Unpack[OpOptions]`: a type checker
    checks their names and types (PEP 692); `inspect.signature` and help() show them one by one with the
    defaults of `OPTION_DEFAULTS` (`public_op`). What they mean: each op's docstring and `common_settings`."""

    key_padding_mask: torch.Tensor | None
    scale: float | None
    dropout_p: float
    dropout_seed: int | None
    dropout_offset: int | None
    backend: str


OPTION_DEFAULTS: dict[str, Any] = dict(
    key_padding_mask=None, scale=None, dropout_p=0.0, dropout_seed=None, dropout_offset=None, backend="auto"
)
if list(OPTION_DEFAULTS) != list(OpOptions.__annotations__):
    raise TypeError("ops/_common.py: OPTION_DEFAULTS must name OpOptions' keys, in order")

# The dropout paragraph of every public op's docstring ("{dropout}" there); `column` names what indexes a
# probability's key side in the counter (a key position, or a column of a product with extra keys).
_DROPOUT_DOC = """dropout_p: dropout on the attention probabilities (after the softmax, before @ v, where HF applies it),
kept ones scaled by 1 / (1 - dropout_p); p is resolved to multiples of 1/65536. The keep-mask comes from a
counter-based RNG (Philox4x32-10 keyed by dropout_seed, counter = ({column}, query position i, batch * heads +
head, dropout_offset); `etkd_kernels._shared.dropout_keep`), so the backward regenerates it and it does not
depend on the backend, threads or tiling. Without dropout_seed, (seed, offset) are drawn from torch's default
generator when the op runs (torch.manual_seed reproduces; successive calls differ)."""


OpFn = TypeVar("OpFn", bound=Callable[..., Any])


def public_op(column: str = "key position j") -> Callable[[OpFn], OpFn]:
    """Decorator of every public op, written `fn(q, k, v, <its own arguments>, **options: Unpack[OpOptions])`:
    its signature (`inspect.signature`, help(), IDEs) lists the options as keyword-only parameters with their
    types and defaults, and "{dropout}" in its docstring becomes the shared dropout paragraph (`column` names
    what indexes a probability's key side in the dropout counter). The function itself is returned, unwrapped."""

    def put(fn: OpFn) -> OpFn:
        sig = inspect.signature(fn)
        *own, rest = sig.parameters.values()
        if rest.kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{fn.__name__}: expected a last parameter **options: Unpack[OpOptions]")
        options = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=_annotation(name)
            )
            for name, default in OPTION_DEFAULTS.items()
        ]
        fn.__signature__ = sig.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
        if fn.__doc__:  # None under python -OO
            text = _DROPOUT_DOC.replace("{column}", column).replace("\n", "\n    ")
            fn.__doc__ = fn.__doc__.replace("{dropout}", text)
        return fn

    return put


def _annotation(name: str) -> str:
    """OpOptions' annotation of `name` as written (a string, like the annotations of the ops' own arguments)."""
    a = OpOptions.__annotations__[name]
    return str(getattr(a, "__forward_arg__", a))


def common_settings(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: OpOptions,
    *,
    defer_finite: bool = False,
    **more_inputs: torch.Tensor | None,
) -> tuple[dict[str, Any], str]:
    """The checks every public op makes after `check_qkv` and its own, on its `options`: no keyword other than
    OpOptions', the key padding mask, the scale (None: head_dim ** -0.5), the dropout settings, finite q, k, v
    (and `more_inputs`, by name; with `defer_finite` not here: the op passes them to `run` as `finite`, which
    checks them once the backend is known, unless its kernel does); and the requested backend with
    `use_backend` / ETKD_BACKEND applied now, in the caller's context.

    Returns (the `CommonParams` fields as keywords, the requested backend)."""
    for name in options:
        if name not in OPTION_DEFAULTS:
            raise TypeError(
                f"{name}: unexpected keyword argument; an op takes its own and {', '.join(OPTION_DEFAULTS)}"
            )
    o = {**OPTION_DEFAULTS, **options}
    key_padding_mask = check_token_mask(o["key_padding_mask"], "key_padding_mask", q)
    scale = check_scale(o["scale"], q.shape[-1])
    dropout_p, seed, offset = check_dropout(o["dropout_p"], o["dropout_seed"], o["dropout_offset"])
    if not defer_finite:
        check_finite(q=q, k=k, v=v, **more_inputs)
    common = dict(
        key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p, seed=seed, offset=offset
    )
    return common, requested_backend(o["backend"])


def run(
    fwd_op: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: CommonParams,
    backend: str,
    multiple: int = 1,
    finite: dict[str, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The output of the defined forward op (`_define.define`) on q, k, v with the settings `p`; with `multiple` > 1
    the seq is padded to a multiple of it (the added keys masked) and the output cut back to the caller's seq.
    The backend is resolved here, once per call (`_define.call` hands the choice to the op, which does not resolve
    again): q, k, v reach it as they are where its kernel takes strided inputs (`Capabilities.strided`: the cpu
    kernels read a model's head-split views in place and write the output in q's layout), else contiguous (and
    always while torch.compile traces, where the backend is chosen in the graph). `finite`: the inputs (by name)
    of an op whose `common_settings` deferred the NaN/Inf check: checked here unless the resolved kernel checks
    them itself (`Capabilities.checks_finite`), which saves a pass over them (while tracing: not at all, as
    `check_finite` does)."""
    q, k, v, kpm, s = pad_to_multiple(q, k, v, p.key_padding_mask, multiple)
    if kpm is not p.key_padding_mask:
        p = dataclasses.replace(p, key_padding_mask=kpm)
    impl = None  # traced: the graph resolves
    if not torch.compiler.is_compiling():
        op = op_name(fwd_op)
        impl = resolve(
            op, Problem.of(q, dropout=p.dropout_p > 0), backend=backend
        )  # the call's one resolution
    if finite is not None and (impl is None or not checks_finite(impl, op)):
        check_finite(**finite)
    if impl is None or not strided_inputs(impl, op):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = call(fwd_op, impl, q, k, v, settings_of(p), backend)[0]
    return out if out.shape[2] == s else out[:, :, :s]


def pad_to_multiple(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Pad the seq dim of q, k, v to a multiple of `multiple`; the added keys are marked as padding.

    Returns (q, k, v, key_padding_mask, original_seq_len). Nothing is copied when no padding is needed.
    """
    s = q.shape[2]
    extra = (-s) % multiple
    if extra == 0:
        return q, k, v, key_padding_mask, s
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    if key_padding_mask is None:
        key_padding_mask = torch.ones(q.shape[0], s, dtype=torch.bool, device=q.device)
    key_padding_mask = F.pad(key_padding_mask, (0, extra), value=False)
    return q, k, v, key_padding_mask, s
