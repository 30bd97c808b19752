"""HF's own attention modules as callables on (hidden states, padding, globals): the shared head helpers here,
each pattern's module builder and runner in its benchmark module (`benchmarks/patterns/<name>.py`).

One place for how HF is driven: the parity tests and the benchmarks both build and call HF through these
functions, so a test and a benchmark can never disagree about what "HF" means.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    b, s, hidden = x.shape
    return x.view(b, s, heads, hidden // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def projections(module: nn.Module, x: torch.Tensor, heads: int, names=("query", "key", "value")):
    """q, k, v (batch, heads, seq, head_dim) from the HF module's own linear layers."""
    return tuple(split_heads(getattr(module, n)(x), heads) for n in names)
