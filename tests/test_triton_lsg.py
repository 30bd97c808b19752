"""Triton LSG under TRITON_INTERPRET=1 on the CPU: forward and gradients equal the `reference` backend.

Run in its own pytest process with TRITON_INTERPRET=1 set (the interpreter is read when the kernels are
defined, so it cannot be switched on inside a shared pytest process); skipped otherwise. Tiles are 16 x 16 under the interpreter, so the shapes below cross tile edges.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    # Switching the interpreter on here would leak into every other module of a shared pytest process.
    pytest.skip(
        "run in its own process: TRITON_INTERPRET=1 python -m pytest tests/test_triton_lsg.py",
        allow_module_level=True,
    )
pytest.importorskip("triton")

import torch  # noqa: E402
from helpers import assert_close  # noqa: E402

from etkd_kernels import lsg_attention  # noqa: E402

pytestmark = pytest.mark.triton_interpret

# (forward (atol, rtol), gradients (atol, rtol)) per dtype, as in tests/test_triton_kernels.py.
TOL = {
    torch.float32: ((1e-5, 0.0), (2e-5, 0.0)),
    torch.float16: ((2e-3, 5e-3), (4e-3, 1e-2)),
}

CASES = [
    # (batch, heads, seq, head_dim, block, sparse_block, factor, n_global, pad, type, dtype)
    pytest.param(2, 2, 72, 16, 8, 8, 4, 1, 11, "pooling", torch.float32, id="pooling-padded"),
    # 20-token blocks: query tiles of 16 cut a block, key tiles cross block edges; seq not a multiple
    pytest.param(1, 2, 110, 8, 20, 10, 2, 2, 0, "stride", torch.float32, id="stride-ragged-2-globals"),
    pytest.param(1, 3, 64, 16, 8, 8, 4, 1, 5, "bos_pooling", torch.float32, id="bos-pooling"),
    pytest.param(1, 2, 64, 16, 8, 8, 2, 0, 3, "block_stride", torch.float32, id="block-stride-no-global"),
    pytest.param(1, 2, 81, 16, 9, 9, 3, 1, 4, "norm", torch.float32, id="norm-odd-step"),
    pytest.param(1, 2, 48, 16, 8, 8, 4, 1, 0, "none", torch.float32, id="local-global-only"),
    pytest.param(1, 2, 64, 16, 8, 8, 4, 1, 6, "pooling", torch.float16, id="fp16"),
]


@pytest.mark.parametrize("b,h,s,d,block,sblock,factor,n_global,pad,sparsity_type,dtype", CASES)
def test_triton_lsg_matches_reference(b, h, s, d, block, sblock, factor, n_global, pad, sparsity_type, dtype):
    _check(b, h, s, d, block, sblock, factor, n_global, pad, sparsity_type, dtype, {})


DROPOUT_CASES = [
    # Attention dropout (issue 27): local keys at their positions, global keys at theirs, compressed keys at
    # columns S + t (etkd_kernels/reference/lsg.py), the global rows over every key.
    pytest.param(2, 2, 72, 16, 8, 8, 4, 1, 11, "pooling", torch.float32, id="pooling-padded"),
    pytest.param(1, 2, 110, 8, 20, 10, 2, 2, 0, "stride", torch.float32, id="stride-ragged-2-globals"),
    pytest.param(1, 2, 64, 16, 8, 8, 4, 1, 6, "pooling", torch.float16, id="fp16"),
]


@pytest.mark.parametrize("b,h,s,d,block,sblock,factor,n_global,pad,sparsity_type,dtype", DROPOUT_CASES)
def test_triton_lsg_dropout_matches_reference(
    b, h, s, d, block, sblock, factor, n_global, pad, sparsity_type, dtype
):
    drop = dict(dropout_p=0.25, dropout_seed=2**35 + 11, dropout_offset=9)
    _check(b, h, s, d, block, sblock, factor, n_global, pad, sparsity_type, dtype, drop)


def _check(b, h, s, d, block, sblock, factor, n_global, pad, sparsity_type, dtype, drop):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    grad = torch.randn(b, h, s, d, generator=gen).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = lsg_attention(
            *leaves,
            block_size=block,
            sparse_block_size=sblock,
            sparsity_factor=factor,
            sparsity_type=sparsity_type,
            num_global_tokens=n_global,
            key_padding_mask=real,
            backend=backend,
            **drop,
        )
        out.backward(grad)
        results[backend] = (out, [t.grad for t in leaves])
    (fwd_tol, bwd_tol) = TOL[dtype]
    out_r, grads_r = results["reference"]
    out_t, grads_t = results["triton"]
    assert_close(out_t, out_r, *fwd_tol, name="forward")
    for got, want, name in zip(grads_t, grads_r, ("dq", "dk", "dv")):
        assert_close(got, want, *bwd_tol, name=name)


@pytest.mark.parametrize(
    "sparsity_type, n_global, factor, block",
    [
        ("pooling", 3, 4, 8),  # globals in a leading block of their own; empty pooled groups not attended
        ("bos_pooling", 1, 2, 8),  # pooled by the first non-global query
        ("stride", 2, 8, 8),  # step 1: only the right sparse window shifts
    ],
)
def test_triton_lsg_model_variant_matches_reference(sparsity_type, n_global, factor, block):
    """variant="model" (lsg-converter's model files: prepended globals) on triton = reference."""
    b, h, s, d = 2, 2, 75, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    real[-1, 40:] = False
    grad = torch.randn(b, h, s, d, generator=gen)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = lsg_attention(
            *leaves, block_size=block, sparse_block_size=block, sparsity_factor=factor,
            sparsity_type=sparsity_type, num_global_tokens=n_global, key_padding_mask=real,
            variant="model", backend=backend,
        )  # fmt: skip
        out.backward(grad)
        results[backend] = (out, [t.grad for t in leaves])
    (fwd_tol, bwd_tol) = TOL[torch.float32]
    assert_close(results["triton"][0], results["reference"][0], *fwd_tol, name="forward")
    for got, want, name in zip(results["triton"][1], results["reference"][1], ("dq", "dk", "dv")):
        assert_close(got, want, *bwd_tol, name=name)
