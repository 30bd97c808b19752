"""`lsg_attention`: Local + Sparse + Global attention (Condevaux & Harispe, LSG)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .._checks import check_positive_int, check_qkv
from .._shared.lsg import VARIANTS, lead_tokens
from ._common import OpOptions, common_settings, public_op, run
from ._define import CommonParams, define

if TYPE_CHECKING:
    from typing_extensions import Unpack

SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling")


@dataclass(frozen=True)
class LSGParams(CommonParams):
    """What every backend's forward/backward gets besides the tensors (see `lsg_attention`)."""

    block_size: int
    sparse_block_size: int
    sparsity_factor: int
    sparsity_type: str
    num_global_tokens: int
    variant: str = "layer"


_fwd_op = define("lsg", LSGParams)


@public_op("key column j")
def lsg_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    sparse_block_size: int = 128,
    sparsity_factor: int = 2,
    sparsity_type: str = "pooling",
    num_global_tokens: int = 1,
    variant: str = "layer",
    **options: Unpack[OpOptions],
) -> torch.Tensor:
    """LSG attention: each query block sees its own and the neighbouring key blocks (local), a compressed
    view of the keys around them (sparse: `sparsity_type` norm / pooling / stride / block_stride /
    bos_pooling by `sparsity_factor`, `sparse_block_size` compressed tokens each side), and the first
    `num_global_tokens` positions (global, which also attend to every key). Equals lsg-converter's
    `LSGSelfAttention` (num_global_tokens=1, sparse_block_size=block_size) on the real query rows.

    q, k, v: (batch, heads, seq, head_dim); a seq that is not a multiple of block_size is padded inside.
    key_padding_mask: (batch, seq) bool, True = real token. Returns (batch, heads, seq, head_dim).
    The exact key set of each query is defined by `etkd_kernels.reference.lsg`.
    {dropout} Compressed (sparse) keys have
    columns >= seq (`etkd_kernels.reference.lsg`), so they draw their own bits.

    variant: "layer" (above: lsg-converter's `attention_layers` LSGSelfAttention, blocks counted from token 0)
    or "model" (the attention inside lsg-converter's model files, `LSGRobertaModel` & co.: the first
    `num_global_tokens` positions are prepended global tokens, blocks, sparse keys and LSG's switch to full
    attention up to two blocks count the tokens after them, an empty pooled group is not attended, norm ranks
    keys in chunks of min(block_size, sparse_block_size), and bos_pooling pools by the first non-global query
    and gives padded non-global query rows what a real row of their block gets, not zeros: lsg-converter's
    model computes them, and a later layer's bos_pooling pools groups of padding from their hidden states).
    """
    check_qkv(q, k, v)
    check_positive_int(block_size, "block_size")
    check_positive_int(sparse_block_size, "sparse_block_size", minimum=0)
    check_positive_int(sparsity_factor, "sparsity_factor")
    check_positive_int(num_global_tokens, "num_global_tokens", minimum=0)
    if sparsity_type not in SPARSITY_TYPES:
        raise ValueError(f"sparsity_type: expected one of {SPARSITY_TYPES}, got {sparsity_type!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if variant == "model" and sparsity_type == "norm" and 0 < sparse_block_size < block_size:
        if block_size % sparse_block_size or sparse_block_size % sparsity_factor:
            # lsg-converter's model reshapes the keys into chunks of sparse_block_size, keeping
            # sparse_block_size // sparsity_factor of each: other sizes fail there for most lengths.
            raise ValueError(
                f"sparse_block_size: norm ranks key norms in chunks of sparse_block_size < block_size, so "
                f"expected a divisor of block_size ({block_size}) and a multiple of sparsity_factor "
                f"({sparsity_factor}), got {sparse_block_size}"
            )
    if sparsity_type != "none" and sparse_block_size > 0 and block_size % sparsity_factor:
        raise ValueError(
            f"sparsity_factor: expected a divisor of block_size ({block_size}) for sparse keys, got {sparsity_factor}"
        )
    if sparsity_type == "bos_pooling" and num_global_tokens < 1:
        raise ValueError(
            "num_global_tokens: bos_pooling pools with the first (global) query's scores, needs >= 1"
        )
    if q.shape[2] and num_global_tokens > q.shape[2]:  # seq 0 gives an empty result
        raise ValueError(f"num_global_tokens: expected at most seq ({q.shape[2]}), got {num_global_tokens}")
    common, backend = common_settings(q, k, v, options)
    g = lead = num_global_tokens
    if variant == "model" and q.shape[2]:
        # Globals in leading blocks of their own (non-real filler), blocks counted after them; LSG's model
        # runs full attention, which local + global then is, up to two blocks of non-global tokens.
        lead = lead_tokens(g, block_size, variant)
        if -(-(q.shape[2] - g) // block_size) <= 2:
            sparsity_type = "none"
    p = LSGParams(block_size, sparse_block_size, sparsity_factor, sparsity_type, g, variant, **common)
    if lead > g:
        b, h, s0, d = q.shape
        fill = q.new_zeros(b, h, lead - g, d)
        q, k, v = (torch.cat([t[:, :, :g], fill, t[:, :, g:]], dim=2) for t in (q, k, v))
        real = p.key_padding_mask if p.key_padding_mask is not None else q.new_ones(b, s0, dtype=torch.bool)
        kpm = torch.cat([real[:, :g], real.new_zeros(b, lead - g), real[:, g:]], dim=1)
        out = run(_fwd_op, q, k, v, replace(p, key_padding_mask=kpm), backend, multiple=block_size)
        return torch.cat([out[:, :, :g], out[:, :, lead:]], dim=2)
    return run(_fwd_op, q, k, v, p, backend, multiple=block_size)
