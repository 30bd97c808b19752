"""Nystrom attention, ours (`cpu`) vs HF's `NystromformerSelfAttention` core, under the switches that make this CPU
take other CPUs' code paths (issue 28): `python -m etkd.benchmarks.nystrom_switches`.

Each switch set runs in a fresh process (the variables are read once per process): ours and HF's core alternate
call by call for `--repeats` rounds, forward and forward + backward (12 heads x 64, seq 4096, 64 landmarks,
`pinv_init="hf_global"`, the core comparison's `providers.build("nystrom", ...)`); the table gives each median
and HF / ours of the medians and of every round.

    default       the CPU's own paths (its widest etkd target, AMX where present, MKL's own choice)
    zen4          ETKD_CPU_AMX=0, MKL_ENABLE_INSTRUCTIONS=AVX2: AVX-512 and AVX512-BF16 without AMX, and MKL on
                  its AVX2 code path as on an AMD CPU (AMD Zen 4 runs 512-bit ops as two 256-bit halves, so
                  its FLOP rate is AVX2's: the avx2-epyc set bounds it from that side); needs a CPU with
                  AVX512-BF16 (elsewhere it would run another target under its name: skipped, saying so)
    avx2-epyc     ETKD_CPU_ISA=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2: an AVX2-only EPYC; on a CPU whose widest target
                  is avx2 (a real AVX2-only EPYC) it is the default set, run only when named in --switches

`--heap default|warm|both|...` (benchmarks/harness.py: HEAPS) runs the whole comparison once per heap, each in a child
whose switch sets' workers inherit that heap (warm: tcmalloc preloaded, so neither side pays page faults on a fresh
large tensor per call); without it the workers run on this process's heap.

`--profile` then runs ours `--repeats` more times per mode with the per-phase timers on (ETKD_CPU_PROFILE's, read by
`_C.nystrom_profile()`: each phase's thread CPU time summed over threads, so phases measured under load stay
comparable) and prints, per phase, ms per call and the multiply-adds per second of its products, the calling thread's
CPU time outside the parallel loops (`serial`), and each parallel loop's CPU time on thread 0 and on the others (their
difference: one thread working while the other has no task left).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SWITCHES = {
    "default": {},
    "zen4": {"ETKD_CPU_AMX": "0", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2-epyc": {"ETKD_CPU_ISA": "avx2", "ETKD_CPU_AMX": "0", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
SIDES = ("hf-core", "etkd-cpu")
# The etkd target a set emulates another CPU with: this CPU must run it (`_C.supported_isas()`), else the set would
# time this CPU's own path under another CPU's name.
NEEDS = {"zen4": "avx512_bf16", "avx2-epyc": "avx2"}


def plan(named: list[str] | None, supported: list[str]) -> list[tuple[str, str | None]]:
    """(set, reason it is skipped or None) for the sets to report, in order: `named` (--switches) or every set. A set
    whose target this CPU lacks is skipped; unnamed, avx2-epyc is skipped too where avx2 is the widest target (it is
    then the default set: the same target, and MKL_ENABLE_INSTRUCTIONS=AVX2 changes nothing on an AVX2-only CPU)."""
    rows = []
    for name in named or list(SWITCHES):
        need = NEEDS.get(name)
        if need and need not in supported:
            rows.append((name, f"this CPU cannot run the {need} target it emulates with (supported: "
                               f"{', '.join(supported) or 'none'})"))  # fmt: skip
        elif named is None and name == "avx2-epyc" and supported[-1:] == ["avx2"]:
            rows.append((name, "the same paths as default on this CPU (avx2 is its widest target); name it in "
                               "--switches to run it anyway"))  # fmt: skip
        else:
            rows.append((name, None))
    return rows


# Multiply-adds of each phase's products per (batch, head), L landmarks, D head_dim, S seq (csrc/cpu/nystrom.cpp; the
# Newton-Schulz pseudo-inverse: 4 L^3 products per iteration forward, 13 in its backward; 6 iterations).
def phase_macs(S: int, L: int, D: int, iters: int = 6) -> dict[str, float]:
    mm, sq, ld = S * L * D, L**3, L * L * D
    return {
        "fwd.k1_scores": mm, "fwd.k1_out": mm, "fwd.k3v": 2 * mm, "fwd.k2": ld, "fwd.pinv": 4 * iters * sq + ld,
        "bwd.k1_scores": mm, "bwd.dx": mm, "bwd.dk1": mm, "bwd.dq": mm, "bwd.dkl": mm, "bwd.k3_side": 5 * mm,
        "bwd.ns_fwd": 4 * iters * sq, "bwd.ns_bwd": 13 * iters * sq + 4 * ld, "bwd.x": ld, "bwd.dt_dz": 2 * ld,
    }  # fmt: skip


def worker(seq: int, repeats: int, modes: list[str], profile: bool = False) -> dict:
    """This process's switch set: per mode, the seconds of every call of each side (and with `profile`, ours' phase
    seconds per call)."""
    import torch

    from etkd_kernels import _C
    from etkd_kernels.timing import heap

    from . import providers as P

    setup = P.build("nystrom", seq, backends=["cpu"])
    out = {"isa": _C.isa(), "threads": torch.get_num_threads(), "heap": heap(), "load": [os.getloadavg()[0]]}
    for mode in modes:
        calls = {side: setup.call(side, mode) for side in SIDES}
        for call in calls.values():
            call()  # warm-up
        times = {side: [] for side in SIDES}
        for _ in range(repeats):
            for side, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[side].append(time.perf_counter() - t0)
        out[mode] = times
        if profile:
            _C.set_cpu_profile(True)
            _C.nystrom_profile()
            for _ in range(repeats):
                calls["etkd-cpu"]()
            out[f"{mode}.phases"] = {k: v / repeats for k, v in _C.nystrom_profile().items() if v > 0}
            _C.set_cpu_profile(False)
    out["load"].append(os.getloadavg()[0])
    return out


def print_phases(phases: dict[str, float], threads: int, seq: int, heads: int = 12) -> None:
    """Ours' phases per call: CPU ms (summed over threads), share, and GMAC/s of the phase's products."""
    macs = phase_macs(seq, 64, 64)
    for part in ("fwd", "bwd"):
        names = {
            k: v
            for k, v in phases.items()
            if k.startswith(part + ".") and k != f"{part}.total" and ".loop" not in k
        }
        if not names:
            continue
        # Each parallel loop's CPU time on thread 0 and on the others: their difference is time one thread worked
        # while the other had no task left (csrc/cpu/nystrom.cpp: parallel_tasks).
        loops = sorted({k.rsplit(".", 1)[0] for k in phases if k.startswith(part + ".loop")})
        split = [f"{k.split('.')[1]} {1e3 * phases.get(k + '.t0', 0):.2f} / {1e3 * phases.get(k + '.t1+', 0):.2f}"
                 for k in loops]  # fmt: skip
        cpu = sum(names.values())
        wall = phases.get(f"{part}.total", 0.0)
        print(f"    {part}: wall {1e3 * wall:.2f} ms x {threads} threads, phases {1e3 * cpu:.2f} CPU ms, outside the "
              f"tasks (serial work, waits) {1e3 * (wall * threads - cpu):.2f} ms")  # fmt: skip
        for name, sec in sorted(names.items(), key=lambda kv: -kv[1]):
            rate = f"{heads * macs[name] / sec / 1e9:6.1f} GMAC/s" if name in macs else ""
            print(f"      {name:16s} {1e3 * sec:7.2f} ms {100 * sec / cpu:5.1f}%  {rate}")
        if split:
            print(f"      parallel loops, CPU ms on thread 0 / the others: {'; '.join(split)}")


def main(argv: list[str] | None = None) -> int:
    from .harness import parser, rerun_per_heap

    ap = parser(__doc__.splitlines()[0], heap=True, seq=4096, repeats=5, threads=2)
    ap.add_argument(
        "--switches",
        nargs="+",
        choices=list(SWITCHES),
        help="sets to run (default: every set this CPU can take)",
    )
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwd_bwd"), default=["fwd", "fwd_bwd"])
    ap.add_argument(
        "--profile", action="store_true", help="ours' per-phase CPU time and GMAC/s (ETKD_CPU_PROFILE)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.seq, args.repeats, args.modes, args.profile)))
        return 0
    # --heap: one child per heap, whose switch sets' workers inherit its environment (so run on that heap)
    if (code := rerun_per_heap(args, "etkd.benchmarks.nystrom_switches", argv)) is not None:
        return code
    from etkd_kernels import _C
    from etkd_kernels.timing import environment

    # the workers run at --threads (OMP_NUM_THREADS below); this process's own count would mislabel the run
    print({**environment("cpu").as_dict(), "threads": args.threads})
    print(f"Nystrom 64 landmarks, 1 x 12 heads x {args.seq} x 64, fp32, {args.threads} threads, median of "
          f"{args.repeats}, sides alternating")  # fmt: skip
    for name, skipped in plan(args.switches, _C.supported_isas()):
        if skipped:
            print(f"\n{name}: skipped: {skipped}")
            continue
        env = {**os.environ, **SWITCHES[name], "OMP_NUM_THREADS": str(args.threads)}
        for var in ("ETKD_CPU_ISA", "ETKD_CPU_AMX", "MKL_ENABLE_INSTRUCTIONS"):
            if var not in SWITCHES[name]:
                env.pop(var, None)
        cmd = [sys.executable, "-m", "etkd.benchmarks.nystrom_switches", "--worker", "--seq", str(args.seq),
               "--repeats", str(args.repeats), "--modes", *args.modes, *(["--profile"] if args.profile else [])]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{name}: failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        set_text = " ".join(f"{k}={v}" for k, v in SWITCHES[name].items()) or "(none)"
        print(f"\n{name}: {set_text}; etkd target {r['isa']}, {r['threads']} threads, heap {r['heap']}, load "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f}")  # fmt: skip
        for mode in args.modes:
            hf, ours = r[mode]["hf-core"], r[mode]["etkd-cpu"]
            rounds = ", ".join(f"{h / o:.2f}" for h, o in zip(hf, ours))
            print(f"  {mode:8s} HF core {1e3 * statistics.median(hf):8.1f} ms   ours {1e3 * statistics.median(ours):7.1f} ms"
                  f"   HF / ours {statistics.median(hf) / statistics.median(ours):5.2f}x   rounds {rounds}")  # fmt: skip
            if f"{mode}.phases" in r:
                print_phases(r[f"{mode}.phases"], r["threads"], args.seq)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
