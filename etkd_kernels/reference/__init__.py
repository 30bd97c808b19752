"""`reference`: plain PyTorch, exact, the oracle every fused kernel is tested against.

Each module here defines its pattern's semantics: `forward` is the definition, `backward` recomputes it
under autograd. Memory is O(seq * window) (or O(nnz blocks)) where the pattern allows it.
"""

import torch

from .. import dispatch
from ..dispatch import Capabilities

NAME = "reference"
DESCRIPTION = "plain PyTorch, any device, the oracle"
OPS = dispatch.OPS  # the definition of every op: the one list of ops
AUTO_DEVICES = None  # any device


def unavailable_reason() -> str | None:
    return None


def capabilities(op: str) -> Capabilities:
    return Capabilities(
        devices=None, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), dropout=True
    )
