"""`full_attention`: the dense baseline, softmax(q k^T) v with key padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._checks import check_qkv
from ._common import OpOptions, common_settings, public_op, run
from ._define import CommonParams, define

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(frozen=True)
class FullParams(CommonParams):
    """What every backend's forward/backward gets besides the tensors (see `full_attention`): the common ones."""


_fwd_op = define("full", FullParams)


@public_op()
def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **options: Unpack[OpOptions],
) -> torch.Tensor:
    """Dense softmax attention (the baseline every pattern is measured against).

    q, k, v: (batch, heads, seq, head_dim); key_padding_mask: (batch, seq) bool, True = real token.
    Returns (batch, heads, seq, head_dim), padded query rows zero.
    Plain-PyTorch meaning: softmax(scale * q @ k.T, keys masked by key_padding_mask) @ v.
    {dropout}
    """
    check_qkv(q, k, v)
    common, backend = common_settings(q, k, v, options)
    return run(_fwd_op, q, k, v, FullParams(**common), backend)
