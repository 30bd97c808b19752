"""Attention dropout (issue 27): the Philox4x32-10 keep-mask of `etkd_kernels._shared` against Random123's known
answers and an independent scalar Philox, its statistics, the seeding contract (torch.manual_seed reproduces,
unseeded calls differ, p = 0 draws nothing), the reference backend of every op against a dense oracle built from
the same mask, E[output] over seeds, gradcheck, opcheck and torch.compile with dropout on, and how backends
without a dropout kernel are reported. Fused backends are compared with `reference` on the mask itself, the
outputs and the gradients in the per-backend section at the end (the backends that declare dropout)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import assert_close
from test_support_matrix import CALLS, N_EXTRA, _Capture, _kpm

import etkd_kernels as ek
from etkd_kernels import dispatch
from etkd_kernels._shared import dropout_keep, dropout_threshold, philox4x32_10
from etkd_kernels.dispatch import BACKENDS, OPS
from etkd_kernels.ops._define import defined

CPU = torch.device("cpu")
M32 = 0xFFFFFFFF


# --- The RNG ---------------------------------------------------------------------------------------------------
# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2 words) -> 4 words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    got = philox4x32_10(*(torch.tensor(c) for c in ctr), *key)
    assert tuple(int(x) for x in got) == expected


def _philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints (arbitrary precision: no 16-bit splitting), the second implementation."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def test_keep_mask_is_the_contract():
    """dropout_keep(b*H+h, i, j) == the contract's formula evaluated element by element on Python ints."""
    seed, offset, p = 0x1234_5678_9ABC_DEF0 & (2**63 - 1), 0xDEADBEEF7, 0.37
    bh, i, j = torch.tensor(5)[None, None], torch.arange(3)[:, None], torch.arange(50)[None, :]
    got = dropout_keep(seed, offset, p, bh, i, j)
    thr = dropout_threshold(p)
    assert thr == math.floor(0.37 * 65536)
    for ii in range(3):
        for jj in range(50):
            r = _philox_scalar((jj >> 3, ii, 5, offset & M32), (seed & M32, seed >> 32))
            u16 = (r[(jj & 7) >> 1] >> (16 * (jj & 1))) & 0xFFFF
            assert bool(got[ii, jj]) == (u16 >= thr), (ii, jj)


def test_threshold_resolution():
    assert dropout_threshold(0.0) == 0 and dropout_threshold(1 / 65536) == 1
    assert dropout_threshold(0.1) == 6553 and dropout_threshold(0.999999999) == 65535


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_4_sigma(p):
    n_rows, n_cols = 512, 2048  # ~1e6 elements, 4 heads
    keep = dropout_keep(
        7, 3, p, torch.arange(4)[:, None, None], torch.arange(n_rows)[:, None], torch.arange(n_cols)
    )
    n = keep.numel()
    q = 1 - dropout_threshold(p) / 65536
    assert abs(keep.float().mean().item() - q) <= 4 * math.sqrt(q * (1 - q) / n)


# --- Arguments and seeding -------------------------------------------------------------------------------------
def _qkv(s=24, dtype=torch.float32, b=2, h=2, d=8, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype) for _ in range(n)]


def _call(op, leaves, backend="reference", **dropout):
    """The public op as test_support_matrix calls it (padding, a global token), with dropout keywords."""
    q, k, v, *extra = leaves
    s = q.shape[2]
    kw = dict(key_padding_mask=_kpm(q), backend=backend, **dropout)
    if op == "sliding_window":
        glob = (torch.arange(s) == 1).expand(q.shape[0], -1).contiguous()
        return ek.sliding_window_attention(
            q, k, v, 4, global_mask=glob, global_qkv=tuple(extra) or None, **kw
        )
    if op == "block_sparse":
        return ek.block_sparse_attention(
            q, k, v, ek.longformer_layout(s, block_size=8, num_window_blocks=1), **kw
        )
    if op == "full":
        return ek.full_attention(q, k, v, **kw)
    if op == "lsg":
        return ek.lsg_attention(
            q, k, v, block_size=8, sparse_block_size=4, sparsity_factor=2, num_global_tokens=1, **kw
        )
    return ek.nystrom_attention(q, k, v, 4, **kw)


assert set(CALLS) == set(OPS)  # every op has a case here too


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"dropout_p": 1.0}, "dropout_p: expected a float in \\[0, 1\\)"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"dropout_p": "0.1"}, "dropout_p"),
        ({"dropout_p": 0.1, "dropout_seed": -1}, "dropout_seed"),
        ({"dropout_p": 0.1, "dropout_seed": 2**63}, "dropout_seed"),
        ({"dropout_p": 0.1, "dropout_seed": 1.5}, "dropout_seed"),
        ({"dropout_p": 0.1, "dropout_offset": -3}, "dropout_offset"),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_bad_dropout_arguments(op, kw, err):
    with pytest.raises((TypeError, ValueError), match=err):
        _call(op, _qkv(), **kw)


@pytest.mark.parametrize("op", OPS)
def test_seeding_like_torch(op):
    """Unseeded calls draw (seed, offset) from torch's default generator: successive calls differ,
    torch.manual_seed reproduces, an explicit seed is reproducible, and dropout_p = 0 draws nothing."""
    leaves = _qkv()
    torch.manual_seed(123)
    a = _call(op, leaves, dropout_p=0.3)
    b = _call(op, leaves, dropout_p=0.3)
    assert not torch.equal(a, b)
    torch.manual_seed(123)
    assert torch.equal(_call(op, leaves, dropout_p=0.3), a)
    assert torch.equal(
        _call(op, leaves, dropout_p=0.3, dropout_seed=9), _call(op, leaves, dropout_p=0.3, dropout_seed=9)
    )
    assert not torch.equal(
        _call(op, leaves, dropout_p=0.3, dropout_seed=9),
        _call(op, leaves, dropout_p=0.3, dropout_seed=9, dropout_offset=1),
    )
    state = torch.get_rng_state()
    no_drop = _call(op, leaves, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(no_drop, _call(op, leaves))


@pytest.mark.parametrize("op", OPS)
def test_manual_seed_reproduces_a_training_step(op):
    """Forward and backward of an unseeded call, twice from the same torch.manual_seed: bit for bit (the backward
    gets the (seed, offset) its forward drew)."""
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        leaves = [t.requires_grad_(True) for t in _qkv(n=3 + N_EXTRA.get(op, 0))]
        out = _call(op, leaves, dropout_p=0.2)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --- The reference against a dense oracle -----------------------------------------------------------------------
def _dense_oracle(q, k, v, allowed, p, seed, offset):
    """softmax over `allowed` (b, 1 or h, s, s), dropped with the contract's mask on key positions, @ v."""
    b, h, s, d = q.shape
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    bh = (torch.arange(b)[:, None] * h + torch.arange(h))[..., None, None]
    keep = dropout_keep(seed, offset, p, bh, torch.arange(s)[:, None], torch.arange(s))
    return (probs * keep / (1 - p)) @ v


def test_reference_sliding_window_is_the_dense_oracle():
    q, k, v = _qkv(s=30, dtype=torch.float64)
    real = _kpm(q)
    glob = torch.zeros(2, 30, dtype=torch.bool)
    glob[0, 3] = glob[1, [0, 17]] = True
    i, j = torch.arange(30)[:, None], torch.arange(30)
    allowed = ((i - j).abs() <= 3) | glob[:, None, None, :] | glob[:, None, :, None]
    allowed = allowed & real[:, None, None, :]
    want = _dense_oracle(q, k, v, allowed, 0.25, 11, 4) * real[:, None, :, None]
    got = ek.sliding_window_attention(
        q, k, v, 6, global_mask=glob, key_padding_mask=real, dropout_p=0.25, dropout_seed=11, dropout_offset=4,
        backend="reference",
    )  # fmt: skip
    assert_close(got, want, 1e-12, 1e-12)


def test_reference_block_sparse_is_the_dense_oracle():
    q, k, v = _qkv(s=30, dtype=torch.float64)  # 30: padded to 32 inside (block 8)
    real = _kpm(q)
    mask = (torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.5) | torch.eye(
        4, dtype=torch.bool
    )
    layout = ek.BlockLayout(mask, 8)  # per-head blocks
    allowed = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[None, :, :30, :30] & real[:, None, None, :]
    want = _dense_oracle(q, k, v, allowed, 0.4, 3, 0) * real[:, None, :, None]
    got = ek.block_sparse_attention(
        q, k, v, layout, key_padding_mask=real, dropout_p=0.4, dropout_seed=3,
        backend="reference",
    )  # fmt: skip
    assert_close(got, want, 1e-12, 1e-12)


def test_reference_lsg_local_and_global_keys_are_the_dense_oracle():
    """LSG without sparse keys is local blocks + global tokens, all on sequence positions."""
    q, k, v = _qkv(s=32, dtype=torch.float64)
    real = _kpm(q)
    i, j = torch.arange(32)[:, None], torch.arange(32)
    local = ((j // 8) - (i // 8)).abs() <= 1
    allowed = ((local & (j >= 2)) | (j < 2) | (i < 2)) & real[:, None, None, :]
    want = _dense_oracle(q, k, v, allowed, 0.3, 8, 1) * real[:, None, :, None]
    got = ek.lsg_attention(
        q, k, v, block_size=8, sparsity_type="none", num_global_tokens=2, key_padding_mask=real,
        dropout_p=0.3, dropout_seed=8, dropout_offset=1, backend="reference",
    )  # fmt: skip
    assert_close(got, want, 1e-12, 1e-12)


@pytest.mark.parametrize("op", OPS)
def test_expected_output_over_seeds_is_the_no_dropout_output(op):
    """E[out] over seeds equals the output without dropout: every element within 5 standard errors."""
    leaves = _qkv(s=16, dtype=torch.float64)
    want = _call(op, leaves)
    n = 300
    outs = torch.stack([_call(op, leaves, dropout_p=0.3, dropout_seed=s) for s in range(n)])
    mean, se = outs.mean(0), outs.std(0) / math.sqrt(n)
    z = (mean - want).abs() / se.clamp_min(1e-12)
    assert (z <= 5).all(), f"max z {z.max().item():.2f}"
    assert not torch.equal(outs[0], want)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_with_dropout(op):
    leaves = [t.requires_grad_(True) for t in _qkv(s=12, d=4, dtype=torch.float64, n=3 + N_EXTRA.get(op, 0))]
    fn = lambda *t: _call(op, list(t), dropout_p=0.3, dropout_seed=42, dropout_offset=7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-5)


# --- Custom-op machinery with dropout on ------------------------------------------------------------------------
_NO_CPU = not ek.available_backends()["cpu"].available


def _with_cpu(ops, cpu_ops=("full", "lsg", "nystrom")):
    """(op, backend) cases: `reference` for `ops`, and the cpu kernels of LSG, Nystrom and full attention (issue 27;
    sliding window and block sparse run on cpu in tests/test_cpu_kernels.py and the parity tests below)."""
    skip = pytest.mark.skipif(_NO_CPU, reason="cpu backend unavailable")
    return [(op, "reference") for op in ops] + [pytest.param(op, "cpu", marks=skip) for op in cpu_ops]


@pytest.mark.parametrize("op, backend", _with_cpu(OPS))
def test_opcheck_with_dropout(op, backend):
    """opcheck of `etkd::<op>_fwd` with the arguments the public op passes (dropout on, explicit seed), and of
    `etkd::<op>_bwd` on that forward's outputs (the eager backward calls the forward's backend directly)."""
    leaves = [t.requires_grad_(True) for t in _qkv(n=3 + N_EXTRA.get(op, 0))]
    with _Capture() as cap:
        _call(op, leaves, backend=backend, dropout_p=0.2, dropout_seed=3, dropout_offset=1)
    func, args, kwargs = cap.calls[f"etkd::{op}_fwd"]
    assert args[-1] == backend
    torch.library.opcheck(func, args, kwargs)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    outs = func(*args, **kwargs)
    q, k, v, *settings, backend = args
    bwd = defined(f"{op}_bwd")
    torch.library.opcheck(bwd, (torch.randn_like(outs[0]), q, k, v, *outs, *settings, backend))


@pytest.mark.parametrize("op, backend", _with_cpu(["sliding_window", "block_sparse", "full"]))
def test_compile_fullgraph_with_dropout(op, backend):
    """torch.compile(fullgraph=True): a seeded call equals eager (forward and gradients); unseeded compiled calls
    draw at run time, not at trace time (two calls differ; torch.manual_seed reproduces)."""
    torch._dynamo.reset()
    leaves = [t.requires_grad_(True) for t in _qkv()]
    seeded = torch.compile(
        lambda *t: _call(op, list(t), backend=backend, dropout_p=0.2, dropout_seed=5) * 2.0, fullgraph=True
    )
    out = seeded(*leaves)
    eager = _call(op, leaves, backend=backend, dropout_p=0.2, dropout_seed=5) * 2.0
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    g = torch.autograd.grad(out.sum(), leaves)
    ge = torch.autograd.grad(eager.sum(), leaves)
    for a, e in zip(g, ge):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
    unseeded = torch.compile(
        lambda *t: _call(op, list(t), backend=backend, dropout_p=0.2) * 2.0, fullgraph=True
    )
    torch.manual_seed(1)
    a = unseeded(*leaves)
    b = unseeded(*leaves)
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(unseeded(*leaves), a)


# --- Backends without a dropout kernel --------------------------------------------------------------------------
def _no_dropout_pairs():
    """(op, backend) pairs that run on CPU float32 without dropout but declare no dropout kernel."""
    out = []
    for op in OPS:
        for b in BACKENDS:
            p = dispatch.Problem(CPU, torch.float32, 8, 4, 24)
            if not dispatch.reasons(b, op, p) and dispatch.reasons(
                b, op, dispatch.Problem(CPU, torch.float32, 8, 4, 24, True)
            ):
                out.append((op, b))
    return out


def _without_dropout_kernel(op, monkeypatch):
    """A backend that runs `op` here but declares no dropout for it: a real one if any, else `cpu` with its
    dropout declaration taken away (every cpu kernel applies dropout since issue 27, so the dispatch path that
    reports a missing dropout kernel is exercised this way)."""
    real = [b for o, b in _no_dropout_pairs() if o == op]
    if real:
        return real[0]
    if not ek.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    import etkd_kernels.cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "DROPOUT_OPS", tuple(o for o in cpu_backend.DROPOUT_OPS if o != op))
    return "cpu"


@pytest.mark.parametrize("op", OPS)
def test_backend_without_dropout_says_so(op, monkeypatch):
    """An explicit backend without a dropout kernel raises with the reason; `auto` falls back to reference and
    warns once per (op, device, dtype) saying why."""
    backend = _without_dropout_kernel(op, monkeypatch)
    leaves = _qkv()
    with pytest.raises(RuntimeError, match="no dropout kernel"):
        _call(op, leaves, backend=backend, dropout_p=0.1, dropout_seed=1)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="dropout_p > 0 runs on the slow `reference`"):
        got = _call(op, leaves, backend="auto", dropout_p=0.1, dropout_seed=1)
    assert torch.equal(got, _call(op, leaves, backend="reference", dropout_p=0.1, dropout_seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(op, leaves, backend="auto", dropout_p=0.1, dropout_seed=1)


@pytest.mark.parametrize("op", OPS)
def test_auto_takes_the_cpu_dropout_kernel(op):
    """Every cpu kernel applies dropout: `auto` on CPU tensors picks `cpu` with dropout_p > 0, with no fallback
    warning, and gives the reference result."""
    if not ek.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    assert not _no_dropout_pairs()
    assert dispatch.resolve(op, dispatch.Problem(CPU, torch.float32, 8, 4, 24, True)).__name__.startswith(
        "etkd_kernels.cpu"
    )
    leaves = _qkv()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _call(op, leaves, backend="auto", dropout_p=0.1, dropout_seed=1)
    assert not [w for w in seen if "reference" in str(w.message)], [str(w.message) for w in seen]
    assert_close(got, _call(op, leaves, backend="reference", dropout_p=0.1, dropout_seed=1), 2e-6, 2e-6)


# --- Fused backends against reference: the same keep-mask, outputs and gradients --------------------------------
def _takes_dropout(backend: str, op: str, dtype=torch.float32) -> bool:
    return not dispatch.reasons(backend, op, dispatch.Problem(CPU, dtype, 16, 4, 64, True))


FUSED = [(op, b) for op in OPS for b in BACKENDS if b != "reference" and _takes_dropout(b, op)]


def _mask_probe(op, backend, dtype, s, p, seed):
    """q = k = 0 (uniform probabilities over each row's keys) and v = the identity (head_dim = seq): out[b, h, i]
    is row i of the dropped probabilities, so its non-zero pattern is the keep-mask on the row's keys. LSG's
    compressed keys are strided tokens ("stride": distinct identity rows outside the local window, so each
    compressed key's bit shows on a column of its own); Nystrom is probed in its exact case (landmarks == seq),
    its landmark columns by the output parity below (a flipped bit moves a row by K1[i, l] X[l] / (1 - p))."""
    b, h = 2, 3
    q = torch.zeros(b, h, s, s, dtype=dtype)
    v = torch.eye(s, dtype=dtype).expand(b, h, s, s).contiguous()
    real = torch.ones(b, s, dtype=torch.bool)
    real[1, s - 7 :] = False  # padding in one batch row
    kw = dict(key_padding_mask=real, dropout_p=p, dropout_seed=seed, dropout_offset=3, backend=backend)
    if op == "sliding_window":
        glob = torch.zeros(b, s, dtype=torch.bool)
        glob[0, [0, 37]] = glob[1, 5] = True
        return ek.sliding_window_attention(q, q, v, 16, global_mask=glob, **kw)
    if op == "full":
        return ek.full_attention(q, q, v, **kw)
    if op == "lsg":
        return ek.lsg_attention(
            q, q, v, block_size=16, sparse_block_size=8, sparsity_factor=4, sparsity_type="stride",
            num_global_tokens=2, **kw,
        )  # fmt: skip
    if op == "nystrom":
        return ek.nystrom_attention(q, q, v, s, **kw)
    layout = (
        torch.rand(h, -(-s // 16), -(-s // 16), generator=torch.Generator().manual_seed(1)) < 0.4
    ) | torch.eye(-(-s // 16), dtype=torch.bool)
    return ek.block_sparse_attention(q, q, v, ek.BlockLayout(layout, 16), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, backend", FUSED)
def test_fused_keep_mask_is_the_reference_mask(op, backend, dtype):
    if not _takes_dropout(backend, op, dtype):
        pytest.skip(f"{backend} takes no {dtype} dropout for {op}")
    for s, p, seed in [(96, 0.3, 1), (83, 0.1, 2**40 + 5)]:  # 83: ragged tiles, blocks padded inside
        got = _mask_probe(op, backend, dtype, s, p, seed)
        want = _mask_probe(op, "reference", dtype, s, p, seed)
        assert torch.equal(got != 0, want != 0), f"{(got != 0).ne(want != 0).sum().item()} keep bits differ"
        assert want.ne(0).any() and (want == 0).any()


def _parity_inputs(op, s, dtype=torch.float32, seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    n = 6 if op == "sliding_window" else 3
    leaves = [torch.randn(2, 3, s, d, generator=g).to(dtype).requires_grad_(True) for _ in range(n)]
    real = torch.ones(2, s, dtype=torch.bool)
    real[0, s - 9 :] = False
    return leaves, real


def _parity_call(op, backend, leaves, real, extra: bool, **dropout):
    q, k, v, *gqkv = leaves
    s = q.shape[2]
    kw = dict(key_padding_mask=real, backend=backend, **dropout)
    if op == "full":
        return ek.full_attention(q, k, v, **kw)
    if op == "lsg":  # 2 globals, pooled sparse keys (f = 4, windows of 8), blocks of 16 (157: padded inside)
        return ek.lsg_attention(
            q, k, v, block_size=16, sparse_block_size=8, sparsity_factor=4, sparsity_type="pooling",
            num_global_tokens=2, **kw,
        )  # fmt: skip
    if op == "nystrom":  # 157 / 8 landmarks: segments of 20, the last one shorter
        return ek.nystrom_attention(q, k, v, 8, **kw)
    if op == "sliding_window":
        glob = torch.zeros(2, s, dtype=torch.bool)
        glob[0, [1, s // 2]] = glob[1, 0] = True
        return ek.sliding_window_attention(
            q, k, v, 24, global_mask=glob, global_qkv=tuple(gqkv) if extra else None, **kw
        )
    nb = -(-s // 16)
    layout = (torch.rand(3, nb, nb, generator=torch.Generator().manual_seed(3)) < 0.4) | torch.eye(
        nb, dtype=torch.bool
    )
    layout[:, :, 0] = True  # a global key block
    return ek.block_sparse_attention(q, k, v, ek.BlockLayout(layout, 16), **kw)


@pytest.mark.parametrize("extra", [False, True], ids=["shared_qkv", "global_qkv"])
@pytest.mark.parametrize("s", [64, 157])  # 157: ragged query tiles and padded blocks
@pytest.mark.parametrize("op, backend", FUSED)
def test_fused_outputs_and_gradients_match_reference(op, backend, s, extra):
    if extra and op != "sliding_window":
        pytest.skip("separate global projections: sliding window only")
    leaves, real = _parity_inputs(op, s)
    drop = dict(dropout_p=0.2, dropout_seed=77, dropout_offset=5)
    out = _parity_call(op, backend, leaves, real, extra, **drop)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    used = leaves if (extra or op != "sliding_window") else leaves[:3]
    grads = torch.autograd.grad(out, used, grad)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in used]
    ref = _parity_call(op, "reference", ref_leaves + leaves[len(used) :], real, extra, **drop)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    assert_close(out, ref, 2e-5, 2e-5, name=f"{op}/{backend} out")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, 2e-5, 2e-5, name=f"{op}/{backend} grad[{i}]")


# The cpu ops on the tile driver (csrc/cpu/flash_tile_impl.h), whose results must not depend on the thread count:
# with dropout where the backend takes it, and without (full without dropout is ATen's flash kernel, not the driver).
THREAD_CASES = [
    (op, p)
    for op in OPS
    for p in (0.0, 0.3)
    if (p == 0 and op != "full") or (p > 0 and _takes_dropout("cpu", op))
]


@pytest.mark.parametrize("d", [32, 24])  # 24: not whole AVX-512 vectors, so the tile products are BLAS's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, p", THREAD_CASES)
@pytest.mark.filterwarnings("ignore:.*runs its fp32 tile products on BLAS sgemm")
def test_cpu_results_do_not_depend_on_the_thread_count(op, p, dtype, d):
    """1, 2, 3 and 4 threads give the same forward and the same gradients bit for bit: the backward splits each
    (batch, head) into a fixed number of query-tile chunks whatever the thread count and adds their dK/dV in chunk
    order (seq 157 = 3 query tiles x 6 (batch, head) pairs: 2 chunks each, so the private sums are exercised), and
    the buffers BLAS multiplies are 64-byte aligned whichever thread allocated them (MKL rounds by alignment)."""
    if p and not _takes_dropout("cpu", op, dtype):
        pytest.skip(f"cpu takes no {dtype} dropout for {op}")
    if op in ("sliding_window", "block_sparse"):
        leaves, real = _parity_inputs(op, 157, dtype, d=d)
        leaves = leaves[:3]
        run = lambda: _parity_call(op, "cpu", leaves, real, False, dropout_p=p, dropout_seed=4)  # noqa: E731
    else:
        if dtype != torch.float32 and dispatch.reasons("cpu", op, dispatch.Problem(CPU, dtype, d, 3, 157)):
            pytest.skip(f"cpu takes no {dtype} {op}")
        leaves = [t.requires_grad_(True) for t in _qkv(157, dtype, b=2, h=3, d=d)]
        run = lambda: _call(op, leaves, backend="cpu", dropout_p=p, dropout_seed=4)  # noqa: E731
    n = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            out = run()
            res.append((threads, out, torch.autograd.grad(out.float().square().sum(), leaves)))
    finally:
        torch.set_num_threads(n)
    _, o1, g1 = res[0]
    for threads, o, g in res[1:]:
        assert torch.equal(o, o1), f"forward, {threads} threads vs 1"
        for i, (a, b) in enumerate(zip(g, g1)):
            assert torch.equal(a, b), (
                f"grad[{i}], {threads} threads vs 1: max |diff| {(a - b).abs().max().item():.3g}"
            )


# --- cpu: LSG, Nystrom and full attention with dropout, case by case -------------------------------------------
# Each case: (op, settings, seq, padding) -> the public op on (2, 3, seq, 32) inputs; the comment says what it covers.
def _real(s, pad):
    real = torch.ones(2, s, dtype=torch.bool)
    if pad == "tail":
        real[0, max(s - 9, 1) :] = False  # ragged lengths
    elif pad == "row":
        real[1] = False  # a fully padded batch row
    return real


CPU_CASES = [
    ("full", {}, 70, "tail"),  # ragged query tiles (64 + 6)
    ("full", {}, 40, "row"),  # a batch row with no real token: out 0, no NaN
    ("full", {}, 1, None),  # seq 1
    ("nystrom", {"num_landmarks": 8}, 157, "tail"),  # segments of 20, the last one 17
    ("nystrom", {"num_landmarks": 6, "pinv_init": "hf_global"}, 48, "row"),  # max over every head; padded row
    ("nystrom", {"num_landmarks": 37}, 37, "tail"),  # landmarks == seq: exact attention, key columns
    ("nystrom", {"num_landmarks": 1}, 1, None),  # seq 1
]
for _variant in ("layer", "model"):
    for _stype, _f in [("pooling", 4), ("stride", 4), ("block_stride", 2), ("norm", 4), ("bos_pooling", 4)]:
        # native extra keys (lsg_sparse_keys: pooling, stride, block_stride; not the model files' pooling) and
        # torch-built ones (norm, bos_pooling); 2 globals, seq 100 padded to 112 inside
        _sbs = 16 if (_stype, _variant) == ("norm", "model") else 8  # the model files rank norms per window
        CPU_CASES.append(
            ("lsg", {"sparsity_type": _stype, "sparsity_factor": _f, "num_global_tokens": 2, "variant": _variant,
                     "sparse_block_size": _sbs}, 100, "tail")
        )  # fmt: skip
CPU_CASES += [
    ("lsg", {"sparsity_type": "stride", "sparsity_factor": 1, "num_global_tokens": 1}, 64, "row"),  # f = 1
    ("lsg", {"sparsity_type": "none", "num_global_tokens": 3}, 64, "tail"),  # local + global only
    ("lsg", {"sparsity_type": "pooling", "num_global_tokens": 0}, 64, None),  # no global token
    ("lsg", {"sparsity_type": "pooling", "num_global_tokens": 1}, 1, None),  # seq 1
]


def _cpu_case_call(op, settings, leaves, real, backend, **dropout):
    q, k, v = leaves
    kw = dict(key_padding_mask=real, backend=backend, **dropout, **settings)
    if op == "full":
        return ek.full_attention(q, k, v, **kw)
    if op == "nystrom":
        return ek.nystrom_attention(q, k, v, kw.pop("num_landmarks"), **kw)
    return ek.lsg_attention(q, k, v, block_size=16, **{"sparse_block_size": 8, **kw})


def _case_id(case):
    op, settings, s, pad = case
    return f"{op}-{'-'.join(f'{k}={v}' for k, v in settings.items())}-s{s}-{pad}"


def _cpu_case_results(case, backend, dtype=torch.float32, p=0.25):
    """(out, grads of q, k, v) of one case with dropout p on `backend`, inputs rounded to dtype."""
    op, settings, s, pad = case
    g = torch.Generator().manual_seed(s)
    leaves = [torch.randn(2, 3, s, 32, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]
    out = _cpu_case_call(op, settings, leaves, _real(s, pad), backend, dropout_p=p, dropout_seed=2**33 + s,
                         dropout_offset=9)  # fmt: skip
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return out.detach(), [t.detach() for t in torch.autograd.grad(out, leaves, grad)]


cpu_dropout = pytest.mark.skipif(_NO_CPU, reason="cpu backend unavailable")


@cpu_dropout
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_cpu_dropout_matches_reference(case):
    """The cpu kernels with dropout against `reference`: the same keep-mask (a flipped bit would move an output row
    by a probability / (1 - p), far above the tolerance), outputs and gradients to fp32 tolerance; a padded or
    empty row is 0, never NaN."""
    out, grads = _cpu_case_results(case, "cpu")
    ref, ref_grads = _cpu_case_results(case, "reference")
    name = _case_id(case)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out, ref, 1e-5, 1e-5, name=f"{name} out")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, 2e-5, 2e-5, name=f"{name} grad[{i}]")
    without, _ = _cpu_case_results(case, "cpu", p=0.0)
    if (
        case[2] > 1
    ):  # with one key per row the output is v or 0: dropout still changes it unless every bit is kept
        assert not torch.equal(out, without)


@cpu_dropout
@pytest.mark.parametrize("op", ["full", "lsg", "nystrom"])
def test_cpu_dropout_bf16_matches_reference(op):
    """bf16 inputs (native bf16 tiles for full attention; LSG and Nystrom compute in fp32): the float64 reference on
    the same rounded inputs, within test_cpu_isa's bf16 tolerance."""
    case = next(c for c in CPU_CASES if c[0] == op and c[2] > 1)
    out, grads = _cpu_case_results(case, "cpu", torch.bfloat16)
    ref, ref_grads = _cpu_case_results(case, "reference", torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), 3e-2, name=f"{op} bf16 out")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a.float(), e.float(), 1.5e-1, name=f"{op} bf16 grad[{i}]")


@cpu_dropout
@pytest.mark.parametrize("case", [c for c in CPU_CASES if c[2] > 1][::3], ids=_case_id)
def test_cpu_dropout_one_and_two_threads_identical_forward(case):
    """The forward with dropout is bit for bit the same on 1 and 2 threads (the mask is a function of positions;
    forward tasks split rows or heads, never a row's sum)."""
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_cpu_case_results(case, "cpu")[0])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])


# --- every ISA target (a subprocess each, as tests/test_cpu_isa.py runs them) -------------------------------------
_ISA_CASES = [
    0,
    3,
    5,
    7,
    10,
    11,
    13,
    17,
]  # indices into CPU_CASES: full, Nystrom (landmarks, exact), LSG native/torch keys
_ISA_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_dropout as t
    from etkd_kernels import _C
    assert _C.isa() == {isa!r}, _C.isa()
    torch.set_num_threads(2)
    res = {{"probe": {{}}, "cases": {{}}}}
    for op in ("full", "lsg", "nystrom", "sliding_window", "block_sparse"):
        for dtype in (torch.float32, torch.bfloat16):
            res["probe"][op, str(dtype)] = t._mask_probe(op, "cpu", dtype, 83, 0.1, 2**40 + 5)
    for i in t._ISA_CASES:
        res["cases"][i] = t._cpu_case_results(t.CPU_CASES[i], "cpu")
    torch.save(res, {path!r})
    """
)


def _isa_variants():
    from test_cpu_isa import ISAS, _isa_param

    params = [_isa_param(i) for i in ISAS]
    amx_off = _isa_param("avx512_bf16")
    return [pytest.param(p.values[0], "1", marks=p.marks, id=p.values[0]) for p in params] + [
        pytest.param(amx_off.values[0], "0", marks=amx_off.marks, id="avx512_bf16-amx0")
    ]


@pytest.mark.parametrize("isa, amx", _isa_variants())
def test_cpu_dropout_every_isa_target(isa, amx, tmp_path):
    """Under ETKD_CPU_ISA=<target> (and ETKD_CPU_AMX=0: the vdpbf16ps bf16 tiles): the keep-mask probe of every
    cpu op in fp32 and bf16 equals the reference mask, and the LSG / Nystrom / full cases match the reference."""
    path = str(tmp_path / "res.pt")
    code = _ISA_CHILD.format(tests=os.path.dirname(__file__), isa=isa, path=path)
    env = dict(os.environ, ETKD_CPU_ISA=isa, ETKD_CPU_AMX=amx)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(path)
    for (op, dtype), out in got["probe"].items():
        want = _mask_probe(op, "reference", getattr(torch, dtype.split(".")[-1]), 83, 0.1, 2**40 + 5)
        assert torch.equal(out != 0, want != 0), (
            f"{isa} {op} {dtype}: {(out != 0).ne(want != 0).sum()} bits differ"
        )
    for i, (out, grads) in got["cases"].items():
        ref, ref_grads = _cpu_case_results(CPU_CASES[i], "reference")
        name = f"{isa} amx={amx} {_case_id(CPU_CASES[i])}"
        assert_close(out, ref, 1e-5, 1e-5, name=f"{name} out")
        for j, (a, e) in enumerate(zip(grads, ref_grads)):
            assert_close(a, e, 2e-5, 2e-5, name=f"{name} grad[{j}]")
