"""sliding_window_attention (reference backend) against HF LongformerSelfAttention and a dense brute force."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_parity_on_real_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from etkd.benchmarks import hf_reference as hr
from etkd.benchmarks.patterns import longformer as hl
from etkd_kernels import sliding_window_attention


def dense_sliding_window(q, k, v, window, global_mask=None, global_qkv=None, key_padding_mask=None):
    """Brute force O(seq^2) definition, written independently of the reference backend."""
    b, h, s, d = q.shape
    scale = d**-0.5
    i = torch.arange(s)
    allowed = ((i[:, None] - i[None, :]).abs() <= window // 2)[None].expand(b, s, s).clone()
    real = key_padding_mask if key_padding_mask is not None else torch.ones(b, s, dtype=torch.bool)
    if global_mask is not None:
        allowed |= global_mask[:, None, :]
    allowed &= real[:, None, :]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.nan_to_num(scores.softmax(-1)) @ v
    if global_mask is not None:
        qg, kg, vg = global_qkv if global_qkv is not None else (q, k, v)
        gs = (qg @ kg.transpose(-1, -2)) * scale
        gs = gs.masked_fill(~real[:, None, None, :], float("-inf"))
        gout = torch.nan_to_num(gs.softmax(-1)) @ vg
        out = torch.where(global_mask[:, None, :, None], gout, out)
    return out * real[:, None, :, None]


def _run_ours(module, x, real, glob, backend="reference"):
    q, k, v, gqkv = hl.longformer_qkv(module, x)
    out = sliding_window_attention(
        q,
        k,
        v,
        module.one_sided_attn_window_size * 2,
        global_mask=glob if glob.any() else None,
        global_qkv=gqkv if glob.any() else None,
        key_padding_mask=real,
        backend=backend,
    )
    return hr.merge_heads(out)


CASES = [
    # (batch, seq, heads, head_dim, window, pad, n_global)
    (1, 32, 2, 8, 8, 0, 0),  # plain band, seq a multiple of the window
    (2, 64, 2, 8, 8, 5, 0),  # key padding in one row
    (2, 64, 3, 16, 16, 0, 3),  # global tokens
    (2, 48, 2, 8, 8, 7, 2),  # globals + padding
    (2, 37, 2, 8, 8, 3, 1),  # seq not a multiple of the window (HF side padded)
    (1, 40, 2, 8, 32, 0, 1),  # window wider than half the sequence
    (2, 20, 1, 4, 4, 2, 2),  # smallest window HF accepts (one side 2)
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_hf_longformer_forward_and_grad(case):
    b, s, h, d, window, pad, n_global = case
    module = hl.longformer_module(h * d, h, window)
    x = torch.randn(b, s, h * d)
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    glob = torch.zeros(b, s, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for row in range(b):
        n_real = int(real[row].sum())
        idx = torch.randperm(n_real, generator=gen)[:n_global]
        glob[row, idx] = True

    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ref = hl.run_longformer(module, x1, real, glob)
    ours = _run_ours(module, x2, real, glob)
    assert_parity_on_real_rows(ours, ref, x2, x1, real)


def test_global_rows_without_global_qkv_use_local_projections():
    b, h, s, d = 2, 2, 24, 8
    q, k, v = torch.randn(3, b, h, s, d).unbind(0)
    glob = torch.zeros(b, s, dtype=torch.bool)
    glob[0, [0, 7]] = True
    glob[1, 20] = True
    out = sliding_window_attention(q, k, v, 4, global_mask=glob)
    assert_close(out, dense_sliding_window(q, k, v, 4, glob), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    s=st.integers(1, 40),
    d=st.sampled_from([4, 8]),
    half=st.integers(1, 12),
    data=st.data(),
)
def test_matches_dense_brute_force(b, h, s, d, half, data):
    window = 2 * half
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, qg, kg, vg = torch.randn(6, b, h, s, d, generator=gen, dtype=torch.float64).unbind(0)
    real = torch.rand(b, s, generator=gen) > data.draw(st.sampled_from([0.0, 0.3]))
    glob = (torch.rand(b, s, generator=gen) < data.draw(st.sampled_from([0.0, 0.15]))) & real
    use_g = data.draw(st.booleans()) and bool(glob.any())
    gqkv = (qg, kg, vg) if use_g else None
    leaves = [t.requires_grad_(True) for t in (q, k, v, qg, kg, vg)]
    out = sliding_window_attention(
        q, k, v, window, global_mask=glob if glob.any() else None, global_qkv=gqkv, key_padding_mask=real
    )
    exp = dense_sliding_window(q, k, v, window, glob if glob.any() else None, gqkv, real)
    assert torch.isfinite(out).all()
    assert_close(out, exp, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads_exp = torch.autograd.grad(exp, leaves, g, allow_unused=True)
    for got, want in zip(grads, grads_exp):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            assert_close(got, want, atol=1e-10)


def test_fully_padded_rows_are_zero_not_nan():
    q, k, v = torch.randn(3, 2, 2, 16, 8).unbind(0)
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1] = False  # a row of the batch with no real token at all
    real[0, 10:] = False
    out = sliding_window_attention(q, k, v, 4, key_padding_mask=real)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[0, :, 10:].abs().max() == 0


def test_long_input_uses_band_memory_only():
    """8192 tokens, window 64: a seq x seq fp32 score tensor alone would be 256 MiB per head."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = torch.randn(3, 1, 1, 8192, 16).unbind(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sliding_window_attention(q, k, v, 64)
    peak = max(e.cpu_memory_usage for e in prof.key_averages())
    assert peak < 64 * 2**20, f"largest single allocation pattern {peak / 2**20:.1f} MiB"
