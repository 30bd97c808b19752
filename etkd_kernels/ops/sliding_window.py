"""`sliding_window_attention`: Longformer's pattern (local band + global tokens), one public op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .._checks import check_positive_int, check_qkv, check_token_mask
from ._common import OpOptions, common_settings, public_op, run
from ._define import CommonParams, define

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(frozen=True)
class SlidingWindowParams(CommonParams):
    """What every backend's forward/backward gets besides the tensors (see `sliding_window_attention`)."""

    window: int
    global_mask: torch.Tensor | None
    qg: torch.Tensor | None = field(metadata={"grad": True})
    kg: torch.Tensor | None = field(metadata={"grad": True})
    vg: torch.Tensor | None = field(metadata={"grad": True})


_fwd_op = define("sliding_window", SlidingWindowParams)


@public_op()
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    global_mask: torch.Tensor | None = None,
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **options: Unpack[OpOptions],
) -> torch.Tensor:
    """Longformer attention: a local band of `window + 1` keys per query, plus global tokens.

    q, k, v: (batch, heads, seq, head_dim). window: HF's `attention_window`, even; query i sees key j
    when |i - j| <= window // 2. global_mask: (batch, seq) bool, True = global token: it attends to every
    key and every query attends to it. global_qkv: (qg, kg, vg), each like q: the separate projections HF
    uses for global query rows (scores qg_i . kg_j, values vg); without it global rows use q, k, v.
    key_padding_mask: (batch, seq) bool, True = real token. Returns (batch, heads, seq, head_dim); padded
    query rows are zeros.
    {dropout} Global rows'
    probabilities (with or without global_qkv) are dropped like the band's, as HF Longformer does.

    Plain-PyTorch meaning (O(seq^2) memory; the backends never build this):
        allowed = (i - j).abs() <= window // 2 | global_mask[:, None, None, :]        # (b, 1, s, s)
        s = scale * q @ k.T masked by allowed & key_padding_mask[:, None, None, :]
        out = softmax(s) @ v; rows i with global_mask[i] use softmax(scale * qg @ kg.T, masked by padding) @ vg
    """
    check_qkv(q, k, v)
    check_positive_int(window, "window", minimum=2)
    if window % 2:
        raise ValueError(
            f"window: expected an even int (HF attention_window; one side is window // 2), got {window}"
        )
    global_mask = check_token_mask(global_mask, "global_mask", q)
    qg = kg = vg = None
    if global_qkv is not None:
        if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3:
            raise TypeError("global_qkv: expected a tuple (qg, kg, vg) of tensors shaped like q")
        if global_mask is None:
            raise ValueError("global_qkv: given without global_mask, so no row would use it")
        qg, kg, vg = global_qkv
        check_qkv(qg, kg, vg, ("global_qkv[0]", "global_qkv[1]", "global_qkv[2]"))
        for name, t in (("global_qkv[0]", qg),):
            if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(
                    f"{name}: expected {tuple(q.shape)} {q.dtype} on {q.device} like q, "
                    f"got {tuple(t.shape)} {t.dtype} on {t.device}"
                )
        qg, kg, vg = qg.contiguous(), kg.contiguous(), vg.contiguous()
    common, backend = common_settings(
        q, k, v, options, **{"global_qkv[0]": qg, "global_qkv[1]": kg, "global_qkv[2]": vg}
    )
    return run(_fwd_op, q, k, v, SlidingWindowParams(window, global_mask, qg, kg, vg, **common), backend)
