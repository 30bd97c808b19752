"""The pattern registry: one record per attention pattern, read by everything that names patterns.

Each pattern is one module of this package (`models/patterns/<name>.py`) holding everything model-side about
it: its model adapter, its `Pattern` record (`register(Pattern(...))`) and what its HF integration reads.
Importing the package imports every module in it (`pkgutil`), so this file names none of them.

`EncoderConfig.attention` and the CLI choices (`etkd convert --to`, `etkd distill --student-attention`) are
the registry's names; the encoder's attention layer takes the record's model adapter; `etkd.hf`'s export
(`--format hf-attention`) writes the record's `attn_implementation` name and settings; `etkd bench` and the
benchmarks read its op and label. A new pattern is its kernel-side files (an op in `etkd_kernels`, or a
block layout for `block_sparse`) and one module here (ARCHITECTURE.md).

Every adapter has the signature

    fn(attn, x, q, k, v, key_padding_mask, global_mask, backend) -> (batch, heads, seq, head_dim)

attn: the `SelfAttention` module (its config and any extra projections); x: (batch, seq, hidden)
hidden states; q, k, v: (batch, heads, seq, head_dim); key_padding_mask / global_mask: (batch, seq) bool or
None; backend: the model's kernel backend name.

Attention dropout (`attn.dropout_p`: the config's attention_dropout in training mode, else 0) is passed to
the op exactly where the HF model of the pattern applies it, on the probabilities (each module says where).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT = "full"  # `EncoderConfig.attention`'s default, listed first


@dataclass(frozen=True)
class Option:
    """A setting `etkd convert` (and `etkd distill`'s student conversion) takes as a flag: `--<name>` with the
    default of `convert`'s keyword of that name."""

    help: str
    choices: tuple | None = None
    type: type | None = None  # the flag's type when the default (None) does not say it


@dataclass(frozen=True)
class Pattern:
    """Everything etkd knows about one attention pattern.

    name:        `EncoderConfig.attention` value and CLI choice
    op:          the `etkd_kernels` op that computes it (a name in `etkd_kernels.dispatch.OPS`)
    adapter:     the model adapter, `fn(attn, x, q, k, v, key_padding_mask, global_mask, backend)` (above)
    settings:    the `EncoderConfig` fields the pattern reads (its settings; defaults in `EncoderConfig`)
    hf_name:     the transformers `attn_implementation` name that runs it in BERT/RoBERTa classes (`etkd.hf`),
                 None when there is none
    hf_settings: `config.etkd_attention` key -> `EncoderConfig` field, what the export writes for `hf_name`
    label:       the benchmark label, `str.format`-ed with the benchmark's sizes (`benchmarks.providers`)
    hf_model_type: the transformers model_type whose own classes run it (`to_hf`, `etkd bench`'s HF rows);
                 "" for full attention (the checkpoint's own BERT/RoBERTa family), None when there is none
    hf_unsupported: `fn(config) -> str | None`, why a model of this pattern cannot be written as a BERT/RoBERTa
                 class running `hf_name` (`--format hf-attention`), None when it can
    hf_attention: the body of the `hf_name` attention function, `fn(module, query, key, value, settings,
                 kwargs, common)` (`etkd.hf.attention_interface` wraps it: `settings` is `config.etkd_attention`
                 with per-layer lists resolved, `common` the op's padding mask, scale, dropout and backend
                 keywords) -> (batch, heads, seq, head_dim)
    hf_required: the `config.etkd_attention` keys `hf_attention` cannot do without
    save_format: the `save_pretrained(format=...)` that writes this pattern when no transformers class can
    save_format_help: what that format is (the `etkd convert --format` help)
    options:     `convert` keyword -> `Option`: the flags of `etkd convert --to <name>` (settings of the pattern,
                 or of its conversion only)
    convert_tokens: why converting to this pattern needs the tokenizer's special-token ids (`convert`'s
                 `bos_token_id`, `mask_token_id`), None when it does not
    convert_settings: `EncoderConfig` fields `convert` sets on a model converted to this pattern
    convert_resets: `EncoderConfig` fields `convert` resets to these values unless source and target are both
                 this pattern (settings a conversion cannot carry over)
    global_tokens: whether the adapter reads `global_mask` (the model's `global_attention_mask=`: tokens that
                 attend to and are attended by every token); `etkd finetune` then makes [CLS] (and
                 `--global-prefix` tokens) global
    global_projections: whether the pattern runs global tokens through their own q/k/v projections when
                 `EncoderConfig.global_projections` is set (the encoder then builds `attn.qg`, `kg`, `vg`)
    classification_globals: how many leading tokens a sequence-classification model makes global when the
                 call gives no `global_attention_mask` (1: [CLS], as HF's classifier of that pattern does)
    """

    name: str
    op: str
    adapter: Callable
    settings: tuple[str, ...] = ()
    hf_name: str | None = None
    hf_settings: dict[str, str] = field(default_factory=dict)
    label: str = ""
    hf_model_type: str | None = None
    hf_unsupported: Callable[..., str | None] = lambda config: None
    hf_attention: Callable | None = None
    hf_required: tuple[str, ...] = ()
    save_format: str | None = None
    save_format_help: str = ""
    options: dict[str, Option] = field(default_factory=dict)
    convert_tokens: str | None = None
    convert_settings: dict = field(default_factory=dict)
    convert_resets: dict = field(default_factory=dict)
    global_tokens: bool = False
    global_projections: bool = False
    classification_globals: int = 0


PATTERNS: dict[str, Pattern] = {}

# The transformers config attribute (saved in config.json) holding the settings of an `etkd.hf`
# `attn_implementation` name and, under "attn_implementation", the name itself (`--format hf-attention`).
HF_CONFIG_KEY = "etkd_attention"


@dataclass(frozen=True)
class HFFamily:
    """How one transformers model family maps onto `EncoderModel` (`models/hf.py`'s `from_hf` / `to_hf`).

    model_type:  the HF `config.model_type`
    stem:        the class-name stem (`<stem>Model`, `<stem>ForMaskedLM`, `<stem>Config`, ...)
    prefix:      the base model's attribute inside head classes
    fairseq:     RoBERTa-style: padded positions, an `lm_head` MLM with gelu, a tanh classifier
    position_offset: the first position row real tokens use when positions are not padded
    head_style:  its sequence-classification head (`EncoderConfig.head_style`)
    pooler:      its pooler's weight name under the base model
    pooling_arg: whether its bare `*Model` class takes `add_pooling_layer`
    holds_full:  whether a full-attention model of its checkpoints exports back to it
    from_config: `fn(hf_config) -> dict`, the `EncoderConfig` fields its config sets beyond the common ones
    to_config:   `fn(config) -> dict`, the HF config fields it needs beyond the common ones
    to_weights:  `fn(config, state_dict)`, fills HF weights etkd's model has no copy of (in place), or None
    unsupported: class name -> why etkd does not reproduce that class
    """

    model_type: str
    stem: str
    prefix: str
    fairseq: bool = False
    position_offset: int = 0
    head_style: str = "roberta"
    pooler: str = "pooler.dense"
    pooling_arg: bool = True
    holds_full: bool = False
    from_config: Callable = lambda c: {}
    to_config: Callable = lambda config: {}
    to_weights: Callable | None = None
    unsupported: dict[str, str] = field(default_factory=dict)


HF_FAMILIES: dict[str, HFFamily] = {}


def register_family(family: HFFamily) -> HFFamily:
    if family.model_type in HF_FAMILIES:
        raise ValueError(f"HF family {family.model_type!r} is registered already")
    HF_FAMILIES[family.model_type] = family
    return family


def register(pattern: Pattern) -> Pattern:
    if pattern.name in PATTERNS:
        raise ValueError(f"pattern {pattern.name!r} is registered already")
    PATTERNS[pattern.name] = pattern
    return pattern


def get(name: str) -> Pattern:
    """The pattern called `name`, or a ValueError listing the registered ones."""
    if name not in PATTERNS:
        raise ValueError(f"attention: expected one of {tuple(PATTERNS)}, got {name!r}")
    return PATTERNS[name]


def by_hf_name(name: str | None) -> Pattern | None:
    """The pattern whose `hf_name` (the `etkd.hf` attn_implementation name) is `name`, None when none is."""
    return next((p for p in PATTERNS.values() if name is not None and p.hf_name == name), None)


def names() -> tuple[str, ...]:
    """Every registered pattern name (the CLI choices, `EncoderConfig.attention`'s values)."""
    return tuple(PATTERNS)


def get_attention(config) -> Callable:
    """The model adapter of `config.attention`."""
    return get(config.attention).adapter


def _discover() -> None:
    """Import every pattern module of this package (the default first, then by name): each registers itself."""
    found = sorted((m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")),
                   key=lambda n: (n != DEFAULT, n))  # fmt: skip
    for name in found:
        importlib.import_module(f"{__name__}.{name}")


_discover()
