"""Loading a checkpoint of either format: the one module above `encoder` (our format) and `hf` (transformers
checkpoints), so neither has to import the other's loader."""

from __future__ import annotations

import json
import os

from .config import CONFIG_NAME, is_etkd_checkpoint
from .encoder import EncoderModel
from .hf import from_hf
from .lsg import is_lsg_config, load_lsg


def load(path: str | os.PathLike, **hf_kwargs) -> EncoderModel:
    """An `EncoderModel` (eval mode) from our format (a folder saved by `save_pretrained`), an lsg-converter
    LSG checkpoint folder (models/lsg.py), or an HF checkpoint folder or hub name (`hf_kwargs` go to
    transformers' `from_pretrained`). A checkpoint of a model etkd does not reproduce exactly is refused."""
    if os.path.isdir(path) and is_etkd_checkpoint(path):
        return EncoderModel.from_pretrained(path)
    config = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config):
        with open(config) as f:
            if is_lsg_config(json.load(f)):
                return load_lsg(path)
    return from_hf(path, **hf_kwargs)
