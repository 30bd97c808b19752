"""ISA variants and 16-bit dtypes of the `cpu` backend, against `reference` and against each other.

Every kernel target built into the extension and supported by this CPU runs in its own subprocess
(ETKD_CPU_ISA=<target>, the choice is made once per process) on the same inputs; targets this CPU lacks are
skipped with the reason. Tolerances per dtype (outputs, gradients; inputs ~N(0, 1), head_dim <= 64):
float32 1e-5 / 1e-4 like tests/test_cpu_kernels.py; float16 (fp32 compute, output rounding only) 4e-3 /
2e-2; bfloat16 (outputs rounded to 8 bits of mantissa; native targets also round P and dS to bf16 for the
tile products, as flash attention does) 3e-2 / 1.5e-1. The reference runs in float64 on the same 16-bit
inputs, so the tolerance covers only the kernel's own rounding.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import assert_close

import etkd_kernels
from etkd_kernels import block_sparse_attention, nystrom_attention, sliding_window_attention
from etkd_kernels import dispatch as dispatch_mod

CPU = etkd_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")

ISAS = ("avx2", "avx512", "avx512_bf16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 1.5e-1)}


def _isa_lists() -> tuple[list[str], list[str]]:
    from etkd_kernels import _C

    return _C.built_isas(), _C.supported_isas()


def _isa_param(name: str):
    if not CPU.available:
        return pytest.param(name, marks=pytest.mark.skip(reason="cpu backend unavailable"))
    built, supported = _isa_lists()
    if name not in built:
        why = f"{name} is not built into this extension (built: {', '.join(built)}; compiler or non-x86 host)"
        return pytest.param(name, marks=pytest.mark.skip(reason=why))
    if name not in supported:
        why = f"this CPU lacks {name} (supports: {', '.join(supported)})"
        return pytest.param(name, marks=pytest.mark.skip(reason=why))
    return pytest.param(name)


def _cases(dtype: torch.dtype) -> list[tuple[str, list[torch.Tensor], dict]]:
    """(name, [q, k, v, (qg, kg, vg)], kwargs) covering padding, globals, tails, several segments."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    b, h = 2, 2
    cases = []
    s, d = 150, 40  # query tiles 64 + 64 + 22; head_dim not a multiple of 16 (vector tails)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, s - 9 :] = False
    gm = torch.zeros(b, s, dtype=torch.bool)
    gm[:, [0, 77]] = True
    cases.append(
        (
            "sw_globals_pad",
            [rnd(b, h, s, d) for _ in range(3)],
            dict(window=32, global_mask=gm, key_padding_mask=kpm),
        )
    )
    cases.append(
        (
            "sw_global_qkv",
            [rnd(b, h, s, d) for _ in range(6)],
            dict(window=16, global_mask=gm, key_padding_mask=None),
        )
    )
    # head_dim 64 (the packed bf16 path on AMX CPUs): band edges and the global source off the 64-key blocks
    # (window 30), globals, padding, a last partial query tile
    cases.append(
        (
            "sw_d64",
            [rnd(b, h, s, 64) for _ in range(3)],
            dict(window=30, global_mask=gm, key_padding_mask=kpm),
        )
    )
    # an odd number of query rows in the last tile (77 = 64 + 13): the own bf16 backward pairs query rows
    cases.append(("sw_odd_rows", [rnd(1, 2, 77, 32) for _ in range(3)], dict(window=20)))
    # band of 64 + 1024 keys per query tile: split into two key segments (kMaxSeg 640)
    cases.append(("sw_long", [rnd(1, 1, 800, 32) for _ in range(3)], dict(window=1024)))
    # q, k, v as a model passes them: (b, s, h, d) projections viewed (b, h, s, d), read in place (flash_tile.h Rows)
    cases.append(
        (
            "sw_split",
            [rnd(b, s, h, 64) for _ in range(3)],
            dict(window=30, global_mask=gm, key_padding_mask=kpm),
        )
    )
    layout = torch.rand(h, 4, 4, generator=g) < 0.5
    layout[:, torch.arange(4), torch.arange(4)] = True
    layout[1, 2] = False  # a query block seeing nothing
    cases.append(
        ("bs", [rnd(b, h, 128, 32) for _ in range(3)], dict(layout=layout, key_padding_mask=kpm[:, :128]))
    )
    cases.append(
        (
            "bs_split",
            [rnd(b, 128, h, 32) for _ in range(3)],
            dict(layout=layout, key_padding_mask=kpm[:, :128]),
        )
    )
    cases.append(
        (
            "nystrom",
            [rnd(b, h, 96, 32) for _ in range(3)],
            dict(num_landmarks=8, key_padding_mask=kpm[:, :96]),
        )
    )
    return cases


def _run(name: str, ts: list[torch.Tensor], kw: dict, backend: str) -> torch.Tensor:
    if name.endswith("_split"):  # (b, s, h, d) tensors, passed as (b, h, s, d) views
        ts = [t.transpose(1, 2) for t in ts]
    if name.startswith("sw"):
        kw = dict(kw)
        gqkv = tuple(ts[3:6]) if len(ts) == 6 else None
        return sliding_window_attention(*ts[:3], kw.pop("window"), global_qkv=gqkv, backend=backend, **kw)
    if name.startswith("bs"):
        return block_sparse_attention(
            *ts[:3], kw["layout"], key_padding_mask=kw["key_padding_mask"], backend=backend
        )
    return nystrom_attention(
        *ts[:3], kw["num_landmarks"], key_padding_mask=kw["key_padding_mask"], backend=backend
    )


def _forward_backward(name, ts, kw, backend, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in ts]
    out = _run(name, leaves, kw, backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), [g.detach() for g in grads]


def _results(dtype: torch.dtype, backend: str, compute_dtype: torch.dtype | None = None) -> dict:
    return {
        name: _forward_backward(name, ts, kw, backend, compute_dtype or dtype)
        for name, ts, kw in _cases(dtype)
    }


@functools.cache
def _reference(dtype: torch.dtype) -> dict:
    """float64 reference on the inputs rounded to `dtype`."""
    return _results(dtype, "reference", compute_dtype=torch.float64)


_CHILD_RESULTS: dict[str, dict] = {}


def _child_results(isa: str, tmp_dir: str, gemm: str = "own", amx: str = "1", bf16: str = "auto") -> dict:
    """cpu results for every dtype from a subprocess with ETKD_CPU_ISA=isa ('auto': the process chooses),
    ETKD_CPU_GEMM=gemm, ETKD_CPU_AMX=amx and ETKD_CPU_BF16=bf16 (run once per session)."""
    key = f"{isa}-{gemm}-amx{amx}-{bf16}"
    if key not in _CHILD_RESULTS:
        path = os.path.join(tmp_dir, f"{key}.pt")
        code = _CHILD.format(tests=os.path.dirname(__file__), isa=isa, gemm=gemm, path=path)
        env = dict(os.environ, ETKD_CPU_ISA=isa, ETKD_CPU_GEMM=gemm, ETKD_CPU_AMX=amx, ETKD_CPU_BF16=bf16)
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
        )
        assert res.returncode == 0, res.stderr[-3000:]
        _CHILD_RESULTS[key] = torch.load(path)
    return _CHILD_RESULTS[key]


_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_cpu_isa as t
    import etkd_kernels
    from etkd_kernels import _C
    isa = _C.isa()
    assert {isa!r} in ("auto", isa), isa
    reason = etkd_kernels.available_backends()["cpu"].reason
    assert f"ISA {{isa}} " in reason, reason  # available_backends() / `etkd info` name the target that runs
    # the fp32 tile products asked for are the ones that run (every x86 target has its own micro-kernels)
    assert _C.tile_gemm() == {gemm!r}, _C.tile_gemm()
    assert (f"own {{isa}} micro-kernels" in reason) == ({gemm!r} == "own"), reason
    torch.set_num_threads(2)
    _C.bf16_calls()  # reset
    res = {{name: t._results(t.DTYPES[name], "cpu") for name in t.DTYPES}}
    res["isa"] = isa
    res["rates"] = _C.product_rates()
    res["bf16_brgemm"] = _C.bf16_brgemm()
    res["bf16_products"] = _C.bf16_products()
    res["bf16_calls"] = _C.bf16_calls()  # what really multiplied the bf16 tiles of the cases above
    res["reason"] = reason
    torch.save(res, {path!r})
    """
)


@pytest.mark.parametrize("isa", [_isa_param(i) for i in ISAS])
def test_isa_variant_matches_reference(isa, tmp_path_factory):
    """One subprocess per target: fp32, bf16 and fp16, forward and gradients, against float64 reference."""
    got = _child_results(isa, str(tmp_path_factory.getbasetemp()))
    calls = got["bf16_calls"]
    if isa == "avx512_bf16":
        # the bf16 cases of head_dim 64 and 32 take the packed tiles, forward and backward: AMX brgemm on an AMX
        # CPU, elsewhere the own vdpbf16ps kernels (head_dim 40 goes to MKL, said once); the child counts the calls
        # that really ran on each, so a packed path silently not taken (MKL or the other kernels) fails here
        amx = _amx_for_onednn()
        fast, other = ("amx", "vdpbf16ps") if amx else ("vdpbf16ps", "amx")
        assert got["bf16_brgemm"] == amx, got["bf16_brgemm"]
        assert got["bf16_products"] == {"forward": fast, "backward": fast}, got["bf16_products"]
        for way in ("forward", "backward"):
            assert calls[way][fast] > 0 and calls[way][other] == 0, calls
    else:
        assert got["bf16_products"] == {"forward": "fp32", "backward": "fp32"}, got["bf16_products"]
        assert calls["forward"]["fp32"] > 0 and calls["backward"]["fp32"] > 0, calls
    _check_against_reference(isa, got)


def _check_against_reference(label: str, got: dict) -> None:
    for dname, dtype in DTYPES.items():
        want = _reference(dtype)
        fwd_tol, grad_tol = TOL[dtype]
        for case, (out, grads) in got[dname].items():
            w_out, w_grads = want[case]
            assert out.dtype == dtype, f"{label} {case} {dname}: output dtype {out.dtype}"
            assert_close(out, w_out, fwd_tol, name=f"{label} {case} {dname} out")
            for i, (g, w) in enumerate(zip(grads, w_grads)):
                assert g.dtype == dtype, f"{label} {case} {dname}: grad dtype {g.dtype}"
                assert_close(g, w, grad_tol, name=f"{label} {case} {dname} grad[{i}]")


def test_amx_switched_off_runs_vdpbf16ps(tmp_path_factory):
    """ETKD_CPU_AMX=0 makes an AMX CPU multiply bf16 tiles as an AVX512-BF16 CPU without AMX (AMD Zen 4/5) does:
    the own vdpbf16ps kernels, forward and backward. The child counts which products really ran (not only what
    it reports), and the results match the float64 reference in every dtype."""
    built, supported = _isa_lists()
    if "avx512_bf16" not in built or "avx512_bf16" not in supported:
        pytest.skip(f"needs the avx512_bf16 target (built {built}, supported {supported})")
    got = _child_results("avx512_bf16", str(tmp_path_factory.getbasetemp()), amx="0")
    calls = got["bf16_calls"]
    assert not got["bf16_brgemm"]
    assert got["bf16_products"] == {"forward": "vdpbf16ps", "backward": "vdpbf16ps"}, got["bf16_products"]
    for way in ("forward", "backward"):
        assert calls[way]["amx"] == 0 and calls[way]["vdpbf16ps"] > 0, calls
    assert "own vdpbf16ps micro-kernels" in got["reason"], got["reason"]  # etkd info says what runs
    _check_against_reference("avx512_bf16 amx=0", got)


def _needs_bf16_without_amx() -> None:
    built, supported = _isa_lists()
    if not {"avx512", "avx512_bf16"} <= set(built) & set(supported):
        pytest.skip(f"needs the avx512 and avx512_bf16 targets (built {built}, supported {supported})")


@pytest.mark.parametrize("bf16", ["vdpbf16ps", "fp32"])
def test_bf16_products_forced_without_amx(bf16, tmp_path_factory):
    """ETKD_CPU_BF16 forces the bf16 products of an AVX512-BF16 CPU without AMX (here ETKD_CPU_AMX=0) when the
    target is chosen automatically: the own vdpbf16ps kernels on the avx512_bf16 target, or fp32 tiles converted on
    load on the avx512 target. The child counts the calls that really ran; results match the float64 reference."""
    _needs_bf16_without_amx()
    got = _child_results("auto", str(tmp_path_factory.getbasetemp()), amx="0", bf16=bf16)
    calls = got["bf16_calls"]
    assert got["isa"] == ("avx512_bf16" if bf16 == "vdpbf16ps" else "avx512"), got["isa"]
    assert got["bf16_products"] == {"forward": bf16, "backward": bf16}, got["bf16_products"]
    other = "fp32" if bf16 == "vdpbf16ps" else "vdpbf16ps"
    for way in ("forward", "backward"):
        assert calls[way][bf16] > 0 and calls[way][other] == 0 and calls[way]["amx"] == 0, calls
    assert f"(ETKD_CPU_BF16={bf16})" in got["reason"], got["reason"]  # etkd info says what forced it
    _check_against_reference(f"auto amx=0 bf16={bf16}", got)


def test_bf16_products_chosen_by_measured_rates(tmp_path_factory):
    """Without AMX (ETKD_CPU_AMX=0) and nothing forced, the process measures the own fp32 and vdpbf16ps products
    once and keeps vdpbf16ps only when its rate beats fp32's (else the avx512 target converts bf16 to fp32 tiles);
    `_C.product_rates()` reports the two compared rates and `etkd info` quotes them. Results match the reference."""
    _needs_bf16_without_amx()
    got = _child_results("auto", str(tmp_path_factory.getbasetemp()), amx="0")
    rates, calls = got["rates"], got["bf16_calls"]
    assert rates["fp32"] > 0 and rates["vdpbf16ps"] > 0, rates  # both measured, whichever target runs
    want = "vdpbf16ps" if rates["vdpbf16ps"] > rates["fp32"] else "fp32"
    assert got["isa"] == ("avx512_bf16" if want == "vdpbf16ps" else "avx512"), (got["isa"], rates)
    assert got["bf16_products"] == {"forward": want, "backward": want}, (got["bf16_products"], rates)
    for way in ("forward", "backward"):
        assert calls[way][want] > 0 and calls[way]["amx"] == 0, calls
    said = f"vdpbf16ps {rates['vdpbf16ps']:.1f} vs fp32 {rates['fp32']:.1f} GMAC/s"
    assert said in got["reason"], got["reason"]
    _check_against_reference(f"auto amx=0 ({want})", got)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _amx_for_onednn() -> bool:
    """Whether the bf16 tiles can run on oneDNN's AMX brgemm here: the CPU has AMX-BF16 and oneDNN is not capped
    below AMX (ONEDNN_MAX_CPU_ISA, which the AVX2-CPU and Zen 4 emulations set; the child processes inherit it)."""
    from etkd_kernels import cpu

    return _cpu_flags() >= {"amx_bf16", "amx_tile"} and not cpu.onednn_cap_hiding_amx()


def test_isa_variants_agree(tmp_path_factory):
    """Every supported target gives the same fp32 results up to summation order (1e-5)."""
    built, supported = _isa_lists()
    runnable = [i for i in ISAS if i in built and i in supported]
    if len(runnable) < 2:
        pytest.skip(f"needs two runnable targets, this CPU/build has {runnable}")
    outs = {isa: _child_results(isa, str(tmp_path_factory.getbasetemp()))["float32"] for isa in runnable}
    base = runnable[0]
    for isa in runnable[1:]:
        for case, (out, grads) in outs[isa].items():
            assert_close(out, outs[base][case][0], 1e-5, name=f"{isa} vs {base} {case} out")
            for i, (g, w) in enumerate(zip(grads, outs[base][case][1])):
                assert_close(g, w, 1e-4, name=f"{isa} vs {base} {case} grad[{i}]")


def test_blas_tile_products_agree(tmp_path_factory):
    """ETKD_CPU_GEMM=blas (BLAS sgemm for the fp32 tiles) matches the own micro-kernels of the same target
    (fp32 1e-5: summation order only) and the reference in every dtype."""
    built, supported = _isa_lists()
    isa = next((i for i in reversed(ISAS) if i in built and i in supported), None)
    if isa is None:
        pytest.skip(f"no x86 target runs here (built {built}, supported {supported})")
    tmp = str(tmp_path_factory.getbasetemp())
    blas, own = _child_results(isa, tmp, "blas"), _child_results(isa, tmp)
    for case, (out, grads) in blas["float32"].items():
        assert_close(out, own["float32"][case][0], 1e-5, name=f"{isa} blas vs own {case} out")
        for i, (g, w) in enumerate(zip(grads, own["float32"][case][1])):
            assert_close(g, w, 1e-4, name=f"{isa} blas vs own {case} grad[{i}]")
    _check_against_reference(f"{isa} blas", blas)
    if isa == "avx512_bf16":  # ETKD_CPU_GEMM=blas takes MKL's bf16 GEMM for the bf16 tiles too
        assert blas["bf16_products"] == {"forward": "mkl", "backward": "mkl"}, blas["bf16_products"]
        assert blas["bf16_calls"]["forward"]["mkl"] > 0 and blas["bf16_calls"]["backward"]["mkl"] > 0


@pytest.mark.parametrize(
    "value, hides",
    [("AVX2", True), ("avx512_core_bf16", True), ("AVX512_CORE_AMX", False), ("ALL", False), ("", False)],
)
@pytest.mark.parametrize("name", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_onednn_cap_below_amx_is_named(name, value, hides, monkeypatch):
    """A oneDNN ISA cap below AMX (as the AVX2-CPU and Zen 4 emulations set it) keeps the AMX brgemm tiles off an
    AMX CPU: `cpu.onednn_cap_hiding_amx()` names the variable (new or old name), '' for a cap that allows AMX."""
    from etkd_kernels import cpu

    if not _cpu_flags() >= {"amx_bf16", "amx_tile"}:
        pytest.skip("this CPU has no AMX-BF16: no oneDNN cap can hide it")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(name, value)
    assert cpu.onednn_cap_hiding_amx() == (f"{name}={value}" if hides else "")


@pytest.mark.parametrize("amx", ["1", "0"])
def test_onednn_cap_below_amx_is_said_in_info(amx):
    """On an AMX CPU, ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 alone (not ETKD_CPU_AMX=0) makes the bf16 tiles leave AMX
    for the vdpbf16ps kernels; `etkd info`'s cpu line says which cap did it (not when ETKD_CPU_AMX=0 chose so)."""
    if not _cpu_flags() >= {"amx_bf16", "amx_tile"}:
        pytest.skip("this CPU has no AMX-BF16: no oneDNN cap can hide it")
    _needs_bf16_without_amx()
    code = (
        "from etkd_kernels import _C, cpu; "
        "print(_C.bf16_products()['forward'], _C.bf16_brgemm()); print(cpu.isa_summary())"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16", ETKD_CPU_AMX=amx, ETKD_CPU_BF16="vdpbf16ps")
    env.pop("ETKD_CPU_ISA", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    products, summary = res.stdout.splitlines()[:2]
    assert products == "vdpbf16ps False", products
    said = "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 caps oneDNN below this CPU's AMX tiles"
    assert (said in summary) == (amx == "1"), summary


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("ETKD_CPU_AMX", "off", "expected 1"),  # the AMX switch
        ("ETKD_CPU_GEMM", "mkl", "`own`"),  # the tile products' switch
        ("ETKD_CPU_BF16", "avx512", "vdpbf16ps or fp32"),  # the bf16 products' switch without AMX
        ("ETKD_CPU_ISA", "sse2", "avx2"),  # a forced target the cpu backend does not have
    ],
)
def test_bad_cpu_switch_is_an_error(variable, value, expected):
    """A bad value of an ETKD_CPU_* switch fails the first op with an error naming it and what it expects."""
    code = "import torch, etkd_kernels as e; e.sliding_window_attention(*torch.randn(3, 1, 1, 8, 8), 2)"
    env = dict(os.environ, **{variable: value})
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert f"{variable}={value}" in res.stderr and expected in res.stderr, res.stderr[-2000:]


def test_16bit_runs_on_cpu_under_auto():
    """bf16 and fp16 CPU tensors resolve to the fused cpu backend, not to reference."""
    for dtype in (torch.bfloat16, torch.float16):
        for op in ("sliding_window", "block_sparse", "nystrom", "full", "lsg"):
            assert dispatch_mod.selected_backend_name(op, torch.device("cpu"), dtype) == "cpu"


def test_full_attention_16bit_matches_reference():
    from etkd_kernels import full_attention

    g = torch.Generator().manual_seed(0)
    kpm = torch.ones(2, 70, dtype=torch.bool)
    kpm[1, 60:] = False
    for dtype in (torch.bfloat16, torch.float16):
        ts = [torch.randn(2, 2, 70, 32, generator=g).to(dtype) for _ in range(3)]
        got = full_attention(*ts, key_padding_mask=kpm, backend="cpu")
        want = full_attention(*(t.double() for t in ts), key_padding_mask=kpm, backend="reference")
        assert got.dtype == dtype
        assert_close(got, want, TOL[dtype][0], name=f"full {dtype}")


@pytest.mark.parametrize("sparsity_type", ["pooling", "norm"])  # native sparse keys / torch-built ones
def test_lsg_16bit_matches_reference(sparsity_type):
    """LSG computes in fp32 (convert on load): bf16/fp16 in, outputs and gradients in the input dtype."""
    from etkd_kernels import lsg_attention

    g = torch.Generator().manual_seed(0)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[1, 55:] = False
    kw = dict(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type=sparsity_type)
    kw.update(num_global_tokens=1, key_padding_mask=kpm)
    for dtype in (torch.bfloat16, torch.float16):
        ts = [torch.randn(2, 2, 64, 16, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]
        out = lsg_attention(*ts, backend="cpu", **kw)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        grads = torch.autograd.grad(out, ts, grad)
        ref = [t.detach().double().requires_grad_(True) for t in ts]
        want = lsg_attention(*ref, backend="reference", **kw)
        want_grads = torch.autograd.grad(want, ref, grad.double())
        assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
        assert_close(out, want, TOL[dtype][0], name=f"lsg {sparsity_type} {dtype} out")
        for i, (x, w) in enumerate(zip(grads, want_grads)):
            assert_close(x, w, TOL[dtype][1], name=f"lsg {sparsity_type} {dtype} grad[{i}]")


def test_fallback_to_reference_warns_once(monkeypatch):
    """float64 on the CPU: `auto` takes reference and says once why and that cpu takes float32."""
    monkeypatch.setattr(dispatch_mod, "_warned", set())
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sliding_window_attention(q, q, q, 4)
        sliding_window_attention(q, q, q, 4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "reference" in msgs[0] and "cpu takes torch.float32" in msgs[0] and "torch.float64" in msgs[0]
    with warnings.catch_warnings(record=True) as caught:  # an explicit choice is not a silent fallback
        warnings.simplefilter("always")
        monkeypatch.setattr(dispatch_mod, "_warned", set())
        sliding_window_attention(q, q, q, 4, backend="reference")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


# Instructions a baseline x86-64 CPU may lack: VEX/EVEX-encoded SIMD (every AVX mnemonic starts with "v") and BMI.
_WIDE = re.compile(r"\t(v[a-z0-9]+|shlx|shrx|sarx|rorx|bzhi|pdep|pext|andn|tzcnt|lzcnt)\s")
_TARGET_CODE = re.compile(r"etkd::cpu::(avx2|avx512|avx512_bf16)::|at::vec::etkd_(avx2|avx512|avx512_bf16)::")


def test_simd_code_stays_in_its_target():
    """Every function of the extension that uses AVX/BMI instructions lives in a per-target namespace (ours or
    at::vec's per-target one), so only the chosen target's table ever reaches it: no inline std::/c10:: helper
    was emitted with a wider target's instructions where baseline code could link to it (isa/prelude.h)."""
    import shutil

    from etkd_kernels import _C

    if shutil.which("objdump") is None or "avx2" not in _C.built_isas():
        pytest.skip(f"needs objdump and an x86-64 build (built: {_C.built_isas()})")
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    inside, outside, dp_fns, fn = set(), set(), set(), None
    for line in dump.stdout.splitlines():
        if line.endswith(">:") and " <" in line:
            fn = line.split(" <", 1)[1][:-2]
        elif fn and _WIDE.search(line):
            (inside if _TARGET_CODE.search(fn) else outside).add(fn)
            if "\tvdpbf16ps" in line:
                dp_fns.add(fn)
    assert len(inside) > 20, (
        f"the scan found only {len(inside)} target functions using AVX: is it reading the kernels?"
    )
    assert not outside, (
        f"{len(outside)} functions outside the per-target namespaces use AVX/BMI: {sorted(outside)[:5]}"
    )
    if "avx512_bf16" in _C.built_isas():
        # the own bf16 products (vdpbf16ps) exist, and only in the avx512_bf16 target
        assert dp_fns, "no function of the extension uses vdpbf16ps: the own bf16 tile products are not built"
        wrong = [f for f in dp_fns if "etkd::cpu::avx512_bf16::" not in f]
        assert not wrong, f"vdpbf16ps outside the avx512_bf16 target: {wrong[:5]}"
