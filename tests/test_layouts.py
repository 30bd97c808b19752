"""Layout builders: shapes, the structure each promises, reproducibility and argument errors."""

from __future__ import annotations

import pytest
import torch

from etkd_kernels import BlockLayout, bigbird_layout, fixed_layout, longformer_layout, lsg_layout
from etkd_kernels.layouts.bigbird import bigbird_block_counts


def _band(nb, half):
    i = torch.arange(nb)
    return (i[:, None] - i[None, :]).abs() <= half


@pytest.mark.parametrize(
    "seq, block, r, heads", [(512, 16, 3, 2), (200, 8, 2, 1), (170, 10, 1, 3), (1024, 16, 3, 2)]
)
def test_bigbird_generated_structure(seq, block, r, heads):
    layout = bigbird_layout(seq, block, num_random_blocks=r, seed=7, num_heads=heads)
    nb = -(-seq // block)
    assert isinstance(layout, BlockLayout) and layout.mask.shape == (heads, nb, nb)
    assert layout.block_size == block and layout.name == "bigbird"
    m = layout.mask
    assert m[:, [0, -1]].all() and m[:, :, [0, -1]].all()  # global first and last blocks
    assert (m & _band(nb, 1)).eq(_band(nb, 1)).all()  # the window
    base = _band(nb, 1)
    base[[0, -1]] = True
    base[:, [0, -1]] = True
    extra = (m & ~base).sum(-1)[:, 1:-1]  # random blocks of each non-global row, never window/global
    assert (extra == r).all(), extra
    # Reproducible from the seed, different with another seed, per-head random blocks.
    assert torch.equal(bigbird_layout(seq, block, num_random_blocks=r, seed=7, num_heads=heads).mask, m)
    assert not torch.equal(bigbird_layout(seq, block, num_random_blocks=r, seed=8, num_heads=heads).mask, m)
    if heads > 1:
        assert not torch.equal(m[0], m[1])


def test_bigbird_short_sequence_is_full():
    # BigBirdModel uses full attention for seq <= (5 + 2r) * block (here 11 * 16 = 176).
    layout = bigbird_layout(176, 16, num_random_blocks=3)
    assert layout.mask.all() and layout.mask.shape == (1, 11, 11) and layout.name == "bigbird_full"
    assert not bigbird_layout(177, 16, num_random_blocks=3).mask.all()


def test_bigbird_rand_attn_layout_and_counts():
    nb, r = 8, 2
    # (1 head, nb - 2, r); row 3 lists global block 0: a duplicate HF would count twice.
    ra = torch.tensor([[[3, 5], [4, 6], [5, 0], [1, 6], [1, 2], [2, 3]]])
    counts = bigbird_block_counts(nb * 4, 4, ra)
    assert counts.shape == (1, nb, nb) and counts[0, 3, 0] == 2 and counts.max() == 2
    with pytest.raises(ValueError, match="rand_attn"):
        bigbird_layout(nb * 4, 4, num_random_blocks=r, rand_attn=ra)
    layout = bigbird_layout(
        nb * 4, 4, num_random_blocks=r, rand_attn=[a.numpy() for a in ra], allow_duplicates=True
    )
    assert torch.equal(layout.mask, counts > 0)
    assert layout.mask[0, 1, 3] and layout.mask[0, 1, 5] and not layout.mask[0, 1, 4]


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(seq_len=-1), ValueError, "seq_len"),
        (dict(seq_len=256, block_size=0), ValueError, "block_size"),
        (dict(seq_len=256, num_window_blocks=2), ValueError, "num_window_blocks"),
        (dict(seq_len=256, num_random_blocks=-1), ValueError, "num_random_blocks"),
        (
            dict(seq_len=256, block_size=16, rand_attn=torch.zeros(2, 5, 3, dtype=torch.long)),
            ValueError,
            "rand_attn",
        ),
        (dict(seq_len=256, block_size=16, rand_attn=torch.full((2, 14, 3), 16)), ValueError, "rand_attn"),
        (dict(seq_len=256, block_size=16, rand_attn=torch.zeros(2, 14, 3)), TypeError, "rand_attn"),
    ],
)
def test_bigbird_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        bigbird_layout(**kwargs)


@pytest.mark.parametrize("builder", [bigbird_layout, longformer_layout, lsg_layout, fixed_layout])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_builder_gives_seq_0_an_empty_layout_the_op_takes(builder, backend):
    """Every op takes seq 0, so every builder does (whatever its global/random blocks would ask): no blocks,
    and block_sparse_attention runs on it forward and backward."""
    from etkd_kernels import available_backends, block_sparse_attention

    if not available_backends()[backend].available:
        pytest.skip(f"{backend}: {available_backends()[backend].reason}")
    layout = builder(0, block_size=16)
    assert isinstance(layout, BlockLayout) and layout.mask.shape == (1, 0, 0) and layout.block_size == 16
    q = torch.randn(2, 3, 0, 8, requires_grad=True)
    out = block_sparse_attention(q, q, q, layout, backend=backend)
    out.sum().backward()
    assert out.shape == (2, 3, 0, 8) and q.grad.shape == q.shape


def test_lsg_layout():
    layout = lsg_layout(50, 8, num_global_blocks=1)
    nb = 7
    expected = _band(nb, 1)
    expected[0] = True
    expected[:, 0] = True
    assert layout.mask.shape == (1, nb, nb) and torch.equal(layout.mask[0], expected)
    assert lsg_layout(64, 8, num_global_blocks=0).mask[0].equal(_band(8, 1))
    with pytest.raises(ValueError, match="num_global_blocks"):
        lsg_layout(16, 8, num_global_blocks=3)


def test_longformer_and_fixed_layouts():
    lf = longformer_layout(64, 8, num_window_blocks=3, global_block_indices=(0,))
    assert lf.mask[0, 0].all() and lf.mask[0, :, 0].all() and lf.mask[0, 5, 4] and not lf.mask[0, 5, 2]
    fx = fixed_layout(64, 8, num_local_blocks=4, num_global_blocks=1)
    assert fx.mask[0, 1, 2] and not fx.mask[0, 1, 4] and fx.mask[0, 1, 7]  # block 7 summarises segment 2
    with pytest.raises(ValueError, match="num_window_blocks"):
        longformer_layout(64, 8, num_window_blocks=2)


def test_lut_cache_is_per_tensor_and_version():
    """`masks.cached_lut` builds a layout's LUT once, and again after an in-place edit of the layout."""
    from etkd_kernels.masks import cached_lut

    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    lut1, count1 = cached_lut(layout)
    assert cached_lut(layout)[0] is lut1  # the same tensor: built once
    layout[0, 0, 1] = False
    lut2, count2 = cached_lut(layout)
    assert count1.tolist() == [[2, 2]] and count2.tolist() == [[1, 2]]
    assert lut2[0, 0, 0].item() == 0
    assert cached_lut(layout.clone())[1].tolist() == [[1, 2]]  # another tensor, same contents
