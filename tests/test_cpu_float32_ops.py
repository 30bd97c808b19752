"""Warnings that a call is off the fast path name the caller's line. The cpu ops that compute in float32 only
(Nyström, LSG: `etkd_kernels/cpu/_dtype.in_float32`) say so once per
(op, dtype) when a 16-bit call converts its inputs, pointing at the caller's line; float32 calls say nothing."""

import warnings

import pytest
import torch

import etkd_kernels
from etkd_kernels import lsg_attention, nystrom_attention
from etkd_kernels.cpu import _dtype

pytestmark = pytest.mark.skipif(
    not etkd_kernels.available_backends()["cpu"].available,
    reason=f"cpu backend unavailable: {etkd_kernels.available_backends()['cpu'].reason}",
)


def _nystrom(x):
    return nystrom_attention(x, x, x, num_landmarks=8, backend="cpu")


def _lsg(x):
    return lsg_attention(x, x, x, block_size=16, sparse_block_size=16, backend="cpu")


def test_16bit_conversion_is_said_once_per_op_and_dtype(monkeypatch):
    monkeypatch.setattr(_dtype, "_told", set())
    x = torch.randn(1, 2, 64, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _nystrom(x), _lsg(x)
        assert not seen, [str(w.message) for w in seen]  # float32: nothing converted, nothing said

        xb = x.bfloat16().requires_grad_()
        out = _nystrom(xb)
        out.float().sum().backward()  # the backward converts too: still one warning
        _nystrom(xb), _lsg(xb), _lsg(xb), _nystrom(x.half())

    said = [(str(w.message).split(":")[0], str(w.message)) for w in seen]
    assert [op for op, _ in said] == ["etkd nystrom", "etkd lsg", "etkd nystrom"], said
    assert "bfloat16 inputs are converted to float32" in said[0][1]
    assert "float16 inputs are converted to float32" in said[2][1]
    assert all(w.category is RuntimeWarning and w.filename == __file__ for w in seen), [
        (w.filename, w.lineno) for w in seen
    ]
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16


def test_tile_path_warning_points_at_the_callers_line(monkeypatch):
    import etkd_kernels.cpu as cpu
    from etkd_kernels import _C, sliding_window_attention

    width = _C.own_tile_width()
    if width == 0:
        pytest.skip("this target has no own fp32 tile micro-kernels (nothing falls back to BLAS)")
    monkeypatch.setattr(cpu, "_told", set())
    x = torch.randn(1, 2, 64, 12 if 12 % width else width + 4)  # head_dim not a multiple of the vector width
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sliding_window_attention(x, x, x, window=8, backend="cpu")
    assert [w.filename for w in seen] == [__file__], [(w.filename, w.lineno, str(w.message)) for w in seen]
    assert "runs its fp32 tile products on BLAS sgemm" in str(seen[0].message)


def test_reference_fallback_warning_points_at_the_callers_line(monkeypatch):
    from etkd_kernels import dispatch, sliding_window_attention

    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(1, 2, 32, 8, dtype=torch.float64)  # float64: auto falls back to `reference`, saying so
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sliding_window_attention(x, x, x, window=8)
    assert [w.filename for w in seen] == [__file__], [(w.filename, w.lineno, str(w.message)) for w in seen]
    assert "runs on the slow `reference` backend" in str(seen[0].message)
