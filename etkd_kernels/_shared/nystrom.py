"""Nystromformer's landmarks and pseudo-inverse, shared by the reference and the fused backends (semantics in
`etkd_kernels/reference/nystrom.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_means(x: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """x (b, h, s, d) -> (b, h, L', d): means over contiguous segments of ceil(s / L) tokens.

    L' = ceil(s / ceil(s / L)) (= L when L divides s); the last segment may be shorter.
    """
    b, h, s, d = x.shape
    c = -(-s // num_landmarks)
    n = -(-s // c)
    if n * c == s:
        # HF's exact expression (same rounding) when the segments tile the sequence.
        return x.reshape(b, h, n, c, d).mean(dim=-2)
    sums = F.pad(x, (0, 0, 0, n * c - s)).reshape(b, h, n, c, d).sum(dim=-2)
    counts = torch.full((n, 1), float(c), dtype=x.dtype, device=x.device)
    counts[-1] = s - (n - 1) * c
    return sums / counts


def iterative_pinv(m: torch.Tensor, iterations: int, pinv_init: str) -> torch.Tensor:
    """HF's Newton-Schulz pseudo-inverse of the row-stochastic (b, h, L, L) matrices `m`."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    col_sums = m.sum(dim=-2)  # (b, h, L); softmax rows make ||m||_inf = 1, so this is ||m||_1's column sums
    if pinv_init == "hf_global":
        coeff = 1 / col_sums.max()
    else:
        coeff = 1 / col_sums.amax(dim=-1)[..., None, None]
    z = coeff * m.transpose(-1, -2)
    for _ in range(iterations):
        mz = m @ z
        # Same association and constants as HF so fp32 rounding matches as closely as possible.
        z = (0.25 * z) @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z


# --- Attention dropout -------------------------------------------------------------------------------------
# The keep-mask of element (batch b, head h, query row i, key column j) is a pure function of (seed, offset, p,
# b * H + h, i, j), so a backward regenerates it, and no backend's tiling or thread count can change it:
#   key     = (seed & 0xFFFFFFFF, seed >> 32)                   seed in [0, 2^63)
#   counter = (j >> 3, i, b * H + h, offset & 0xFFFFFFFF)       H = heads of q
#   r       = Philox4x32-10(counter, key)                       one call covers 8 consecutive key columns
#   u16     = (r[(j & 7) >> 1] >> (16 * (j & 1))) & 0xFFFF
#   keep    = u16 >= min(65535, floor(p * 65536))
# p is thereby resolved to multiples of 1/65536 (FlashAttention resolves it to 1/256), and kept probabilities
# are multiplied by 1 / (1 - p) (computed in double, applied in float32), as torch.nn.functional.dropout does.
