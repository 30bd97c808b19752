"""The paper's step 1 (§3.1): turn a pretrained full-attention encoder into an efficient long one
(`convert`), and initialise a half-depth student from a teacher (`make_student`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def order_positions(
    positions: torch.Tensor, stride: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """lsg-converter's `order_positions`: 512 position rows (fewer are padded with normal rows of their
    mean/std, more are thinned to every (n // 512)-th) reordered so global i takes row (i mod m) * stride + i // m,
    m = 512 / stride: consecutive globals sit `stride` positions apart."""
    n, d = positions.shape
    if n % 512:
        if n > 512:
            positions = positions[: 512 * (n // 512)]
        else:
            mean = positions.mean(dim=0, keepdim=True).expand(512 - n, -1)
            std = positions.std(dim=0, keepdim=True).expand(512 - n, -1)
            positions = torch.cat([positions, torch.normal(mean, std, generator=generator)], dim=0)
        n = positions.shape[0]
    factor = n // 512
    positions = positions.reshape(-1, factor, d)[:, 0]
    return positions.reshape(-1, stride // factor, d).transpose(0, 1).reshape(-1, d)


def lsg_global_embeddings(
    word: torch.Tensor, positions: torch.Tensor, bos_token_id: int, mask_token_id: int, *,
    token_type: torch.Tensor | None = None, stride: int = 64, random_init: bool = False, seed: int = 123,
) -> torch.Tensor:  # fmt: skip
    """The 512 global embeddings lsg-converter's `LSGConverter` gives a converted model (`update_global`):
    the ordered positions (`order_positions` of the real-token rows) plus the bos embedding for global 0 and
    the [MASK] embedding for the others, plus `token_type` (the type-0 embedding: lsg-converter's BERT script,
    `use_token_ids`; its RoBERTa script adds none); with `random_init` (`update_global_randomly`) the others
    are drawn from a normal with the word embeddings' mean and covariance instead.

    Same operations, same random draws in the same order, so the result is bit-identical to LSGConverter's
    run after `torch.manual_seed(seed)` (its own `seed` argument is never used; it draws from torch's global
    generator): its loader first initialises the new (512, hidden) global table (one normal draw of that
    size, discarded here), then `MultivariateNormal(...).sample((512,))` (random_init), then the normal rows
    `order_positions` pads a table of fewer than 512 positions with. That holds when the source checkpoint
    has every other weight of the LSG class (else its loader initialises those too, drawing more first).
    The draws run on a forked global generator, whose state is restored afterwards."""
    from torch.distributions import MultivariateNormal

    u = word.detach().float().cpu()
    tt = None if token_type is None else token_type.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.empty(512, u.shape[1]).normal_()  # the loader's init of the new global table
        if random_init:
            try:
                w = MultivariateNormal(u.mean(dim=0), torch.cov(u.T)).sample((512,))
            except ValueError as exc:  # LSGConverter fails the same way
                raise ValueError(
                    f"random_global_init: the word embeddings' covariance ({u.shape[1]} x {u.shape[1]} from "
                    f"{u.shape[0]} rows) is not positive definite, so no normal can be drawn from it: {exc}"
                ) from None
        pos = order_positions(positions.detach().float().cpu().clone(), stride)
    if random_init:
        w[0] = u[bos_token_id]
        if tt is not None:
            pos += tt.unsqueeze(0)
            w[0] = u[bos_token_id] + tt
        return (w + pos).to(word.dtype)
    pos[0] += u[bos_token_id]
    pos[1:] += u[mask_token_id].unsqueeze(0)
    if tt is not None:
        pos += tt.unsqueeze(0)
    return pos.to(word.dtype)


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
    every other weight is copied. Settings: `window` (longformer, even), `block_size` and
    `num_random_blocks` (bigbird, lsg), `num_landmarks` (nystrom), `sparse_block_size` (default
    block_size), `sparsity_factor`, `sparsity_type`, `num_global_tokens`, `pool_with_global`,
    `mask_first_token`, `adaptive` (lsg).

    To "lsg" this is lsg-converter's `LSGConverter`: positions extended the same way, and the global
    embeddings (a new weight) made by `lsg_global_embeddings` from the *original* position table and the
    embeddings of `bos_token_id` (the tokenizer's bos, else cls) and `mask_token_id` (required then), with
    `global_positional_stride`, `random_global_init`, `use_token_ids` (BERT-style sources) as LSGConverter's
    options, and `seed` as the `torch.manual_seed` LSGConverter ran under (its random draws are reproduced). An LSG source keeps
    its global embeddings (LSGConverter's `resize_lsg`).
    """
    if to not in patterns.PATTERNS:
        raise ValueError(f"to: expected one of {patterns.names()}, got {to!r}")
    if not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions: expected a positive int, got {max_positions!r}")
    cfg = model.config
    first = cfg.max_positions - cfg.max_tokens
    new_cfg = cfg.replace(
        attention=to, max_positions=max_positions + first, window=window, global_projections=to == "longformer",
        block_size=block_size, num_random_blocks=num_random_blocks, num_landmarks=num_landmarks,
        sparse_block_size=sparse_block_size or block_size, sparsity_factor=sparsity_factor,
        sparsity_type=sparsity_type, num_global_tokens=num_global_tokens, pool_with_global=pool_with_global,
        mask_first_token=mask_first_token, adaptive=adaptive,
        conv_kernel_size=cfg.conv_kernel_size if cfg.attention == "nystrom" and to == "nystrom" else None,
        extra={k: v for k, v in cfg.extra.items() if k != "segment_means_seq_len"},
    )  # fmt: skip
    new = EncoderModel(new_cfg)
    old_sd = model.state_dict()
    sd = new.state_dict()
    glob = "encoder.embeddings.global_tokens.weight"
    if glob in sd and glob not in old_sd and (bos_token_id is None or mask_token_id is None):
        raise ValueError(
            "bos_token_id / mask_token_id: converting to lsg initialises the global embeddings from these tokens' "
            "embeddings (as LSGConverter does); give both (the tokenizer's bos or cls id, and its mask id)"
        )
    with torch.no_grad():
        for key, t in sd.items():
            if key == "encoder.embeddings.position.weight":
                t.copy_(tile_positions(old_sd[key], t.shape[0], first))
            elif key == glob and key not in old_sd:
                # lsg-converter's BERT script adds the type-0 embedding (use_token_ids), its RoBERTa one not
                tt = (
                    old_sd.get("encoder.embeddings.token_type.weight")
                    if cfg.position_style != "padded"
                    else None
                )
                t.copy_(lsg_global_embeddings(
                    old_sd["encoder.embeddings.word.weight"], old_sd["encoder.embeddings.position.weight"][first:],
                    bos_token_id, mask_token_id, token_type=None if tt is None or not use_token_ids else tt[0],
                    stride=global_positional_stride, random_init=random_global_init, seed=seed,
                ))  # fmt: skip
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

    layers: "every_other" (0, 2, 4, ... as DistilBERT) or a list of teacher layer indices.
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
