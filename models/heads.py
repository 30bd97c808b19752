"""Task heads: each takes the encoder's `EncoderOutput` and returns logits."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderConfig
from .precision import linear

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class MaskedLMHead(nn.Module):
    """dense -> act -> LayerNorm -> decoder (tied to the word embeddings by default) + bias: (b, s, vocab)."""

    def __init__(self, cfg: EncoderConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.mlm_act)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, out):
        return (
            linear(self.decoder, self.norm(self.act(linear(self.dense, out.last_hidden_state)))) + self.bias
        )


class SequenceClassificationHead(nn.Module):
    """Token 0 -> (b, num_labels); num_labels == 1 is regression.

    "bert" style: the encoder's pooler (dense + tanh), dropout, linear. "roberta" style (RoBERTa and
    every HF family whose `HFFamily.head_style` says so, models/patterns/): dropout, dense, act, dropout,
    out_proj on token 0.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.style = cfg.head_style
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size) if self.style == "roberta" else None
        self.act = activation(cfg.classifier_act)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, out):
        if self.dense is None:
            if out.pooled is None:
                raise ValueError("head_style 'bert' needs the encoder's pooler (config.add_pooler=True)")
            return linear(self.out, self.dropout(out.pooled))
        x = self.dropout(out.last_hidden_state[:, 0])  # (b, d)
        return linear(self.out, self.dropout(self.act(linear(self.dense, x))))


class TokenClassificationHead(nn.Module):
    """(b, s, num_labels)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, out):
        return linear(self.out, self.dropout(out.last_hidden_state))


class QuestionAnsweringHead(nn.Module):
    """Span extraction: (b, s, 2) = start and end logits."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.out = nn.Linear(cfg.hidden_size, 2)

    def forward(self, out):
        return linear(self.out, out.last_hidden_state)


def build_head(cfg: EncoderConfig, encoder: nn.Module) -> nn.Module | None:
    if cfg.head is None:
        return None
    if cfg.head == "mlm":
        return MaskedLMHead(cfg, encoder.embeddings.word)
    if cfg.head == "sequence_classification":
        return SequenceClassificationHead(cfg)
    if cfg.head == "token_classification":
        return TokenClassificationHead(cfg)
    if cfg.head == "question_answering":
        return QuestionAnsweringHead(cfg)
    raise ValueError(f"head: unknown head {cfg.head!r}")
