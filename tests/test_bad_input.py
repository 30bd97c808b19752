"""Bad input gets a clear error naming the argument: never a crash, a silent wrong answer or NaN."""

from __future__ import annotations

import pytest
import torch

import etkd_kernels as ek

Q = torch.randn(2, 2, 16, 8)


def _sw(**kw):
    args = dict(q=Q, k=Q, v=Q, window=4)
    args.update(kw)
    return ek.sliding_window_attention(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("window"), **args
    )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(q=Q[0]), ValueError, r"q: expected rank 4"),
        (dict(k=Q[:, :, :8]), ValueError, r"k: expected shape"),
        (dict(v=Q.double()), TypeError, r"v: expected dtype"),
        (dict(q=Q.long(), k=Q.long(), v=Q.long()), TypeError, r"q: expected a floating dtype"),
        (dict(q=Q.numpy()), TypeError, r"q: expected a torch.Tensor"),
        (dict(window=3), ValueError, r"window: expected an even int"),
        (dict(window=0), ValueError, r"window: expected an int >= 2"),
        (dict(window=4.0), TypeError, r"window: expected an int"),
        (dict(key_padding_mask=torch.ones(2, 16)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
        (
            dict(key_padding_mask=torch.ones(2, 15, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask: expected shape",
        ),
        (dict(global_mask=torch.ones(16, dtype=torch.bool)), ValueError, r"global_mask: expected shape"),
        (dict(global_qkv=(Q, Q, Q)), ValueError, r"global_qkv: given without global_mask"),
        (dict(global_qkv=(Q, Q)), TypeError, r"global_qkv: expected a tuple"),
        (
            dict(global_mask=torch.zeros(2, 16, dtype=torch.bool), global_qkv=(Q, Q[:, :1], Q)),
            ValueError,
            r"global_qkv\[1\]: expected shape",
        ),
        (  # the wrong head count in the first of the three is named as the first (not as global_qkv[1])
            dict(global_mask=torch.zeros(2, 16, dtype=torch.bool), global_qkv=(Q[:, :1], Q, Q)),
            ValueError,
            r"global_qkv\[0\]: expected shape \(2, 2, 16, 8\)",
        ),
        (
            dict(q=Q[:, :1]),
            ValueError,
            r"q: expected shape \(2, 2, 16, 8\) like k and v, got \(2, 1, 16, 8\)",
        ),
        (dict(scale=-1.0), ValueError, r"scale: expected a positive"),
        (dict(scale="x"), TypeError, r"scale: expected a float"),
        (dict(backend="gpu"), ValueError, r"backend: unknown backend"),
        (dict(q=Q[:0], k=Q[:0], v=Q[:0]), ValueError, r"q: empty batch"),
    ],
)
def test_sliding_window_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _sw(**kwargs)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(name, bad):
    """Documented choice: NaN/Inf inputs raise ValueError naming the argument (see _checks.check_finite)."""
    t = {"q": Q.clone(), "k": Q.clone(), "v": Q.clone()}
    t[name][1, 0, 3, 2] = bad
    with pytest.raises(ValueError, match=rf"{name}: contains NaN or Inf"):
        ek.sliding_window_attention(t["q"], t["k"], t["v"], 4)
    with pytest.raises(ValueError, match=rf"{name}: contains NaN or Inf"):
        ek.full_attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_check_decides_by_the_values_not_their_sum(dtype):
    """check_finite's fast path is a sum; finite values whose sum overflows must still pass, and a NaN, +Inf or
    -Inf anywhere (also +Inf with -Inf, whose sum is NaN) must not, on contiguous and transposed views."""
    from etkd_kernels._checks import check_finite

    big = torch.full((2, 64, 3, 8), 3e38, dtype=dtype).transpose(1, 2)  # sum overflows to +Inf
    assert not torch.isfinite(big.sum())
    check_finite(q=big, k=-big)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = torch.randn(2, 64, 3, 8, dtype=dtype).transpose(1, 2)
        for i, value in enumerate(bad):
            t[1, 2, 5 + i, 7] = value
        with pytest.raises(ValueError, match="v: contains NaN or Inf"):
            check_finite(q=torch.randn(3), v=t)


def test_device_mismatch_names_the_argument():
    meta = torch.empty(2, 2, 16, 8, device="meta")
    with pytest.raises(ValueError, match=r"k: expected device"):
        ek.full_attention(Q, meta, Q)


def test_block_sparse_layout_errors_name_layout():
    with pytest.raises(ValueError, match="layout"):
        ek.block_sparse_attention(Q, Q, Q, torch.ones(1, 3, 3, dtype=torch.bool))  # 16 not a multiple of 3
    with pytest.raises(TypeError, match="layout"):
        ek.block_sparse_attention(Q, Q, Q, torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="layout"):
        ek.block_sparse_attention(Q, Q, Q, ek.fixed_layout(32, block_size=4))
    with pytest.raises(ValueError, match="layout"):
        ek.block_sparse_attention(
            Q, Q, Q, torch.ones(3, 4, 4, dtype=torch.bool)
        )  # 3 heads for a 2-head input


def test_layout_builder_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_window_blocks"):
        ek.longformer_layout(64, block_size=8, num_window_blocks=2)
    with pytest.raises(ValueError, match="seq_len"):
        ek.fixed_layout(-1)
    with pytest.raises(ValueError, match="global_block_indices"):
        ek.longformer_layout(64, block_size=8, global_block_indices=(9,))


def test_finite_check_skips_tensors_without_data():
    """meta tensors and FakeTensorMode (shape propagation, torch.export) hold no values: every op gives its
    output shape instead of failing in the NaN/Inf check (it used to read a value: Tensor.item() on meta,
    DataDependentOutputException under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    layout = ek.bigbird_layout(32, block_size=16, num_random_blocks=0, seed=0)
    calls = {
        "sliding_window": lambda q: ek.sliding_window_attention(q, q, q, 8),
        "block_sparse": lambda q: ek.block_sparse_attention(q, q, q, layout.to(q.device)),
        "lsg": lambda q: ek.lsg_attention(q, q, q, block_size=16),
        "nystrom": lambda q: ek.nystrom_attention(q, q, q, num_landmarks=4),
        "full": lambda q: ek.full_attention(q, q, q),
    }
    meta = torch.empty(1, 2, 32, 16, device="meta")
    for op, call in calls.items():
        out = call(meta)
        assert out.device.type == "meta" and out.shape == meta.shape, op
    with FakeTensorMode(allow_non_fake_inputs=True):  # the layout stays a real constant
        fake = torch.randn(1, 2, 32, 16)
        for op, call in calls.items():
            out = call(fake)
            assert isinstance(out, FakeTensor) and out.shape == fake.shape, op
