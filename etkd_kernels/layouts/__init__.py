"""Block layout builders: each returns a `BlockLayout` (bool (heads or 1, blocks, blocks) + block size).

A layout covers ceil(seq_len / block_size) blocks; the ops pad the sequence to that many blocks. seq_len 0 gives
the empty layout (no blocks), which every op takes for a sequence of length 0. One module per
pattern's layout (`layouts/<name>.py`, its builders in `__all__`); importing the package imports every module
in it and re-exports their builders (`etkd_kernels.layouts.<builder>`, listed in this package's `__all__`, and
`etkd_kernels.<builder>`), so neither this file nor `etkd_kernels/__init__.py` names them.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from .._checks import check_positive_int
from ..masks import BlockLayout


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size); seq_len a checked int >= 0 (every op takes seq 0), block_size a positive int."""
    check_positive_int(seq_len, "seq_len", minimum=0)
    check_positive_int(block_size, "block_size")
    return -(-seq_len // block_size)


def empty_layout(block_size: int, name: str, num_heads: int = 1) -> BlockLayout:
    """The layout of a sequence of length 0 (no blocks): what every builder returns for seq_len 0, whatever
    its other settings (global blocks, random blocks) would ask of blocks that are not there."""
    return BlockLayout(torch.zeros(num_heads, 0, 0, dtype=torch.bool), block_size, name)


__all__: list[str] = []  # every layout module's builders (`etkd_kernels` re-exports them at the top level)


def _discover() -> None:
    """Import every layout module of this package (by name) and re-export the builders in its `__all__`."""
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{m.name}")
            globals().update({name: getattr(module, name) for name in module.__all__})
            __all__.extend(module.__all__)


_discover()
