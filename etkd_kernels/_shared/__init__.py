"""Math that the reference (the oracle) and the fused backends share, so no backend imports another's
internals: here the compute dtype, backward by recomputation and the attention-dropout RNG (Philox4x32-10 and
the keep-mask every backend reproduces bit for bit); a pattern's own shared math is the module of this package
named as its op (`etkd_kernels/_shared/<op>.py`, semantics in `etkd_kernels/reference/<op>.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The oracle computes in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recompute_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    grad_out: torch.Tensor,
    inputs: Sequence[torch.Tensor | None],
    *args,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `fn(*inputs, *args)[0]` (or of its only output) w.r.t. each non-None input.

    Runs with grad mode on and inference mode off: compiled graphs may call the backward op inside either.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves, *args)
        if isinstance(out, tuple):
            out = out[0]
        wrt = [t for t in leaves if t is not None]
        if out.requires_grad:
            grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
        else:  # the output does not depend on the inputs (e.g. a layout with no allowed block)
            grads = [None] * len(wrt)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
        else:
            g = next(it)
            res.append(torch.zeros_like(t) if g is None else g)
    return tuple(res)


# i and j are positions in the op's own [0, seq) coordinates; keys that are not sequence positions (pooled
# compressed keys, landmarks) get columns >= seq, defined in that pattern's reference module.

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's Philox4x32 multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and Weyl key bumps
_M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and a constant m < 2^32, without int64
    overflow: 16-bit halves, every partial product < 2^34."""
    ah, al = a >> 16, a & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    mid = ah * ml + al * mh
    t = al * ml + ((mid & 0xFFFF) << 16)
    return ah * mh + (mid >> 16) + (t >> 32), t & _M32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC11; Random123's `philox4x32`) of the counter words c0..c3 (int64 tensors,
    broadcastable, taken mod 2^32) under the key (k0, k1): four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = (torch.as_tensor(c).long() & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _M32, k1 & _M32
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _M32, (k1 + PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of the keep test (u16 >= threshold): floor(p * 65536), at most 65535."""
    return min(65535, int(p * 65536))


def dropout_scale(p: float) -> float:
    """What kept probabilities are multiplied by: 1 / (1 - p) in double (the kernels round it to float32)."""
    return 1.0 / (1.0 - p)


def dropout_keep(
    seed: int, offset: int, p: float, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Keep-mask (bool, the broadcast shape of bh, i, j) of the elements at batch-head index bh = b * H + h,
    query row i and key column j (int64 tensors; negative columns are never kept-tested meaningfully: callers
    only use entries that are real positions)."""
    r0, r1, r2, r3 = philox4x32_10(
        j >> 3, i, bh, torch.as_tensor(offset & _M32), seed & _M32, (seed >> 32) & _M32
    )
    sel = (j & 7) >> 1
    word = torch.where(sel < 2, torch.where(sel == 0, r0, r1), torch.where(sel == 2, r2, r3))
    u16 = (word >> ((j & 1) * 16)) & 0xFFFF
    return u16 >= dropout_threshold(p)


def batch_heads(b: int, h: int, device: torch.device) -> torch.Tensor:
    """(b, h, 1, 1) int64: the b * H + h index of the dropout counter."""
    return (torch.arange(b, device=device)[:, None] * h + torch.arange(h, device=device)[None, :])[
        ..., None, None
    ]


def apply_dropout(
    probs: torch.Tensor, p: float, seed: int, offset: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """probs with the dropped entries zeroed and the kept ones scaled by 1 / (1 - p); probs itself when p == 0.
    bh, i, j (int64, broadcastable to probs) give each entry's counter (see `dropout_keep`)."""
    if p == 0:
        return probs
    keep = dropout_keep(seed, offset, p, bh, i, j)
    return torch.where(
        keep, probs * dropout_scale(p), torch.zeros((), dtype=probs.dtype, device=probs.device)
    )
