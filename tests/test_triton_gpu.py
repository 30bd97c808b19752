"""Triton kernels on a real GPU: parity with `reference` at realistic sizes. Skipped without CUDA. GPU timings
against SDPA, FlexAttention and flash-attn: `python -m etkd_kernels.gpu_check` (the acceptance run) and the
harness, `python -m etkd.benchmarks.core --device cuda --dtype fp16 --backends triton,cuda`.

Run it in its own process (`pytest tests/test_triton_gpu.py -s`): tests/test_triton_kernels.py sets
TRITON_INTERPRET=1 for the whole session, and kernels jitted under it would run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_parity, sliding_window_call

from etkd_kernels import (
    BlockLayout,
    bigbird_layout,
    block_sparse_attention,
    nystrom_attention,
)

# Skipped per test at run time without a GPU or under TRITON_INTERPRET=1 (tests/conftest.py), so these tests
# can only pass on a GPU with compiled kernels.
pytestmark = pytest.mark.cuda


# (atol, rtol): forward, gradients. Realistic sizes sum over thousands of keys, so allow more than the tiny
# interpreter cases; fp32 uses true fp32 products (input_precision="ieee").
TOL = {
    torch.float32: ((2e-4, 1e-4), (5e-4, 1e-3)),
    torch.float16: ((4e-3, 1e-2), (1e-2, 2e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _parity(call, tensors, dtype, name):
    return backend_parity(call, tensors, TOL[dtype], name)


def _masks(b, s, device, n_global=4, pad=100):
    gm = torch.zeros(b, s, dtype=torch.bool, device=device)
    gm[:, torch.randperm(s, device=device)[:n_global]] = True
    kpm = torch.ones(b, s, dtype=torch.bool, device=device)
    kpm[-1, s - pad :] = False
    return gm, kpm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("separate", [False, True])
def test_sliding_window_parity_gpu(dtype, separate):
    b, h, s, d, window = 2, 4, 1000, 64, 256  # 1000: not a multiple of any tile
    dev = torch.device("cuda")
    tensors = [torch.randn(b, h, s, d, device=dev, dtype=dtype) for _ in range(6 if separate else 3)]
    gm, kpm = _masks(b, s, dev)

    _parity(sliding_window_call(window, gm, kpm), tensors, dtype, "sliding_window")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [64, 96])
def test_block_sparse_parity_gpu(dtype, block):
    b, h, d = 2, 4, 64
    s = 16 * block - 37  # padded inside the op
    dev = torch.device("cuda")
    layout = bigbird_layout(16 * block, block, num_random_blocks=2, num_heads=h).to(dev)
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype) for _ in range(3))
    _, kpm = _masks(b, s, dev)

    def call(q, k, v, backend):
        return block_sparse_attention(q, k, v, layout, key_padding_mask=kpm, backend=backend)

    _parity(call, [q, k, v], dtype, "block_sparse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nystrom_parity_gpu(dtype):
    b, h, s, d, landmarks = 2, 4, 1000, 64, 64  # 1000 / 64: ragged last segment
    dev = torch.device("cuda")
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype) for _ in range(3))
    _, kpm = _masks(b, s, dev)

    def call(q, k, v, backend):
        return nystrom_attention(q, k, v, landmarks, key_padding_mask=kpm, backend=backend)

    _parity(call, [q, k, v], dtype, "nystrom")


def test_layout_object_roundtrip_gpu():
    """A plain bool tensor layout and a BlockLayout give the same result on the GPU."""
    dev = torch.device("cuda")
    mask = torch.rand(1, 8, 8, device=dev) < 0.4
    q, k, v = (torch.randn(1, 2, 512, 64, device=dev) for _ in range(3))
    a = block_sparse_attention(q, k, v, mask, backend="triton")
    b = block_sparse_attention(q, k, v, BlockLayout(mask, 64), backend="triton")
    assert torch.equal(a, b)
