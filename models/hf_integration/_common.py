"""What every patched HF attention module shares: options, head reshapes, and the checks that refuse a
configuration our ops would compute differently from HF."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etkd_kernels.dispatch import check_name


class UnsupportedConfigError(ValueError):
    """A model, config or call etkd cannot serve with exactly HF's result (raised instead of a different one)."""


@dataclass(frozen=True)
class Options:
    """How a patched module runs: the etkd backend, and whether training may skip attention-probability
    dropout (our ops have none, so by default a training-mode forward with dropout > 0 is refused)."""

    backend: str = "auto"
    ignore_attention_dropout: bool = False

    def __post_init__(self) -> None:
        check_name(self.backend)  # an unknown name fails here, at patch time
        if not isinstance(self.ignore_attention_dropout, bool):
            raise TypeError(
                f"ignore_attention_dropout: expected a bool, got {type(self.ignore_attention_dropout).__name__}"
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


def refuse_dropout(module: torch.nn.Module, p: float, options: Options, where: str) -> None:
    if module.training and p > 0 and not options.ignore_attention_dropout:
        raise UnsupportedConfigError(
            f"{where}: attention dropout p={p} in training mode; etkd's attention ops have no dropout on the "
            f"attention probabilities, so this step would differ from HF. Set config.attention_probs_dropout_prob=0 "
            f"before building the model, or patch with ignore_attention_dropout=True to train without it"
        )


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None, scale: float, backend: str
) -> torch.Tensor:
    """Dense softmax attention as HF's eager code computes it, padded query rows included.

    Real query rows run on `etkd_kernels.full_attention`; HF also attends from padded query rows (over the
    real keys; over all keys, uniformly, when a sequence has none), while our op returns zeros there: those
    rows are computed here with the same formula on the padded rows only (O(padded x seq))."""
    import etkd_kernels as ek

    out = ek.full_attention(q, k, v, key_padding_mask=real, scale=scale, backend=backend)
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
    padded_rows = torch.softmax(scores, dim=-1) @ v
    return out.scatter(2, index, torch.where(valid, padded_rows, out.gather(2, index)))
