"""Nyström attention in the benchmarks: 64 landmarks (the paper's size), with HF's `NystromformerSelfAttention`
driven one way for the parity tests and benchmarks.

FLOPs: 4 * head_dim * (2 * seq * L + L^2) per head: the QK-type products K1 (seq x L), K3 (L x seq) and the
L x L landmark kernel, and the value products K3 V, pinv(K2) (K3 V) and K1 (...); the Newton-Schulz
pseudo-inverse (~48 L^3 per head, about 9% at seq 4096, L 64) is not counted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import etkd_kernels as ek

from ..hf_reference import projections
from . import Bench, PatternInputs, cached_projections, hf_providers, inputs, register

LANDMARKS = 64
HF_CONV_KERNEL = 65  # HF Nystromformer's default depthwise conv on values


def nystrom_module(
    hidden: int, heads: int, seq: int, num_landmarks: int, conv_kernel_size: int | None = None
) -> nn.Module:
    from transformers import NystromformerConfig
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

    cfg = NystromformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        segment_means_seq_len=seq,
        num_landmarks=num_landmarks,
        attention_probs_dropout_prob=0.0,
    )
    if conv_kernel_size is not None:
        cfg.conv_kernel_size = conv_kernel_size
    module = NystromformerSelfAttention(cfg).eval()
    if conv_kernel_size is None:
        # HF's config validator rejects conv_kernel_size=None, but the module skips its conv term when the
        # attribute is None: that is the attention core.
        module.conv_kernel_size = None
        del module.conv
    return module


def run_nystrom(module: nn.Module, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """HF NystromformerSelfAttention on x (batch, seq, hidden), with the classic (batch, 1, 1, seq) additive
    mask: transformers 5.x's NystromformerModel builds a (batch, 1, seq, seq) mask that cannot broadcast
    against HF's own (landmarks, seq) K3 scores, so the full model cannot run padded batches."""
    ext = torch.zeros(x.shape[0], 1, 1, x.shape[1], dtype=x.dtype, device=x.device)
    ext[~real[:, None, None, :]] = torch.finfo(x.dtype).min
    return module(x, attention_mask=ext)[0]


def nystrom_pairs(seq: int, landmarks: int) -> int:
    return 2 * seq * landmarks + landmarks * landmarks


def setup(setup, x, real, glob) -> PatternInputs:
    mod = nystrom_module(setup.hidden, setup.heads, setup.seq, LANDMARKS).to(setup.device, setup.dtype)
    hf_providers(setup, x, mod, ("query", "key", "value"), run_nystrom, real)
    op = lambda b, **kw: (lambda q, k, v: ek.nystrom_attention(q, k, v, LANDMARKS, key_padding_mask=real, pinv_init="hf_global", backend=b, **kw))  # fmt: skip
    return PatternInputs(
        tuple(t.detach().contiguous() for t in projections(mod, x, setup.heads)), op,
        setup.score_flops(nystrom_pairs(setup.seq, LANDMARKS)),
    )  # fmt: skip


def configure(cfg, seq: int) -> None:
    """`etkd bench`'s model as HF's Nystromformer computes it: its landmark segments sized by the length, the
    global pseudo-inverse init, the conv term on values."""
    cfg.extra["segment_means_seq_len"] = seq
    cfg.pinv_init = "hf_global"
    cfg.conv_kernel_size = HF_CONV_KERNEL


def dropout_core(setup, p: float):
    # HF's NystromformerSelfAttention defines self.dropout but never calls it: this row is HF without dropout.
    x, real, _ = inputs(setup.batch, setup.seq, setup.hidden, setup.device, setup.dtype)
    mod = nystrom_module(setup.hidden, setup.heads, setup.seq, LANDMARKS).to(setup.device, setup.dtype)
    core = cached_projections(mod, ("query", "key", "value")).train()
    note = "NystromformerSelfAttention, train: HF never applies its attention dropout"
    return (lambda x: run_nystrom(core, x, real)), (x,), note


register(Bench(
    "nystrom", setup, sizes={"LANDMARKS": LANDMARKS}, settings={"num_landmarks": LANDMARKS},
    positions="nystromformer", configure=configure, dropout_core=dropout_core, fallback_replaced=True,
))  # fmt: skip
