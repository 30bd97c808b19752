"""Reference Nystromformer attention: the definition of the pattern, in O(seq * num_landmarks) memory.

It is the core of HF `NystromformerSelfAttention` (everything up to, not including, its optional depthwise
conv term `conv(v)`), with the same landmarks, kernels and Newton-Schulz pseudo-inverse:

    q~, k~  = segment means of q, k (one landmark per contiguous segment of the sequence)
    K1 = softmax(s q  k~^T)   (seq, L)        K2 = softmax(s q~ k~^T)   (L, L)
    K3 = softmax(s q~ k^T)    (L, seq), padded keys masked
    out = K1 @ pinv(K2) @ (K3 @ v)

Choices, and where they differ from HF:
- Segments. seq is cut into segments of c = ceil(seq / L) tokens, the last one shorter when L does not
  divide seq; each landmark is the mean over the tokens its segment holds. When L divides seq this is HF's
  `reshape(..., L, seq // L, d).mean(-2)` (HF cannot run that case at all). With c tokens per segment only
  ceil(seq / c) segments are non-empty, which can be fewer than L (seq=10, L=6: c=2, 5 landmarks); the
  empty ones are dropped (identical to keeping them as masked landmarks: their K2 rows/columns would be
  zero and Newton-Schulz keeps them zero).
- Key padding follows HF exactly: only K3 masks padded keys; the landmark means include padded positions
  (their q/k rows are whatever the caller passes) and K1/K2 are unmasked. Padded query rows of the output
  are then set to zero (HF leaves values there); real rows are HF's.
- Scale. HF multiplies q and k each by d^-1/4 before every product; we multiply each product by `scale`
  (d^-1/2 by default). Means and products are linear, so this is the same function; the two differ only by
  rounding (~1e-7 relative in fp32, see tests/test_nystrom.py).
- pinv. HF's `iterative_inv`: Z0 = K2^T / max_j sum_i K2[i, j], then `pinv_iterations` steps of
  Z <- Z/4 (13 I - K2 Z (15 I - K2 Z (7 I - K2 Z))). `pinv_init="hf_global"` takes that max over the whole
  (batch, heads, L, L) tensor, as HF does (so a batch row's output depends on the other rows);
  `"per_head"` takes it per (batch, head) matrix, so every batch row is independent of the others.
- num_landmarks == seq is exact softmax attention (HF special-cases it too), keys masked by padding.
- Dropout. HF's NystromformerSelfAttention never applies its `self.dropout` (attention_probs_dropout_prob),
  so HF trains Nystromformer without attention dropout. Here dropout_p > 0 drops entries of K1 (query row i,
  landmark l: column seq + l of `etkd_kernels._shared.dropout_keep`), each query's probabilities over the
  landmarks, the analogue of attention probabilities; in the exact case, the probabilities (key columns).

Everything is computed in fp32 (fp64 for fp64 inputs) and cast back; no seq x seq tensor is formed except
in the exact num_landmarks == seq case.
"""

from __future__ import annotations

import torch

from .._shared import apply_dropout, batch_heads, compute_dtype, recompute_backward
from .._shared.nystrom import iterative_pinv, segment_means
from . import full
from ._softmax import masked_softmax

__all__ = ["attend", "backward", "check_call", "check_case", "forward", "iterative_pinv", "segment_means"]


def attend(
    q,
    k,
    v,
    num_landmarks,
    pinv_iterations,
    key_padding_mask,
    scale,
    pinv_init,
    dropout_p=0.0,
    seed=0,
    offset=0,
):
    b, h, s, d = q.shape
    if num_landmarks == s:
        return full.attend(q, k, v, key_padding_mask, scale, dropout_p, seed, offset)[0]
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = (t.to(ct) for t in (q, k, v))
    ql, kl = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
    k1 = torch.softmax((q @ kl.transpose(-1, -2)) * scale, dim=-1)  # (b, h, s, L)
    if dropout_p:
        pos = torch.arange(s, device=q.device)
        lm = s + torch.arange(k1.shape[-1], device=q.device)
        k1 = apply_dropout(k1, dropout_p, seed, offset, batch_heads(b, h, q.device), pos[:, None], lm)
    k2 = torch.softmax((ql @ kl.transpose(-1, -2)) * scale, dim=-1)  # (b, h, L, L)
    kmask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    k3, _ = masked_softmax((ql @ k.transpose(-1, -2)) * scale, kmask)  # (b, h, L, s)
    # K1 @ (Z @ (K3 @ v)): the (L, d) products first, never a (seq, L) x (L, L) one.
    out = k1 @ (iterative_pinv(k2, pinv_iterations, pinv_init) @ (k3 @ v))
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[:, None, :, None], out, torch.zeros_like(out))
    return out.to(out_dtype)


def forward(q, k, v, p):
    return attend(q, k, v, *_settings(p))


def backward(grad_out, q, k, v, out, p):
    return recompute_backward(attend, grad_out, (q, k, v), *_settings(p))


def _settings(p):
    """The op's settings in `attend`'s order."""
    return (
        p.num_landmarks, p.pinv_iterations, p.key_padding_mask, p.scale, p.pinv_init, p.dropout_p, p.seed,
        p.offset,
    )  # fmt: skip


def check_case(b: int, s: int, block: int, device) -> tuple[int, dict]:
    """The case `etkd_kernels.gpu_check` checks this op on, batch `b`, length `s` (`block`: its tile-sized
    setting): (how many tensor inputs take gradients, keyword arguments besides the padding mask)."""
    return 3, {"num_landmarks": max(s // 16, 2)}


def check_call(q, k, v, *, backend, num_landmarks, **kw):
    """This op's public call on `check_case`'s inputs (`etkd_kernels.gpu_check`)."""
    from ..ops.nystrom import nystrom_attention

    return nystrom_attention(q, k, v, num_landmarks, backend=backend, **kw)
