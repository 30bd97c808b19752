"""`full_attention`: the dense baseline, softmax(q k^T) v with key padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_qkv
from ._common import common_settings, dropout_doc
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


@dropout_doc()
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
    {dropout}
    """
    check_qkv(q, k, v)
    kpm, scale, dropout, backend = common_settings(
        q, k, v, key_padding_mask, scale, dropout_p, dropout_seed, dropout_offset, backend
    )
    return _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), kpm, scale, *dropout, backend)[0]
