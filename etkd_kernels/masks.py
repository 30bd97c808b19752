"""Typed attention structures.

A block layout is an object, not a dense seq x seq tensor: it carries its block size so an op can check it
against the sequence, and it can hand kernels a look-up table of non-empty key blocks per query block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def lut(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Look-up table for kernels: int32 (heads, q_blocks, max_nnz) key-block indices (ascending, padded
        with the last valid index) and int32 (heads, q_blocks) counts."""
        return layout_lut(self.mask)

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(self.mask.to(device), self.block_size, self.name)


def layout_lut(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the ascending list of allowed key blocks (see `BlockLayout.lut`)."""
    counts = mask.sum(-1, dtype=torch.int32)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    kb = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32)
    # Sort allowed blocks first, keeping ascending order among them (stable sort on the negated mask).
    key = torch.where(mask, kb, kb + mask.shape[-1])
    order = key.argsort(dim=-1, stable=True)[..., :width].to(torch.int32)
    last = order.gather(-1, (counts.clamp(min=1) - 1).long().unsqueeze(-1))
    pos = torch.arange(width, device=mask.device).expand_as(order)
    lut = torch.where(pos < counts.unsqueeze(-1), order, last)
    return lut.contiguous(), counts.contiguous()
