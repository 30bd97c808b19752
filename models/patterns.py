"""The pattern registry: one record per attention pattern, read by everything that names patterns.

`EncoderConfig.attention` and the CLI choices (`etkd convert --to`, `etkd distill --student-attention`) are
the registry's names; the encoder's attention layer takes the record's model adapter; `etkd.hf`'s export
(`--format hf-attention`) writes the record's `attn_implementation` name and settings; `etkd bench` and the
benchmarks read its op and label. A new pattern is its kernel-side files (an op in `etkd_kernels`, or a
block layout for `block_sparse`), its model adapter in `attention.py` and one `register(Pattern(...))` here
(ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import attention


@dataclass(frozen=True)
class Pattern:
    """Everything etkd knows about one attention pattern.

    name:        `EncoderConfig.attention` value and CLI choice
    op:          the `etkd_kernels` op that computes it (a name in `etkd_kernels.dispatch.OPS`)
    adapter:     the model adapter, `fn(attn, x, q, k, v, key_padding_mask, global_mask, backend)` (attention.py)
    settings:    the `EncoderConfig` fields the pattern reads (its settings; defaults in `EncoderConfig`)
    hf_name:     the transformers `attn_implementation` name that runs it in BERT/RoBERTa classes (`etkd.hf`),
                 None when there is none
    hf_settings: `config.etkd_attention` key -> `EncoderConfig` field, what the export writes for `hf_name`
    label:       the benchmark label, `str.format`-ed with the benchmark's sizes (`benchmarks.providers`)
    hf_model_type: the transformers model_type whose own classes run it (`to_hf`, `etkd bench`'s HF rows);
                 "" for full attention (the checkpoint's own BERT/RoBERTa family), None when there is none
    hf_unsupported: `fn(config) -> str | None`, why a model of this pattern cannot be written as a BERT/RoBERTa
                 class running `hf_name` (`--format hf-attention`), None when it can
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


PATTERNS: dict[str, Pattern] = {}


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


def names() -> tuple[str, ...]:
    """Every registered pattern name (the CLI choices, `EncoderConfig.attention`'s values)."""
    return tuple(PATTERNS)


def get_attention(config) -> Callable:
    """The model adapter of `config.attention`."""
    return get(config.attention).adapter


register(
    Pattern("full", "full", attention.full, hf_name="etkd_full", label="full attention", hf_model_type="")
)
register(Pattern(
    "longformer", "sliding_window", attention.longformer, ("window", "global_projections"),
    hf_name="etkd_sliding_window", hf_settings={"window": "window"}, label="sliding window {WINDOW} + 1 global",
    hf_model_type="longformer",
))  # fmt: skip
register(Pattern(
    "bigbird", "block_sparse", attention.bigbird, ("block_size", "num_random_blocks", "random_seed"),
    hf_name="etkd_block_sparse",
    hf_settings={"block_size": "block_size", "num_random_blocks": "num_random_blocks", "seed": "random_seed"},
    label="BigBird {BLOCK}, 3+2+{RANDOM_BLOCKS} blocks", hf_model_type="big_bird",
))  # fmt: skip
register(Pattern(
    "lsg", "lsg", attention.lsg,
    ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type", "num_global_tokens",
     "pool_with_global", "mask_first_token", "adaptive"),
    hf_name="etkd_lsg",
    hf_unsupported=lambda config: (
        "LSG RoBERTa's global embeddings (prepended tokens) have no place in a BERT/RoBERTa class; write it as "
        "lsg-converter's checkpoint (save_pretrained(dir, format='lsg'), --format lsg)"
    ),
    hf_settings={k: k for k in ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type",
                                "num_global_tokens")},
    label="LSG {LSG_BLOCK} (+{LSG_BLOCK} pooled each side)",
))  # fmt: skip
register(Pattern(
    "nystrom", "nystrom", attention.nystrom, ("num_landmarks", "pinv_iterations", "pinv_init", "conv_kernel_size"),
    hf_name="etkd_nystrom",
    hf_unsupported=lambda config: (
        "a Nystrom conv term has no place in a BERT/RoBERTa class" if config.conv_kernel_size is not None else None
    ),
    hf_settings={k: k for k in ("num_landmarks", "pinv_iterations", "pinv_init")},
    label="Nyström {LANDMARKS} landmarks", hf_model_type="nystromformer",
))  # fmt: skip
register(Pattern(
    "fixed", "block_sparse", attention.fixed, ("block_size", "num_local_blocks", "num_global_blocks"),
    label="fixed: {BLOCK}-token blocks, segments of 4 with 1 summary block",
))  # fmt: skip
