"""etkd's patterns as transformers 5 `attn_implementation` names, for models built on `AttentionInterface`
(BERT, RoBERTa, and the other encoders whose self-attention calls `ALL_ATTENTION_FUNCTIONS`).

    import etkd.hf                                              # registers the names
    model = AutoModel.from_pretrained(path, attn_implementation="etkd_sliding_window")
    out = model(ids, attention_mask=mask, global_attention_mask=glob)   # glob: (batch, seq), 1 = global

A model whose `config.etkd_attention` names one of them under "attn_implementation" (what `etkd convert
--format hf-attention` writes, kept when transformers re-saves the checkpoint) runs it when loaded without an
explicit `attn_implementation=` (`register_attention_implementations` hooks transformers' default choice).

Settings come from `config.etkd_attention` (a dict saved in config.json; `etkd convert --format hf-attention`
writes it): the keys of each pattern's `hf_settings` (its `hf_attention` documents them,
models/patterns/<name>.py); a list value is one per layer (`ignore_attention_dropout` is deprecated and has
no effect). Extra keyword arguments reach the attention function as HF passes them (e.g.
`model(..., global_attention_mask=...)` for the sliding window's global tokens). The `dropout` HF passes (the
model's attention_probs_dropout_prob in training mode, 0 in eval) is applied to the probabilities inside the
op, as HF's eager attention applies it.

Each name also registers a mask function that hands the attention the (batch, seq) padding mask instead of
a (batch, 1, seq, seq) tensor. Padded query rows: zeros for the sparse patterns (as HF's own sparse
models give); `etkd_full` computes them as HF's eager/sdpa code does, so it equals HF everywhere.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from etkd.models.hf import hf_attention_request
from etkd.models.patterns import HF_CONFIG_KEY, PATTERNS

# HF's linear layers under bf16 on a CPU whose bf16 GEMMs are slow are not ours to route: told once
from etkd.models.precision import note_hf_linears

from ._common import (
    UnsupportedConfigError,
    _collecting,
    full_attention_hf_rows,
    warn_ignore_attention_dropout,
)

CONFIG_KEY = HF_CONFIG_KEY


def _settings(module: torch.nn.Module, name: str, required: tuple[str, ...]) -> dict:
    cfg = getattr(module.config, CONFIG_KEY, None) or {}
    if not isinstance(cfg, dict):
        raise TypeError(f"config.{CONFIG_KEY}: expected a dict of settings, got {type(cfg).__name__}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise UnsupportedConfigError(
            f"attn_implementation={name!r} needs config.{CONFIG_KEY}[{missing[0]!r}] "
            f"(set config.{CONFIG_KEY} = {{{', '.join(repr(k) + ': ...' for k in required)}}} or convert "
            f"with `etkd convert --format hf-attention`)"
        )
    return cfg


def _checks(name: str, module, query, key, attention_mask, cfg: dict, kwargs: dict) -> None:
    if query.shape[2] != key.shape[2]:
        raise UnsupportedConfigError(
            f"{name}: query length {query.shape[2]} != key length {key.shape[2]} (a cache or cross-attention); "
            f"etkd's patterns are encoder self-attention"
        )
    if getattr(module, "is_causal", False):
        raise UnsupportedConfigError(f"{name}: causal (decoder) attention is not an etkd pattern")
    warn_ignore_attention_dropout(cfg.get("ignore_attention_dropout"), f"config.{CONFIG_KEY}", stacklevel=4)
    if kwargs.get("output_attentions") or _collecting("attentions"):
        raise UnsupportedConfigError(
            f"{name}: output_attentions=True needs attention probabilities, which etkd's ops never build"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise UnsupportedConfigError(
            f"{name}: expected the (batch, seq) padding mask from etkd's mask function, got a "
            f"{attention_mask.dim()}D mask (a custom 4D mask cannot be served)"
        )


def _layer_value(value, module, key: str):
    if isinstance(value, (list, tuple)):
        layer = getattr(module, "layer_idx", None)
        if layer is None or not 0 <= layer < len(value):
            raise UnsupportedConfigError(
                f"config.{CONFIG_KEY}[{key!r}]: a per-layer list needs the module's layer_idx, got {layer}"
            )
        return value[layer]
    return value


def _heads_out(out: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim), what HF's attention functions return."""
    return out.transpose(1, 2).contiguous()


IMPLEMENTATIONS: dict[str, Callable] = {}


def _implementation(name: str, required: tuple[str, ...] = ()):
    """Register `op(module, query, key, value, cfg, kwargs, common)` as the attention function `name`: the
    settings and checks every name shares run first; `common` holds the padding mask, scale and backend
    keywords of the etkd op (and `dropout_p`, HF's `dropout`); the (batch, heads, seq, head_dim) result goes
    back in HF's layout."""

    def register(op: Callable) -> Callable:
        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            cfg = _settings(module, name, required)
            _checks(name, module, query, key, attention_mask, cfg, kwargs)
            note_hf_linears(module, query)  # HF's q/k/v/o GEMMs around this call
            cfg = {k: _layer_value(v, module, k) for k, v in cfg.items()}
            common = dict(
                key_padding_mask=attention_mask, scale=scaling, dropout_p=float(dropout),
                backend=cfg.get("backend", "auto"),
            )  # fmt: skip
            return _heads_out(op(module, query, key, value, cfg, kwargs, common)), None

        IMPLEMENTATIONS[name] = attention
        return attention

    return register


def _register_patterns() -> None:
    """Every registered pattern's `hf_attention` under its `hf_name` (models/patterns/<name>.py)."""
    for p in PATTERNS.values():
        if p.hf_name is not None and p.hf_attention is not None:
            _implementation(p.hf_name, p.hf_required)(p.hf_attention)


_register_patterns()


@_implementation("etkd_full")
def full(module, query, key, value, cfg, kwargs, common):
    scale = query.shape[-1] ** -0.5 if common["scale"] is None else common["scale"]
    return full_attention_hf_rows(
        query, key, value, common["key_padding_mask"], scale, common["backend"], common["dropout_p"]
    )


def padding_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    **kwargs,
):
    """Mask function for the etkd names: the (batch, seq) bool padding mask (None without padding)."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not bidirectional_mask_function:
        raise UnsupportedConfigError(
            f"etkd attention: the model asks for a mask other than bidirectional padding ({mask_function}); "
            f"etkd's patterns serve encoder self-attention"
        )
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


_told_unknown: set[str] = set()


def requested_by_checkpoint(config) -> str | None:
    """The etkd name a model's config asks for (`config.etkd_attention["attn_implementation"]`) when nothing
    else chose one, None when it asks for none. A name this etkd does not register is said once, loudly: the
    model then runs transformers' default (full) attention."""
    name, _ = hf_attention_request(config)
    if name is None or name in IMPLEMENTATIONS:
        return name
    if name not in _told_unknown:
        _told_unknown.add(name)
        warnings.warn(
            f"etkd.hf: this checkpoint's config.{CONFIG_KEY} asks for attn_implementation {name!r}, which this "
            f"etkd does not register ({sorted(IMPLEMENTATIONS)}), so the model runs transformers' default full "
            f"attention instead; install the etkd that wrote it, or pass attn_implementation= one of those",
            stacklevel=2,
        )
    return None


def _checkpoint_default(get_correct: Callable) -> Callable:
    """transformers' `get_correct_attn_implementation` (which turns "nothing requested" into sdpa), first
    taking the etkd name the checkpoint's config asks for: transformers' own `save_pretrained` drops the
    top-level `attn_implementation`, so without this a re-saved `--format hf-attention` checkpoint would run
    full attention silently. An explicit `attn_implementation=` still wins."""

    @functools.wraps(get_correct)
    def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
        if requested_attention is None:
            requested_attention = requested_by_checkpoint(self.config)
        return get_correct(self, requested_attention, is_init_check)

    get_correct_attn_implementation.etkd_original = get_correct
    return get_correct_attn_implementation


def register_attention_implementations() -> None:
    """Register every name in `IMPLEMENTATIONS` with transformers' AttentionInterface and mask interface, and
    make a model whose config asks for one of them (`config.etkd_attention`) run it when loaded without an
    explicit `attn_implementation=` (`_checkpoint_default`)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask)
    current = getattr(PreTrainedModel, "get_correct_attn_implementation", None)
    if (
        current is None
    ):  # a transformers that moved its default choice elsewhere: say what is lost, keep working
        warnings.warn(
            "etkd.hf: this transformers has no PreTrainedModel.get_correct_attn_implementation, so a checkpoint whose "
            f"config.{CONFIG_KEY} names an etkd attention runs transformers' default (full) attention unless loaded "
            "with attn_implementation= that name (etkd.models.load still restores it)",
            stacklevel=2,
        )
    elif not hasattr(current, "etkd_original"):
        PreTrainedModel.get_correct_attn_implementation = _checkpoint_default(current)
