"""Reference dense attention (SDPA's math, with etkd's padding convention: padded query rows are zero)."""

from __future__ import annotations

import torch

from ._autograd import recompute_backward
from ._softmax import compute_dtype, masked_softmax


def attend(q, k, v, key_padding_mask, scale):
    ct = compute_dtype(q.dtype)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(ct), k.to(ct)) * scale
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    probs, lse = masked_softmax(scores, mask)
    out = probs @ v.to(ct)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        out = out * real[..., None]
        lse = torch.where(real, lse, torch.full_like(lse, float("inf")))
    return out.to(q.dtype), lse.float()


def forward(q, k, v, p):
    return attend(q, k, v, p.key_padding_mask, p.scale)


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(attend, grad_out, (q, k, v), p.key_padding_mask, p.scale)
