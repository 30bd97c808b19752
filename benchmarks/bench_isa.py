"""ISA x dtype timing of the cpu kernels, side by side in one run: `python -m etkd.benchmarks.bench_isa`.

Every (ISA target, emulation) runs in a subprocess of its own (the target is chosen once per process via
ETKD_CPU_ISA); the rounds alternate between the subprocesses so that load on a shared machine hits every
configuration alike, and the median over rounds is reported. `--mkl-avx2` adds an "AVX2 CPU" configuration:
ETKD_CPU_ISA=avx2 plus MKL_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2, so the BLAS that the tile
products call is also limited to AVX2, as on an AVX2-only CPU. `--no-amx` adds an "AVX512-BF16 CPU without AMX"
configuration (AMD Zen 4/5) on an AMX CPU: ETKD_CPU_ISA=avx512_bf16, ETKD_CPU_AMX=0 (bf16 tiles on the own
vdpbf16ps kernels), MKL_ENABLE_INSTRUCTIONS=AVX512_E3 and ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (no AMX in MKL or
oneDNN either). The CPU's model (family and model numbers), its SIMD flags and the code path MKL takes on it
(`MKL_VERBOSE`'s line for one sgemm: MKL picks its kernels per CPU, which moves HF's side and BLAS tiles) are printed
first; the default targets are those built that this CPU runs, and a target, `--no-amx` or `--mkl-avx2`
configuration it cannot run is skipped with the reason (an AVX2-only CPU runs `avx2` alone). Every child says what
multiplied its bf16 tiles (`_C.bf16_products()`) and on which heap it ran (`--heap`: every configuration once per
heap, `etkd.benchmarks.harness.HEAPS`). Shapes: batch 1, 12 heads x 64, seq 4096;
sliding window 512 (no globals); BigBird block-sparse 64 (3 window + 2 global + 3 random blocks).

Each round times every case with the project's one timer (`etkd_kernels.timing.time_call`, median of
`--repeats` calls after one warm-up); the table gives `Timing.of` over the rounds' medians (median, p20-p80).
Each configuration also says how fast its own tile micro-kernels multiply on one thread (`_C.product_rates()`,
GMAC/s on the forward's tile shapes, best round): the fp32 FMA ones and, on `avx512_bf16`, the vdpbf16ps ones, whose
ratio bounds the bf16 products without AMX against the fp32 ones on this CPU.
`--profile` runs the children with ETKD_CPU_PROFILE=1 and adds, per case, the kernel's time per phase (QK^T GEMM,
softmax, conversions, PV GEMM, ...; csrc/cpu/flash_tile.h) in ms per call summed over threads; a fwd+bwd row
minus its fwd row is the backward's (whose products are qk: S = Q K^T, and pv: the other four).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from etkd_kernels.timing import Timing, environment, heap, time_call

from .harness import HeapUnavailable, add_heap_arg, heap_env, heaps_of

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _child(patterns: list[str], dtypes: list[str], modes: list[str], seq: int, repeats: int) -> dict:
    import etkd_kernels as ek
    from etkd_kernels import _C

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 12, seq, 64, generator=g) for _ in range(3)]
    layout = ek.bigbird_layout(seq, block_size=64, num_random_blocks=3, seed=0)
    ops = {
        "sliding_window": lambda q, k, v: ek.sliding_window_attention(q, k, v, 512, backend="cpu"),
        "block_sparse": lambda q, k, v: ek.block_sparse_attention(q, k, v, layout, backend="cpu"),
    }
    res: dict = {"isa": _C.isa(), "bf16": _C.bf16_products(), "heap": heap(), "times": {}, "phases": {}}
    res["rates"] = _C.product_rates()  # the own micro-kernels' peak on one thread (about 25 ms)
    for pattern in patterns:
        for dn in dtypes:
            for mode in modes:
                ts = [t.detach().to(_DTYPES[dn]).requires_grad_(mode == "fwd+bwd") for t in base]
                grad = torch.randn(ts[0].shape, generator=g).to(_DTYPES[dn])

                def run(op=ops[pattern], ts=ts, mode=mode, grad=grad):
                    if mode == "fwd":
                        with torch.no_grad():
                            op(*ts)
                    else:
                        torch.autograd.grad(op(*ts), ts, grad)

                key = f"{pattern}/{dn}/{mode}"
                _C.cpu_profile()  # reset the phase totals
                res["times"][key] = time_call(run, repeats=repeats, warmup=1).median
                prof = _C.cpu_profile()
                if prof.pop("enabled"):
                    res["phases"][key] = {k: v / (repeats + 1) for k, v in prof.items()}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", nargs="+", default=None,
                    help="kernel targets (default: every one built that this CPU runs); one it cannot run is "
                    "skipped with the reason")  # fmt: skip
    ap.add_argument("--mkl-avx2", action="store_true", help="add the AVX2-CPU emulation (BLAS limited too)")
    ap.add_argument(
        "--blas", action="store_true", help="add each ISA with BLAS tile products (ETKD_CPU_GEMM=blas)"
    )
    ap.add_argument(
        "--no-amx",
        action="store_true",
        help="add avx512_bf16 without AMX (ours, MKL, oneDNN): a Zen 4 emulation",
    )
    ap.add_argument("--patterns", nargs="+", default=["sliding_window", "block_sparse"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=tuple(_DTYPES))
    ap.add_argument("--modes", nargs="+", default=["fwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over configurations (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-phase kernel time (ETKD_CPU_PROFILE=1)")
    add_heap_arg(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(_child(a.patterns, a.dtypes, a.modes, a.seq, a.repeats)))
        return 0
    # What this CPU is, before anything runs: the README's table is per CPU family.
    print(f"# {environment().cpu}; SIMD flags: {' '.join(_simd_flags()) or 'unknown'}", flush=True)
    print(f"# torch {torch.__version__} (its own vector ISA {torch.backends.cpu.get_cpu_capability()}); "
          f"{_blas_path()}", flush=True)  # fmt: skip
    configs, skipped = _configs(a)
    for name, why in skipped.items():
        print(f"# {name}: skipped: {why}", flush=True)
    try:
        heaps = heaps_of(a.heap)
    except ValueError as exc:
        ap.error(str(exc))
    if heaps:  # every configuration once per heap, each in its own child (the heap is chosen at start-up)
        on_heaps = {}
        for c, env in configs.items():
            for h in heaps:
                try:
                    on_heaps[f"{c}@{h}"] = heap_env(h, dict(os.environ, **env))
                except HeapUnavailable as exc:
                    print(f"# {c}@{h}: skipped: {exc}", flush=True)
        configs = on_heaps
    else:
        configs = {c: dict(os.environ, **env) for c, env in configs.items()}
    if not configs:
        print("# nothing to run")
        return 0
    rows: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    phases: dict[str, dict[str, dict[str, list[float]]]] = {c: {} for c in configs}
    argv_child = [sys.executable, "-m", "etkd.benchmarks.bench_isa", "--child", "1", "--seq", str(a.seq)]
    argv_child += ["--repeats", str(a.repeats), "--threads", str(a.threads), "--patterns", *a.patterns]
    argv_child += ["--dtypes", *a.dtypes, "--modes", *a.modes]
    loads, bf16, rates = [], {}, {}
    for _ in range(a.rounds):
        for name, env in configs.items():
            loads.append(os.getloadavg()[0])
            out = subprocess.run(argv_child, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            bf16[name] = (
                f"{got['isa']}, bf16 tiles fwd {got['bf16']['forward']} / bwd {got['bf16']['backward']}; "
                f"heap {got['heap']}"
            )
            for kind, val in got["rates"].items():  # the best round: the least disturbed by other load
                rates.setdefault(name, {})[kind] = max(val, rates.get(name, {}).get(kind, 0.0))
            for key, val in got["times"].items():
                rows[name].setdefault(key, []).append(val)
            for key, ph in got["phases"].items():
                for k, v in ph.items():
                    phases[name].setdefault(key, {}).setdefault(k, []).append(v)
    cpu = _cpu_model()
    print(f"# {cpu}; torch {torch.__version__}; {a.threads} threads")
    print(f"# 1-min load during the run: min {min(loads):.2f}, max {max(loads):.2f}; now {os.getloadavg()}")
    for name, what in bf16.items():
        print(f"# {name}: {what}")
    for name, r in rates.items():
        dp = (
            f", vdpbf16ps {r['vdpbf16ps']:.1f} (per multiply-add {r['vdpbf16ps'] / r['fp32']:.2f}x fp32)"
            if r["vdpbf16ps"] and r["fp32"]
            else ""
        )
        print(f"# {name}: own tile products, 1 thread, forward shapes: fp32 {r['fp32']:.1f} GMAC/s{dp}")
    print(f"# seconds per call: median [p20-p80] over {a.rounds} rounds of time_call (median of {a.repeats})")
    keys = list(next(iter(rows.values())))
    tm = {c: {k: Timing.of(v) for k, v in r.items()} for c, r in rows.items()}
    med = {c: {k: t.median for k, t in r.items()} for c, r in tm.items()}
    print("| case | " + " | ".join(configs) + " |")
    print("|---|" + "---|" * len(configs))
    for k in keys:
        cells = (f"{tm[c][k].median:.4f} [{tm[c][k].p20:.3f}-{tm[c][k].p80:.3f}]" for c in configs)
        print(f"| {k} | " + " | ".join(cells) + " |")
    print()
    for c in configs:
        for p in a.patterns:
            for mode in a.modes:
                f32 = med[c].get(f"{p}/fp32/{mode}")
                for dn in a.dtypes:
                    if dn != "fp32" and f32:
                        print(
                            f"{c}: {p} {mode} {dn} speed-up over fp32: {f32 / med[c][f'{p}/{dn}/{mode}']:.2f}x"
                        )
    if "avx2" in med:
        for c in configs:
            if c != "avx2":
                for k in keys:
                    print(f"{c} vs avx2: {k}: {med['avx2'][k] / med[c][k]:.2f}x")
    if any(phases.values()):
        names = list(next(iter(next(p for p in phases.values() if p).values())))
        print()
        print("# kernel phases, ms per call summed over threads (median over rounds); wall = ms per call")
        print("| config | case | wall | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for c, per in phases.items():
            for key, ph in per.items():
                cells = " | ".join(f"{1e3 * statistics.median(ph[n]):.0f}" for n in names)
                print(f"| {c} | {key} | {1e3 * med[c][key]:.0f} | {cells} |")
    return 0


def _configs(a: argparse.Namespace) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({configuration: its environment variables}, {configuration: why it is skipped}) for the command line `a`:
    the targets this CPU cannot run (or that are not built) are skipped with the reason, not errors."""
    from etkd_kernels import cpu

    why = cpu.unavailable_reason()
    if why is not None:
        raise SystemExit(f"bench_isa: the cpu kernels are not available: {why}")
    from etkd_kernels import _C

    built, runs = list(_C.built_isas()), list(_C.supported_isas())
    flags = " ".join(_simd_flags()) or "unknown"

    def cannot(isa: str) -> str | None:
        if isa not in built:
            return f"target {isa} is not built here (built: {', '.join(built)})"
        if isa not in runs:
            return f"this CPU cannot run target {isa} (it runs: {', '.join(runs)}; its flags: {flags})"
        return None

    configs, skipped = {}, {}
    for isa in a.isas or runs:
        if (why := cannot(isa)) is not None:
            skipped[isa] = why
            continue
        configs[isa] = {"ETKD_CPU_ISA": isa}
        if a.blas:
            configs[f"{isa}+blas"] = {"ETKD_CPU_ISA": isa, "ETKD_CPU_GEMM": "blas"}
    if a.mkl_avx2 and (why := cannot("avx2")) is not None:
        skipped["avx2+mkl_avx2"] = why
    elif a.mkl_avx2:
        configs["avx2+mkl_avx2"] = {
            "ETKD_CPU_ISA": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
        }
        if a.blas:
            configs["avx2+blas+mkl_avx2"] = dict(configs["avx2+mkl_avx2"], ETKD_CPU_GEMM="blas")
    if a.no_amx:
        if (why := cannot("avx512_bf16")) is not None:
            skipped["avx512_bf16+noamx"] = f"{why}: no bf16 tile products to take off AMX"
        else:
            configs["avx512_bf16+noamx"] = dict(_NO_AMX, ETKD_CPU_ISA="avx512_bf16")
            if a.blas:
                configs["avx512_bf16+blas+noamx"] = dict(configs["avx512_bf16+noamx"], ETKD_CPU_GEMM="blas")
    if a.profile:
        configs = {c: dict(env, ETKD_CPU_PROFILE="1") for c, env in configs.items()}
    return configs, skipped


def _blas_path() -> str:
    """Which BLAS torch's fp32 GEMMs run here and the code path MKL says it takes on this CPU (one sgemm in a
    child with MKL_VERBOSE=1: the ISA MKL dispatched to), e.g. "MKL 2024.2: ... AVX2 enabled processors"."""
    if not torch.backends.mkl.is_available():
        return "BLAS: torch has no MKL"
    code = "import torch; a = torch.ones(64, 64); torch.mm(a, a)"
    env = dict(os.environ, MKL_VERBOSE="1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "MKL (its code path not read: timeout)"
    line = next(
        (ln for ln in out.stdout.splitlines() if ln.startswith("MKL_VERBOSE") and "SGEMM" not in ln), ""
    )
    said = line.removeprefix("MKL_VERBOSE").strip()
    return f"MKL: {said}" if said else "MKL (MKL_VERBOSE printed no version line)"


# What an AVX512-BF16 CPU without AMX runs: our kernels off AMX, MKL and oneDNN (torch's own GEMMs) limited too.
_NO_AMX = {
    "ETKD_CPU_AMX": "0",
    "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3",
    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
}


def _simd_flags() -> list[str]:
    """The CPU's SIMD/matrix flags from /proc/cpuinfo (avx*, fma, f16c, amx*)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in flags if x.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
