"""etkd_kernels: efficient attention ops (sliding window, block-sparse, LSG, Nystrom, full) with swappable
backends (`reference`, `cpu`, `triton`, `cuda`).

Importing this package never touches a GPU and never fails because a compiled part is missing:
`available_backends()` says what is usable and why not.
"""

from . import layouts
from .dispatch import BackendInfo, available_backends, selected_backend_name, support_matrix, use_backend
from .layouts import *  # noqa: F403  every pattern's layout builder (`layouts.__all__`)
from .masks import BlockLayout
from .ops.block_sparse import block_sparse_attention
from .ops.full import full_attention
from .ops.lsg import lsg_attention
from .ops.nystrom import nystrom_attention
from .ops.sliding_window import sliding_window_attention

__all__ = [
    "BackendInfo",
    "BlockLayout",
    "available_backends",
    "block_sparse_attention",
    "full_attention",
    "lsg_attention",
    "nystrom_attention",
    "selected_backend_name",
    "sliding_window_attention",
    "support_matrix",
    "use_backend",
    *layouts.__all__,
]
__version__ = "0.1.0"
