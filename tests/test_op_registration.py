"""Every op is a torch.library custom op: gradcheck in float64, torch.compile(fullgraph=True) with aot_eager (the
op calls of tests/test_support_matrix.py, which also opchecks every forward and backward op), and one inductor
compile of a small model."""

from __future__ import annotations

import pytest
import torch
from test_support_matrix import CALLS, N_EXTRA

import etkd_kernels as ek


def _inputs(op: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    n = 3 + N_EXTRA.get(op, 0)
    return [torch.randn(2, 2, 12, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(n)]


def _op(op: str):
    """The public op on (q, k, v, *extra) with padding (and global tokens), as test_support_matrix calls it."""
    return lambda q, k, v, *extra: CALLS[op](q, k, v, "auto", extra)


@pytest.mark.parametrize("op", list(CALLS))
def test_gradcheck_float64(op):
    assert torch.autograd.gradcheck(_op(op), tuple(_inputs(op)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", list(CALLS))
def test_compile_fullgraph(op):
    torch._dynamo.reset()
    leaves = [t.detach().float().requires_grad_(True) for t in _inputs(op)]
    fn = _op(op)
    compiled = torch.compile(lambda *t: fn(*t) * 2.0, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    torch.testing.assert_close(out, fn(*leaves) * 2.0, atol=1e-6, rtol=0)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


class _TinyEncoderLayer(torch.nn.Module):
    """Projections -> sliding-window attention -> output projection: the smallest model around an etkd op."""

    def __init__(self, d_model: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = ek.sliding_window_attention(q, k, v, 4, key_padding_mask=real)
        return self.out(att.transpose(1, 2).reshape(b, s, d)) + x


def test_inductor_compiles_a_small_model():
    """torch.compile with the default (inductor) backend, in the default run: same forward and gradients as
    eager, with the etkd op kept as one opaque node of the generated graph."""
    torch._dynamo.reset()
    model = _TinyEncoderLayer()
    x = torch.randn(2, 12, 16, requires_grad=True)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[-1, -3:] = False
    eager = model(x, real)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, real)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-5, rtol=1e-5)
