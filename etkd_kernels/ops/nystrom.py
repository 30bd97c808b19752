"""`nystrom_attention`: Nystromformer's landmark approximation of softmax attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._checks import check_positive_int, check_qkv
from ._common import OpOptions, common_settings, public_op, run
from ._define import CommonParams, define

if TYPE_CHECKING:
    from typing_extensions import Unpack

PINV_INITS = ("per_head", "hf_global")


@dataclass(frozen=True)
class NystromParams(CommonParams):
    """What every backend's forward/backward gets besides the tensors (see `nystrom_attention`)."""

    num_landmarks: int
    pinv_iterations: int
    pinv_init: str
    # Whether the caller will differentiate the result (grad mode on and an input requiring grad, decided before the
    # op, so a traced graph sees the same value): the cpu backend then keeps K1 and K3 for its backward
    # (etkd_kernels/cpu/nystrom.py: kept); the other backends ignore it.
    for_backward: bool = False


# saved_revision 1: the cpu backend's `saved` gained K3's log-sum-exp per landmark (etkd_kernels/cpu/nystrom.py);
# 2: and K1, K3 where the cpu backend keeps them (etkd_kernels/cpu/nystrom.py: kept; the for_backward setting).
_fwd_op = define("nystrom", NystromParams, lse=False, saved=True, saved_revision=2)


@public_op("key column j")
def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_landmarks: int,
    *,
    pinv_iterations: int = 6,
    pinv_init: str = "per_head",
    **options: Unpack[OpOptions],
) -> torch.Tensor:
    """Nystromformer attention with `num_landmarks` segment-mean landmarks and an iterative pseudo-inverse.

    q, k, v: (batch, heads, seq, head_dim). The sequence is cut into `num_landmarks` contiguous segments
    of ceil(seq / num_landmarks) tokens (the last one shorter; when that leaves segments empty, e.g. seq 10
    with 6 landmarks, the empty ones are dropped); landmarks are segment means. With
    K1 = softmax(s q k~^T), K2 = softmax(s q~ k~^T), K3 = softmax(s q~ k^T) (keys masked by padding):
    out = K1 @ pinv(K2) @ (K3 @ v), pinv by `pinv_iterations` Newton-Schulz steps. pinv_init:
    "per_head" scales the initial inverse per (batch, head); "hf_global" uses one max over the whole batch
    and all heads, as HF `NystromformerSelfAttention` does (its outputs then depend on the other batch rows).
    When num_landmarks == seq the op is exact softmax attention. Padded query rows are zeros.
    {dropout}
    Where: HF's NystromformerSelfAttention builds `self.dropout` from attention_probs_dropout_prob but never
    applies it (transformers 5.25, modeling_nystromformer.py), so HF Nystromformer trains without attention
    dropout; pass dropout_p=0 to match it. Here dropout_p drops entries of K1 (each query's probabilities over
    the landmarks, columns seq + landmark), and of the probabilities when num_landmarks == seq; K2 and K3 (the
    landmark rows) are never dropped.
    """
    check_qkv(q, k, v)
    check_positive_int(num_landmarks, "num_landmarks")
    check_positive_int(pinv_iterations, "pinv_iterations", minimum=0)
    if pinv_init not in PINV_INITS:
        raise ValueError(f"pinv_init: expected one of {PINV_INITS}, got {pinv_init!r}")
    if q.shape[2] and num_landmarks > q.shape[2]:  # seq 0 gives an empty result whatever the count
        raise ValueError(f"num_landmarks: expected at most seq ({q.shape[2]}), got {num_landmarks}")
    # the NaN/Inf check once the backend is known: the cpu kernel makes it in its own passes over q, k, v
    common, backend = common_settings(q, k, v, options, defer_finite=True)
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    params = NystromParams(num_landmarks, pinv_iterations, pinv_init, for_backward, **common)
    return run(_fwd_op, q, k, v, params, backend, finite=dict(q=q, k=k, v=v))
