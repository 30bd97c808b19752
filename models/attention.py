"""The model adapters: one per pattern (registered in `patterns.py`), from projected heads to an `etkd_kernels` op.

Every adapter has the signature

    fn(attn, x, q, k, v, key_padding_mask, global_mask, backend) -> (batch, heads, seq, head_dim)

attn: the `SelfAttention` module (its config and any extra projections); x: (batch, seq, hidden)
hidden states; q, k, v: (batch, heads, seq, head_dim); key_padding_mask / global_mask: (batch, seq) bool or
None; backend: the model's kernel backend name. Adding a pattern: ARCHITECTURE.md.

Attention dropout (`attn.dropout_p`: the config's attention_dropout in training mode, else 0) is passed to
the op exactly where the HF model of the pattern applies it, on the probabilities: full (BERT/RoBERTa),
longformer (local and global rows), lsg (lsg-converter) and bigbird's short-input full fallback; not
bigbird's block-sparse path and not nystrom, whose HF modules never apply it. fixed (no HF model) drops
probabilities like BERT.
"""

from __future__ import annotations

import torch

import etkd_kernels as ek


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, s, h*d) -> (b, h, s, d)."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def full(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    return ek.full_attention(
        q, k, v, key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend
    )


def longformer(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    global_qkv = None
    if global_mask is not None and attn.qg is not None:
        h = attn.config.num_heads
        global_qkv = (_heads(attn.qg(x), h), _heads(attn.kg(x), h), _heads(attn.vg(x), h))
    return ek.sliding_window_attention(
        q, k, v, attn.window, global_mask=global_mask, global_qkv=global_qkv,
        key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


@torch.compiler.disable  # built once per length and cached; a compiled model breaks the graph only then
def _bigbird_layout(cfg, seq: int, seed: int) -> ek.BlockLayout:
    return ek.bigbird_layout(
        seq, cfg.block_size, num_random_blocks=cfg.num_random_blocks, seed=seed, num_heads=cfg.num_heads
    )


def bigbird(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    cfg = attn.config
    bs, r, s = cfg.block_size, cfg.num_random_blocks, q.shape[2]
    if s <= (5 + 2 * r) * bs:
        # Too short for the block pattern; HF's BigBirdModel switches to full attention here too.
        return full(attn, x, q, k, v, key_padding_mask, global_mask, backend)
    if attn.rand_attn is not None:
        # Fixed random blocks (heads, nb - 2, r), e.g. HF's own indices for exact parity.
        layout = ek.bigbird_layout(s, bs, num_random_blocks=r, rand_attn=attn.rand_attn)
    else:
        # Seeded per layer and cached per length, so a model gives the same output on every call.
        key = ("bigbird", s, str(q.device))
        if key not in attn.cache:
            attn.cache[key] = _bigbird_layout(cfg, s, cfg.random_seed + attn.layer_index).to(q.device)
        layout = attn.cache[key]
    # No attention dropout here: HF's BigBirdBlockSparseAttention applies none (its full fallback does).
    return ek.block_sparse_attention(q, k, v, layout, key_padding_mask=key_padding_mask, backend=backend)


@torch.compiler.disable  # built once per length and cached, as the bigbird layout
def _fixed_layout(cfg, seq: int) -> ek.BlockLayout:
    return ek.fixed_layout(seq, cfg.block_size, cfg.num_local_blocks, cfg.num_global_blocks)


def fixed(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    """Sparse Transformer's "fixed" pattern as a block layout: blocks attend within their segment of
    `num_local_blocks` blocks and to the last `num_global_blocks` (summary) blocks of every segment."""
    key = ("fixed", q.shape[2], str(q.device))
    if key not in attn.cache:
        attn.cache[key] = _fixed_layout(attn.config, q.shape[2]).to(q.device)
    # No HF model has this pattern: attention dropout on the probabilities, as in BERT and the Sparse Transformer.
    return ek.block_sparse_attention(
        q, k, v, attn.cache[key], key_padding_mask=key_padding_mask, dropout_p=attn.dropout_p, backend=backend
    )


def lsg(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # LSG RoBERTa: the encoder has prepended num_global_tokens global embeddings (lsg-converter's model files).
    cfg = attn.config
    return ek.lsg_attention(
        q, k, v, block_size=cfg.block_size, sparse_block_size=cfg.sparse_block_size,
        sparsity_factor=cfg.sparsity_factor, sparsity_type=cfg.sparsity_type,
        num_global_tokens=cfg.num_global_tokens, key_padding_mask=key_padding_mask, variant="model",
        dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


def nystrom(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    cfg = attn.config
    # No attention dropout: HF's NystromformerSelfAttention defines it but never applies it.
    out = ek.nystrom_attention(
        q, k, v, min(cfg.num_landmarks, q.shape[2]), pinv_iterations=cfg.pinv_iterations,
        pinv_init=cfg.pinv_init, key_padding_mask=key_padding_mask, backend=backend,
    )  # fmt: skip
    if attn.conv is not None:
        # HF's depthwise conv over the sequence of each head's values: (b, h, s, d) -> (b, h, s, d).
        out = out + attn.conv(v)
    return out
