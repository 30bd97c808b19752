"""`cpu`: fused C++ kernels from csrc/cpu (OpenMP + ATen vectorization), loaded lazily.

The SIMD kernels are compiled for several x86-64 targets (AVX2 baseline, AVX-512, AVX-512 + BF16) and one is
chosen when the extension is first used: the widest this CPU reports, or the one ETKD_CPU_ISA names
(`avx2`, `avx512`, `avx512_bf16`; an unusable value is an error). `isa()` says which one runs.
float32, bfloat16 and float16 inputs: fp32 softmax statistics and accumulation, outputs in the input dtype;
bf16 tiles are multiplied natively on the `avx512_bf16` target, forward and backward on K/V packed once per
(batch, head) task: on a CPU with AMX by oneDNN brgemm on AMX tiles, without AMX (AMD Zen 4/5, or ETKD_CPU_AMX=0)
by the own vdpbf16ps micro-kernels when they measure faster than fp32 tiles at first use, else converted to fp32
tiles on the avx512 target (ETKD_CPU_BF16=vdpbf16ps|fp32 forces one; ETKD_CPU_GEMM=blas: MKL's bf16 GEMM per
tile); other 16-bit cases convert on load (K/V once per (batch, head) task).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._caller import caller_stacklevel
from .._env import EnvironmentValueError, flag
from ..dispatch import Capabilities, backend_ops

NAME = "cpu"
OPS = backend_ops(__file__)  # module <op> here holds forward/backward
AUTO_DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def isa() -> str:
    """The kernel target this process runs ('avx2', 'avx512', 'avx512_bf16', or 'generic' off x86-64).

    Raises RuntimeError when ETKD_CPU_ISA names a target that is not built or that this CPU lacks.
    """
    from etkd_kernels import _C

    return _C.isa()


def isa_summary() -> str:
    """One line: the chosen target, how bf16 is computed, and what else is built / supported here."""
    from etkd_kernels import _C

    bf16 = bf16_description()
    if _C.tile_gemm() == "own":
        fp32 = f"fp32 tiles by own {_C.isa()} micro-kernels"
    else:
        fp32 = "fp32 tiles by BLAS sgemm" + (" (ETKD_CPU_GEMM=blas)" if _C.isa() != "generic" else "")
    from etkd_kernels.cpu.nystrom import keep_description

    return (
        f"ISA {_C.isa()} ({fp32}; {bf16}; {keep_description()}; built: {', '.join(_C.built_isas())}; "
        f"this CPU: {', '.join(_C.supported_isas()) or 'none'}; ETKD_CPU_ISA forces one)"
    )


_BF16_PRODUCTS = {
    "amx": "oneDNN AMX brgemm tiles",
    "vdpbf16ps": "own vdpbf16ps micro-kernels",
    "mkl": "MKL bf16 GEMM",
}


def bf16_description() -> str:
    """How bf16 tiles are multiplied here, forward and backward (`_C.bf16_products()`): AMX brgemm where the CPU has
    AMX (ETKD_CPU_AMX=0 switches it off), the own AVX512-BF16 vdpbf16ps kernels, MKL's bf16 GEMM
    (ETKD_CPU_GEMM=blas), or conversion to fp32 on a target without native bf16. Without AMX, the vdpbf16ps kernels
    or fp32 tiles (the avx512 target) by what measured faster at first use (csrc/cpu/isa.cpp:
    bf16_products_choice), and why: the two rates, or the variable that forced it."""
    from etkd_kernels import _C

    got = _C.bf16_products()
    if got["forward"] == "fp32":
        said = "bf16/fp16 converted to fp32 on load"
    else:
        fwd, bwd = _BF16_PRODUCTS[got["forward"]], _BF16_PRODUCTS[got["backward"]]
        said = (
            f"bf16 native: tiles by {fwd}"
            if fwd == bwd
            else f"bf16 native: forward tiles by {fwd}, backward by {bwd}"
        )
    return said + _bf16_choice(got["forward"])


def _bf16_choice(products: str) -> str:
    """Why an AVX512-BF16 CPU without AMX (or with ETKD_CPU_AMX=0) runs `products` ('vdpbf16ps' or 'fp32'); ''
    where that choice was not made (AMX, MKL, a CPU without AVX512-BF16)."""
    import os

    from etkd_kernels import _C

    if (
        products not in ("vdpbf16ps", "fp32")
        or "avx512_bf16" not in _C.supported_isas()
        or _C.tile_gemm() != "own"
    ):
        return ""
    cap = onednn_cap_hiding_amx() if os.environ.get("ETKD_CPU_AMX", "").strip() != "0" else ""
    why_no_amx = f"; {cap} caps oneDNN below this CPU's AMX tiles" if cap else ""
    isa = os.environ.get("ETKD_CPU_ISA", "").strip()
    if isa not in ("", "auto"):
        return f" (ETKD_CPU_ISA={isa}{why_no_amx})"
    mode = os.environ.get("ETKD_CPU_BF16", "").strip()
    if mode not in ("", "auto"):
        return f" (ETKD_CPU_BF16={mode}{why_no_amx})"
    if products == "fp32" and _C.isa() != "avx512":
        return f" ({why_no_amx[2:]})" if cap else ""  # avx512_bf16 target, no MKL bf16 GEMM in this torch
    rates = _C.product_rates()  # the rates the choice compared
    return (
        f" (faster here: vdpbf16ps {rates['vdpbf16ps']:.1f} vs fp32 {rates['fp32']:.1f} GMAC/s per thread, "
        f"measured at first use; ETKD_CPU_BF16=vdpbf16ps|fp32 forces one{why_no_amx})"
    )


# oneDNN's ONEDNN_MAX_CPU_ISA values below AMX (its cpu_isa_t names; DEFAULT, ALL and the *_AMX* ones allow it)
_ONEDNN_BELOW_AMX = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
     "AVX512_CORE_FP16", "AVX10_1_512"}
)  # fmt: skip


def onednn_cap_hiding_amx() -> str:
    """'ONEDNN_MAX_CPU_ISA=<value>' when that variable (or its old name DNNL_MAX_CPU_ISA) keeps oneDNN, and so the
    AMX brgemm bf16 tiles, below AMX on a CPU that has AMX-BF16; '' otherwise. The AVX2 and Zen 4 emulations set
    it on purpose; anyone else loses the AMX tiles to it, so `etkd info` says so (unless ETKD_CPU_AMX=0)."""
    import os

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            break
    if value.upper() not in _ONEDNN_BELOW_AMX:
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return f"{name}={value}" if {"amx_bf16", "amx_tile"} <= set(flags) else ""


class Bf16Matmul(NamedTuple):
    fast: bool  # torch's own bf16 GEMMs (F.linear, matmul) are fast here: run them as they are
    reason: str  # why, for `etkd info` and the warning of the routed linear layers (etkd.models.precision)


def bf16_matmul() -> Bf16Matmul:
    """Whether torch's own bf16 GEMMs on the CPU (the linear layers of a model under bf16 autocast or with bf16
    weights; not etkd's attention kernels, whose bf16 tiles `bf16_description` covers) are fast here, and why.

    `auto` asks torch: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is the check ATen's bf16 matmuls make
    (use_mkldnn_bf16_matmul, mkldnn_bf16_gemm) before handing a GEMM to oneDNN; it is ideep's
    `has_bf16_type_support()`, oneDNN's effective ISA >= avx512_core (AVX-512 F/BW/VL/DQ: oneDNN's bf16 kernels,
    native with AVX512-BF16/AMX, else converting in AVX-512 registers; ONEDNN_MAX_CPU_ISA lowers it). When it is
    False (an AVX2-only CPU: every Zen 1-3, client Intel without AVX-512) the GEMM runs on ATen's generic
    kernel instead: measured 5.9x slower than fp32 on a Zen 3 (4096x768 by 3072x768, 1185 vs 200 ms, 2 threads).
    ETKD_CPU_BF16_LINEAR=bf16|fp32 forces the answer (read per call; a bad value raises EnvironmentValueError)."""
    from .._env import BF16_LINEAR, bf16_linear_mode

    mode = bf16_linear_mode()
    if mode == "bf16":
        return Bf16Matmul(True, f"{BF16_LINEAR}=bf16 forces torch's bf16 GEMMs")
    if mode == "fp32":
        return Bf16Matmul(False, f"{BF16_LINEAR}=fp32 forces fp32 GEMMs")
    return _bf16_matmul_auto()


@functools.cache
def _bf16_matmul_auto() -> Bf16Matmul:
    if not torch.backends.mkldnn.is_available():
        return Bf16Matmul(False, "this torch has no oneDNN: its bf16 GEMMs run on ATen's generic kernel")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Bf16Matmul(
            True, "torch runs bf16 GEMMs on oneDNN here (torch.ops.mkldnn._is_mkldnn_bf16_supported())"
        )
    return Bf16Matmul(
        False,
        "torch.ops.mkldnn._is_mkldnn_bf16_supported() is False (oneDNN's bf16 GEMMs need AVX-512, which this CPU "
        "lacks or ONEDNN_MAX_CPU_ISA hides), so torch's bf16 GEMMs run on ATen's generic kernel, several times "
        "slower than its fp32 GEMMs",
    )


def bf16_matmul_summary() -> str:
    """One line for `etkd info`: how the linear layers' bf16 GEMMs run here (etkd.models.precision)."""
    got = bf16_matmul()
    if got.fast:
        return f"bf16 linear layers: torch's bf16 GEMMs ({got.reason}); ETKD_CPU_BF16_LINEAR=fp32 forces fp32 GEMMs"
    return (
        f"bf16 linear layers: fp32 GEMMs on bf16-rounded inputs in etkd's models, a warning for HF models "
        f"({got.reason}); ETKD_CPU_BF16_LINEAR=bf16 forces torch's bf16 GEMMs"
    )


_told: set[tuple[str, torch.dtype, int]] = set()


def note_tile_path(op: str, q: torch.Tensor) -> None:
    """Warn once per (op, dtype, head_dim) when a call's head_dim keeps it off this CPU's fastest tile products,
    which would otherwise happen unsaid: bf16 on the AMX brgemm tiles (head_dim a multiple of 16) falls back to
    MKL's bf16 GEMM; fp32 tiles (fp32, fp16, and bf16 converted on load) on the target's own micro-kernels
    (head_dim a multiple of the vector width) fall back to BLAS sgemm."""
    d = q.shape[-1]
    if (op, q.dtype, d) in _told:
        return
    from etkd_kernels import _C

    if q.dtype == torch.bfloat16 and _C.native_bf16():
        fast = _C.bf16_products()["forward"]
        if fast == "mkl" or d % 16 == 0:
            return
        msg = (
            f"etkd {op}: bf16 with head_dim {d} runs on MKL's bf16 GEMM, not the faster "
            f"{_BF16_PRODUCTS[fast]} of this CPU (they need head_dim a multiple of 16)"
        )
    else:
        width = _C.own_tile_width()
        if width == 0 or d % width == 0:
            return
        msg = (
            f"etkd {op}: head_dim {d} runs its fp32 tile products on BLAS sgemm, not the {_C.isa()} target's own "
            f"micro-kernels (they need head_dim a multiple of {width})"
        )
    import warnings

    _told.add((op, q.dtype, d))
    warnings.warn(msg, RuntimeWarning, stacklevel=caller_stacklevel())


def __getattr__(name: str) -> str:
    # DESCRIPTION names the chosen ISA, which needs the extension: computed on first access, not at import.
    if name == "DESCRIPTION":
        base = "fused C++ kernels (csrc/cpu), OpenMP + SIMD, fp32/bf16/fp16"
        return base if unavailable_reason() else f"{base}, {isa_summary()}"
    raise AttributeError(name)


@functools.cache
def unavailable_reason() -> str | None:
    import platform

    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return "this x86 CPU has no AVX2, which the fused C++ kernels need at least"
    why = _load_extension()
    if why is not None:
        return why
    from etkd_kernels import _C

    try:
        _C.isa()
    except RuntimeError as exc:
        # a bad ETKD_CPU_ISA / ETKD_CPU_GEMM, the message naming what would work: a user error, not a fallback
        if str(exc).startswith("ETKD_"):
            raise EnvironmentValueError(str(exc)) from None
        raise
    # the kernels' phase timers, from the one check of every ETKD_ flag
    _C.set_cpu_profile(flag("ETKD_CPU_PROFILE"))
    return None


def _load_extension() -> str | None:
    """Import `etkd_kernels._C`: the installed one when it was compiled against this torch's minor, else a JIT
    build for this torch (the cache's, or compiled now with ETKD_JIT=1). None, or why there are no kernels and
    how to get them. A mismatched extension is never imported: a torch extension built for another torch
    fails on missing symbols at best."""
    from etkd_kernels import build

    running = torch.__version__
    try:
        from etkd_kernels._build_info import TORCH_VERSION as built_for
    except ImportError:
        built_for = None
    if built_for is None:
        try:  # a source tree built before the version was recorded
            from etkd_kernels import _C  # noqa: F401

            return None
        except ImportError:
            problem = (
                "this etkd install has no compiled CPU kernels (built without torch, or with ETKD_NO_EXT=1)"
            )
    elif build.torch_minor(built_for) != build.torch_minor(running):
        problem = (
            f"etkd_kernels._C was compiled against torch {built_for} but this is torch {running} (a compiled "
            "extension loads only on the torch minor it was built for)"
        )
    else:
        try:
            from etkd_kernels import _C  # noqa: F401

            return None
        except ImportError as exc:
            problem = f"etkd_kernels._C (compiled against torch {built_for}) failed to load on torch {running}: {exc}"
    try:
        if build.load_cached() is not None:
            return None
    except (ImportError, OSError) as exc:  # a cached build that does not load: build it again (ETKD_JIT=1)
        problem += f"; the cached JIT build does not load ({exc})"
    if flag("ETKD_JIT"):
        try:
            build.jit_build(force="cached JIT build" in problem)
            return None
        except Exception as exc:  # the compiler's own words (their end) are the reason
            return (
                f"{problem}; ETKD_JIT=1 could not build the kernels for torch {running}: {str(exc)[-2000:]}"
            )
    want = f"pip install 'torch=={build.torch_minor(built_for)}.*'; or " if built_for else ""
    return (
        f"{problem}. Fix: {want}ETKD_JIT=1 (or `python -m etkd_kernels.build`) compiles the kernels for torch "
        f"{running} once (needs a C++ compiler and ninja); or reinstall from source against this torch: "
        "pip install --no-build-isolation --no-deps --force-reinstall etkd"
    )


# Per-op exceptions to DTYPES (none today: the kernels that compute in float32 only get their 16-bit inputs
# converted on load by `_dtype.in_float32` (their modules use it), forward and backward;
# tests/test_support_matrix.py checks it).
OP_DTYPES: dict[str, tuple[torch.dtype, ...]] = {}


# Ops whose kernels apply attention dropout (dropout_p > 0; the others fall back to `reference`, saying so): all
# of them (full_attention with dropout runs the tile driver, not ATen's kernel: etkd_kernels/cpu/full.py).
DROPOUT_OPS = OPS


# Ops whose kernels read q, k, v, grad_out and write out, dq, dk, dv at any row strides (csrc/cpu/flash_tile.h: Rows):
# a model's head-split views reach them without a copy. nystrom: grad_out at any strides (the expanded gradient of a
# sum) too; its exact landmarks == seq case makes its inputs contiguous (etkd_kernels/cpu/nystrom.py: softmax_matmul).
STRIDED_OPS = ("block_sparse", "sliding_window", "nystrom")


# Ops whose forward rejects NaN/Inf inputs itself (Capabilities.checks_finite): nystrom, fused into nystrom_fwd's passes
# over q, k, v (csrc/cpu/nystrom.cpp: rows_finite; the exact landmarks == seq case calls check_finite).
FINITE_CHECKING_OPS = ("nystrom",)


def capabilities(op: str) -> Capabilities:
    return Capabilities(
        devices=("cpu",),
        dtypes=OP_DTYPES.get(op, DTYPES),
        dropout=op in DROPOUT_OPS,
        strided=op in STRIDED_OPS,
        checks_finite=op in FINITE_CHECKING_OPS,
    )
