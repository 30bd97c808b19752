"""Loading a checkpoint of either format: the one module above `encoder` (our format) and `hf` (transformers
checkpoints), so neither has to import the other's loader."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from .config import CONFIG_NAME, is_etkd_checkpoint
from .encoder import EncoderModel
from .hf import from_hf

# Other checkpoint formats `load` reads (the counterparts of `encoder.SAVE_FORMATS`): name ->
# (`fn(config.json dict) -> bool`, whether a folder is one; `fn(directory) -> EncoderModel`), registered by the
# module that implements the format (it imports this one).
LOAD_FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[str | os.PathLike], EncoderModel]]] = {}


def load(path: str | os.PathLike, **hf_kwargs) -> EncoderModel:
    """An `EncoderModel` (eval mode) from our format (a folder saved by `save_pretrained`), a folder of another
    format in `LOAD_FORMATS` (the module of that format registers it), or an HF checkpoint folder or hub name
    (`hf_kwargs` go to transformers' `from_pretrained`). A checkpoint of a model etkd does not reproduce exactly
    is refused."""
    if os.path.isdir(path) and is_etkd_checkpoint(path):
        return EncoderModel.from_pretrained(path)
    config = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config):
        with open(config) as f:
            d = json.load(f)
        for is_format, read in LOAD_FORMATS.values():
            if is_format(d):
                return read(path)
    return from_hf(path, **hf_kwargs)
