"""The attention registry: one adapter per pattern, from projected heads to an `etkd_kernels` op.

Every adapter has the signature

    fn(attn, x, q, k, v, key_padding_mask, global_mask) -> (batch, heads, seq, head_dim)

attn: the `SelfAttention` module (its config, backend and any extra projections); x: (batch, seq, hidden)
hidden states; q, k, v: (batch, heads, seq, head_dim); key_padding_mask / global_mask: (batch, seq) bool or
None. A new pattern is one function plus one `ATTENTION[...] = fn` line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import etkd_kernels as ek

from .config import EncoderConfig


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, s, h*d) -> (b, h, s, d)."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def full(attn, x, q, k, v, key_padding_mask, global_mask):
    return ek.full_attention(q, k, v, key_padding_mask=key_padding_mask, backend=attn.backend)


def longformer(attn, x, q, k, v, key_padding_mask, global_mask):
    global_qkv = None
    if global_mask is not None and attn.qg is not None:
        h = attn.config.num_heads
        global_qkv = (_heads(attn.qg(x), h), _heads(attn.kg(x), h), _heads(attn.vg(x), h))
    return ek.sliding_window_attention(
        q, k, v, attn.window, global_mask=global_mask, global_qkv=global_qkv,
        key_padding_mask=key_padding_mask, backend=attn.backend,
    )  # fmt: skip


def bigbird_block_mask(num_blocks: int, rand_attn: torch.Tensor) -> torch.Tensor:
    """BigBird's (ITC) pattern as a (heads, nb, nb) bool block mask.

    Blocks 0 and nb-1 are global (attend to and are attended by everything), every block sees its
    neighbours, and middle rows 1..nb-2 also see the blocks listed in rand_attn (heads, nb-2, r), which is
    HF's `rand_attn` layout (so HF's random indices can be passed in to reproduce it exactly).
    """
    idx = torch.arange(num_blocks, device=rand_attn.device)
    base = (idx[:, None] - idx[None, :]).abs() <= 1
    base[0] = base[-1] = True
    base[:, 0] = base[:, -1] = True
    mask = base.expand(rand_attn.shape[0], -1, -1).clone()
    rows = idx[1:-1].view(1, -1, 1).expand_as(rand_attn)
    heads = torch.arange(rand_attn.shape[0], device=rand_attn.device).view(-1, 1, 1).expand_as(rand_attn)
    mask[heads, rows, rand_attn.long()] = True
    return mask


@torch.compiler.disable  # built once per length and cached; a compiled model breaks the graph only then
def bigbird_random_blocks(num_blocks: int, num_heads: int, r: int, seed: int) -> torch.Tensor:
    """(heads, nb-2, r) random key blocks for middle rows, chosen outside each row's window/global blocks."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(num_heads, max(num_blocks - 2, 0), r, dtype=torch.long)
    for h in range(num_heads):
        for i in range(1, num_blocks - 1):
            banned = {0, num_blocks - 1, i - 1, i, i + 1}
            cand = torch.tensor([j for j in range(num_blocks) if j not in banned], dtype=torch.long)
            pick = cand[torch.randperm(len(cand), generator=g)[:r]]
            out[h, i - 1, : len(pick)] = pick
            out[h, i - 1, len(pick) :] = i  # fewer candidates than r: repeat an allowed block (no-op)
    return out


def bigbird(attn, x, q, k, v, key_padding_mask, global_mask):
    cfg = attn.config
    bs, r, s = cfg.block_size, cfg.num_random_blocks, q.shape[2]
    if s <= (5 + 2 * r) * bs:
        # Too short for the block pattern; HF switches to full attention here too.
        return full(attn, x, q, k, v, key_padding_mask, global_mask)
    nb = -(-s // bs)
    rand = attn.rand_attn
    if rand is not None and rand.shape[1] == nb - 2:
        mask = bigbird_block_mask(nb, rand.to(q.device))
    else:
        # Seeded per layer and cached per length, so a model gives the same output every call.
        key = ("bigbird", nb, str(q.device))
        if key not in attn.cache:
            rand = bigbird_random_blocks(nb, cfg.num_heads, r, cfg.random_seed + attn.layer_index)
            attn.cache[key] = bigbird_block_mask(nb, rand.to(q.device))
        mask = attn.cache[key]
    layout = ek.BlockLayout(mask, bs, "bigbird")
    return ek.block_sparse_attention(q, k, v, layout, key_padding_mask=key_padding_mask, backend=attn.backend)


def lsg(attn, x, q, k, v, key_padding_mask, global_mask):
    cfg = attn.config
    return ek.lsg_attention(
        q, k, v, block_size=cfg.block_size, sparse_block_size=cfg.sparse_block_size,
        sparsity_factor=cfg.sparsity_factor, sparsity_type=cfg.sparsity_type,
        num_global_tokens=min(cfg.num_global_tokens, q.shape[2]), key_padding_mask=key_padding_mask,
        backend=attn.backend,
    )  # fmt: skip


def nystrom(attn, x, q, k, v, key_padding_mask, global_mask):
    cfg = attn.config
    out = ek.nystrom_attention(
        q, k, v, min(cfg.num_landmarks, q.shape[2]), pinv_iterations=cfg.pinv_iterations,
        pinv_init=cfg.pinv_init, key_padding_mask=key_padding_mask, backend=attn.backend,
    )  # fmt: skip
    if attn.conv is not None:
        # HF's depthwise conv over the sequence of each head's values: (b, h, s, d) -> (b, h, s, d).
        out = out + attn.conv(v)
    return out


AttentionFn = Callable[..., torch.Tensor]
ATTENTION: dict[str, AttentionFn] = {
    "full": full,
    "longformer": longformer,
    "bigbird": bigbird,
    "lsg": lsg,
    "nystrom": nystrom,
}


def get_attention(config: EncoderConfig) -> AttentionFn:
    if config.attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {sorted(ATTENTION)}, got {config.attention!r}")
    return ATTENTION[config.attention]
