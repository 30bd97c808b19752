"""LSG: local, sparse and global attention as lsg-converter's LSG RoBERTa/BERT models run it."""

from __future__ import annotations

import etkd_kernels as ek

from . import Option, Pattern, register

# lsg-converter's sparsity types etkd reproduces (its "lsh" draws fresh random hash planes on every call)
SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling")
MAX_GLOBAL_TOKENS = 512  # rows of lsg-converter's global_embeddings table


def adapter(attn, x, q, k, v, key_padding_mask, global_mask, backend):
    # LSG RoBERTa: the encoder has prepended num_global_tokens global embeddings (lsg-converter's model files).
    # Attention dropout on the probabilities, as lsg-converter applies it.
    cfg = attn.config
    return ek.lsg_attention(
        q, k, v, block_size=cfg.block_size, sparse_block_size=cfg.sparse_block_size,
        sparsity_factor=cfg.sparsity_factor, sparsity_type=cfg.sparsity_type,
        num_global_tokens=cfg.num_global_tokens, key_padding_mask=key_padding_mask, variant="model",
        dropout_p=attn.dropout_p, backend=backend,
    )  # fmt: skip


def hf_attention(module, query, key, value, settings, kwargs, common):
    """`etkd_lsg` (`etkd.hf`): settings `block_size`, `sparse_block_size`, `sparsity_factor`, `sparsity_type`,
    `num_global_tokens` (here the first tokens of the sequence: a BERT/RoBERTa class has no global embeddings)."""
    return ek.lsg_attention(
        query, key, value, block_size=int(settings["block_size"]),
        sparse_block_size=int(settings.get("sparse_block_size", settings["block_size"])),
        sparsity_factor=int(settings.get("sparsity_factor", 2)),
        sparsity_type=settings.get("sparsity_type", "pooling"),
        num_global_tokens=min(int(settings.get("num_global_tokens", 1)), query.shape[2]), **common,
    )  # fmt: skip


PATTERN = register(Pattern(
    "lsg", "lsg", adapter,
    ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type", "num_global_tokens",
     "pool_with_global", "mask_first_token", "adaptive"),
    hf_name="etkd_lsg",
    hf_unsupported=lambda config: (
        "LSG RoBERTa's global embeddings (prepended tokens) have no place in a BERT/RoBERTa class; write it as "
        "lsg-converter's checkpoint (save_pretrained(dir, format='lsg'), --format lsg)"
    ),
    hf_settings={k: k for k in ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type",
                                "num_global_tokens")},
    label="LSG {LSG_BLOCK} (+{LSG_BLOCK} pooled each side)", hf_attention=hf_attention, hf_required=("block_size",),
    save_format="lsg",
    save_format_help="an LSG model as lsg-converter's checkpoint: config.json with auto_map, loads with "
    "trust_remote_code=True",
    options={
        "block_size": Option("block size"),
        "sparse_block_size": Option("(default: --block-size)", type=int),
        "sparsity_factor": Option("sparsity factor"),
        "sparsity_type": Option("sparsity type", SPARSITY_TYPES),
        "num_global_tokens": Option(f"learned global embeddings (1..{MAX_GLOBAL_TOKENS})"),
        "pool_with_global": Option("the first token's output is the first global's (LSGRobertaConfig)"),
        "mask_first_token": Option("hide the first token as a key"),
        "adaptive": Option("pad lengths that are not a multiple of --block-size"),
        "global_positional_stride": Option("positions between consecutive global embeddings at init (LSGConverter)"),
        "random_global_init": Option("draw the global embeddings from the word embeddings' normal (LSGConverter)"),
        "seed": Option("the torch.manual_seed whose draws LSGConverter would make (--random-global-init)"),
    },
    convert_tokens="its bos/cls and mask tokens seed the global embeddings",
))  # fmt: skip
