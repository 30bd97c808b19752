"""Test helpers shared by every module: a verbose allclose and the HF-module builders."""

from __future__ import annotations

import contextlib
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


def padded_global_batch(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of token ids (seeded), the second with its last 9 tokens padded, and a global mask marking the
    first token: (input_ids, attention_mask, global_attention_mask), each (2, seq), for the encoder model tests."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 9 :] = 0
    gmask = torch.zeros_like(mask)
    gmask[:, 0] = 1
    return ids, mask, gmask


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


# --- attention dropout with the same keep-masks in etkd and in HF ------------------------------------------

DROPOUT_OPS = (
    "full_attention",
    "sliding_window_attention",
    "block_sparse_attention",
    "lsg_attention",
    "nystrom_attention",
)


class SameDropoutMasks:
    """Attention dropout with identical keep-masks in etkd's ops and in HF's own code, so a training-mode
    forward (and backward) can be compared exactly instead of statistically.

    `with masks.ours():` every public etkd op called with dropout_p > 0 gets an explicit (seed, offset) =
    (1000 + n, n) for its n-th such call, recorded in `masks.calls` with the op name and p.
    `with masks.hf(layout, heads, global_mask):` torch.nn.functional.dropout, while HF runs, applies to HF's
    k-th attention-probability tensor the keep-mask of etkd's k-th recorded call
    (`etkd_kernels._shared.dropout_keep` of (batch * heads + head, query row, key column)), scaled by
    1 / (1 - p) like F.dropout. HF's layouts: "dense" (batch, heads, seq, seq) (BERT's eager attention);
    "longformer": the local probabilities (batch, seq, heads, globals + 2w + 1) (global key columns first, in
    position order, then the band i - w ... i + w) and the global rows (batch * heads, globals, seq), which
    reuse the mask of the local call before them (one etkd call per layer). Calls with p == 0 (hidden dropout
    off) pass through.
    """

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls: list[tuple[str, float, int, int]] = []  # (op, p, seed, offset)

    @contextlib.contextmanager
    def ours(self):
        import etkd_kernels as ek

        def wrap(name, fn):
            def call(*args, dropout_p=0.0, **kw):
                if dropout_p > 0:
                    n = len(self.calls)
                    self.calls.append((name, float(dropout_p), 1000 + n, n))
                    kw.update(dropout_seed=1000 + n, dropout_offset=n)
                return fn(*args, dropout_p=dropout_p, **kw)

            return call

        with self.monkeypatch.context() as m:
            for name in DROPOUT_OPS:
                m.setattr(ek, name, wrap(name, getattr(ek, name)))
            yield self

    @contextlib.contextmanager
    def hf(self, layout: str, heads: int, global_mask: torch.Tensor | None = None):
        from etkd_kernels._shared import dropout_keep

        original = torch.nn.functional.dropout
        pending = list(self.calls)
        current: list[tuple[str, float, int, int]] = []

        def dropout(x, p=0.5, training=True, inplace=False):
            if p == 0 or not training:
                return original(x, p, training, inplace)
            if layout == "dense" or x.dim() == 4:
                assert pending, "HF applied more attention dropouts than etkd's ops did"
                current[:] = [pending.pop(0)]
            _, p_ours, seed, offset = current[0]
            assert p == p_ours, f"HF drops with p={p}, etkd's op got dropout_p={p_ours}"
            keep = dropout_keep(seed, offset, p, *self._counters(layout, heads, global_mask, x))
            return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype))

        with self.monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "dropout", dropout)
            yield self
        assert not pending, f"etkd's ops dropped {len(pending)} more attention tensors than HF did"

    @staticmethod
    def _counters(layout, heads, global_mask, x):
        """(batch * heads + head, query row, key column) of every element of HF's probability tensor x."""
        ar = torch.arange
        if layout == "dense":  # (b, h, s, s)
            b, h, s, _ = x.shape
            return (ar(b)[:, None] * h + ar(h))[..., None, None], ar(s)[:, None], ar(s)[None, :]
        assert layout == "longformer", layout
        s = x.shape[1] if x.dim() == 4 else x.shape[2]
        glob = torch.zeros(x.shape[0] if x.dim() == 4 else x.shape[0] // heads, s, dtype=torch.bool)
        if global_mask is not None:  # HF pads the sequence to a multiple of the window: pad the mask too
            glob[:, : global_mask.shape[1]] = global_mask.bool()[:, :s]
        g = int(glob.sum(1).max())
        # positions of each row's global tokens, in order, padded with 0 (those columns hold probability 0)
        order = torch.sort(glob.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :g]
        if x.dim() == 3:  # global rows (b * h, g, s)
            bh = ar(x.shape[0])[:, None, None]
            return bh, order.repeat_interleave(heads, 0)[:, :, None], ar(s)[None, None, :]
        b, s, h, c = x.shape  # local rows
        w = (c - g - 1) // 2
        i = ar(s)[None, :, None, None]
        j = (i - w + ar(c) - g).expand(b, s, 1, c).clone()
        j[..., :g] = order[:, None, None, :]
        return (ar(b)[:, None] * h + ar(h))[:, None, :, None], i, j.clamp(0, s - 1)


def sliding_window_call(window: int, global_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None):
    """`call(q, k, v, *global_qkv, backend)`: `sliding_window_attention` with these settings, for the parity
    helpers; three trailing tensors are the separate global projections, none means q/k/v serve globals too."""
    from etkd_kernels import sliding_window_attention

    def call(q, k, v, *qkv_g, backend):
        return sliding_window_attention(
            q, k, v, window, global_mask=global_mask, global_qkv=tuple(qkv_g) or None,
            key_padding_mask=key_padding_mask, backend=backend,
        )  # fmt: skip

    return call


def backend_parity(call, tensors, tolerances, name: str, backends=("reference", "triton")) -> float:
    """Run `call(*tensors, backend=...)` on both backends (fresh leaves, the same seeded output gradient) and
    compare the second's output and every input's gradient with the first's; `tolerances` is
    ((out rtol, atol), (grad rtol, atol)). Returns the largest error `assert_close` reported."""
    results = {}
    for backend in backends:
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = call(*leaves, backend=backend)
        torch.manual_seed(1)
        out.backward(torch.randn_like(out))
        results[backend] = (out, [t.grad for t in leaves])
    (fwd_tol, bwd_tol), (expected, got) = tolerances, (results[backends[0]], results[backends[1]])
    errs = [assert_close(got[0], expected[0], *fwd_tol, name=f"{name} out")]
    for i, (g, e) in enumerate(zip(got[1], expected[1])):
        errs.append(assert_close(g, e, *bwd_tol, name=f"{name} grad[{i}]"))
    return max(errs)


def head_split_views(b: int, h: int, s: int, d: int, fused: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v (b, h, s, d) as the encoder passes them: head-split views of three (b, s, h * d) projections, or of
    one (b, s, 3, h, d) stacked q/k/v output (rows 3 h d apart). Leaves that need grad."""
    if fused:
        qkv = torch.randn(b, s, 3 * h * d, requires_grad=True)
        return tuple(t.transpose(1, 2) for t in qkv.view(b, s, 3, h, d).unbind(2))
    xs = [torch.randn(b, s, h * d, requires_grad=True) for _ in range(3)]
    return tuple(x.view(b, s, h, d).transpose(1, 2) for x in xs)


def assert_views_not_copied(prof, numel: int, out: torch.Tensor, grads) -> None:
    """No aten copy_/clone/contiguous of a tensor of `numel` elements or more in the profile, and `out` and the
    gradients in the views' (b, s, h, d) order (so the model's transpose + reshape back is a view too)."""
    import math

    copies = [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
        and any(shape and math.prod(shape) >= numel for shape in e.input_shapes)
    ]
    assert copies == [], copies
    for name, t in (("out", out), *zip(("dq", "dk", "dv"), grads)):
        assert t.transpose(1, 2).is_contiguous(), (name, t.stride())
