"""Masked softmax shared by the reference patterns: exact, NaN-free on rows that see no key."""

from __future__ import annotations

import torch

from .._shared import compute_dtype

__all__ = ["compute_dtype", "masked_softmax"]


def masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over `dim` of `scores` where `mask` is True; returns (probs, lse).

    Rows with no allowed entry get probs 0 and lse +inf (the convention every backend's saved
    log-sum-exp follows: exp(s - lse) is then 0, never NaN).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    total = e.sum(dim=dim, keepdim=True)
    probs = e / total.clamp_min(torch.finfo(total.dtype).tiny)
    lse = (torch.log(total) + m).squeeze(dim)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    return probs, lse
