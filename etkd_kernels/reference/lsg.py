"""Reference LSG attention (Condevaux & Harispe, "LSG Attention", 2022): the definition of the pattern, in
O(seq * (3 * block + 2 * sparse_block + globals)) memory. It equals lsg-converter's `LSGSelfAttention`
(ccdv-ai/convert_checkpoint_to_lsg 0.1.9, `lsg_converter/attention_layers/lsg_self_attention.py`, the code
behind the LSG checkpoints) for every sparsity type it has; tests/test_lsg_converter.py checks that.

Notation: S = seq (a multiple of `block_size` = B; the op pads first, padded keys are not real), G =
`num_global_tokens`, f = `sparsity_factor`, s = `sparse_block_size` (LSG: s = B), step = B // f, T = S // f,
nb = S // B. Blocks are counted over the whole sequence, global positions included. A key j is *usable* when
it is real (key_padding_mask) and not global (j >= G); local keys are made of usable keys only, so every
global key is counted once (as its own column), as LSG masks its global first token out of the rest.

* Global query rows (i < G) attend to every real key.
* A non-global query row i in block n = i // B attends to
  - global keys: the real j < G;
  - local keys: the usable j in [(n - 1) B, (n + 2) B) (its own block and one on each side);
  - sparse keys (unless sparsity_type == "none", s == 0 or nb <= 2, where LSG runs full attention, which
    local + global then already is): the compressed positions p in [(n - 1) step - s + o, (n - 1) step + o)
    and [(n + 2) step - 2 o, (n + 2) step - 2 o + s), 0 <= p < T, with o = step mod 2 (LSG's unfold
    slicing shifts both windows when step is odd, into the local window), i.e. the s compressed tokens
    just left and right of the local window. With f == 1 compressed position p is token p (usable or not attended). Otherwise:
      "pooling":      the sum of k_j (and v_j) over the usable j in [p f, (p + 1) f), divided by
                      (their count + 1e-6), as LSG does;
      "bos_pooling":  sum_j w_j k_j (and v_j) over j in [p f, (p + 1) f), w = softmax over the real j
                      (global ones included) of scale * q_0 . k_j: pooled by the first query's scores;
      "stride":       token j = p f + (h mod f) (LSG offsets the stride by head);
      "block_stride": token j = (p // step) B + ((h step + p mod step) mod B): each block contributes a
                      contiguous run of B / f tokens, rotated by head;
      "norm":         the step usable tokens of largest |k_j| of block p // step (in descending order),
                      padded with unusable ones (not attended) when the block has fewer.
    A pooled token ("pooling", "bos_pooling") is attended even when no token of its group is usable: LSG
    marks a compressed token masked only if the mean of its group's additive mask equals finfo.min, and
    that mean overflows to -inf for f >= 2 masked tokens. Such a token is zero for "pooling" (0 / 1e-6)
    and, for "bos_pooling", the plain mean of the group's keys when none is real (its softmax is uniform).
    A strided or "norm" token is attended only if usable.
Softmax over that key set with `scale`; rows that see no key, and padded query rows, give 0 (lse +inf).
Attention dropout (`etkd_kernels._shared.dropout_keep`) uses the key's position as its column for global and
local keys, and column S + p for compressed position p (S = the padded seq the op hands over), so compressed
keys draw bits of their own (`etkd_kernels._shared.lsg.lsg_key_columns`, which the fused backends pass to their
kernels).

Where this differs from LSGSelfAttention: (1) LSG has one global token, the first; here the first G
positions are global (G = 1 is LSG's convention, G = 0 its compute_global_attention=False); (2) LSG keeps
its global key visible even when the first token is padding, here a padded global key is not attended;
(3) padded query rows give 0 here (LSG returns an average); (4) LSG's sparse block size is always B, here
`sparse_block_size`; (5) LSGSelfAttention's sparse windows are unfolds of width 3 B sliced at
(3 B - 3 B / f) / 2, which is well formed only for f >= 4 (or odd f >= 3 with an odd step): for f = 2 both
windows come out empty, for f = 3 with an even step the right one does, for f = 1 or an odd step with even
f it raises. There we keep the windows above, which are the ones of the model files the LSG checkpoints
run (`LSGAttentionProduct.reshape_to_sparse_block`, unfolds of width 6 s) for an even step, so the default
f = 2 has sparse keys as the checkpoints do.
`block_size` must be a multiple of `sparsity_factor` when sparse keys are used (LSG asserts the same).

`variant="model"` is the attention of lsg-converter's model files (`LSGRobertaModel` & co.,
`modeling_lsg_*.py`), which prepend G global embeddings and count blocks after them. The public op
(`etkd_kernels.ops.lsg`) puts the G globals in leading blocks of their own, padded with non-real tokens, so
here the first non-global token starts block `lead // B` with lead = ceil(G / B) B, and the rules above
change in these places only: a pooled token ("pooling") is attended only when its group has a usable token
(the model files mask an empty group); "norm" ranks the key norms in chunks of min(B, s) tokens (keeping
s // f of each, in ascending order of norm: its argsort's tail) rather than whole blocks; "bos_pooling" pools
by the scores of query `lead` (the first non-global token; the model files' `queries[..., :1, :]` after
splitting the globals off), never attends a compressed token of the leading global blocks (there the model
files' unfold has only padding), and gives padded non-global query rows the output of a real row of their
block (`all_query_rows`: the model files compute them, and a later layer pools a group of padding from
them); and for an odd step only the right sparse window shifts (`sparse_windows`; the model files run an odd
step only when block_size == sparsity_factor).
"""

from __future__ import annotations

import torch

from .._shared import apply_dropout, batch_heads, compute_dtype, recompute_backward
from .._shared.lsg import all_query_rows, lsg_key_columns, sparse_keys, sparse_windows, uses_sparse
from ._softmax import masked_softmax, padded_rows


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
    variant="layer",
    dropout_p=0.0,
    seed=0,
    offset=0,
):
    b, h, s, d = q.shape
    bs, sbs, f, g = block_size, sparse_block_size, sparsity_factor, num_global_tokens
    if s % bs:
        raise ValueError(f"block_size: seq {s} must be a multiple of block_size {bs} (the op pads first)")
    nb = s // bs
    use_sparse = uses_sparse(sparsity_type, sbs, nb)
    if use_sparse and bs % f:
        raise ValueError(f"sparsity_factor: expected a divisor of block_size {bs}, got {f}")
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
    cols = [loc]  # dropout columns of each group's keys, (nb, K)
    if use_sparse:
        kc, vc, okc = sparse_keys(q, k, v, real, g, bs, f, sparsity_type, scale, variant, sbs)
        t = s // f
        left, right = sparse_windows(n, bs // f, sbs, variant)
        j = torch.arange(sbs, device=dev)[None]
        pos = torch.cat([left + j, right + j], dim=-1)
        pos_c = pos.clamp(0, t - 1)
        groups.append((kc[:, :, pos_c], vc[:, :, pos_c], ((pos >= 0) & (pos < t)) & okc[:, :, pos_c]))
        cols.append(lsg_key_columns(s, g, g + t, dev)[g + pos_c])
    if g > 0:
        kg, vg = k[:, :, None, :g].expand(b, h, nb, g, d), v[:, :, None, :g].expand(b, h, nb, g, d)
        groups.append((kg, vg, real[:, None, :g].expand(b, nb, g)))
        cols.append(lsg_key_columns(s, g, g, dev).expand(nb, g))

    hm = max(m.shape[1] if m.dim() == 4 else 1 for _, _, m in groups)
    masks = [(m if m.dim() == 4 else m[:, None]).expand(b, hm, nb, m.shape[-1]) for _, _, m in groups]
    qb = q.view(b, h, nb, bs, d)
    scores = torch.cat([torch.einsum("bhnqd,bhnkd->bhnqk", qb, kk) for kk, _, _ in groups], dim=-1) * scale
    probs, lse = masked_softmax(scores, torch.cat(masks, dim=-1)[:, :, :, None, :])
    if dropout_p:
        bh = batch_heads(b, h, dev)[..., None]
        i = (n * bs + torch.arange(bs, device=dev))[..., None]  # (nb, bs, 1)
        probs = apply_dropout(probs, dropout_p, seed, offset, bh, i, torch.cat(cols, dim=-1)[:, None, :])
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
        if dropout_p:
            pos = torch.arange(s, device=dev)
            gprobs = apply_dropout(
                gprobs, dropout_p, seed, offset, batch_heads(b, h, dev), pos[:g, None], pos
            )
        out = torch.cat([gprobs @ v, out[:, :, g:]], dim=2)
        lse = torch.cat([glse, lse[:, :, g:]], dim=2)

    if all_query_rows(sparsity_type, variant):
        real = real | (torch.arange(s, device=dev) >= g)[None]
    return padded_rows(out, lse, real, out_dtype)


def forward(q, k, v, p):
    return attend(q, k, v, *_settings(p))


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(attend, grad_out, (q, k, v), *_settings(p))


def _settings(p):
    """The op's settings in `attend`'s order."""
    return (
        p.block_size, p.sparse_block_size, p.sparsity_factor, p.sparsity_type, p.num_global_tokens,
        p.key_padding_mask, p.scale, p.variant, p.dropout_p, p.seed, p.offset,
    )  # fmt: skip


def check_case(b: int, s: int, block: int, device) -> tuple[int, dict]:
    """The case `etkd_kernels.gpu_check` checks this op on, batch `b`, length `s` (`block`: its tile-sized
    setting): (how many tensor inputs take gradients, keyword arguments besides the padding mask)."""
    return 3, {
        "block_size": block,
        "sparse_block_size": block // 2,
        "sparsity_factor": 2,
        "num_global_tokens": 1,
    }


def check_call(q, k, v, *, backend, **kw):
    """This op's public call on `check_case`'s inputs (`etkd_kernels.gpu_check`)."""
    from ..ops.lsg import lsg_attention

    return lsg_attention(q, k, v, backend=backend, **kw)
