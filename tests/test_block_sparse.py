"""block_sparse_attention (reference backend) against HF BigBirdBlockSparseAttention and a dense brute force.

HF numerics handled here, each on purpose:
* HF masks padded keys with a -10000 penalty instead of -inf: identical for every row that sees at least one
  real key (exp(-10000) is 0 in fp32), different only for rows whose keys are all padding; HF also zeroes
  padded query rows (from_mask). We compare real query rows only.
* HF in eval mode uses all-zero random indices, so key block 0 enters the softmax 1 + r times; HF's legacy
  plan (seq 1024/3072/4096) can pick a block the row already sees. A bool layout cannot count a block twice:
  `bigbird_layout` raises on such rand_attn, and `bigbird_block_counts` + `fold_block_counts` reproduce HF
  exactly (tested below).
* BigBirdModel uses full attention for seq <= (5 + 2r) * block: `bigbird_layout` returns a full layout there.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_parity_on_real_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from etkd.benchmarks import hf_reference as hr
from etkd.benchmarks.patterns import bigbird as hb
from etkd_kernels import BlockLayout, bigbird_layout, block_sparse_attention
from etkd_kernels.layouts.bigbird import bigbird_block_counts, fold_block_counts


def dense_block_sparse(q, k, v, layout: BlockLayout, key_padding_mask=None, scale=None):
    """Brute force O(seq^2) definition, written independently of the reference backend."""
    b, h, s, d = q.shape
    scale = d**-0.5 if scale is None else scale
    allowed = layout.to_dense()[:, :s, :s][None]  # (1, hl, s, s)
    real = key_padding_mask if key_padding_mask is not None else torch.ones(b, s, dtype=torch.bool)
    allowed = allowed & real[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.nan_to_num(scores.softmax(-1)) @ v
    return out * real[:, None, :, None]


# ---------------------------------------------------------------------------------------------------------
# HF BigBird parity
# ---------------------------------------------------------------------------------------------------------


def _hf_module(heads, head_dim, block, r, train, max_pos=512):
    module = hb.bigbird_module(heads * head_dim, heads, block, r, seed=3, max_positions=max_pos).train(train)
    return hb.record_random_blocks(module)


def _project(module, x):
    return hr.projections(module, x, module.num_attention_heads)


HF_CASES = [
    # (batch, heads, head_dim, block, random blocks, blocks, pad tokens in the last row)
    (2, 2, 8, 8, 2, 12, 5),  # block 8, padding inside the last block
    (2, 3, 8, 16, 3, 14, 20),  # block 16, padding across a block boundary (a random block may be padding)
    (1, 2, 8, 8, 1, 8, 0),  # one block above HF's (5 + 2r) * block threshold, elif-branch of HF's plan
]


@pytest.mark.parametrize("case", HF_CASES, ids=[str(c) for c in HF_CASES])
def test_matches_hf_bigbird_forward_and_grad(case):
    b, h, d, block, r, nb, pad = case
    s = nb * block
    assert s > (5 + 2 * r) * block  # HF's BigBirdModel would use block-sparse attention at this length
    module = _hf_module(h, d, block, r, train=True)  # training mode: real random blocks (no dropout here)
    x = torch.randn(b, s, h * d)
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ref = hb.run_bigbird(module, x1, real)
    rand_attn = hb.recorded_random_blocks(module, nb)
    assert rand_attn.shape == (h, nb - 2, r)
    layout = bigbird_layout(s, block, num_random_blocks=r, rand_attn=rand_attn)
    assert layout.num_heads == h
    ours = hr.merge_heads(block_sparse_attention(*_project(module, x2), layout, key_padding_mask=real))
    assert_parity_on_real_rows(ours, ref, x2, x1, real)


@pytest.mark.parametrize(
    "train, max_pos, nb, block, r",
    [
        (False, 512, 10, 8, 2),  # eval mode: all-zero rand_attn, key block 0 counted 1 + r times
        (True, 4096, 64, 16, 3),  # seq 1024: HF's legacy plan, may pick the last (global) block again
    ],
)
def test_hf_duplicated_blocks_reproduced_by_counts(train, max_pos, nb, block, r):
    b, h, d = 2, 2, 8
    s = nb * block
    module = _hf_module(h, d, block, r, train=train, max_pos=max_pos)
    x = torch.randn(b, s, h * d)
    real = torch.ones(b, s, dtype=torch.bool)
    real[0, s - 7 :] = False
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ref = hb.run_bigbird(module, x1, real)
    rand_attn = hb.recorded_random_blocks(module, nb)
    if not train:
        assert (rand_attn == 0).all()
    counts = bigbird_block_counts(s, block, rand_attn)
    q, k, v = _project(module, x2)
    q2, k2, v2, scale = fold_block_counts(q, k, v, counts, block)
    ours = hr.merge_heads(
        block_sparse_attention(q2, k2, v2, counts > 0, key_padding_mask=real, scale=scale)[..., :d]
    )
    assert_parity_on_real_rows(ours, ref, x2, x1, real)
    if (counts > 1).any():
        with pytest.raises(ValueError, match="rand_attn"):
            bigbird_layout(s, block, num_random_blocks=r, rand_attn=rand_attn)
        merged = bigbird_layout(s, block, num_random_blocks=r, rand_attn=rand_attn, allow_duplicates=True)
        assert torch.equal(merged.mask, counts > 0)


def test_hf_eval_mode_without_counts_differs():
    """The duplicated block matters: counting it once (allow_duplicates) is not HF's eval output."""
    nb, block, r, h, d = 10, 8, 2, 2, 8
    s = nb * block
    module = _hf_module(h, d, block, r, train=False)
    x = torch.randn(1, s, h * d)
    real = torch.ones(1, s, dtype=torch.bool)
    with torch.no_grad():
        ref = hb.run_bigbird(module, x, real)
        layout = bigbird_layout(
            s,
            block,
            num_random_blocks=r,
            rand_attn=hb.recorded_random_blocks(module, nb),
            allow_duplicates=True,
        )
        ours = hr.merge_heads(block_sparse_attention(*_project(module, x), layout))
    assert (ours - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Dense brute force
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    block=st.sampled_from([1, 2, 4, 8]),
    nb=st.integers(1, 6),
    density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    per_head=st.booleans(),
    data=st.data(),
)
def test_matches_dense_brute_force(b, h, block, nb, density, per_head, data):
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    s = nb * block - data.draw(st.integers(0, block - 1))  # lengths that are not a block multiple too
    q, k, v = torch.randn(3, b, h, s, 8, generator=gen).unbind(0)
    hl = h if per_head else 1
    layout = BlockLayout(torch.rand(hl, nb, nb, generator=gen) < density, block)
    real = torch.rand(b, s, generator=gen) > data.draw(st.sampled_from([0.0, 0.3]))
    kpm = real if data.draw(st.booleans()) else None
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=kpm)
    exp = dense_block_sparse(q, k, v, layout, kpm)
    assert torch.isfinite(out).all()
    assert_close(out, exp, atol=1e-5, name="forward")
    g = torch.randn_like(out)
    for got, want, name in zip(
        torch.autograd.grad(out, leaves, g), torch.autograd.grad(exp, leaves, g), ("dq", "dk", "dv")
    ):
        assert_close(got, want, atol=1e-5, name=name)


def test_plain_tensor_layout_and_scale():
    q, k, v = torch.randn(3, 2, 2, 24, 8).unbind(0)
    mask = torch.rand(2, 3, 3) < 0.6  # plain tensor: block size 24 / 3 = 8
    out = block_sparse_attention(q, k, v, mask, scale=0.3)
    assert_close(out, dense_block_sparse(q, k, v, BlockLayout(mask, 8), scale=0.3), atol=1e-5)


def test_bigbird_layout_matches_dense():
    """A generated (seeded, per-head) BigBird layout through the op equals the dense definition."""
    layout = bigbird_layout(200, 8, num_random_blocks=2, seed=5, num_heads=2)
    q, k, v = torch.randn(3, 1, 2, 200, 8).unbind(0)
    real = torch.ones(1, 200, dtype=torch.bool)
    real[0, 190:] = False
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=real)
    assert_close(out, dense_block_sparse(q, k, v, layout, real), atol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(3, 2, 2, 32, 8).unbind(0)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 2] = False  # query block 2 sees nothing
    real = torch.ones(2, 32, dtype=torch.bool)
    real[1] = False  # a batch row with no real token at all
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = block_sparse_attention(q, k, v, BlockLayout(mask, 8), key_padding_mask=real)
    assert torch.isfinite(out).all()
    assert out[:, :, 16:24].abs().max() == 0 and out[1].abs().max() == 0
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, 7, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[[1, 0, 1], [0, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    real = torch.ones(1, 7, dtype=torch.bool)
    real[0, 6:] = False
    layout = BlockLayout(mask, 3)  # seq 7 is padded to 9 inside the op

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, exc",
    [
        (BlockLayout(torch.ones(1, 3, 3, dtype=torch.bool), 8), ValueError),  # 3 blocks for a 4-block seq
        (BlockLayout(torch.ones(1, 4, 3, dtype=torch.bool), 8), ValueError),  # not square
        (BlockLayout(torch.ones(3, 4, 4, dtype=torch.bool), 8), ValueError),  # 3 heads for 2
        (torch.ones(1, 4, 4), TypeError),  # float tensor
        (torch.ones(4, 4, dtype=torch.bool), TypeError),  # rank 2
        (torch.ones(1, 5, 5, dtype=torch.bool), ValueError),  # plain tensor: 5 blocks do not divide seq 32
        ("dense", TypeError),
    ],
)
def test_bad_layout_raises(layout, exc):
    q, k, v = torch.randn(3, 1, 2, 32, 8).unbind(0)
    with pytest.raises(exc, match="layout"):
        block_sparse_attention(q, k, v, layout)


def test_long_input_uses_block_memory_only():
    """8192 tokens, BigBird blocks of 64: a seq x seq fp32 score tensor alone would be 256 MiB per head."""
    from torch.profiler import ProfilerActivity, profile

    layout = bigbird_layout(8192, 64, num_random_blocks=3)
    q, k, v = torch.randn(3, 1, 1, 8192, 16).unbind(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        block_sparse_attention(q, k, v, layout)
    peak = max(e.cpu_memory_usage for e in prof.key_averages())
    assert peak < 64 * 2**20, f"largest single allocation pattern {peak / 2**20:.1f} MiB"
