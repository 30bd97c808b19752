"""etkd's environment variables: their values checked in one place.

A bad value raises `EnvironmentValueError` naming the variable and what it takes; the `etkd` CLI checks them
all before a command runs (`etkd.distill.cli.check_environment`) and prints that one line (exit 2).

    ETKD_BACKEND       auto | reference | cpu | triton | cuda   (etkd_kernels.dispatch)
    ETKD_CPU_ISA       auto | a kernel target built and supported here (csrc/cpu/isa.cpp, checked by _C)
    ETKD_CPU_GEMM      own | blas                                (csrc/cpu/isa.cpp, checked by _C)
    ETKD_CPU_AMX       1 | 0                                     (csrc/cpu/isa.cpp, checked by _C)
    ETKD_CPU_BF16      auto | vdpbf16ps | fp32  (bf16 tiles without AMX; csrc/cpu/isa.cpp, checked by _C)
    ETKD_CPU_NYSTROM_KEEP  auto | none | k1 | k3 | k1,k3  (etkd_kernels/cpu/nystrom.py: kept, read per call)
    ETKD_CPU_BF16_LINEAR   auto | bf16 | fp32  (etkd.models.precision: the GEMMs of bf16 linear layers on the CPU)
    ETKD_CPU_PROFILE   0 | 1
    ETKD_CHECK_FINITE  0 | 1
    ETKD_JIT           0 | 1   (etkd_kernels.build: compile the cpu kernels for the running torch)
"""

from __future__ import annotations

import os

FLAGS = ("ETKD_CPU_PROFILE", "ETKD_CHECK_FINITE", "ETKD_JIT")
# The cpu kernels' switches, checked by the extension at its first use (etkd.distill.cli loads it when one is set).
CPU_SWITCHES = ("ETKD_CPU_ISA", "ETKD_CPU_GEMM", "ETKD_CPU_AMX", "ETKD_CPU_BF16")
# The Nystrom cpu kernels' keep switch, read per call in Python (etkd_kernels/cpu/nystrom.py: kept), checked up
# front by etkd.distill.cli without loading the extension.
NYSTROM_KEEP = "ETKD_CPU_NYSTROM_KEEP"
# Whether bf16 work of linear layers on the CPU runs torch's bf16 GEMMs or fp32 GEMMs (etkd_kernels.cpu.bf16_matmul
# answers it, etkd.models.precision acts on it): `auto` asks torch whether its bf16 GEMMs are fast here; `bf16` and
# `fp32` force either answer, so both paths run (and are tested) on any CPU. Read per call, in Python.
BF16_LINEAR = "ETKD_CPU_BF16_LINEAR"
BF16_LINEAR_MODES = ("auto", "bf16", "fp32")


class EnvironmentValueError(ValueError, RuntimeError):
    """An environment variable holds a value etkd cannot use (a user error, not a bug)."""


def flag(name: str) -> bool:
    """An on/off variable: unset, '' or '0' is off, '1' is on, anything else an error."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise EnvironmentValueError(f"{name}={value}: expected 0 or 1")
    return value == "1"


def bf16_linear_mode() -> str:
    """ETKD_CPU_BF16_LINEAR's value: 'auto' (unset or empty), 'bf16' or 'fp32'; anything else an error."""
    value = os.environ.get(BF16_LINEAR, "").strip() or "auto"
    if value not in BF16_LINEAR_MODES:
        raise EnvironmentValueError(f"{BF16_LINEAR}={value}: expected {', '.join(BF16_LINEAR_MODES)}")
    return value
