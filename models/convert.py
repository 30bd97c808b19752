"""The paper's step 1 (§3.1): turn a pretrained full-attention encoder into an efficient long one
(`convert`), and initialise a half-depth student from a teacher (`make_student`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from . import patterns
from .encoder import EncoderModel


def tile_positions(old: torch.Tensor, rows: int, first: int) -> torch.Tensor:
    """A (rows, d) position table: rows [0, first) kept, then old[first:] repeated (Longformer's recipe).

    `first` is the first row real tokens use: 0 for BERT, pad+1 = 2 for RoBERTa, 2 for Nystromformer.
    """
    if rows <= old.shape[0]:
        return old[:rows].clone()
    new = old.new_empty(rows, old.shape[1])
    new[:first] = old[:first]
    src = old[first:]
    k = first
    while k < rows:
        n = min(src.shape[0], rows - k)
        new[k : k + n] = src[:n]
        k += n
    return new


# Weights a target pattern adds that a source of another pattern has none of (e.g. prepended global
# embeddings): state-dict key -> `fn(source_state_dict, source_config, first, options) -> tensor`, registered by
# the module that knows how to make them (it imports this one). `first` is the source's first real position row;
# `options` holds `convert`'s keywords for such weights.
NEW_WEIGHTS: dict[str, Callable[..., torch.Tensor]] = {}


def convert(
    model: EncoderModel,
    to: str,
    max_positions: int = 4096,
    *,
    window: int | list[int] = 512,
    block_size: int = 64,
    num_random_blocks: int = 3,
    num_landmarks: int = 64,
    sparse_block_size: int | None = None,
    sparsity_factor: int = 2,
    sparsity_type: str = "pooling",
    num_global_tokens: int = 1,
    pool_with_global: bool = True,
    mask_first_token: bool = False,
    adaptive: bool = True,
    bos_token_id: int | None = None,
    mask_token_id: int | None = None,
    global_positional_stride: int = 64,
    random_global_init: bool = False,
    use_token_ids: bool = True,
    seed: int = 123,
) -> EncoderModel:
    """A copy of `model` with attention pattern `to` that takes up to `max_positions` tokens.

    Position embeddings are copied out to the new length by tiling the pretrained ones (RoBERTa's two
    reserved rows kept in place); Longformer's global q/k/v projections start as copies of the local ones;
    every other weight is copied. Settings: the keywords of the target pattern's `options` (its flags in
    `etkd convert`, documented in models/patterns/<name>.py); the entry's `convert_settings` are set too, and
    other patterns' `convert_resets` applied unless source and target are that pattern.

    A weight the target pattern adds and the source lacks is made by its `NEW_WEIGHTS` hook from the source
    weights, with `bos_token_id`, `mask_token_id`, `global_positional_stride`, `random_global_init`,
    `use_token_ids` and `seed` (what they mean: the registering module's hook).
    """
    if to not in patterns.PATTERNS:
        raise ValueError(f"to: expected one of {patterns.names()}, got {to!r}")
    if not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions: expected a positive int, got {max_positions!r}")
    cfg = model.config
    first = cfg.max_positions - cfg.max_tokens
    target = patterns.get(to)
    resets = {
        k: getattr(cfg, k) if cfg.attention == to == p.name else v
        for p in patterns.PATTERNS.values()
        for k, v in p.convert_resets.items()
    }
    new_cfg = cfg.replace(
        attention=to, max_positions=max_positions + first, window=window,
        block_size=block_size, num_random_blocks=num_random_blocks, num_landmarks=num_landmarks,
        sparse_block_size=sparse_block_size or block_size, sparsity_factor=sparsity_factor,
        sparsity_type=sparsity_type, num_global_tokens=num_global_tokens, pool_with_global=pool_with_global,
        mask_first_token=mask_first_token, adaptive=adaptive,
        extra={k: v for k, v in cfg.extra.items() if k != "segment_means_seq_len"},
        **{**resets, **target.convert_settings},
    )  # fmt: skip
    new = EncoderModel(new_cfg)
    old_sd = model.state_dict()
    sd = new.state_dict()
    options = dict(bos_token_id=bos_token_id, mask_token_id=mask_token_id,
                   global_positional_stride=global_positional_stride, random_global_init=random_global_init,
                   use_token_ids=use_token_ids, seed=seed)  # fmt: skip
    with torch.no_grad():
        for key, t in sd.items():
            if key == "encoder.embeddings.position.weight":
                t.copy_(tile_positions(old_sd[key], t.shape[0], first))
            elif key in NEW_WEIGHTS and key not in old_sd:
                t.copy_(NEW_WEIGHTS[key](old_sd, cfg, first, options))
            elif key in old_sd:
                t.copy_(old_sd[key])
            elif m := re.fullmatch(r"(.*\.attn\.)(q|k|v)g\.(weight|bias)", key):
                t.copy_(old_sd[f"{m[1]}{m[2]}.{m[3]}"])  # global projections from the local ones
            else:
                raise KeyError(f"convert: no source for {key!r}")
    new.encoder.backend = model.encoder.backend
    return new.train(model.training)


def make_student(teacher: EncoderModel, layers: str | Sequence[int] = "every_other") -> EncoderModel:
    """A shallower copy of `teacher`: embeddings, the chosen layers (in order) and the head copied.

    layers: "every_other" (0, 2, 4, ...) or a list of teacher layer indices. (DistilBERT's own choice spreads
    them from the first layer to the last, 0, 2, 4, 7, 9, 11 of 12: `etkd distill --student-layers spread`.)
    """
    n = teacher.config.num_layers
    if layers == "every_other":
        chosen = list(range(0, n, 2))
    elif isinstance(layers, str):
        raise ValueError(f"layers: expected 'every_other' or a list of layer indices, got {layers!r}")
    else:
        chosen = [int(i) for i in layers]
        if not chosen or any(not 0 <= i < n for i in chosen):
            raise ValueError(f"layers: expected a non-empty list of indices in [0, {n}), got {list(layers)}")
    cfg = teacher.config
    window = [cfg.window[i] for i in chosen] if isinstance(cfg.window, list) else cfg.window
    student = EncoderModel(cfg.replace(num_layers=len(chosen), window=window))
    old = teacher.state_dict()
    sd = student.state_dict()
    with torch.no_grad():
        for key, t in sd.items():
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
            src = f"encoder.layers.{chosen[int(m[1])]}.{m[2]}" if m else key
            t.copy_(old[src])
    student.encoder.backend = teacher.encoder.backend
    return student.train(teacher.training)
