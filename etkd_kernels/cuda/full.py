"""`full` on CUDA tensors: torch's own fused attention (the memory-efficient SDPA kernel, which takes an
additive mask and returns the log-sum-exp), with etkd's padding convention on top (padded query rows zero,
lse +inf). It needs no compiled etkd extension, so `auto` picks it on every CUDA build of torch.

Forward: `aten._scaled_dot_product_efficient_attention` (fp32/fp16/bf16, any head_dim SDPA takes).
Backward: autograd through the public `F.scaled_dot_product_attention` (torch picks FlashAttention-2 or the
memory-efficient kernel; one extra forward, no seq x seq tensor). Never run on a GPU here: the GPU acceptance
run (`python -m etkd_kernels.gpu_check`) checks it against the fp32 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._shared import recompute_backward

_ALIGN = 16  # the memory-efficient kernel reads the mask's last dim in 16-element rows


def _bias(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Additive (batch, heads, seq, seq) mask, a stride-0 expansion of one (batch, seq) row per batch.

    A batch row with no real key at all would be all -inf (NaN); it sees every key instead: its queries are
    all padding, so their outputs are zeroed afterwards and carry no gradient.
    """
    if key_padding_mask is None:
        return None
    b, h, s, _ = q.shape
    keys = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    bias = torch.where(keys, zero, float("-inf"))
    pad = (-s) % _ALIGN  # as SDPA's own front end does: an aligned row, viewed back to seq
    bias = F.pad(bias, (0, pad))[:, :s] if pad else bias
    return bias[:, None, None, :].expand(b, h, s, s)


def _sdpa(q, k, v, key_padding_mask, scale):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias(key_padding_mask, q), scale=scale)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None]
    return out


def forward(q, k, v, p):
    key_padding_mask, scale = p.key_padding_mask, p.scale
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _bias(key_padding_mask, q), True, 0.0, False, scale=scale
    )
    lse = lse[..., : q.shape[2]].float()  # the kernel pads its lse rows to a multiple of 32
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        out = out * real[..., None]
        lse = torch.where(real, lse, torch.full_like(lse, float("inf")))
    return out, lse


def backward(grad_out, q, k, v, out, lse, p):
    return recompute_backward(_sdpa, grad_out, (q, k, v), p.key_padding_mask, p.scale)
