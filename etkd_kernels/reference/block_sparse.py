"""Reference block-sparse attention: the definition of the pattern, in O(nnz blocks * block^2) memory.

Meaning: softmax(scale * q @ k.T) @ v where query i may see key j only if `layout[h, i // block, j // block]`
and `key_padding_mask[b, j]`. Each allowed (query block, key block) pair is counted once: a bool layout
cannot say "this block twice" (for HF BigBird's duplicated random blocks see `etkd_kernels.layouts`).

How: per (head, query block), the allowed key blocks come from `cached_lut` (ascending, padded with a
validity mask); their keys and values are gathered and scored against that query block only. Rows are
bucketed by their block count rounded up to a power of two and each bucket is padded to its own width, so
a few dense rows (global blocks) do not pad every row to the whole sequence: memory <= 2 * nnz * block^2,
nothing seq x seq is ever built.

Conventions (shared by every backend): a query row that sees no real key (a padded query, or a row whose
allowed blocks hold only padding) gives out 0 and lse +inf; padded query rows (key_padding_mask False) are
zeroed whatever they see. lse is float32 (batch, heads, seq). The op (`ops/block_sparse.py`) pads seq to a
multiple of the block size before calling, so here seq == q_blocks * block_size.
"""

from __future__ import annotations

import torch

from .._shared import apply_dropout, compute_dtype, recompute_backward
from ..masks import cached_lut
from ._softmax import masked_softmax, padded_rows


def _check(q: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    b, h, s, _ = q.shape
    if layout.dtype != torch.bool or layout.dim() != 3:
        raise TypeError(
            f"layout: expected a bool tensor (heads or 1, q_blocks, k_blocks), got {layout.dtype} "
            f"{tuple(layout.shape)}"
        )
    hl, nqb, nkb = layout.shape
    if nqb * block_size != s or nkb * block_size != s:
        raise ValueError(
            f"layout: expected ({s // block_size}, {s // block_size}) blocks of {block_size} for seq {s} "
            f"(the op pads seq to a block multiple first), got ({nqb}, {nkb})"
        )
    if hl not in (1, h):
        raise ValueError(f"layout: expected 1 or {h} heads, got {hl}")


def attend(q, k, v, layout, block_size, key_padding_mask, scale, dropout_p=0.0, seed=0, offset=0):
    _check(q, layout, block_size)
    b, h, s, d = q.shape
    bs = block_size
    nb = s // bs
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = (t.to(ct) for t in (q, k, v))
    dev = q.device
    lut, counts = cached_lut(layout.to(dev))  # (1 or h, nb, W), (1 or h, nb)
    lut, counts = lut.long().expand(h, -1, -1), counts.expand(h, -1)
    qb, kb, vb = (t.view(b, h, nb, bs, d) for t in (q, k, v))
    real = key_padding_mask.view(b, nb, bs) if key_padding_mask is not None else None
    out = q.new_zeros(b, h, nb, bs, d)
    lse = torch.full((b, h, nb, bs), float("inf"), dtype=ct, device=dev)

    # Bucket the (head, query block) rows by their count rounded up to a power of two, so a few dense rows
    # (a layout's global blocks) do not pad every row to seq: memory <= 2 * nnz * block^2.
    width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
    width = width.clamp(max=lut.shape[-1])
    for w in width.unique().tolist():
        if w == 0:
            continue  # rows that see no block keep out 0, lse +inf
        hs, ns = (width == w).nonzero(as_tuple=True)
        idx = lut[hs, ns, :w]  # (R, w) key blocks of each row
        key_ok = (torch.arange(w, device=dev)[None, :] < counts[hs, ns][:, None])[None, :, :, None]
        if real is not None:
            key_ok = key_ok & real[:, idx]  # (b, R, w, bs)
        key_ok = key_ok.expand(-1, -1, -1, bs).reshape(key_ok.shape[0], len(hs), 1, w * bs)
        kr = kb[:, hs[:, None], idx].reshape(b, len(hs), w * bs, d)
        vr = vb[:, hs[:, None], idx].reshape(b, len(hs), w * bs, d)
        scores = torch.einsum("brqd,brkd->brqk", qb[:, hs, ns], kr) * scale
        probs, row_lse = masked_softmax(scores, key_ok)
        if dropout_p:
            bh = (torch.arange(b, device=dev)[:, None] * h + hs)[:, :, None, None]
            i = (ns[:, None] * bs + torch.arange(bs, device=dev))[None, :, :, None]
            j = (idx[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(1, len(hs), 1, w * bs)
            probs = apply_dropout(probs, dropout_p, seed, offset, bh, i, j)
        out[:, hs, ns] = torch.einsum("brqk,brkd->brqd", probs, vr)
        lse[:, hs, ns] = row_lse

    out, lse = out.reshape(b, h, s, d), lse.reshape(b, h, s)
    return padded_rows(out, lse, key_padding_mask, out_dtype)


def forward(q, k, v, p):
    return attend(q, k, v, p.layout, p.block_size, p.key_padding_mask, p.scale, p.dropout_p, p.seed, p.offset)


def backward(grad_out, q, k, v, out, lse, p):
    if not bool(p.layout.any()):  # nothing attended: the output does not depend on q, k, v at all
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return recompute_backward(
        attend,
        grad_out,
        (q, k, v),
        p.layout,
        p.block_size,
        p.key_padding_mask,
        p.scale,
        p.dropout_p,
        p.seed,
        p.offset,
    )


def check_case(b: int, s: int, block: int, device) -> tuple[int, dict]:
    """The case `etkd_kernels.gpu_check` checks this op on, batch `b`, length `s` (`block`: its tile-sized
    setting): (how many tensor inputs take gradients, keyword arguments besides the padding mask)."""
    from ..layouts.bigbird import bigbird_layout

    return 3, {"layout": bigbird_layout(-(-s // block) * block, block, num_random_blocks=1).to(device)}


def check_call(q, k, v, *, backend, layout, **kw):
    """This op's public call on `check_case`'s inputs (`etkd_kernels.gpu_check`)."""
    from ..ops.block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, layout, backend=backend, **kw)
