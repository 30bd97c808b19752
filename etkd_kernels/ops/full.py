"""`full_attention`: the dense baseline, softmax(q k^T) v with key padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_dropout, check_finite, check_qkv, check_scale, check_token_mask
from ..dispatch import requested_backend
from ._define import define


@dataclass(frozen=True)
class FullParams:
    """What every backend's forward/backward gets besides the tensors (see `full_attention`)."""

    key_padding_mask: torch.Tensor | None
    scale: float
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0


_fwd_op = define("full", FullParams)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    dropout_offset: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense softmax attention (the baseline every pattern is measured against).

    q, k, v: (batch, heads, seq, head_dim); key_padding_mask: (batch, seq) bool, True = real token.
    Returns (batch, heads, seq, head_dim), padded query rows zero.
    Plain-PyTorch meaning: softmax(scale * q @ k.T, keys masked by key_padding_mask) @ v.
    dropout_p: dropout on the attention probabilities (after the softmax, before @ v, where HF applies it),
    kept ones scaled by 1 / (1 - dropout_p); p is resolved to multiples of 1/65536. The keep-mask comes from a
    counter-based RNG (Philox4x32-10 keyed by dropout_seed, counter = (key position j, query position i, batch * heads +
    head, dropout_offset); `etkd_kernels._shared.dropout_keep`), so the backward regenerates it and it does not
    depend on the backend, threads or tiling. Without dropout_seed, (seed, offset) are drawn from torch's default
    generator when the op runs (torch.manual_seed reproduces; successive calls differ).
    """
    check_qkv(q, k, v)
    key_padding_mask = check_token_mask(key_padding_mask, "key_padding_mask", q)
    scale = check_scale(scale, q.shape[-1])
    dropout = check_dropout(dropout_p, dropout_seed, dropout_offset)
    check_finite(q=q, k=k, v=v)
    backend = requested_backend(backend)  # use_backend / ETKD_BACKEND applied now, in the caller's context
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _fwd_op(q, k, v, key_padding_mask, scale, *dropout, backend)[0]
