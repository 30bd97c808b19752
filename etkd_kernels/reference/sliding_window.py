"""Reference sliding-window attention: the definition of the pattern, in O(seq * window) memory.

Queries are cut into chunks of c = window // 2 rows; chunk n sees the 3c keys [n*c - c, n*c + 2c), which
holds its whole band. Global keys are extra columns, and are removed from the band so each key counts
once (as HF Longformer does). Global query rows attend to every key with their own projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._shared import apply_dropout, batch_heads, compute_dtype, recompute_backward
from ._softmax import masked_softmax, padded_rows


def _global_index(global_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, G) indices of global tokens (G = most in any row) and their validity."""
    counts = global_mask.sum(-1)
    g = int(counts.max().item())
    order = torch.argsort((~global_mask).to(torch.int8), dim=-1, stable=True)[:, :g]
    valid = torch.arange(g, device=global_mask.device)[None, :] < counts[:, None]
    return order, valid


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (b, h, s, d), idx (b, g) -> (b, h, g, d)."""
    b, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def attend(
    q, k, v, qg, kg, vg, window, global_mask, key_padding_mask, scale, dropout_p=0.0, seed=0, offset=0
):
    b, h, s, d = q.shape
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = (t.to(ct) for t in (q, k, v))
    w = window // 2
    c = w
    nc = -(-s // c)
    sp = nc * c
    real = (
        key_padding_mask
        if key_padding_mask is not None
        else torch.ones(b, s, dtype=torch.bool, device=q.device)
    )
    is_global = global_mask if global_mask is not None else torch.zeros_like(real)

    # Local band, chunked: (b, h, nc, c, 3c) scores.
    qc = F.pad(q, (0, 0, 0, sp - s)).view(b, h, nc, c, d)
    kp = F.pad(k, (0, 0, w, sp - s + w)).unfold(2, 3 * c, c)  # (b, h, nc, d, 3c)
    vp = F.pad(v, (0, 0, w, sp - s + w)).unfold(2, 3 * c, c)
    band_scores = torch.einsum("bhncd,bhndt->bhnct", qc, kp) * scale
    # Key usable in the band: inside the sequence, real, and not global (globals are their own columns).
    key_ok = F.pad(real & ~is_global, (w, sp - s + w), value=False).unfold(1, 3 * c, c)  # (b, nc, 3c)
    a = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(3 * c, device=q.device)[None, :]
    in_band = (t - a >= 0) & (t - a <= 2 * w)  # |i - j| <= w with j = n*c + t - w, i = n*c + a
    band_mask = in_band[None, None, None] & key_ok[:, None, :, None, :]  # (b, 1, nc, c, 3c)
    band_scores = band_scores.reshape(b, h, sp, 3 * c)
    band_mask = band_mask.reshape(b, 1, sp, 3 * c)

    has_global = global_mask is not None and bool(global_mask.any())
    if has_global:
        gidx, gvalid = _global_index(global_mask)
        kglob, vglob = _gather_rows(k, gidx), _gather_rows(v, gidx)
        g_scores = torch.einsum("bhsd,bhgd->bhsg", F.pad(q, (0, 0, 0, sp - s)), kglob) * scale
        g_ok = (gvalid & real.gather(1, gidx))[:, None, None, :]
        scores = torch.cat([band_scores, g_scores], dim=-1)
        mask = torch.cat([band_mask, g_ok.expand(b, 1, sp, -1)], dim=-1)
    else:
        scores, mask = band_scores, band_mask
    probs, lse = masked_softmax(scores, mask)
    if dropout_p:
        # Dropout counters: row i, band column t is key i - i % c + t - w; global columns are their positions.
        bh = batch_heads(b, h, q.device)
        i = torch.arange(sp, device=q.device)[:, None]
        j = (i - i % c + torch.arange(3 * c, device=q.device) - w).expand(b, 1, sp, 3 * c)
        if has_global:
            j = torch.cat([j, gidx[:, None, None, :].expand(b, 1, sp, -1)], dim=-1)
        probs = apply_dropout(probs, dropout_p, seed, offset, bh, i, j)
    pb = probs[..., : 3 * c].reshape(b, h, nc, c, 3 * c)
    out = torch.einsum("bhnct,bhndt->bhncd", pb, vp).reshape(b, h, sp, d)
    if has_global:
        out = out + torch.einsum("bhsg,bhgd->bhsd", probs[..., 3 * c :], vglob)
    out, lse = out[:, :, :s], lse[:, :, :s]

    if has_global:
        # Global query rows: full attention over real keys, with the global projections when given.
        qg_, kg_, vg_ = (q, k, v) if qg is None else (t.to(ct) for t in (qg, kg, vg))
        qrows = _gather_rows(qg_, gidx)
        gs = torch.einsum("bhgd,bhsd->bhgs", qrows, kg_) * scale
        gprobs, glse = masked_softmax(gs, real[:, None, None, :].expand(b, 1, gidx.shape[1], s))
        if dropout_p:
            pos = torch.arange(s, device=q.device)
            gprobs = apply_dropout(gprobs, dropout_p, seed, offset, bh, gidx[:, None, :, None], pos)
        gout = torch.einsum("bhgs,bhsd->bhgd", gprobs, vg_)
        rows = gidx[:, None, :].expand(b, h, -1)
        keep = gvalid[:, None, :].expand(b, h, -1)
        # Scatter only valid global rows (invalid slots repeat index 0 but must not overwrite it).
        cur = out.gather(2, rows[..., None].expand(-1, -1, -1, d))
        out = out.scatter(2, rows[..., None].expand(-1, -1, -1, d), torch.where(keep[..., None], gout, cur))
        lse = lse.scatter(2, rows, torch.where(keep, glse, lse.gather(2, rows)))

    return padded_rows(out, lse, real, out_dtype)


def forward(q, k, v, p):
    return attend(
        q, k, v, p.qg, p.kg, p.vg, p.window, p.global_mask, p.key_padding_mask, p.scale, p.dropout_p, p.seed,
        p.offset,
    )  # fmt: skip


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(
        attend, grad_out, (q, k, v, p.qg, p.kg, p.vg), p.window, p.global_mask, p.key_padding_mask, p.scale,
        p.dropout_p, p.seed, p.offset,
    )  # fmt: skip


def check_case(b: int, s: int, block: int, device) -> tuple[int, dict]:
    """The case `etkd_kernels.gpu_check` checks this op on, batch `b`, length `s` (`block`: its tile-sized
    setting): (how many tensor inputs take gradients, keyword arguments besides the padding mask)."""
    glob = torch.zeros(b, s, dtype=torch.bool, device=device)
    glob[:, [0, s // 2]] = True
    return 6, {"window": 2 * block, "global_mask": glob}  # q, k, v and the global q, k, v


def check_call(q, k, v, qg, kg, vg, *, backend, window, **kw):
    """This op's public call on `check_case`'s inputs (`etkd_kernels.gpu_check`)."""
    from ..ops.sliding_window import sliding_window_attention

    return sliding_window_attention(q, k, v, window, global_qkv=(qg, kg, vg), backend=backend, **kw)
