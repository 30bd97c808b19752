"""Fused LSG on the `cpu` backend: forward and gradients equal the `reference` backend (fp32).

Each case comment says which branch of csrc/cpu/lsg.cpp / etkd_kernels/cpu/lsg.py it covers.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from etkd_kernels import available_backends, lsg_attention

pytestmark = pytest.mark.skipif(
    not available_backends()["cpu"].available, reason=f"cpu backend: {available_backends()['cpu'].reason}"
)

TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling"]
CASES = [
    # (batch, heads, seq, head_dim, block, sparse_block, factor, n_global, pad)
    (2, 3, 96, 16, 16, 16, 4, 1, 13),  # LSG's shape (sparse block = block), padding over a whole block
    (1, 2, 100, 8, 16, 8, 2, 2, 0),  # seq not a multiple of the block, 2 globals, windows past the ends
    (2, 2, 72, 8, 8, 5, 4, 0, 9),  # no globals, sparse block not a multiple of the step
    (1, 2, 81, 8, 9, 9, 3, 1, 4),  # odd step: shifted windows overlapping the local keys
    (1, 2, 40, 4, 4, 4, 1, 1, 3),  # factor 1: plain tokens as sparse keys
    (1, 1, 20, 8, 8, 8, 2, 1, 0),  # <= 2 blocks: local + global only
    (1, 2, 320, 16, 160, 40, 4, 1, 7),  # block > 128: query tiles of 64 rows inside a block
]


def _run(backend, q, k, v, real, case, sparsity_type, grad):
    b, h, s, d, block, sblock, factor, n_global, pad = case
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    kw = dict(block_size=block, sparse_block_size=sblock, sparsity_factor=factor, num_global_tokens=n_global)
    out = lsg_attention(*leaves, sparsity_type=sparsity_type, key_padding_mask=real, backend=backend, **kw)
    out.backward(grad)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("sparsity_type", TYPES)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_cpu_matches_reference(case, sparsity_type):
    b, h, s, d, block, sblock, factor, n_global, pad = case
    if sparsity_type == "bos_pooling" and n_global == 0:
        pytest.skip("bos_pooling needs a global first token")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    grad = torch.randn(b, h, s, d, generator=gen)
    out_r, grads_r = _run("reference", q, k, v, real, case, sparsity_type, grad)
    out_c, grads_c = _run("cpu", q, k, v, real, case, sparsity_type, grad)
    assert torch.isfinite(out_c).all()
    assert_close(out_c, out_r, atol=2e-6, name="forward")
    for got, want, name in zip(grads_c, grads_r, ("dq", "dk", "dv")):
        assert_close(got, want, atol=1e-5, name=name)


def test_fully_padded_batch_row_is_zero_with_finite_grads():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 48, 8, generator=gen, requires_grad=True) for _ in range(3))
    real = torch.ones(2, 48, dtype=torch.bool)
    real[1] = False
    out = lsg_attention(
        q, k, v, block_size=8, sparse_block_size=8, sparsity_factor=4, key_padding_mask=real, backend="cpu"
    )
    assert out[1].abs().max() == 0 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g[1].abs().max() == 0 for g in grads[:1])  # padded query rows get no gradient
