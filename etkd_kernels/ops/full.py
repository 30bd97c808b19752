"""`full_attention`: the dense baseline, softmax(q k^T) v with key padding."""

from __future__ import annotations

import torch

from .._checks import check_finite, check_qkv, check_scale, check_token_mask
from ..dispatch import requested_backend
from ._define import define, empty_to_none, fake_out_lse

_FWD = (
    "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, str backend) -> (Tensor, Tensor)"
)
_BWD = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
    "float scale, str backend) -> Tensor[]"
)


def _bwd_fake(grad_out, q, k, v, out, lse, kpm, scale, backend):
    return [torch.empty_like(q) for _ in range(3)]


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output, kpm)
    ctx.args = (scale, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    scale, backend = ctx.args
    dq, dk, dv = empty_to_none(_bwd_op(grad_out.contiguous(), q, k, v, out, lse, kpm, scale, backend))
    return dq, dk, dv, None, None, None


_fwd_op, _bwd_op = define("full", _FWD, _BWD, fake_out_lse, _bwd_fake, _setup_context, _backward)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense softmax attention (the baseline every pattern is measured against).

    q, k, v: (batch, heads, seq, head_dim); key_padding_mask: (batch, seq) bool, True = real token.
    Returns (batch, heads, seq, head_dim), padded query rows zero.
    Plain-PyTorch meaning: softmax(scale * q @ k.T, keys masked by key_padding_mask) @ v.
    """
    check_qkv(q, k, v)
    key_padding_mask = check_token_mask(key_padding_mask, "key_padding_mask", q)
    scale = check_scale(scale, q.shape[-1])
    check_finite(q=q, k=k, v=v)
    requested_backend(backend)
    out, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, scale, backend)
    return out
