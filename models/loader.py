"""Loading a checkpoint of either format: the one module above `encoder` (our format) and `hf` (transformers
checkpoints), so neither has to import the other's loader."""

from __future__ import annotations

import os

from .config import is_etkd_checkpoint
from .encoder import EncoderModel
from .hf import from_hf


def load(path: str | os.PathLike, **hf_kwargs) -> EncoderModel:
    """An `EncoderModel` (eval mode) from our format (a folder saved by `save_pretrained`), or from an HF
    checkpoint folder or hub name (`hf_kwargs` go to transformers' `from_pretrained`)."""
    if os.path.isdir(path) and is_etkd_checkpoint(path):
        return EncoderModel.from_pretrained(path)
    return from_hf(path, **hf_kwargs)
