"""Where an op's warning (a cpu kernel's, a fallback's) should point: the user's line, not the library's."""

from __future__ import annotations

import os
import sys


def caller_stacklevel() -> int:
    """`warnings.warn`'s stacklevel, for a warning raised in the calling function, of the first frame outside the
    library code that runs an op (etkd_kernels, etkd's models/HF integration/drivers, torch, transformers): an op
    runs through torch.library, autograd and model code at a depth that varies, and the line that called it is
    the one the user needs to see."""
    frame, level = sys._getframe(1), 1
    inside = _library_dirs()
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _library_dirs() -> tuple[str, ...]:
    names = (
        "etkd_kernels",
        "torch",
        "transformers",
        "etkd.models",
        "etkd.hf",
        "etkd.distill",
        "etkd.benchmarks",
    )
    dirs = [
        os.path.join(path, "")
        for name in names
        if (module := sys.modules.get(name)) is not None
        for path in getattr(module, "__path__", ())
    ]
    return tuple(dirs)
