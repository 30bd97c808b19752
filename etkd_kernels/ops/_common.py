"""What the public op wrappers share: the checks every op makes, the dropout paragraph of their docstrings,
padding a sequence to a block multiple and back."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._checks import check_dropout, check_finite, check_scale, check_token_mask
from ..dispatch import requested_backend

# The dropout paragraph of every public op's docstring ("{dropout}" there); `column` names what indexes a
# probability's key side in the counter (a key position, or a column of a product with extra keys).
_DROPOUT_DOC = """dropout_p: dropout on the attention probabilities (after the softmax, before @ v, where HF applies it),
kept ones scaled by 1 / (1 - dropout_p); p is resolved to multiples of 1/65536. The keep-mask comes from a
counter-based RNG (Philox4x32-10 keyed by dropout_seed, counter = ({column}, query position i, batch * heads +
head, dropout_offset); `etkd_kernels._shared.dropout_keep`), so the backward regenerates it and it does not
depend on the backend, threads or tiling. Without dropout_seed, (seed, offset) are drawn from torch's default
generator when the op runs (torch.manual_seed reproduces; successive calls differ)."""


def dropout_doc(column: str = "key position j") -> Callable:
    """Decorator: put the shared dropout paragraph where the function's docstring says "{dropout}"."""

    def put(fn: Callable) -> Callable:
        text = _DROPOUT_DOC.replace("{column}", column).replace("\n", "\n    ")
        if fn.__doc__:  # None under python -OO
            fn.__doc__ = fn.__doc__.replace("{dropout}", text)
        return fn

    return put


def common_settings(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
    dropout_seed: int | None,
    dropout_offset: int | None,
    backend: str,
    **more_inputs: torch.Tensor | None,
) -> tuple[torch.Tensor | None, float, tuple[float, int, int], str]:
    """The checks every public op makes after `check_qkv` and its own: the key padding mask, the scale (None:
    head_dim ** -0.5), the dropout settings, finite q, k, v (and `more_inputs`, by name); and the requested
    backend with `use_backend` / ETKD_BACKEND applied now, in the caller's context.

    Returns (key_padding_mask, scale, (dropout_p, seed, offset), backend)."""
    key_padding_mask = check_token_mask(key_padding_mask, "key_padding_mask", q)
    scale = check_scale(scale, q.shape[-1])
    dropout = check_dropout(dropout_p, dropout_seed, dropout_offset)
    check_finite(q=q, k=k, v=v, **more_inputs)
    return key_padding_mask, scale, dropout, requested_backend(backend)


def pad_to_multiple(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Pad the seq dim of q, k, v to a multiple of `multiple`; the added keys are marked as padding.

    Returns (q, k, v, key_padding_mask, original_seq_len). Nothing is copied when no padding is needed.
    """
    s = q.shape[2]
    extra = (-s) % multiple
    if extra == 0:
        return q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, s
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    if key_padding_mask is None:
        key_padding_mask = torch.ones(q.shape[0], s, dtype=torch.bool, device=q.device)
    key_padding_mask = F.pad(key_padding_mask, (0, extra), value=False)
    return q, k, v, key_padding_mask, s
