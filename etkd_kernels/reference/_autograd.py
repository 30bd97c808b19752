"""Backward by recomputation: the reference backend differentiates its own forward with autograd (defined in
`etkd_kernels._shared`, which the fused backends use too)."""

from .._shared import recompute_backward

__all__ = ["recompute_backward"]
