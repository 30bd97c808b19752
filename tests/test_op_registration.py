"""Every op is a torch.library custom op: gradcheck in float64, torch.compile(fullgraph=True) with aot_eager, and
one inductor compile of a small model. opcheck of every forward and backward op: tests/test_support_matrix.py."""

from __future__ import annotations

import pytest
import torch

import etkd_kernels as ek


def _inputs(b=1, h=2, s=12, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _real(b, s, pad=3):
    real = torch.ones(b, s, dtype=torch.bool)
    real[-1, s - pad :] = False
    return real


# Each entry: a name and a function of (q, k, v) calling the public op on small shapes.
OPS = {
    "sliding_window": lambda q, k, v: ek.sliding_window_attention(
        q, k, v, 4, key_padding_mask=_real(q.shape[0], q.shape[2])
    ),
    "sliding_window_global": lambda q, k, v: ek.sliding_window_attention(
        q,
        k,
        v,
        4,
        global_mask=torch.arange(q.shape[2]).eq(1).expand(q.shape[0], -1).contiguous(),
        global_qkv=(q * 0.5, k * 2.0, v + 1.0),
    ),
    "full": lambda q, k, v: ek.full_attention(q, k, v, key_padding_mask=_real(q.shape[0], q.shape[2])),
    "block_sparse": lambda q, k, v: ek.block_sparse_attention(
        q,
        k,
        v,
        ek.longformer_layout(q.shape[2], block_size=4, num_window_blocks=1),
        key_padding_mask=_real(q.shape[0], q.shape[2]),
    ),
    "lsg": lambda q, k, v: ek.lsg_attention(
        q,
        k,
        v,
        block_size=4,
        sparse_block_size=2,
        sparsity_factor=2,
        num_global_tokens=1,
        key_padding_mask=_real(q.shape[0], q.shape[2]),
    ),
    "nystrom": lambda q, k, v: ek.nystrom_attention(
        q, k, v, 3, key_padding_mask=_real(q.shape[0], q.shape[2])
    ),
}


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_float64(name):
    q, k, v = _inputs(b=2)
    assert torch.autograd.gradcheck(lambda a, b_, c: OPS[name](a, b_, c), (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(OPS))
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    q, k, v = (t.detach().float().requires_grad_(True) for t in _inputs())
    fn = OPS[name]
    compiled = torch.compile(lambda a, b_, c: fn(a, b_, c) * 2.0, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v) * 2.0, atol=1e-6, rtol=0)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


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
    real = _real(2, 12)
    eager = model(x, real)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, real)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-5, rtol=1e-5)
