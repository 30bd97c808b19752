"""`full_attention`: the dense baseline, softmax(q k^T) v with key padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_finite, check_qkv, check_scale, check_token_mask
from ..dispatch import requested_backend
from ._define import define


@dataclass(frozen=True)
class FullParams:
    """What every backend's forward/backward gets besides the tensors (see `full_attention`)."""

    key_padding_mask: torch.Tensor | None
    scale: float


_fwd_op = define("full", FullParams)


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
    backend = requested_backend(backend)  # use_backend / ETKD_BACKEND applied now, in the caller's context
    out, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, scale, backend)
    return out
