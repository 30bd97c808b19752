"""`cpu` dense attention: ATen's fused flash-attention CPU kernel (forward and backward), with etkd's
padding convention on top (padded query rows zero, lse +inf); with attention dropout (dropout_p > 0) etkd's tile
driver in one dense pass (`full_fwd` / `full_bwd` of csrc/cpu/full.cpp): ATen's kernel draws its mask from torch's
RNG, not from the Philox contract of etkd_kernels/_shared/ that `reference` and the backward regenerate."""

from __future__ import annotations

import torch

from etkd_kernels import _C  # noqa: F401  (registers torch.ops.etkd_cpu)
from etkd_kernels.cpu import note_tile_path

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _mask(key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive (batch, 1, 1, seq) mask in q's dtype (the ATen kernel takes no bool mask)."""
    if key_padding_mask is None:
        return None
    # A batch row with no real key at all would give the kernel an all-masked row (NaN); let it see every
    # key instead: its queries are all padding, so their outputs are zeroed and their gradients are zero.
    keys = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(keys, zero, float("-inf"))[:, None, None, :]


def forward(q, k, v, p):
    key_padding_mask, scale = p.key_padding_mask, p.scale
    if p.dropout_p:
        note_tile_path("full", q)
        return torch.ops.etkd_cpu.full_fwd(q, k, v, key_padding_mask, scale, p.dropout_p, p.seed, p.offset)
    out, lse = _fwd(q, k, v, 0.0, False, attn_mask=_mask(key_padding_mask, q.dtype), scale=scale)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        out = out * real[..., None]
        lse = torch.where(real, lse, torch.full_like(lse, float("inf")))
    return out, lse.float()


def backward(grad_out, q, k, v, out, lse, p):
    key_padding_mask, scale = p.key_padding_mask, p.scale
    if p.dropout_p:
        return tuple(
            torch.ops.etkd_cpu.full_bwd(
                grad_out.contiguous(),
                q,
                k,
                v,
                out,
                lse,
                key_padding_mask,
                scale,
                p.dropout_p,
                p.seed,
                p.offset,
            )
        )
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        grad_out = grad_out * real[..., None]
        lse = torch.where(real, lse, torch.zeros_like(lse))  # finite: those rows carry no gradient
    dq, dk, dv = _bwd(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=_mask(key_padding_mask, q.dtype), scale=scale
    )
    return dq, dk, dv
