"""The transformers release etkd.hf needs, checked on import (before the modules that hook transformers load)."""

from __future__ import annotations

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "5.6"  # setup.py's floor: the first release the HF suite passes on


def require_transformers(version: str = transformers.__version__) -> None:
    """Refuse, naming the fix, a transformers older than etkd.hf's hooks expect (an install that skipped the
    dependency check, e.g. `pip install --no-deps`): below it they fail later, inside a model's forward."""
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(
            f"etkd.hf needs transformers >= {MIN_TRANSFORMERS}, found {version}: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


require_transformers()
