"""Reference LSG attention (Condevaux & Harispe, "LSG Attention", 2022): the definition of the pattern, in
O(seq * (3 * block + 2 * sparse_block + globals)) memory.

Notation: S = seq (a multiple of `block_size` = B; the op pads first, padded keys are not real), G =
`num_global_tokens`, f = `sparsity_factor`, s = `sparse_block_size`, step = B // f, T = S // f. Blocks are
counted over the whole sequence, global positions included. A key j is *usable* when it is real
(key_padding_mask) and not global (j >= G); usable keys are the only ones local and sparse keys are made of,
so every global key is counted exactly once (as its own column), as LSG's layer does by masking its global
token out of the local/sparse keys.

* Global query rows (i < G) attend to every real key.
* A non-global query row i in block n = i // B attends to
  - global keys: the real j < G;
  - local keys: the usable j in [(n - 1) B, (n + 2) B) (its own block and one on each side);
  - sparse keys (unless sparsity_type == "none" or s == 0): the compressed positions
    p in [(n - 1) step - s, (n - 1) step) and [(n + 2) step, (n + 2) step + s), 0 <= p < T, i.e. the s
    compressed tokens just left and just right of the local window; compressed position p of head h is
      "pooling":      the mean of k_j (and v_j) over the usable j in [p f, (p + 1) f); absent if none is;
      "stride":       token j = p f + (h mod f), if usable (LSG offsets the stride by head);
      "block_stride": token j = (p // step) B + ((h step + p mod step) mod B), if usable: each block
                      contributes a contiguous run of B / f tokens, rotated by head as LSG does.
    Sparse keys always lie outside the local window, so no key is counted twice.
Softmax over that key set with `scale`; rows that see no key, and padded query rows, give 0 (lse +inf).

Relation to lsg-converter (ccdv-ai/convert_checkpoint_to_lsg, `LSGAttentionProduct.reshape_to_sparse_block`
and `get_sparse_tokens_with_*`): the same windows and compression when B / f is even. Differences, on
purpose: (1) LSG's models prepend learned global embeddings and block the rest of the sequence; here the
globals are the first G positions of the sequence and blocks start at position 0 (so `lsg_layout` and the
block-sparse kernels see the same blocks); (2) when B / f is odd LSG's slicing shifts the right sparse window
two positions into the local window (and degenerates when its slice bound hits 0): we keep the symmetric
definition above; (3) pooling ignores padded and global tokens exactly (LSG divides by count + 1e-6);
(4) sequences of <= 2 blocks are not switched to full attention (the op's caller may do that).
`block_size` must be a multiple of `sparsity_factor` when sparse keys are used (LSG asserts the same).
"""

from __future__ import annotations

import torch

from ._autograd import recompute_backward
from ._softmax import compute_dtype, masked_softmax


def _compress(k, v, usable, block_size, f, sparsity_type):
    """Compressed keys/values (b, h, T, d) and their validity (b, h or 1, T)."""
    b, h, s, d = k.shape
    t = s // f
    if sparsity_type == "pooling":
        w = usable.view(b, 1, t, f, 1).to(k.dtype)
        cnt = w.sum(-2)
        kc = (k.view(b, h, t, f, d) * w).sum(-2) / cnt.clamp(min=1)
        vc = (v.view(b, h, t, f, d) * w).sum(-2) / cnt.clamp(min=1)
        return kc, vc, (cnt[..., 0] > 0)
    p = torch.arange(t, device=k.device)
    hh = torch.arange(h, device=k.device)[:, None]
    if sparsity_type == "stride":
        tok = p[None, :] * f + hh % f
    else:  # block_stride
        step = block_size // f
        tok = (p[None, :] // step) * block_size + (hh * step + p[None, :] % step) % block_size
    idx = tok[None, :, :, None].expand(b, h, t, d)
    return k.gather(2, idx), v.gather(2, idx), usable[:, tok]


def attend(
    q,
    k,
    v,
    block_size,
    sparse_block_size,
    sparsity_factor,
    sparsity_type,
    num_global_tokens,
    key_padding_mask,
    scale,
):
    b, h, s, d = q.shape
    bs, sbs, f, g = block_size, sparse_block_size, sparsity_factor, num_global_tokens
    if s % bs:
        raise ValueError(f"block_size: seq {s} must be a multiple of block_size {bs} (the op pads first)")
    use_sparse = sparsity_type != "none" and sbs > 0
    if use_sparse and bs % f:
        raise ValueError(f"sparsity_factor: expected a divisor of block_size {bs}, got {f}")
    nb = s // bs
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = (t.to(ct) for t in (q, k, v))
    dev = q.device
    real = (
        key_padding_mask if key_padding_mask is not None else torch.ones(b, s, dtype=torch.bool, device=dev)
    )
    usable = real & (torch.arange(s, device=dev) >= g)[None]

    # Each key group: keys (b, h, nb, K, d), values, mask (b, h or 1, nb, K).
    n = torch.arange(nb, device=dev)[:, None]
    loc = n * bs - bs + torch.arange(3 * bs, device=dev)[None]
    loc_c = loc.clamp(0, s - 1)
    groups = [(k[:, :, loc_c], v[:, :, loc_c], ((loc >= 0) & (loc < s))[None] & usable[:, loc_c])]
    if use_sparse:
        kc, vc, okc = _compress(k, v, usable, bs, f, sparsity_type)
        t, step = s // f, bs // f
        j = torch.arange(sbs, device=dev)[None]
        pos = torch.cat([(n - 1) * step - sbs + j, (n + 2) * step + j], dim=-1)
        pos_c = pos.clamp(0, t - 1)
        groups.append((kc[:, :, pos_c], vc[:, :, pos_c], ((pos >= 0) & (pos < t)) & okc[:, :, pos_c]))
    if g > 0:
        kg, vg = k[:, :, None, :g].expand(b, h, nb, g, d), v[:, :, None, :g].expand(b, h, nb, g, d)
        groups.append((kg, vg, real[:, None, :g].expand(b, nb, g)))

    hm = max(m.shape[1] if m.dim() == 4 else 1 for _, _, m in groups)
    masks = [(m if m.dim() == 4 else m[:, None]).expand(b, hm, nb, m.shape[-1]) for _, _, m in groups]
    qb = q.view(b, h, nb, bs, d)
    scores = torch.cat([torch.einsum("bhnqd,bhnkd->bhnqk", qb, kk) for kk, _, _ in groups], dim=-1) * scale
    probs, lse = masked_softmax(scores, torch.cat(masks, dim=-1)[:, :, :, None, :])
    out = 0
    start = 0
    for _, vv, m in groups:
        width = m.shape[-1]
        out = out + torch.einsum("bhnqk,bhnkd->bhnqd", probs[..., start : start + width], vv)
        start += width
    out = out.reshape(b, h, s, d)
    lse = lse.reshape(b, h, s)

    if g > 0:
        gs = torch.einsum("bhgd,bhsd->bhgs", q[:, :, :g], k) * scale
        gprobs, glse = masked_softmax(gs, real[:, None, None, :])
        out = torch.cat([gprobs @ v, out[:, :, g:]], dim=2)
        lse = torch.cat([glse, lse[:, :, g:]], dim=2)

    qreal = real[:, None, :, None]
    out = torch.where(qreal, out, torch.zeros_like(out))
    lse = torch.where(qreal[..., 0], lse, torch.full_like(lse, float("inf")))
    return out.to(out_dtype), lse.float()


def forward(
    q,
    k,
    v,
    block_size,
    sparse_block_size,
    sparsity_factor,
    sparsity_type,
    num_global_tokens,
    key_padding_mask,
    scale,
):
    return attend(
        q,
        k,
        v,
        block_size,
        sparse_block_size,
        sparsity_factor,
        sparsity_type,
        num_global_tokens,
        key_padding_mask,
        scale,
    )


def backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    block_size,
    sparse_block_size,
    sparsity_factor,
    sparsity_type,
    num_global_tokens,
    key_padding_mask,
    scale,
):
    return recompute_backward(
        attend,
        grad_out,
        (q, k, v),
        block_size,
        sparse_block_size,
        sparsity_factor,
        sparsity_type,
        num_global_tokens,
        key_padding_mask,
        scale,
    )
