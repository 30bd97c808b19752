"""Reference dense attention (SDPA's math, with etkd's padding convention: padded query rows are zero)."""

from __future__ import annotations

import torch

from .._shared import apply_dropout, batch_heads, compute_dtype, recompute_backward
from ._softmax import masked_softmax, padded_rows


def attend(q, k, v, key_padding_mask, scale, dropout_p=0.0, seed=0, offset=0):
    ct = compute_dtype(q.dtype)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(ct), k.to(ct)) * scale
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    probs, lse = masked_softmax(scores, mask)
    if dropout_p:
        b, h, s, _ = q.shape
        pos = torch.arange(s, device=q.device)
        probs = apply_dropout(probs, dropout_p, seed, offset, batch_heads(b, h, q.device), pos[:, None], pos)
    return padded_rows(probs @ v.to(ct), lse, key_padding_mask, q.dtype)


def forward(q, k, v, p):
    return attend(q, k, v, p.key_padding_mask, p.scale, p.dropout_p, p.seed, p.offset)


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(
        attend, grad_out, (q, k, v), p.key_padding_mask, p.scale, p.dropout_p, p.seed, p.offset
    )


def check_case(b: int, s: int, block: int, device) -> tuple[int, dict]:
    """The case `etkd_kernels.gpu_check` checks this op on, batch `b`, length `s` (`block`: its tile-sized
    setting): (how many tensor inputs take gradients, keyword arguments besides the padding mask)."""
    return 3, {}


def check_call(q, k, v, *, backend, **kw):
    """This op's public call on `check_case`'s inputs (`etkd_kernels.gpu_check`)."""
    from ..ops.full import full_attention

    return full_attention(q, k, v, backend=backend, **kw)
