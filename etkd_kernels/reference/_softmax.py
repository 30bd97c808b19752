"""Masked softmax shared by the reference patterns (exact, NaN-free on rows that see no key), and their
padded-query-row convention."""

from __future__ import annotations

import torch

__all__ = ["masked_softmax", "padded_rows"]


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


def padded_rows(
    out: torch.Tensor, lse: torch.Tensor, real: torch.Tensor | None, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded query rows (`real` (batch, seq) False) get out 0 and lse +inf; out in `out_dtype`, lse fp32."""
    if real is not None:
        qreal = real[:, None, :, None]
        out = torch.where(qreal, out, torch.zeros_like(out))
        lse = torch.where(qreal[..., 0], lse, torch.full_like(lse, float("inf")))
    return out.to(out_dtype), lse.float()
