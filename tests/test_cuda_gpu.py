"""Parity of the fused CUDA kernels (etkd_kernels.cuda.*) with the reference backend, forward and backward.

Tolerance (flash-attention's rule): the kernel's error against an fp32 reference may be at most a small
multiple of the error plain PyTorch (the reference run in the same low precision) makes, plus a per-dtype
floor. Needs a CUDA GPU and the built extension; skipped otherwise (the module collects on any machine).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from etkd_kernels.ops.block_sparse import BlockSparseParams
from etkd_kernels.ops.sliding_window import SlidingWindowParams

pytestmark = pytest.mark.cuda  # skipped per test, at run time, without a GPU (tests/conftest.py)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute floors: (outputs, gradients). fp32 runs plain FMA in the kernels, so it is held tight.
FLOOR = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
FACTOR = 3.0


def _close(got, ref32, ref_lp, floor, name):
    if got is None or ref32 is None:
        assert got is None and ref32 is None, f"{name}: one side is None"
        return
    pt_err = float((ref_lp.float() - ref32.float()).abs().max()) if ref32.numel() else 0.0
    assert_close(got.float(), ref32.float(), atol=FACTOR * pt_err + floor, name=name)


def _close_lse(got, ref32, name):
    inf_got, inf_ref = torch.isinf(got), torch.isinf(ref32)
    assert torch.equal(inf_got, inf_ref), f"{name}: rows with lse = +inf differ"
    fin = ~inf_ref
    assert_close(got[fin], ref32[fin], atol=1e-3, rtol=1e-3, name=name)


def _modules(op):
    import importlib

    ref = importlib.import_module(f"etkd_kernels.reference.{op}")
    cuda = importlib.import_module(f"etkd_kernels.cuda.{op}")
    return ref, cuda


def _check_pair(ref, cuda, dtype, fwd_args, bwd_extra, names, make_inputs):
    """Run both backends forward + backward on the same inputs; compare with fp32 and low-precision ref."""
    inputs = make_inputs()  # fp32 tensors on the GPU
    lp = [None if t is None else t.to(dtype) for t in inputs]
    f32 = [None if t is None else t.float() for t in lp]  # the same rounded values, in fp32

    out, lse = cuda.forward(*fwd_args(lp))
    out32, lse32 = ref.forward(*fwd_args(f32))
    out_lp, _ = ref.forward(*fwd_args(lp))
    floor_o, floor_g = FLOOR[dtype]
    assert torch.isfinite(out).all(), "NaN/Inf in the kernel output"
    _close(out, out32, out_lp, floor_o, "out")
    _close_lse(lse, lse32, "lse")

    g = torch.randn_like(out32)
    grads = cuda.backward(g.to(dtype), *bwd_extra(lp, out, lse))
    grads32 = ref.backward(g, *bwd_extra(f32, out32, lse32))
    out_lp_, lse_lp_ = ref.forward(*fwd_args(lp))
    grads_lp = ref.backward(g.to(dtype), *bwd_extra(lp, out_lp_, lse_lp_))
    for name, a, b, c in zip(names, grads, grads32, grads_lp):
        if a is not None:
            assert torch.isfinite(a).all(), f"NaN/Inf in {name}"
        _close(a, b, c, floor_g, name)


# ---- sliding window -----------------------------------------------------------------------------------------

SW_CASES = [
    # (batch, heads, seq, head_dim, window, padding, globals, separate global projections)
    (2, 2, 256, 64, 64, False, False, False),  # band only, seq a multiple of every tile
    (1, 3, 300, 32, 32, True, False, False),  # ragged last tile + key padding
    (2, 2, 200, 128, 128, True, True, True),  # global rows with their own projections (qg, kg, vg)
    (1, 2, 130, 64, 512, False, True, False),  # window wider than seq; globals use q, k, v
    (1, 1, 96, 64, 0, True, True, False),  # diagonal-only band: globals carry most of the mass
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", SW_CASES, ids=lambda c: "b{}h{}s{}d{}w{}-pad{:d}-glob{:d}-sep{:d}".format(*c)
)
def test_sliding_window_matches_reference(case, dtype):
    b, h, s, d, window, pad, glob, sep = case
    ref, cuda = _modules("sliding_window")
    dev = "cuda"
    kpm = torch.rand(b, s, device=dev) > 0.15 if pad else None
    if kpm is not None:
        kpm[:, 0] = True
    gm = None
    if glob:
        gm = torch.zeros(b, s, dtype=torch.bool, device=dev)
        gm[:, 0] = True
        gm[0, s // 2] = True
        if kpm is not None:
            gm[-1, -1] = True  # possibly a padded global token
    scale = d**-0.5

    def make_inputs():
        t = [torch.randn(b, h, s, d, device=dev) for _ in range(3)]
        t += [torch.randn(b, h, s, d, device=dev) for _ in range(3)] if sep else [None, None, None]
        return t

    def fwd_args(x):
        q, k, v, qg, kg, vg = x
        return (q, k, v, SlidingWindowParams(window, gm, qg, kg, vg, key_padding_mask=kpm, scale=scale))

    def bwd_extra(x, out, lse):
        q, k, v, qg, kg, vg = x
        return (
            q,
            k,
            v,
            out,
            lse,
            SlidingWindowParams(window, gm, qg, kg, vg, key_padding_mask=kpm, scale=scale),
        )

    _check_pair(ref, cuda, dtype, fwd_args, bwd_extra, ("dq", "dk", "dv", "dqg", "dkg", "dvg"), make_inputs)


# ---- block sparse -------------------------------------------------------------------------------------------

BS_CASES = [
    # (batch, heads, n_blocks, block, head_dim, layout heads, padding)
    (2, 2, 4, 64, 64, 2, False),  # block == forward tile
    (1, 3, 8, 16, 32, 1, True),  # blocks smaller than the tiles, broadcast layout, padding
    (1, 2, 3, 100, 128, 2, True),  # block not a multiple of the tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BS_CASES, ids=lambda c: "b{}h{}n{}bs{}d{}hl{}-pad{:d}".format(*c))
def test_block_sparse_matches_reference(case, dtype):
    b, h, nb, bs, d, hl, pad = case
    ref, cuda = _modules("block_sparse")
    dev = "cuda"
    s = nb * bs
    layout = torch.rand(hl, nb, nb, device=dev) < 0.5
    layout |= torch.eye(nb, dtype=torch.bool, device=dev)
    layout[0, -1] = False  # a query block that sees no key: out 0, lse +inf
    kpm = torch.rand(b, s, device=dev) > 0.15 if pad else None
    scale = d**-0.5

    def make_inputs():
        return [torch.randn(b, h, s, d, device=dev) for _ in range(3)]

    def fwd_args(x):
        return (*x, BlockSparseParams(layout, bs, key_padding_mask=kpm, scale=scale))

    def bwd_extra(x, out, lse):
        return (*x, out, lse, BlockSparseParams(layout, bs, key_padding_mask=kpm, scale=scale))

    _check_pair(ref, cuda, dtype, fwd_args, bwd_extra, ("dq", "dk", "dv"), make_inputs)


def test_block_sparse_lut_cache_sees_in_place_edits():
    from etkd_kernels.masks import cached_lut  # the one LUT cache every backend reads

    layout = torch.ones(1, 2, 2, dtype=torch.bool, device="cuda")
    lut1, count1 = cached_lut(layout)
    layout[0, 0, 1] = False
    lut2, count2 = cached_lut(layout)
    assert count1.tolist() == [[2, 2]] and count2.tolist() == [[1, 2]]
