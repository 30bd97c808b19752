"""Typed attention structures and the per-structure index tables every backend reads.

A block layout is an object, not a dense seq x seq tensor: it carries its block size so an op can check it
against the sequence, and it hands kernels a look-up table of non-empty key blocks per query block. Global
tokens are `GlobalTokens`: the mask plus the compact per-batch list of global positions.

Both tables are built by one function each (`layout_lut`, `GlobalTokens.of`), on the tensors' own device
without a host synchronisation, and cached per mask tensor (identity and in-place version), so a layout
built once per model costs one LUT per device and a forward and its backward share one global list.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import _checks


class _TensorCache:
    """A small LRU keyed by the identity and version counter of tensors. An entry holds its key tensors,
    so their ids cannot be reused by other tensors while cached; in-place edits bump `_version`."""

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple, build):
        key = tuple((id(t), t._version) if t is not None else None for t in tensors) + extra
        hit = self.entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
            self.entries.move_to_end(key)
            return hit[1]
        value = build()
        self.entries[key] = (tensors, value)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block may attend to.

    mask: bool tensor (heads or 1, q_blocks, k_blocks); block_size: tokens per block; name: the builder.
    The plain-PyTorch meaning for a sequence of length q_blocks * block_size is the dense boolean mask
    `mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)`.
    """

    mask: torch.Tensor
    block_size: int
    name: str = "custom"
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 3:
            got = getattr(self.mask, "shape", type(self.mask).__name__)
            raise TypeError(
                f"layout.mask: expected a bool tensor (heads or 1, q_blocks, k_blocks), got {got}"
            )
        if int(self.block_size) < 1:
            raise ValueError(f"layout.block_size: expected a positive int, got {self.block_size}")

    @property
    def num_heads(self) -> int:
        return self.mask.shape[0]

    @property
    def q_blocks(self) -> int:
        return self.mask.shape[1]

    @property
    def k_blocks(self) -> int:
        return self.mask.shape[2]

    @property
    def seq_len(self) -> int:
        return self.q_blocks * self.block_size

    def density(self) -> float:
        return self.mask.float().mean().item()

    def to_dense(self) -> torch.Tensor:
        """The (heads or 1, seq, seq) bool mask this layout stands for (tests and small inputs only)."""
        b = self.block_size
        return self.mask.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)

    def lut(self, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Look-up table for kernels: int32 (heads, q_blocks, width) key-block indices (ascending, padded
        with the last valid index) and int32 (heads, q_blocks) counts; `transpose` gives the query blocks
        per key block. Cached: see `cached_lut`."""
        return cached_lut(self.mask, transpose)

    def to(self, device: torch.device | str) -> BlockLayout:
        """This layout on `device`; the copy is kept, so a CPU layout used with GPU tensors is copied (and
        its LUT built) once, not on every call."""
        device = torch.device(device)
        if self.mask.device == device:
            return self
        hit = self._on_device.get(device)
        if hit is None:
            hit = self._on_device[device] = BlockLayout(self.mask.to(device), self.block_size, self.name)
        return hit


_LUTS = _TensorCache()


def cached_lut(mask: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`layout_lut(mask)` (of the transposed layout with `transpose`), built once per mask tensor and version.

    Every backend reads its LUT here; a layout built once per model is turned into a LUT once per device.
    """
    return _LUTS.get((mask,), (transpose,), lambda: layout_lut(mask.transpose(-1, -2) if transpose else mask))


def layout_lut(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the ascending list of allowed key blocks (see `BlockLayout.lut`).

    On the CPU the width is the largest count; on other devices it is the number of key blocks, so building
    the table never waits for the device (entries past a row's count are never read by any kernel).
    """
    counts = mask.sum(-1, dtype=torch.int32)
    if _checks.on_host(mask.device):
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    else:
        width = max(mask.shape[-1], 1)
    kb = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32)
    # Sort allowed blocks first, keeping ascending order among them (stable sort on the negated mask).
    key = torch.where(mask, kb, kb + mask.shape[-1])
    order = key.argsort(dim=-1, stable=True)[..., :width].to(torch.int32)
    last = order.gather(-1, (counts.clamp(min=1) - 1).long().unsqueeze(-1))
    pos = torch.arange(width, device=mask.device).expand_as(order)
    lut = torch.where(pos < counts.unsqueeze(-1), order, last)
    return lut.contiguous(), counts.contiguous()


@dataclass(frozen=True)
class GlobalTokens:
    """Global tokens of a batch: `mask` (batch, seq) bool restricted to real tokens, and the compact list
    `index` (batch, seq) int32 (each row's global positions first, ascending; entries past `count[b]` are
    never read) with `count` (batch,) int32. The list is as wide as the sequence, so building it needs no
    host synchronisation on a GPU (its true width would be a device-to-host read)."""

    mask: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor

    @staticmethod
    def of(global_mask: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> GlobalTokens:
        """Cached per (global_mask, key_padding_mask) tensor pair: a forward and its backward share it."""
        return _GLOBALS.get(
            (global_mask, key_padding_mask), (), lambda: _global_tokens(global_mask, key_padding_mask)
        )


def _global_tokens(global_mask: torch.Tensor, key_padding_mask: torch.Tensor | None) -> GlobalTokens:
    glob = global_mask if key_padding_mask is None else global_mask & key_padding_mask
    count = glob.sum(-1, dtype=torch.int32)
    # Stable sort of "is not global" puts the global positions first, in ascending order.
    index = torch.argsort((~glob).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return GlobalTokens(glob.contiguous(), index.contiguous(), count.contiguous())


_GLOBALS = _TensorCache()
