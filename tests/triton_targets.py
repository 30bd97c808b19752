"""Compile the Triton kernels for a GPU target on a machine without a GPU, and read what the GPU would run.

`compile_case(case)` builds one kernel specialisation with `triton.compile(ASTSource(...), target=GPUTarget)`
and returns the facts the compile tier asserts on: dynamic shared memory, registers, stack (spill) bytes from
the cubin's resource table (Triton's bundled `cuobjdump --dump-resource-usage`), and the tensor-core
instructions in the PTX. Results are cached as JSON under `ETKD_COMPILE_CACHE` (default
`~/.cache/etkd/triton-compile`), keyed by the kernel sources, the Triton version and the case, so an unchanged
kernel is compiled once per machine; Triton's own cache keeps the binaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import etkd_kernels

TRITON_DIR = Path(etkd_kernels.__file__).resolve().parent / "triton"  # the kernels of the package under test
ARCHS = {80: "sm_80", 90: "sm_90"}
# Largest dynamic shared memory a block may opt into: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Argument kinds by name (the kernels share their argument names).
_DATA = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}
_F32_PTR = {"LSE", "DELTA"}
_I8_PTR = {"KIND", "REAL"}
_I32_PTR = {"IDX", "CNT", "LUT"}
_F32 = {"scale", "scale2", "rng_scale"}
_TL_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# The constexpr flags each kernel is launched with, per variant (the host code in each module).
LOCAL, GLOBAL, REAL, ALL = 2, 4, 6, 7
_SW_LOCAL = dict(GATHER=False, RANGE=True, BAND=True, LIST=True, OWN=LOCAL, OTHER=LOCAL, STORE=ALL - GLOBAL)
_SW_GLOBAL = dict(GATHER=True, RANGE=True, BAND=False, LIST=False, OWN=GLOBAL, OTHER=REAL, STORE=ALL)
KERNELS: dict[str, tuple[str, str, dict]] = {
    # name: (module, attribute, constexpr flags of the main launch)
    "sliding_window._fwd": ("sliding_window", "_fwd", _SW_LOCAL),
    "sliding_window._fwd[global rows]": ("sliding_window", "_fwd", _SW_GLOBAL),
    "sliding_window._bwd_dq": ("sliding_window", "_bwd_dq", _SW_LOCAL),
    "sliding_window._bwd_dkv": ("sliding_window", "_bwd_dkv", _SW_LOCAL),
    "block_sparse._fwd": ("block_sparse", "_fwd", dict(LUT_BLOCK=64)),  # e.g. 64 key blocks (4096 / 64)
    "block_sparse._bwd_dq": ("block_sparse", "_bwd_dq", {}),
    "block_sparse._bwd_dkv": ("block_sparse", "_bwd_dkv", {}),
    "nystrom._fwd": ("nystrom", "_fwd", dict(HAS_MASK=True, H=12)),
    "nystrom._bwd_dq": ("nystrom", "_bwd_dq", dict(HAS_MASK=True, H=12)),
    "nystrom._bwd_dkv": ("nystrom", "_bwd_dkv", dict(HAS_MASK=True, H=12)),
    "lsg._fwd": ("lsg", "_fwd", dict(GLOBAL=False)),
    "lsg._bwd": ("lsg", "_bwd", dict(GLOBAL=False)),
}
# Every kernel again with dropout on P (its Philox inlined): the same shipped configs must compile without
# spills and with tensor-core products.
KERNELS.update({f"{name}[dropout]": (mod, attr, {**flags, "DROPOUT": True}) for name, (mod, attr, flags) in KERNELS.items()})  # fmt: skip
# Pointer types that differ from the shared names' (LSG accumulates dK/dV in fp32; STARTS is int64).
_PTR_OVERRIDES = {
    "lsg": {"KX": None, "VX": None, "DK": "*fp32", "DV": "*fp32", "DKX": "*fp32", "DVX": "*fp32",
            "KMASK": "*i8", "QMASK": "*i8", "OKX": "*i8", "STARTS": "*i64"},
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    kernel: str  # a key of KERNELS, or "_common._delta_kernel"
    dtype: str
    head_dim: int
    arch: int
    block_p: int = 0
    block_o: int = 0
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int = 0  # 0: no .maxnreg (ptxas picks)

    def __str__(self) -> str:
        cfg = f"{self.block_p}x{self.block_o} w{self.num_warps} s{self.num_stages}"
        cfg += f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.kernel} {self.dtype} d{self.head_dim} sm_{self.arch} [{cfg}]"


@dataclass
class Result:
    shared: int
    regs: int
    stack: int
    local: int
    mma: int
    wgmma: int
    # Software pipelining: the most copy groups left in flight by a `ttg.async_wait` in the TTGIR (the loop's
    # prefetch distance; 0 when every wait drains all copies, -1 for results cached before this field).
    prefetch: int = -1

    @property
    def spills(self) -> bool:
        # Triton kernels hold no local arrays, so any stack frame is registers spilled to local memory.
        return self.stack > 0 or self.local > 0


def _module(name: str):
    import importlib

    return importlib.import_module(f"etkd_kernels.triton.{name}")


def shipped_configs(kernel: str, head_dim: int, dtype: str) -> list[tuple[int, ...]]:
    """(BLOCK_P, BLOCK_O, num_warps, num_stages[, maxnreg]) of every config a launch with this head_dim and dtype may
    autotune over."""
    from etkd_kernels.triton._common import _entry, head_block, shipped

    mod, attr, flags = KERNELS[kernel]
    fn = getattr(_module(mod), attr)
    return [
        _entry(c) for c in shipped(fn, head_block(head_dim), dtype == "float32", flags.get("DROPOUT", False))
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("ETKD_COMPILE_CACHE", Path.home() / ".cache" / "etkd" / "triton-compile"))


def _kernel_fn(case: Case):
    if case.kernel == "_common._delta_kernel":
        return _module("_common")._delta_kernel, {}
    mod, attr, flags = KERNELS[case.kernel]
    return getattr(_module(mod), attr).fn, flags


def _key(case: Case) -> str:
    """Triton's own hash of the kernel (its source and the jit functions and constexpr globals it uses),
    the Triton version and the case: editing a kernel recompiles it, editing a config table does not."""
    import triton

    fn, _ = _kernel_fn(case)
    h = hashlib.sha256()
    h.update(fn.cache_key.encode())
    h.update(triton.__version__.encode())
    fields = {k: v for k, v in asdict(case).items() if k != "maxnreg" or v}  # keys of older cases unchanged
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _signature(fn, case: Case, flags: dict):  # noqa: C901
    import triton.language as tl

    from etkd_kernels.triton._common import compute_type, head_block, precision

    dtype = DTYPES[case.dtype]
    const = {
        "CT": compute_type(dtype), "PREC": precision(dtype), "BLOCK_D": head_block(case.head_dim),
        "BLOCK_P": case.block_p, "BLOCK_O": case.block_o, "BLOCK_R": 64, "DROPOUT": False, **flags,
    }  # fmt: skip
    sig, attrs, constexprs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        if p.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = const[name]
            continue
        override = _PTR_OVERRIDES.get(case.kernel.split(".")[0], {})
        if name in override:
            sig[name] = override[name] or "*" + _TL_DTYPE[case.dtype]
        elif name in _DATA:
            sig[name] = "*" + _TL_DTYPE[case.dtype]
        elif name in _F32_PTR:
            sig[name] = "*fp32"
        elif name in _I8_PTR:
            sig[name] = "*i8"
        elif name in _I32_PTR:
            sig[name] = "*i32"
        elif name in _F32:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # torch allocations are 16-byte aligned and head_dim is a multiple of 16: what launches specialise on.
        if sig[name].startswith("*") or (name == "D" and case.head_dim % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    del tl
    return sig, constexprs, attrs


def _resources(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    assert m, out.stdout
    return {"regs": int(m[1]), "stack": int(m[2]), "local": int(m[4])}


def compile_case(case: Case) -> Result:
    """Compile `case` for its GPU target (cached) and return what the binary needs."""
    path = _cache_dir() / f"{_key(case)}.json"
    if path.exists():
        return Result(**json.loads(path.read_text()))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, flags = _kernel_fn(case)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    if case.maxnreg:
        options["maxnreg"] = case.maxnreg
    sig, constexprs, attrs = _signature(fn, case, flags)
    target = GPUTarget("cuda", case.arch, 32)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
    ptx = compiled.asm["ptx"]
    waits = re.findall(r"ttg\.async_wait .*\{num = (\d+)", compiled.asm["ttgir"])
    res = Result(
        shared=int(compiled.metadata.shared), mma=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"),
        prefetch=max(map(int, waits), default=0), **_resources(compiled.asm["cubin"]),
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(res)))
    tmp.replace(path)
    return res


def all_cases(dtypes=tuple(DTYPES), head_dims=(32, 64, 128), archs=tuple(ARCHS)) -> list[Case]:
    cases = []
    for kernel in KERNELS:
        for dtype in dtypes:
            for d in head_dims:
                for cfg in shipped_configs(kernel, d, dtype):
                    for arch in archs:
                        cases.append(Case(kernel, dtype, d, arch, *cfg))
    for dtype in dtypes:
        for d in head_dims:
            for arch in archs:
                cases.append(Case("_common._delta_kernel", dtype, d, arch))
    return cases


# One target per class of shipped tile: every arch, every dtype and the widest head tile appear, and each
# kernel's largest shipped config of each class is compiled (the `slow` tier compiles the whole cross
# product: every config x fp16/bf16/fp32 x head_dim 32/64/128 x sm_80/sm_90).
DEFAULT_TARGETS = (("float16", 128, 90), ("bfloat16", 64, 80), ("float32", 64, 80))


def default_cases() -> list[Case]:
    cases = []
    for kernel in KERNELS:
        for dtype, d, arch in DEFAULT_TARGETS:
            cfg = max(shipped_configs(kernel, d, dtype), key=lambda c: (c[0] * c[1], c[3], c[2]))
            cases.append(Case(kernel, dtype, d, arch, *cfg))
    cases.append(Case("_common._delta_kernel", "float16", 128, 90))
    return cases


if __name__ == "__main__":  # survey: python tests/triton_targets.py default | [dtype] [head_dim] [arch]
    import sys

    if sys.argv[1:] == ["default"]:
        todo = default_cases()
    else:
        dts = (sys.argv[1],) if len(sys.argv) > 1 else tuple(DTYPES)
        hds = (int(sys.argv[2]),) if len(sys.argv) > 2 else (32, 64, 128)
        ars = (int(sys.argv[3]),) if len(sys.argv) > 3 else tuple(ARCHS)
        todo = all_cases(dts, hds, ars)
    for c in todo:
        try:
            r = compile_case(c)
            print(f"{c}: shared {r.shared} regs {r.regs} stack {r.stack} mma {r.mma} wgmma {r.wgmma} prefetch {r.prefetch}"
                  f"{'  SPILL' if r.spills else ''}{'  SMEM' if r.shared > SMEM_LIMIT[c.arch] else ''}", flush=True)  # fmt: skip
        except Exception as exc:
            print(f"{c}: ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
