"""Reference block-sparse attention: the definition of the pattern, in O(nnz blocks * block^2) memory.

Meaning: softmax(scale * q @ k.T) @ v where query i may see key j only if `layout[h, i // block, j // block]`
and `key_padding_mask[b, j]`. Each allowed (query block, key block) pair is counted once: a bool layout
cannot say "this block twice" (for HF BigBird's duplicated random blocks see `etkd_kernels.layouts`).

How: per query block, the allowed key blocks come from `layout_lut` (ascending, padded to the longest row
with a validity mask); their keys and values are gathered into (batch, heads, q_blocks, max_nnz * block,
head_dim) and scored against the query block only, so nothing seq x seq is ever built.

Conventions (shared by every backend): a query row that sees no real key (a padded query, or a row whose
allowed blocks hold only padding) gives out 0 and lse +inf; padded query rows (key_padding_mask False) are
zeroed whatever they see. lse is float32 (batch, heads, seq). The op (`ops/block_sparse.py`) pads seq to a
multiple of the block size before calling, so here seq == q_blocks * block_size.
"""

from __future__ import annotations

import torch

from ..masks import layout_lut
from ._autograd import recompute_backward
from ._softmax import compute_dtype, masked_softmax


def _check(q: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    b, h, s, _ = q.shape
    if layout.dtype != torch.bool or layout.dim() != 3:
        raise TypeError(f"layout: expected a bool tensor (heads or 1, q_blocks, k_blocks), got {layout.dtype} "
                        f"{tuple(layout.shape)}")
    hl, nqb, nkb = layout.shape
    if nqb * block_size != s or nkb * block_size != s:
        raise ValueError(
            f"layout: expected ({s // block_size}, {s // block_size}) blocks of {block_size} for seq {s} "
            f"(the op pads seq to a block multiple first), got ({nqb}, {nkb})"
        )
    if hl not in (1, h):
        raise ValueError(f"layout: expected 1 or {h} heads, got {hl}")


def attend(q, k, v, layout, block_size, key_padding_mask, scale):
    _check(q, layout, block_size)
    b, h, s, d = q.shape
    bs = block_size
    nb = s // bs
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = (t.to(ct) for t in (q, k, v))
    layout = layout.to(q.device)
    hl = layout.shape[0]

    lut, counts = layout_lut(layout)  # (hl, nb, W), (hl, nb)
    lut = lut.long()
    w = lut.shape[-1]
    slot_ok = torch.arange(w, device=q.device)[None, None, :] < counts[..., None]  # (hl, nb, W)

    # Gather the allowed key blocks of each query block: (b, h, nb, W, bs, d).
    kb = k.view(b, h, nb, bs, d)
    vb = v.view(b, h, nb, bs, d)
    if hl == 1:
        kg, vg = kb[:, :, lut[0]], vb[:, :, lut[0]]
    else:
        hidx = torch.arange(h, device=q.device)[:, None, None]
        kg, vg = kb[:, hidx, lut], vb[:, hidx, lut]
    kg = kg.reshape(b, h, nb, w * bs, d)
    vg = vg.reshape(b, h, nb, w * bs, d)

    # Key usable: its block slot is a real entry of the row, and the key itself is real.
    key_ok = slot_ok[None, :, :, :, None].expand(1, hl, nb, w, bs)
    if key_padding_mask is not None:
        key_ok = key_ok & key_padding_mask.view(b, nb, bs)[:, lut]  # (b, hl, nb, W, bs)
    key_ok = key_ok.reshape(key_ok.shape[0], hl, nb, 1, w * bs)

    qb = q.view(b, h, nb, bs, d)
    scores = torch.einsum("bhnqd,bhnkd->bhnqk", qb, kg) * scale
    probs, lse = masked_softmax(scores, key_ok)
    out = torch.einsum("bhnqk,bhnkd->bhnqd", probs, vg).reshape(b, h, s, d)
    lse = lse.reshape(b, h, s)

    if key_padding_mask is not None:
        qreal = key_padding_mask[:, None, :, None]
        out = torch.where(qreal, out, torch.zeros_like(out))
        lse = torch.where(qreal[..., 0], lse, torch.full_like(lse, float("inf")))
    return out.to(out_dtype), lse.float()


def forward(q, k, v, layout, block_size, key_padding_mask, scale):
    return attend(q, k, v, layout, block_size, key_padding_mask, scale)


def backward(grad_out, q, k, v, out, lse, layout, block_size, key_padding_mask, scale):
    return recompute_backward(attend, grad_out, (q, k, v), layout, block_size, key_padding_mask, scale)
