"""Test helpers shared by every module: a verbose allclose and the HF-module builders."""

from __future__ import annotations

import os

import torch

# A tiny HF encoder config for parity tests against HF's modules (fp32, no dropout), and the tolerance
# those tests hold, relative to HF's own scale.
HF_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
HF_RTOL = 1e-5

# (test id, comparison name, max abs error, atol) of every assert_close in this session: `pytest
# --max-errors` prints the worst error per test module (conftest.py), the figures quoted in our notes.
RECORDED: list[tuple[str, str, float, float]] = []


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = ""
) -> float:
    """Like torch.testing.assert_close, but says how many elements mismatch, where, and about NaN/Inf.

    Returns the max abs error so tests can report it.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad_nan = (~torch.isfinite(a)) & torch.isfinite(e)
    err = (a - e).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    tol = atol + rtol * e.abs()
    mismatch = (err > tol) | bad_nan
    max_err = float(err.max()) if err.numel() else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    RECORDED.append((test, name, max_err, atol))
    if mismatch.any():
        n = int(mismatch.sum())
        idx = tuple(int(i) for i in mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: {n}/{a.numel()} elements differ (atol {atol}, rtol {rtol}); max abs err {max_err:.3e}; "
            f"first at {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}; "
            f"non-finite in actual: {int((~torch.isfinite(a)).sum())}"
        )
    return max_err


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = HF_RTOL
) -> float:
    """assert_close with atol = rtol * max(1, max |expected|); returns the max abs error over that scale."""
    scale = max(1.0, float(expected.detach().abs().max()))
    return assert_close(actual, expected, atol=rtol * scale, name=name) / scale


def assert_parity_on_real_rows(
    ours: torch.Tensor, ref: torch.Tensor, x_ours: torch.Tensor, x_ref: torch.Tensor, real: torch.Tensor
) -> tuple[float, float]:
    """Forward and d(hidden) of two modules run on copies x_ours / x_ref of the same (batch, seq, hidden)
    leaf, compared on real query rows only (HF's -10000 padding penalty differs on all-padding rows), fp32
    tolerance. Returns (forward error, gradient error)."""
    m = real[..., None]
    err = assert_close(ours * m, ref * m, atol=1e-5, name="forward")
    grad = torch.randn_like(ref) * m
    (ref * grad).sum().backward()
    (ours * grad).sum().backward()
    return err, assert_close(x_ours.grad, x_ref.grad, atol=1e-5, name="d hidden")
