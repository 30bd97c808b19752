"""What every patched HF attention module shares: options, head reshapes, and the checks that refuse a
configuration our ops would compute differently from HF."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from etkd_kernels.dispatch import check_name


class UnsupportedConfigError(ValueError):
    """A model, config or call etkd cannot serve with exactly HF's result (raised instead of a different one)."""


@dataclass(frozen=True)
class Options:
    """How a patched module runs: the etkd backend."""

    backend: str = "auto"

    def __post_init__(self) -> None:
        check_name(self.backend)  # an unknown name fails here, at patch time


def warn_ignore_attention_dropout(value: object, where: str, stacklevel: int = 3) -> None:
    """`ignore_attention_dropout` is a no-op since the ops apply attention dropout (issue 27); it is accepted,
    with this warning, for one release. stacklevel: of the user's call, counted from here."""
    if value is not None:
        warnings.warn(
            f"{where}: ignore_attention_dropout is deprecated and has no effect: etkd's ops apply attention "
            f"dropout like HF (the model's attention_probs_dropout_prob, in training mode); it will be removed "
            f"in the next release",
            DeprecationWarning,
            stacklevel=stacklevel,
        )


def options_of(module: torch.nn.Module) -> Options:
    """The module's own options (instance patch), else its class's (class-level patch)."""
    return module.__dict__.get("_etkd_options") or type(module).class_options


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def refuse_attention_weights(output_attentions: bool, where: str) -> None:
    """output_attentions asks for the (seq x window) probability tensors our fused ops never build."""
    if output_attentions or _collecting("attentions"):
        raise UnsupportedConfigError(
            f"{where}: output_attentions=True needs the attention probabilities, which etkd's fused ops never "
            f"materialise; call etkd.hf.unpatch(model) (or use the unpatched model) to get them"
        )


def _collecting(key: str) -> bool:
    """True when transformers 5's output recorder is collecting `key` for the current forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: output_attentions arrives as an argument instead
        return False
    collected = _active_collector.get()
    return collected is not None and key in collected


def padding_from_mask(attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
    """(batch, seq) bool, True = real key, from the mask HF hands an attention module: None, a 2D 0/1 mask,
    or a 4D (batch, 1, q, seq) bool (True = attend) or additive float (0 = attend) mask whose rows all agree
    (a padding mask; anything else is not a key-padding pattern and is refused)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 2:
        return m.bool() if m.dtype == torch.bool else m > 0
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[-1] != seq:
        raise UnsupportedConfigError(
            f"attention_mask: expected None, (batch, seq) or (batch, 1, q, {seq}), got {tuple(m.shape)}"
        )
    keep = m if m.dtype == torch.bool else m == 0
    if m.shape[2] > 1 and not bool((keep == keep[:, :, :1]).all()):
        raise UnsupportedConfigError(
            "attention_mask: a 4D mask that differs between query rows is not a key-padding mask; etkd's ops "
            "take padding (and their own pattern) only"
        )
    return keep[:, 0, 0, :]


def full_attention_hf_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    real: torch.Tensor | None,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense softmax attention as HF's eager code computes it, padded query rows included, with dropout
    `dropout_p` on the probabilities (as HF's eager attention applies it; the caller passes 0 in eval mode).

    Real query rows run on `etkd_kernels.full_attention`; HF also attends from padded query rows (over the
    real keys; over all keys, uniformly, when a sequence has none), while our op returns zeros there: those
    rows are computed here with the same formula on the padded rows only (O(padded x seq))."""
    import etkd_kernels as ek

    out = ek.full_attention(q, k, v, key_padding_mask=real, scale=scale, dropout_p=dropout_p, backend=backend)
    if real is None:
        return out
    pad = ~real
    n = int(pad.sum(1).max())
    if n == 0:
        return out
    b, h, s, d = q.shape
    rows = torch.sort(pad.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]  # (b, n)
    valid = pad.gather(1, rows)[:, None, :, None]
    index = rows[:, None, :, None].expand(b, h, n, d)
    scores = (q.gather(2, index) @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.nn.functional.dropout(torch.softmax(scores, dim=-1), dropout_p)  # (b, h, n, s)
    padded_rows = probs @ v
    return out.scatter(2, index, torch.where(valid, padded_rows, out.gather(2, index)))
