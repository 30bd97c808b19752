"""full_attention: reference against torch SDPA, and the `cpu` backend (ATen's flash CPU kernel) against
the reference, forward and gradients, with padding and a batch row that is all padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import etkd_kernels as ek

CPU_OK = ek.available_backends()["cpu"].available


def _inputs(b, h, s, d, pad_rows=True):
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    if pad_rows:
        real[-1, s // 2 :] = False
    return q, k, v, real


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 37, 16), (2, 2, 128, 64)])
def test_reference_equals_sdpa(shape):
    q, k, v, real = _inputs(*shape)
    out = ek.full_attention(q, k, v, key_padding_mask=real, backend="reference")
    exp = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :]) * real[:, None, :, None]
    assert_close(out, exp, atol=1e-5, name="forward")


@pytest.mark.skipif(not CPU_OK, reason="cpu backend not built")
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 37, 16), (2, 2, 128, 64)])
@pytest.mark.parametrize("padding", [False, True])
def test_cpu_equals_reference(shape, padding):
    q, k, v, real = _inputs(*shape, pad_rows=padding)
    if padding and shape[0] > 1:
        real[0] = False  # a batch row with no real token at all
    kpm = real if padding else None
    outs, grads = [], []
    g = torch.randn(shape)
    for backend in ("cpu", "reference"):
        out = ek.full_attention(q, k, v, key_padding_mask=kpm, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    assert torch.isfinite(outs[0]).all()
    assert_close(outs[0], outs[1], atol=1e-5, name="forward")
    for name, a, b in zip("qkv", *grads):
        assert_close(a, b, atol=1e-4, name=f"d{name}")
