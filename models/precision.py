"""bf16 linear layers on a CPU whose torch bf16 GEMMs are slow: run them as fp32 GEMMs, and say so once.

On a CPU without oneDNN bf16 support (AVX2 only: AMD Zen 1-3, Intel client CPUs without AVX-512), torch runs a
bf16 `F.linear` on ATen's generic kernel: 5.9x slower than its fp32 GEMM on a Zen 3 (4096x768 by 3072x768, 2
threads), so a whole model under `torch.autocast("cpu", torch.bfloat16)` ran at 0.28x of HF in fp32 although
etkd's bf16 attention kernels are as fast as fp32 there. `etkd_kernels.cpu.bf16_matmul()` decides whether this
CPU's bf16 GEMMs are fast (torch's own check; ETKD_CPU_BF16_LINEAR=bf16|fp32 forces either answer).

When they are not, `linear(module, x)` computes what autocast's bf16 `F.linear` stands for with an fp32 GEMM:
x rounded to bf16 (the input autocast's GEMM would read), fp32 weights (not rounded: one rounding fewer, so
closer to fp32 than autocast's own result), the output cast to bf16 (the dtype autocast gives, so everything
downstream -- residual adds, LayerNorm, the attention kernels in bf16 -- sees what it saw before). Autograd
runs through the casts and the fp32 GEMM, so the backward's GEMMs are fp32 too. Modules are not replaced (the
encoder's q/k/v fusion checks for plain `nn.Linear`s, and state dicts stay the same): the call is routed.

HF models (`etkd.hf.patch`) keep HF's own linear layers: `note_hf_linears` warns once instead.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from etkd_kernels._caller import caller_stacklevel
from etkd_kernels._env import BF16_LINEAR
from etkd_kernels.cpu import bf16_matmul


def bf16_gemm(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether `F.linear(x, w)` with w of `weight_dtype` runs a bf16 GEMM on the CPU here: under CPU bf16
    autocast (which casts fp32 and bf16 operands to bf16), or without autocast on bf16 weights."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        autocast_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
        return autocast_bf16 and x.dtype in (torch.float32, torch.bfloat16)
    return weight_dtype == torch.bfloat16


# torch.compile: evaluated once while tracing (the answer is a property of the CPU and the environment, and its
# warning must not become a graph break); eager calls ask each time (cheap: the torch check is cached).
@torch.compiler.assume_constant_result
def fp32_gemms() -> bool:
    """True when bf16 linear layers of etkd's models run as fp32 GEMMs here (and, the first time, say so)."""
    got = bf16_matmul()
    if got.fast:
        return False
    _say_once(
        "encoder",
        f"etkd models under bf16 on this CPU: their linear layers run fp32 GEMMs on bf16-rounded inputs, outputs "
        f"in bf16 as autocast gives (attention stays in bf16), because {got.reason}. "
        f"{BF16_LINEAR}=bf16 forces torch's bf16 GEMMs (said once)",
    )
    return True


def _plain(m: nn.Module) -> bool:
    """An `nn.Linear` exactly, without forward hooks: calling it is `F.linear(x, weight, bias)`, so the routed
    GEMM computes what the call would."""
    return (
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`m(x)`, except where that would run a slow bf16 GEMM on this CPU: then an fp32 GEMM on x rounded to bf16,
    with m's weights in fp32, its output in bf16 (see the module docstring). x (..., in) -> (..., out)."""
    weight = getattr(m, "weight", None)
    if weight is None or not bf16_gemm(x, weight.dtype) or not fp32_gemms():
        return m(x)
    if not _plain(m):
        # A subclass, wrapper or hooked module (LoRA, quantisation, a forward hook) computes what its own call
        # says: calling F.linear here would bypass it, so it keeps torch's bf16 GEMM, and the user is told.
        _say_once(
            "not plain",
            f"etkd models under bf16 on this CPU: {type(m).__name__} is not a plain nn.Linear without hooks, so it "
            f"keeps torch's slow bf16 GEMM (the fp32 route would bypass what it adds) (said once)",
        )
        return m(x)
    with torch.autocast("cpu", enabled=False):
        bias = None if m.bias is None else m.bias.float()
        y = F.linear(x.to(torch.bfloat16).float(), weight.float(), bias)
    return y.to(torch.bfloat16)


def note_hf_linears(module: nn.Module, x: torch.Tensor) -> None:
    """Warn once when an HF model patched onto etkd's ops (`module` one of its attention modules, `x` its input)
    runs bf16 on a CPU whose torch bf16 GEMMs are slow: its linear layers are HF's, not ours to route."""
    if "hf" in _told or not bf16_gemm(x, x.dtype):
        return
    got = bf16_matmul()
    if got.fast:
        return
    _say_once(
        "hf",
        f"etkd.hf: an HF model ({type(module).__name__}) runs in bf16 on this CPU, and its linear layers (HF's, not "
        f"etkd's) take torch's bf16 GEMMs, slow here ({got.reason}): fp32 (no autocast, fp32 weights) is faster, "
        f"or etkd.models.from_hf(model), whose linear layers run fp32 GEMMs under bf16 autocast. "
        f"{BF16_LINEAR}=bf16 says the bf16 GEMMs are fast enough and silences this (said once)",
    )


_told: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())
