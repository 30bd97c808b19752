"""LSG attention on the `cpu` backend: the compressed (sparse) keys are built with a few ATen ops, then one
fused flash-style pass per query block of csrc/cpu/lsg.cpp runs over [local keys, global keys, sparse keys]
with an online softmax (no (seq x keys) score matrix); the backward recomputes P from the saved lse and
returns the gradients of the compressed keys, which flow back through their construction with autograd.
"""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels.reference.lsg import extra_keys


def _real(q, key_padding_mask):
    if key_padding_mask is not None:
        return key_padding_mask
    return torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)


def forward(
    q, k, v, block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens, kpm, scale
):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with torch.no_grad():
        kx, vx, ok, starts = extra_keys(
            q, k, v, block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens,
            _real(q, kpm), scale,
        )  # fmt: skip
        return torch.ops.etkd_cpu.lsg_fwd(
            q, k, v, kx.contiguous(), vx.contiguous(), ok.contiguous(), starts, kpm,
            block_size, sparse_block_size, num_global_tokens, scale,
        )  # fmt: skip


def backward(
    grad_out, q, k, v, out, lse, block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens,
    kpm, scale,
):  # fmt: skip
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = num_global_tokens
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        kx, vx, ok, starts = extra_keys(
            *leaves, block_size, sparse_block_size, sparsity_factor, sparsity_type, g, _real(q, kpm), scale
        )
        dq, dk, dv, dkx, dvx = torch.ops.etkd_cpu.lsg_bwd(
            grad_out.contiguous(), q, k, v, out, lse, kx.detach().contiguous(), vx.detach().contiguous(),
            ok.contiguous(), starts, kpm, block_size, sparse_block_size, g, scale,
        )  # fmt: skip
        if kx.shape[2] > g:  # the compressed keys' gradients flow back through their construction
            gq, gk, gv = torch.autograd.grad(
                (kx[:, :, g:], vx[:, :, g:]), leaves, (dkx[:, :, g:], dvx[:, :, g:]), allow_unused=True
            )
            dq = dq if gq is None else dq + gq
            dk = dk if gk is None else dk + gk
            dv = dv if gv is None else dv + gv
    dk[:, :, :g] += dkx[:, :, :g]
    dv[:, :, :g] += dvx[:, :, :g]
    return dq, dk, dv
