"""etkd's patterns as transformers 5 `attn_implementation` names, for models built on `AttentionInterface`
(BERT, RoBERTa, and the other encoders whose self-attention calls `ALL_ATTENTION_FUNCTIONS`).

    import etkd.hf                                              # registers the names
    model = AutoModel.from_pretrained(path, attn_implementation="etkd_sliding_window")
    out = model(ids, attention_mask=mask, global_attention_mask=glob)   # glob: (batch, seq), 1 = global

Settings come from `config.etkd_attention` (a dict saved in config.json; `etkd convert --format hf-attention`
writes it): `window` (sliding window: int or one per layer), `block_size`, `num_random_blocks`,
`num_window_blocks`, `num_global_blocks`, `seed` (block_sparse: a BigBird layout drawn per layer from
seed + layer index), `num_landmarks`, `pinv_iterations`, `pinv_init` (nystrom), LSG's `block_size`,
`sparse_block_size`, `sparsity_factor`, `sparsity_type`, `num_global_tokens` (`ignore_attention_dropout`
is deprecated and has no effect). Global tokens reach the attention function as HF passes extra keyword
arguments: `model(..., global_attention_mask=...)` (sliding window only). The `dropout` HF passes (the
model's attention_probs_dropout_prob in training mode, 0 in eval) is applied to the probabilities inside the
op, as HF's eager attention applies it.

Each name also registers a mask function that hands the attention the (batch, seq) padding mask instead of
a (batch, 1, seq, seq) tensor. Padded query rows: zeros for the sparse patterns (as HF Longformer and
BigBird give); `etkd_full` computes them as HF's eager/sdpa code does, so it equals HF everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import etkd_kernels as ek

from ._common import (
    UnsupportedConfigError,
    _collecting,
    full_attention_hf_rows,
    warn_ignore_attention_dropout,
)

CONFIG_KEY = "etkd_attention"


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
            common = dict(
                key_padding_mask=attention_mask, scale=scaling, dropout_p=float(dropout),
                backend=cfg.get("backend", "auto"),
            )  # fmt: skip
            return _heads_out(op(module, query, key, value, cfg, kwargs, common)), None

        IMPLEMENTATIONS[name] = attention
        return attention

    return register


@_implementation("etkd_sliding_window", ("window",))
def sliding_window(module, query, key, value, cfg, kwargs, common):
    glob = kwargs.get("global_attention_mask")
    if glob is not None:
        glob = glob.to(query.device) > 0
        if common["key_padding_mask"] is not None:
            glob = glob & common["key_padding_mask"]
    window = int(_layer_value(cfg["window"], module, "window"))
    return ek.sliding_window_attention(query, key, value, window, global_mask=glob, **common)


@torch.compiler.disable  # drawn once per (length, device) and cached on the module
def _block_layout(module, cfg: dict, seq: int, heads: int, device) -> ek.BlockLayout:
    cache = module.__dict__.setdefault("_etkd_layouts", {})
    key = (seq, str(device))
    if key not in cache:
        layer = getattr(module, "layer_idx", None) or 0
        cache[key] = ek.bigbird_layout(
            seq,
            int(cfg["block_size"]),
            num_window_blocks=int(cfg.get("num_window_blocks", 3)),
            num_global_blocks=int(cfg.get("num_global_blocks", 2)),
            num_random_blocks=int(cfg.get("num_random_blocks", 3)),
            seed=int(cfg.get("seed", 0)) + layer,
            num_heads=heads,
        ).to(device)
    return cache[key]


@_implementation("etkd_block_sparse", ("block_size",))
def block_sparse(module, query, key, value, cfg, kwargs, common):
    layout = _block_layout(module, cfg, query.shape[2], query.shape[1], query.device)
    return ek.block_sparse_attention(query, key, value, layout, **common)


@_implementation("etkd_nystrom", ("num_landmarks",))
def nystrom(module, query, key, value, cfg, kwargs, common):
    return ek.nystrom_attention(
        query, key, value, min(int(cfg["num_landmarks"]), query.shape[2]),
        pinv_iterations=int(cfg.get("pinv_iterations", 6)), pinv_init=cfg.get("pinv_init", "per_head"), **common,
    )  # fmt: skip


@_implementation("etkd_lsg", ("block_size",))
def lsg(module, query, key, value, cfg, kwargs, common):
    return ek.lsg_attention(
        query, key, value, block_size=int(cfg["block_size"]),
        sparse_block_size=int(cfg.get("sparse_block_size", cfg["block_size"])),
        sparsity_factor=int(cfg.get("sparsity_factor", 2)), sparsity_type=cfg.get("sparsity_type", "pooling"),
        num_global_tokens=min(int(cfg.get("num_global_tokens", 1)), query.shape[2]), **common,
    )  # fmt: skip


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


def register_attention_implementations() -> None:
    """Register every name in `IMPLEMENTATIONS` with transformers' AttentionInterface and mask interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask)
