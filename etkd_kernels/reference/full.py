"""Reference dense attention (SDPA's math, with etkd's padding convention: padded query rows are zero)."""

from __future__ import annotations

import torch

from .._shared import compute_dtype, recompute_backward
from ._softmax import masked_softmax, padded_rows


def attend(q, k, v, key_padding_mask, scale):
    ct = compute_dtype(q.dtype)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(ct), k.to(ct)) * scale
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    probs, lse = masked_softmax(scores, mask)
    return padded_rows(probs @ v.to(ct), lse, key_padding_mask, q.dtype)


def forward(q, k, v, p):
    return attend(q, k, v, p.key_padding_mask, p.scale)


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(attend, grad_out, (q, k, v), p.key_padding_mask, p.scale)
