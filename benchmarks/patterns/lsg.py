"""LSG in the benchmarks: blocks of 128 (+ 128 pooled sparse tokens each side, factor 2) and 1 global token
(the paper's size). transformers has no LSG class: `etkd bench`'s baseline is lsg-converter's own
`LSGRobertaModel` with the same shapes and settings, run by benchmarks/lsg_peer.py in the side environment
(`make lsg-env` or `$ETKD_LSG_PYTHON`, as transformers 5 cannot import it)."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

import etkd_kernels as ek
from etkd_kernels import timing as timing_module

from ..harness import run_json
from ..hf_reference import split_heads
from . import Bench, PatternInputs, Peer, register

LSG_BLOCK = 128
LSG_PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lsg_peer.py")
LSG_IMPL = "lsg-converter"  # the baseline of the lsg family: lsg-converter's own model


def lsg_self_attention_class():
    """lsg-converter's `LSGSelfAttention` (the attention behind the LSG checkpoints), loaded by file path: the
    package's `__init__` fails to import under transformers 5. None when lsg-converter is not installed."""
    spec = importlib.util.find_spec("lsg_converter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "attention_layers", "lsg_self_attention.py")
    mod_spec = importlib.util.spec_from_file_location("_lsg_self_attention", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.LSGSelfAttention


def lsg_pairs(seq: int, block: int, sparse_block: int, factor: int, num_global: int) -> int:
    """Scores of LSG attention as `etkd_kernels.reference.lsg` defines it, per head (sparse keys counted at
    their full 2 * sparse_block; compressed positions with no usable token are rarer than 1 in a block)."""
    nb = -(-seq // block)
    g = min(num_global, seq)
    step, total = block // factor, -(-seq // factor)
    pairs = g * seq
    for n in range(nb):
        rows = max(0, min(seq, (n + 1) * block) - max(g, n * block))
        lo, hi = max(g, (n - 1) * block), min(seq, (n + 2) * block)
        local = max(0, hi - lo)
        left = max(0, min(total, (n - 1) * step) - max(0, (n - 1) * step - sparse_block))
        right = max(0, min(total, (n + 2) * step + sparse_block) - max(0, (n + 2) * step))
        pairs += rows * (g + local + left + right)
    return pairs


def setup(setup, x, real, glob) -> PatternInputs:
    why = "transformers has no LSG attention (lsg-converter's is a test-only oracle)"
    setup.skipped["hf"] = setup.skipped["hf-core"] = why
    qkv = torch.randn(3, setup.batch, setup.seq, setup.hidden).to(setup.device, setup.dtype)
    op = lambda b, **kw: (lambda q, k, v: ek.lsg_attention(q, k, v, block_size=LSG_BLOCK, sparse_block_size=LSG_BLOCK, key_padding_mask=real, backend=b, **kw))  # fmt: skip
    flops = setup.score_flops(lsg_pairs(setup.seq, LSG_BLOCK, LSG_BLOCK, 2, 1))
    return PatternInputs(tuple(split_heads(t, setup.heads) for t in qkv), op, flops)


def lsg_python() -> str | None:
    """The side environment's python that runs lsg-converter's model (None when there is none)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("ETKD_LSG_PYTHON") or os.path.join(root, ".venv-lsg", "bin", "python")
    return path if os.path.isfile(path) else None


def lsg_peer_config(cfg) -> dict:
    """LSGRobertaConfig arguments for lsg-converter's model with the shapes and settings of etkd's `cfg`."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        block_size=cfg.block_size, sparse_block_size=cfg.sparse_block_size, sparsity_factor=cfg.sparsity_factor,
        sparsity_type=cfg.sparsity_type, num_global_tokens=cfg.num_global_tokens,
        pool_with_global=cfg.pool_with_global, mask_first_token=cfg.mask_first_token, adaptive=cfg.adaptive,
    )  # fmt: skip


def lsg_peer_row(spec: dict, timeout: float, cfg) -> dict:
    """One lsg-converter row of `etkd bench` (`cfg`: the etkd model's config), in a fresh process of the side
    environment."""
    python = lsg_python()
    if python is None:
        return {"status": "skipped: no side environment for lsg-converter (make lsg-env, or ETKD_LSG_PYTHON)"}
    # The side environment has no etkd: it loads the timing module by the path of the one installed here.
    peer = {**spec, "config": lsg_peer_config(cfg), "timing_path": timing_module.__file__}
    return run_json([python, LSG_PEER, "bench", json.dumps(peer)], timeout)


register(Bench(
    "lsg", setup, sizes={"LSG_BLOCK": LSG_BLOCK},
    settings={"block_size": LSG_BLOCK, "sparse_block_size": LSG_BLOCK, "sparsity_factor": 2},
    positions="roberta",  # LSG RoBERTa's table (two reserved rows)
    peer=Peer(LSG_IMPL, lsg_peer_row), fallback_replaced=True,
))  # fmt: skip
