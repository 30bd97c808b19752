"""Small pieces the op wrappers share: padding a sequence to a block multiple and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Pad the seq dim of q, k, v to a multiple of `multiple`; the added keys are marked as padding.

    Returns (q, k, v, key_padding_mask, original_seq_len). Nothing is copied when no padding is needed.
    """
    s = q.shape[2]
    extra = (-s) % multiple
    if extra == 0:
        return q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, s
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    if key_padding_mask is None:
        key_padding_mask = torch.ones(q.shape[0], s, dtype=torch.bool, device=q.device)
    key_padding_mask = F.pad(key_padding_mask, (0, extra), value=False)
    return q, k, v, key_padding_mask, s
