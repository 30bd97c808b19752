"""The `cpu` backend (csrc/cpu fused kernels) against `reference`, through the public ops.

fp32 tolerances: forward atol 1e-5, gradients atol 1e-4. Every case runs with 1 and 2 OpenMP threads (2
threads also exercises the backward's split of query tiles into private dK/dV accumulators when there are
few (batch, head) pairs).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close, assert_views_not_copied, head_split_views

import etkd_kernels
from etkd_kernels import (
    BlockLayout,
    bigbird_layout,
    block_sparse_attention,
    fixed_layout,
    longformer_layout,
    nystrom_attention,
    sliding_window_attention,
)
from etkd_kernels.ops._define import defined

pytestmark = pytest.mark.skipif(
    not etkd_kernels.available_backends()["cpu"].available,
    reason=f"cpu backend unavailable: {etkd_kernels.available_backends()['cpu'].reason}",
)

FWD_ATOL, GRAD_ATOL = 1e-5, 1e-4


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _inputs(b, h, s, d, n=3):
    return [torch.randn(b, h, s, d, requires_grad=True) for _ in range(n)]


def _padding(b, s, pad):
    kpm = torch.ones(b, s, dtype=torch.bool)
    if pad:
        kpm[-1, s - pad :] = False
    return kpm if pad else None


def _compare(run, leaves, name):
    """run(backend) -> output; compare output and gradients of cpu against reference."""
    got, want = {}, {}
    for backend, res in (("cpu", got), ("reference", want)):
        out = run(backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        res["out"] = out
        res["grads"] = torch.autograd.grad(out, leaves, grad)
    assert_close(got["out"], want["out"], FWD_ATOL, name=f"{name} out")
    for i, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert_close(g, w, GRAD_ATOL, name=f"{name} grad[{i}]")


SW_CASES = [
    # (batch, heads, seq, head_dim, window, globals, global_qkv, pad)
    (1, 1, 37, 16, 8, 0, False, 0),  # seq not a multiple of the 64-row query tile, no globals
    (2, 3, 130, 32, 16, 3, True, 5),  # several query tiles, separate global projections, padding
    (2, 2, 200, 64, 32, 2, False, 7),  # globals reusing q/k/v
    (1, 2, 67, 16, 128, 1, True, 0),  # window wider than the sequence
    (1, 1, 700, 32, 512, 0, False, 30),  # band split into several key segments, padded tail
]


@pytest.mark.parametrize("case", SW_CASES, ids=[str(c) for c in SW_CASES])
def test_sliding_window_matches_reference(case, threads):
    b, h, s, d, window, n_glob, use_gqkv, pad = case
    q, k, v = _inputs(b, h, s, d)
    gqkv = tuple(_inputs(b, h, s, d)) if use_gqkv else None
    gm = None
    if n_glob:
        gm = torch.zeros(b, s, dtype=torch.bool)
        gm[:, torch.randperm(s)[:n_glob]] = True
        gm[-1, s - 1] = True  # a global token that is also padding (when pad) counts as padding
    kpm = _padding(b, s, pad)
    leaves = [q, k, v] + (list(gqkv) if gqkv else [])

    def run(backend):
        return sliding_window_attention(
            q, k, v, window, global_mask=gm, global_qkv=gqkv, key_padding_mask=kpm, backend=backend
        )

    _compare(run, leaves, f"sliding_window{case}")


def _random_layout(h, nb, density=0.3):
    mask = torch.rand(h, nb, nb) < density
    mask[:, 1] = False  # a query block that sees nothing: out 0
    return mask


BS_CASES = [
    # (name, batch, heads, seq, head_dim, layout builder, pad)
    ("random-per-head", 2, 3, 96, 16, lambda s, h: BlockLayout(_random_layout(h, s // 16), 16), 5),
    (
        "random-shared",
        1,
        2,
        100,
        32,
        lambda s, h: BlockLayout(_random_layout(1, 4), 32),
        0,
    ),  # seq padded to 128
    ("longformer", 1, 2, 256, 64, lambda s, h: longformer_layout(s, 32, 3, (0,)), 9),
    ("fixed", 2, 1, 192, 32, lambda s, h: fixed_layout(s, 32, 2, 1), 0),
    ("bigbird", 1, 2, 512, 16, lambda s, h: bigbird_layout(s, 32, 3, 2, 2, seed=3, num_heads=h), 0),
    (
        "big-block",
        1,
        1,
        384,
        16,
        lambda s, h: longformer_layout(s, 192, 1, (0,)),
        0,
    ),  # 192-row blocks, 3 tiles each
]


@pytest.mark.parametrize("case", BS_CASES, ids=[c[0] for c in BS_CASES])
def test_block_sparse_matches_reference(case, threads):
    name, b, h, s, d, make, pad = case
    q, k, v = _inputs(b, h, s, d)
    layout = make(s, h)
    kpm = _padding(b, s, pad)

    def run(backend):
        return block_sparse_attention(q, k, v, layout, key_padding_mask=kpm, backend=backend)

    _compare(run, [q, k, v], f"block_sparse[{name}]")


NY_CASES = [
    # (batch, heads, seq, head_dim, landmarks, pad, pinv_init)
    (1, 2, 64, 16, 8, 0, "per_head"),
    (2, 3, 100, 32, 7, 9, "hf_global"),  # landmarks not dividing seq, padding
    (2, 3, 100, 32, 7, 9, "per_head"),
    (2, 2, 96, 16, 8, 4, "hf_global"),  # landmarks dividing seq, padding
    (1, 1, 10, 16, 6, 0, "per_head"),  # 2-token segments: only 5 landmarks
    (1, 1, 40, 64, 40, 5, "per_head"),  # landmarks == seq: exact softmax attention
    # the backward's 64-row query tiles (3, the last partial) and head_dim not a whole vector (padded rows)
    (2, 2, 150, 12, 9, 20, "hf_global"),
    (1, 2, 200, 80, 16, 0, "per_head"),  # head_dim 5 vectors of 16; 13-row segments, the last one shorter
    (1, 1, 1, 16, 1, 0, "per_head"),  # seq 1
]


@pytest.mark.parametrize("case", NY_CASES, ids=[str(c) for c in NY_CASES])
def test_nystrom_matches_reference(case, threads):
    b, h, s, d, nl, pad, init = case
    q, k, v = _inputs(b, h, s, d)
    kpm = _padding(b, s, pad)

    def run(backend):
        return nystrom_attention(q, k, v, nl, key_padding_mask=kpm, pinv_init=init, backend=backend)

    _compare(run, [q, k, v], f"nystrom{case}")


# K1 and K3 kept from the forward (the automatic choice) or recomputed in the backward: every combination against
# reference on whatever target runs here (and on avx2: test_nystrom_keep_modes_match_reference_avx2).
NY_KEEP_CASES = [
    # (batch, heads, seq, head_dim, landmarks, pad, pinv_init, dropout_p, strided)
    (2, 3, 100, 32, 7, 9, "hf_global", 0.0, False),  # padding, hf_global, landmarks not dividing seq
    (2, 2, 150, 12, 9, 20, "hf_global", 0.2, False),  # head_dim 12 (padded copies), 3 query tiles, dropout
    # 128-key K3 tiles all padding (skipped by the forward: kept as zeros), a partial one, the last one short
    (2, 2, 400, 12, 9, 150, "hf_global", 0.1, False),
    (1, 2, 200, 64, 16, 0, "per_head", 0.3, True),  # dropout on the kept K1's copy; (b, s, h, d) views
    (1, 1, 40, 16, 40, 5, "per_head", 0.0, False),  # landmarks == seq: exact attention, nothing kept
    (1, 1, 1, 16, 1, 0, "per_head", 0.0, False),  # seq 1
    (1, 2, 0, 16, 1, 0, "per_head", 0.0, False),  # seq 0
]


@pytest.mark.parametrize("mode", ["none", "k1", "k3", "k1,k3"])
@pytest.mark.parametrize("case", NY_KEEP_CASES, ids=[str(c) for c in NY_KEEP_CASES])
def test_nystrom_keep_modes_match_reference(case, mode, threads, monkeypatch):
    from etkd_kernels.cpu import nystrom as cpu_nystrom

    monkeypatch.setenv("ETKD_CPU_NYSTROM_KEEP", mode)
    keep = cpu_nystrom.kept()
    assert keep == {"none": 0, "k1": 1, "k3": 2, "k1,k3": 3}[mode]
    b, h, s, d, nl, pad, init, p, strided = case
    if strided:  # head-split views of (b, s, h, d) projections, read in place
        leaves = [torch.randn(b, s, h, d, requires_grad=True) for _ in range(3)]
        q, k, v = (t.transpose(1, 2) for t in leaves)
    else:
        leaves = q, k, v = _inputs(b, h, s, d)
    kpm = _padding(b, s, pad)
    sizes = []

    def run(backend):
        out = nystrom_attention(
            q, k, v, nl, key_padding_mask=kpm, pinv_init=init, dropout_p=p, dropout_seed=7, dropout_offset=3,
            backend=backend,
        )  # fmt: skip
        if backend == "cpu" and out.grad_fn is not None:  # saved's size, before the backward frees it
            sizes.extend(
                t.shape[2]
                for t in out.grad_fn.saved_tensors
                if t is not None and t.dim() == 3 and t.shape[:2] == (b, h)
            )
        return out

    _compare(run, leaves, f"nystrom keep {mode}{case}")
    if (
        1 < nl < s
    ):  # the landmark path ran: saved holds K1 and K3 exactly when kept (landmarks pad to 16 here)
        n = -(-s // -(-s // nl))
        base = 3 * n * (-(-d // 16) * 16) + -(-n // 16) * 16
        extra = (s * 16 if keep & 1 else 0) + ((s + -(-s // 128)) * 16 if keep & 2 else 0)
        assert sizes == [base + extra]


def test_nystrom_keep_mode_is_checked_and_told(monkeypatch):
    from etkd_kernels.cpu import isa_summary
    from etkd_kernels.cpu import nystrom as cpu_nystrom

    monkeypatch.setenv("ETKD_CPU_NYSTROM_KEEP", "sometimes")
    with pytest.raises(
        ValueError, match="ETKD_CPU_NYSTROM_KEEP=sometimes: expected auto, none, k1, k3, k1,k3"
    ):
        cpu_nystrom.kept()
    monkeypatch.setenv("ETKD_CPU_NYSTROM_KEEP", "k3")
    assert "Nystrom K3 kept from the forward when differentiated (ETKD_CPU_NYSTROM_KEEP=k3)" in isa_summary()
    monkeypatch.delenv("ETKD_CPU_NYSTROM_KEEP")
    assert cpu_nystrom.kept() == 3
    assert "Nystrom K1 and K3 kept from the forward when differentiated (auto;" in isa_summary()
    # Kept only when the result will be differentiated (the op's for_backward setting): not under no_grad.
    q, k, v = _inputs(1, 1, 64, 16)
    seen = []
    real = cpu_nystrom.forward

    def spy(q, k, v, p):
        seen.append(p.for_backward)
        return real(q, k, v, p)

    monkeypatch.setattr(cpu_nystrom, "forward", spy)
    nystrom_attention(q, k, v, 8, backend="cpu").sum().backward()
    with torch.no_grad():
        nystrom_attention(q, k, v, 8, backend="cpu")
    nystrom_attention(q.detach(), k.detach(), v.detach(), 8, backend="cpu")
    assert seen == [True, False, False]


def test_nystrom_keep_modes_match_reference_avx2():
    """The keep cases on the avx2 target (chosen once per process: a child pytest)."""
    from etkd_kernels import _C

    if "avx2" not in _C.supported_isas():
        pytest.skip(f"this CPU or build lacks avx2 (supports: {', '.join(_C.supported_isas())})")
    if _C.isa() == "avx2":
        pytest.skip("this process already runs the avx2 target: the cases above are its run")
    import subprocess
    import sys

    env = dict(os.environ, ETKD_CPU_ISA="avx2")
    tests = [f"{__file__}::test_nystrom_keep_modes_match_reference", f"{__file__}::test_nystrom_keep_mode_is_checked_and_told"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


NY_FWD_CASES = [
    # (batch, heads, seq, head_dim, landmarks, pad, pinv_init, pinv_iterations): the fused forward alone
    (1, 4, 600, 64, 64, 0, "per_head", 6),  # several 256-row query tiles, a short last segment
    (3, 2, 300, 64, 32, 40, "hf_global", 6),  # one init over heads and batch rows of different scales
    (2, 2, 77, 32, 5, 77, "per_head", 6),  # a batch row that is all padding: zeros
    (1, 2, 50, 16, 9, 3, "hf_global", 0),  # no Newton-Schulz step: the initial inverse
    (2, 1, 33, 8, 1, 2, "per_head", 3),  # one landmark
    # head_dim not a multiple of 8 (padded v tiles and output rows); a 128-key K3 tile all padding (skipped)
    (2, 2, 400, 12, 9, 150, "hf_global", 6),
    (1, 3, 130, 20, 13, 0, "per_head", 6),  # seq a multiple of neither the 48-row K1 nor the 128-key K3 tile
]


@pytest.mark.parametrize("case", NY_FWD_CASES, ids=[str(c) for c in NY_FWD_CASES])
def test_nystrom_fused_forward_matches_reference(case, threads):
    b, h, s, d, nl, pad, init, iters = case
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    q[-1] *= 3  # hf_global: the batch rows' K2 column sums differ
    kpm = None
    if pad:
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[-1, s - pad :] = False
    with torch.no_grad():
        got, want = (
            nystrom_attention(
                q, k, v, nl, pinv_iterations=iters, key_padding_mask=kpm, pinv_init=init, backend=backend
            )
            for backend in ("cpu", "reference")
        )
    assert_close(got, want, FWD_ATOL, name=f"nystrom fused{case}")
    if pad == s:
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))


def test_nystrom_fused_forward_non_contiguous():
    q, k, v = (torch.randn(1, 40, 2, 16).transpose(1, 2) for _ in range(3))
    with torch.no_grad():
        got = nystrom_attention(q, k, v, 8, backend="cpu")
        want = nystrom_attention(q, k, v, 8, backend="reference")
    assert_close(got, want, FWD_ATOL, name="nystrom fused non-contiguous")


def test_padded_rows_are_zero_not_nan():
    q, k, v = _inputs(1, 1, 20, 16)
    kpm = torch.zeros(1, 20, dtype=torch.bool)  # nothing real at all
    out = sliding_window_attention(q, k, v, 4, key_padding_mask=kpm, backend="cpu")
    assert torch.equal(out, torch.zeros_like(out))
    out = block_sparse_attention(
        q, k, v, BlockLayout(torch.ones(1, 2, 2, dtype=torch.bool), 10), key_padding_mask=kpm, backend="cpu"
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_rejects_non_float32():
    q, k, v = (torch.randn(1, 1, 8, 16, dtype=torch.float64) for _ in range(3))
    with pytest.raises(RuntimeError, match="cpu"):
        sliding_window_attention(q, k, v, 4, backend="cpu")


def test_opcheck_sliding_window_fwd():
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    gm = torch.zeros(1, 9, dtype=torch.bool)
    gm[0, 2] = True
    args = (q, k, v, 4, gm, None, None, None, None, 0.25, 0.0, 0, 0, "cpu")  # dropout_p, seed, offset
    torch.library.opcheck(defined("sliding_window_fwd"), args)


def test_opcheck_nystrom_fwd():
    q, k, v = (torch.randn(2, 2, 24, 16, requires_grad=True) for _ in range(3))
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, 20:] = False
    for init in ("per_head", "hf_global"):
        # for_backward (K1, K3 kept on cpu: saved's size must match the fake kernel's), dropout_p, seed, offset
        args = (q, k, v, 5, 6, init, True, kpm, 0.25, 0.0, 0, 0, "cpu")
        torch.library.opcheck(defined("nystrom_fwd"), args)


def test_bf16_off_the_amx_tiles_is_said_once():
    """bf16 with a head_dim the AMX brgemm tiles cannot take (not a multiple of 16) is told once per op and head_dim;
    a head_dim they take is not."""
    import warnings

    import etkd_kernels as ek
    from etkd_kernels import _C, cpu

    if not _C.bf16_brgemm():
        pytest.skip(f"no AMX brgemm bf16 tiles on this CPU / target ({cpu.isa_summary()})")
    cpu._told.clear()
    q40, q64 = (torch.randn(1, 2, 64, d).bfloat16() for d in (40, 64))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for q in (q40, q40, q64):
            ek.sliding_window_attention(q, q, q, 8, backend="cpu")
        ek.block_sparse_attention(q40, q40, q40, ek.longformer_layout(64, 16), backend="cpu")
    said = [str(w.message) for w in seen if "AMX brgemm" in str(w.message)]
    assert (
        len(said) == 2
        and "sliding_window" in said[0]
        and "head_dim 40" in said[0]
        and "block_sparse" in said[1]
    )


def test_off_the_own_tile_products_is_said_once():
    """fp32 (and fp16) with a head_dim the target's own micro-kernels cannot take (not a whole number of vectors)
    runs on BLAS sgemm and says so once per (op, dtype, head_dim); a head_dim they take says nothing."""
    import warnings

    import etkd_kernels as ek
    from etkd_kernels import _C, cpu

    width = _C.own_tile_width()
    if width == 0:
        pytest.skip(f"the own tile products do not run here ({cpu.isa_summary()})")
    cpu._told.clear()
    odd, whole = (torch.randn(1, 2, 64, d) for d in (width + width // 2, 2 * width))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for q in (odd, odd, whole, odd.half()):
            ek.sliding_window_attention(q, q, q, 8, backend="cpu")
        ek.block_sparse_attention(odd, odd, odd, ek.longformer_layout(64, 16), backend="cpu")
    said = [str(w.message) for w in seen if "own micro-kernels" in str(w.message)]
    d = width + width // 2
    assert len(said) == 3, said  # sliding_window fp32, sliding_window fp16, block_sparse fp32
    assert all(f"head_dim {d}" in m and f"multiple of {width}" in m for m in said), said
    assert "sliding_window" in said[0] and "sliding_window" in said[1] and "block_sparse" in said[2], said


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("", False), ("on", None)])
def test_cpu_profile_switch_is_the_env_check(value, on):
    """ETKD_CPU_PROFILE is decided in one place, etkd_kernels/_env.py, for the CLI and the kernels alike: 1 turns the
    kernels' phase timers on (forward and backward add time), 0 or unset leaves them off, anything else is the
    CLI's error at the first kernel use (the C++ once took every value but 0 as on)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, etkd_kernels as e; from etkd_kernels import _C\n"
        "x = torch.randn(3, 1, 1, 64, 16, requires_grad=True)\n"
        "e.sliding_window_attention(*x, 8, backend='cpu').sum().backward()\n"
        "p = _C.cpu_profile(); print(p.pop('enabled'), sum(p.values()) > 0)"
    )
    env = dict(os.environ, ETKD_CPU_PROFILE=value)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if on is None:
        said = res.stderr[-2000:]
        assert res.returncode != 0 and f"ETKD_CPU_PROFILE={value}: expected 0 or 1" in said, said
        return
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == [str(on), str(on)], res.stdout


def test_product_rates_name_the_target_kernels():
    """`_C.product_rates()` (bench_isa's bound of the bf16 products without AMX) times the chosen target's own
    micro-kernels: an fp32 rate on every x86 target (the portable one has none), a vdpbf16ps rate on avx512_bf16,
    and on avx512 when it was chosen over avx512_bf16 by those two rates (no AMX; csrc/cpu/isa.cpp)."""
    from etkd_kernels import _C

    rates = _C.product_rates()
    assert set(rates) == {"fp32", "vdpbf16ps"}, rates
    assert (rates["fp32"] > 0) == (_C.isa() != "generic"), rates
    auto = all(os.environ.get(v, "").strip() in ("", "auto") for v in ("ETKD_CPU_ISA", "ETKD_CPU_BF16"))
    measured = auto and _C.isa() == "avx512" and "avx512_bf16" in _C.supported_isas()
    assert (rates["vdpbf16ps"] > 0) == (_C.isa() == "avx512_bf16" or measured), rates
    if measured:  # the avx512 target was taken because fp32 tiles measured faster
        assert rates["vdpbf16ps"] <= rates["fp32"], rates


@pytest.mark.parametrize("op", ["sliding_window", "block_sparse"])
def test_bf16_dropout_backward_on_the_packed_tiles(op):
    """bf16 with attention dropout takes the packed tiles backward too (AMX brgemm, or vdpbf16ps without AMX; MKL's
    per-tile GEMM before): the calls are counted, and outputs and gradients match the float64 reference on the same
    bf16 inputs and keep bits, with padding and a last partial query tile, within test_cpu_isa's bf16 tolerance."""
    from etkd_kernels import _C

    fast = _C.bf16_products()["backward"] if _C.native_bf16() else "fp32"
    if fast not in ("amx", "vdpbf16ps"):
        pytest.skip(f"no packed bf16 tiles on this target ({fast})")
    g = torch.Generator().manual_seed(3)
    b, h, s, d = 2, 2, 150 if op == "sliding_window" else 128, 32
    base = [torch.randn(b, h, s, d, generator=g).bfloat16() for _ in range(3)]
    grad = torch.randn(b, h, s, d, generator=g).bfloat16()
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, -9:] = False
    blocks = (torch.rand(h, 4, 4, generator=g) < 0.5) | torch.eye(4, dtype=torch.bool)
    kw = dict(key_padding_mask=kpm, dropout_p=0.3, dropout_seed=7)

    def run(backend, dtype):
        ts = [t.to(dtype).requires_grad_(True) for t in base]
        if op == "sliding_window":
            out = sliding_window_attention(*ts, 30, backend=backend, **kw)
        else:
            out = block_sparse_attention(*ts, BlockLayout(blocks, 32), backend=backend, **kw)
        return [out, *torch.autograd.grad(out, ts, grad.to(dtype))]

    _C.bf16_calls()  # reset
    got = run("cpu", torch.bfloat16)
    calls = _C.bf16_calls()
    assert calls["backward"][fast] > 0 and calls["backward"]["mkl"] == 0, calls
    want = run("reference", torch.float64)
    for i, (a, w) in enumerate(zip(got, want)):
        assert_close(
            a.double(), w, 3e-2 if i == 0 else 1.5e-1, name=f"{op} bf16 dropout {'out' if i == 0 else i}"
        )


def _leaves(kind: str, b: int, h: int, s: int, d: int, g: torch.Generator) -> list[torch.Tensor]:
    """The leaf tensors of a layout kind (`_views_of`)."""
    if kind == "heads_split":
        return [torch.randn(b, s, h * d, generator=g).requires_grad_(True) for _ in range(3)]
    if kind == "sliced_heads":
        return [torch.randn(b, 2 * h, s, d, generator=g).requires_grad_(True) for _ in range(3)]
    q = torch.randn(b, s, h, d, generator=g).requires_grad_(True)
    return [q, *(torch.randn(1, h, s, d, generator=g).requires_grad_(True) for _ in range(2))]


def _views_of(kind: str, leaves: list[torch.Tensor], b: int, h: int, s: int, d: int) -> list[torch.Tensor]:
    """The (b, h, s, d) q, k, v an op gets from `leaves`, in one of the layouts models and users pass."""
    if kind == "heads_split":  # a projection's (b, s, h * d) output viewed (b, s, h, d) and transposed
        return [x.view(b, s, h, d).transpose(1, 2) for x in leaves]
    if kind == "sliced_heads":  # every other head of a wider tensor: (b, h) pairs not adjacent
        return [x[:, ::2] for x in leaves]
    if kind == "expanded_batch":  # one k/v row set seen by every batch row (stride 0), q transposed
        q, k, v = leaves
        return [q.transpose(1, 2), k.expand(b, h, s, d), v.expand(b, h, s, d)]
    raise ValueError(kind)


STRIDED_CASES = [
    # (op, layout kind, dtype); block_sparse BigBird-like per-head layout, sliding window with globals + padding
    (op, kind, dtype)
    for op in ("sliding_window", "block_sparse")
    for kind in ("heads_split", "sliced_heads", "expanded_batch")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}" for c in STRIDED_CASES])
def test_strided_inputs_match_reference(case, threads):
    """q, k, v as views at any row strides (the kernels read them in place, csrc/cpu/flash_tile.h Rows): outputs and
    gradients equal `reference` on the same views (fp32 tolerances; bf16 against the float64 reference within
    test_cpu_isa's bf16 tolerance), with padding and globals (sliding window: both its global passes), 1 and 2 threads
    (2 batch x 2 heads: the backward splits pairs into chunks, whose private dK/dV go back into strided rows)."""
    op, kind, dtype = case
    g = torch.Generator().manual_seed(5)
    b, h, s, d = 2, 2, 160, 32
    leaves = _leaves(kind, b, h, s, d, g)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, -7:] = False
    gm = torch.zeros(b, s, dtype=torch.bool)
    gm[:, [0, 70]] = True
    layout = bigbird_layout(s, 32, 3, 1, 1, seed=2, num_heads=h)
    grad = torch.randn(b, h, s, d, generator=g)

    def run(backend, cast):
        ls = [x.detach().to(dtype).to(cast).requires_grad_(True) for x in leaves]  # the same rounded inputs
        ts = _views_of(kind, ls, b, h, s, d)  # the same views of the cast leaves
        if op == "sliding_window":
            out = sliding_window_attention(*ts, 32, global_mask=gm, key_padding_mask=kpm, backend=backend)
        else:
            out = block_sparse_attention(*ts, layout, key_padding_mask=kpm, backend=backend)
        return [out, *torch.autograd.grad(out, ls, grad.to(cast))]

    got = run("cpu", dtype)
    want = run("reference", torch.float64 if dtype == torch.bfloat16 else dtype)
    fwd, bwd = (FWD_ATOL, GRAD_ATOL) if dtype == torch.float32 else (3e-2, 1.5e-1)
    for i, (a, w) in enumerate(zip(got, want)):
        assert_close(
            a.to(w.dtype), w, fwd if i == 0 else bwd, name=f"{op}[{kind}, {dtype}] {'out' if i == 0 else i}"
        )


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv"])
@pytest.mark.parametrize("op", ["sliding_window", "block_sparse"])
def test_head_split_views_are_not_copied(op, fused):
    """The encoder's head-split views reach the kernels without a copy and come back in their layout: no aten copy in
    the op's forward and backward, the output and the gradients of the views in (b, s, h, d) order, so the model's
    transpose + reshape back to (b, s, h * d) is a view too. Views of three projections, or of one (b, s, 3, h, d)
    output (the encoder's fused q/k/v projection: rows 3 * h * d apart)."""
    b, h, s, d = 1, 3, 128, 32
    q, k, v = head_split_views(b, h, s, d, fused)
    gm = torch.zeros(b, s, dtype=torch.bool)
    gm[0, 0] = True

    def call():
        if op == "sliding_window":
            return sliding_window_attention(q, k, v, 16, global_mask=gm, backend="cpu")
        return block_sparse_attention(q, k, v, bigbird_layout(s, 32, 3, 1, 1, seed=0), backend="cpu")

    call()  # first call: layouts, caches
    with torch.profiler.profile(record_shapes=True) as prof:
        out = call()
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    # no copy of a q-sized tensor (the global-token masks and index lists are converted: a few hundred elements)
    assert_views_not_copied(prof, b * h * s * d, out, grads)
