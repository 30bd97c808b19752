"""LSG attention on the `cpu` backend.

The extra key source [global keys, compressed keys] is built by `lsg_sparse_keys` of csrc/cpu/lsg.cpp for
pooling / stride / block_stride (one pass over k and v; its adjoint scatters the gradients back), and by the
reference's torch code (`extra_keys`) for norm, bos_pooling and sparsity_factor 1. Then one fused flash-style
pass per query block runs over [local keys, global keys, sparse keys] with an online softmax (no seq x keys
score matrix); the backward recomputes P from the saved lse. Attention dropout runs in both passes, the extra
keys' columns given by `lsg_key_columns` (the contract of etkd_kernels/_shared/lsg.py, as the reference draws it).
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels._shared.lsg import all_query_rows, extra_keys, lsg_key_columns, sparse_windows, uses_sparse
from etkd_kernels.cpu import note_tile_path
from etkd_kernels.cpu._dtype import in_float32

_NATIVE = {"pooling": 1, "stride": 2, "block_stride": 3}  # type ids of csrc/cpu/lsg.cpp


def _native(sparsity_type, sparse_block_size, sparsity_factor, num_blocks, variant):
    # The native pooling attends empty groups (the "layer" variant); the model files' pooling goes to torch.
    return (
        uses_sparse(sparsity_type, sparse_block_size, num_blocks)
        and sparsity_type in _NATIVE
        and sparsity_factor >= 2
        and not (variant == "model" and sparsity_type == "pooling")
    )


def _dropout(p, s, kx):
    """The kernels' dropout arguments: the extra keys' columns (None without dropout), p, seed, offset."""
    cols = lsg_key_columns(s, p.num_global_tokens, kx.shape[2]) if p.dropout_p else None
    return cols, p.dropout_p, p.seed, p.offset


def _real(q, key_padding_mask):
    if key_padding_mask is not None:
        return key_padding_mask
    return torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)


def _extra(q, k, v, bs, sbs, f, stype, g, kpm, scale, variant):
    nb = q.shape[2] // bs
    if _native(stype, sbs, f, nb, variant):
        kx, vx, ok = torch.ops.etkd_cpu.lsg_sparse_keys(k, v, kpm, g, bs, f, _NATIVE[stype])
        starts = torch.stack(sparse_windows(torch.arange(nb), bs // f, sbs, variant), dim=1)
        return kx, vx, ok, starts
    return extra_keys(q, k, v, bs, sbs, f, stype, g, _real(q, kpm), scale, variant)


@in_float32(keep=(1,))  # lse stays float32
def forward(q, k, v, p):
    note_tile_path("lsg", q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bs, sbs, f, stype = p.block_size, p.sparse_block_size, p.sparsity_factor, p.sparsity_type
    g, kpm, scale = p.num_global_tokens, p.key_padding_mask, p.scale
    with torch.no_grad():
        kx, vx, ok, starts = _extra(q, k, v, bs, sbs, f, stype, g, kpm, scale, p.variant)
        rows = all_query_rows(stype, p.variant)
        return torch.ops.etkd_cpu.lsg_fwd(
            q, k, v, kx.contiguous(), vx.contiguous(), ok.contiguous(), starts, kpm, bs, sbs, g, scale,
            *_dropout(p, q.shape[2], kx), rows,
        )  # fmt: skip


@in_float32
def backward(grad_out, q, k, v, out, lse, p):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bs, sbs, f, stype = p.block_size, p.sparse_block_size, p.sparsity_factor, p.sparsity_type
    g, kpm, scale = p.num_global_tokens, p.key_padding_mask, p.scale
    if _native(stype, sbs, f, q.shape[2] // bs, p.variant):
        kx, vx, ok, starts = _extra(q, k, v, bs, sbs, f, stype, g, kpm, scale, p.variant)
        dq, dk, dv, dkx, dvx = torch.ops.etkd_cpu.lsg_bwd(
            grad_out.contiguous(), q, k, v, out, lse, kx, vx, ok, starts, kpm, bs, sbs, g, scale,
            *_dropout(p, q.shape[2], kx),
        )  # fmt: skip
        torch.ops.etkd_cpu.lsg_sparse_keys_bwd(dkx, dvx, dk, dv, kpm, g, bs, f, _NATIVE[stype])
        return dq, dk, dv
    with torch.enable_grad():  # compressed keys built by torch ops: their gradients flow back with autograd
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        kx, vx, ok, starts = extra_keys(*leaves, bs, sbs, f, stype, g, _real(q, kpm), scale, p.variant)
        dq, dk, dv, dkx, dvx = torch.ops.etkd_cpu.lsg_bwd(
            grad_out.contiguous(), q, k, v, out, lse, kx.detach().contiguous(), vx.detach().contiguous(),
            ok.contiguous(), starts, kpm, bs, sbs, g, scale, *_dropout(p, q.shape[2], kx),
            all_query_rows(stype, p.variant),
        )  # fmt: skip
        if kx.shape[2] > g:
            gq, gk, gv = torch.autograd.grad(
                (kx[:, :, g:], vx[:, :, g:]), leaves, (dkx[:, :, g:], dvx[:, :, g:]), allow_unused=True
            )
            dq = dq if gq is None else dq + gq
            dk = dk if gk is None else dk + gk
            dv = dv if gv is None else dv + gv
    dk[:, :, :g] += dkx[:, :, :g]
    dv[:, :, :g] += dvx[:, :, :g]
    return dq, dk, dv
