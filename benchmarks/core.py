"""Attention-core comparison, side by side in one run: `python -m etkd.benchmarks.core --seq 4096`.

Every provider of every pattern (`providers.build`: HF's module and its core, etkd per backend, SDPA,
FlexAttention, flash-attn on a GPU) timed by the harness (median and 20/80% quantiles), forward and
forward+backward, with ratios of HF's core, FlexAttention and SDPA over each etkd backend, achieved GFLOP/s,
and with --memory the peak extra memory of one call, each in a fresh process. Every row carries the
environment (CPU, ISA, threads, torch).
"""

from __future__ import annotations

import json
import os
import resource

import torch

from etkd.models.patterns import PATTERNS

from . import harness
from . import providers as P
from .harness import HEAP_VAR, environment, run_fresh, time_call

BASELINES = ("hf-core", "flex", "sdpa", "flash-attn")


def matmul_gflops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's GEMM rate in this run: the roofline next to each kernel's achieved rate."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / time_call(lambda: a @ b, repeats).median / 1e9


def measure(
    setup: P.Setup, modes: list[str], repeats: int, memory: bool = False, providers: list[str] | None = None
) -> list[dict]:
    """One row per mode: `<provider>_ms` (median), `_p20_ms`, `_p80_ms`, `_minflt` (page faults per timed call),
    with memory `<provider>_peak_mib`,
    per etkd provider its useful GFLOP/s and `<baseline>_over_<etkd provider>` time (and memory) ratios."""
    env = environment(setup.device).as_dict()
    rows = []
    for mode in modes:
        row = {"pattern": setup.pattern, "seq": setup.seq, "heads": setup.heads, "head_dim": setup.head_dim,
               "batch": setup.batch, "dtype": P.DTYPE_NAMES[setup.dtype], "mode": mode}  # fmt: skip
        for name in providers or setup.providers:
            if name not in setup.providers or (mode == "fwd_bwd" and name in setup.forward_only):
                continue
            call = setup.call(name, mode)
            call()  # the warm-up, outside the page-fault count
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time_call(call, repeats, warmup=0, device=setup.device)
            row[f"{name}_ms"], row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = (1e3 * t.median, 1e3 * t.p20, 1e3 * t.p80)  # fmt: skip
            # page faults per timed call: a heap that hands large blocks back to the OS shows here (--heap)
            row[f"{name}_minflt"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
            if memory:
                spec = {**setup.build_args, "provider": name, "mode": mode}
                # a peak means something on glibc's default heap only (a warm one serves the call from kept pages)
                heap = "default" if os.environ.get(HEAP_VAR) else None
                row[f"{name}_peak_mib"] = run_fresh(
                    "etkd.benchmarks.providers:peak_memory", spec, heap=heap
                ).get("peak_mib")
        for name in [n for n in setup.providers if n.startswith("etkd-") and f"{n}_ms" in row]:
            row[f"{name}_useful_gflops"] = setup.flops_of(mode) / (row[f"{name}_ms"] / 1e3) / 1e9
            for base in BASELINES:
                if f"{base}_ms" in row:
                    row[f"{base}_over_{name}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
                if row.get(f"{base}_peak_mib") and row.get(f"{name}_peak_mib") is not None:
                    row[f"{name}_peak_over_{base}"] = row[f"{name}_peak_mib"] / row[f"{base}_peak_mib"]
        row["environment"] = env
        rows.append(row)
    return rows


def pattern_label(pattern: str) -> str:
    """The registry's benchmark label of `pattern`, with the sizes `providers` runs it at."""
    return PATTERNS[pattern].label.format(**P.SIZES)


def from_pytest_benchmark(path: str) -> list[dict]:
    """`make bench`'s pytest-benchmark JSON as rows of `measure`'s shape (medians in ms, GFLOP/s, ratios)."""
    with open(path) as f:
        data = json.load(f)
    rows: dict[tuple, dict] = {}
    for b in data["benchmarks"]:
        prm, info = b["params"], b["extra_info"]
        row = rows.setdefault((prm["pattern"], prm["seq"], prm["mode"]), {
            "pattern": prm["pattern"], "seq": prm["seq"], "mode": prm["mode"],
            "environment": info.get("environment")})  # fmt: skip
        name = prm["provider"]
        row[f"{name}_ms"] = 1e3 * b["stats"]["median"]
        if info.get("peak_extra_mib") is not None:
            row[f"{name}_peak_mib"] = info["peak_extra_mib"]
        if name.startswith("etkd-"):
            row[f"{name}_useful_gflops"] = info["useful_gflops_per_s"]
    for row in rows.values():
        for name in [k.removesuffix("_ms") for k in list(row) if k.startswith("etkd-") and k.endswith("_ms")]:
            for base in BASELINES:
                if f"{base}_ms" in row:
                    row[f"{base}_over_{name}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
    return list(rows.values())


def markdown(rows: list[dict], ours: str = "etkd-cpu") -> str:
    """README's table: per pattern and mode, HF's core vs `ours`, with FlexAttention, dense SDPA, our
    reference backend and (when measured) peak memory."""

    def ms(row, name):
        return f"{row[name + '_ms']:.0f}" if f"{name}_ms" in row else "—"

    head = ("| pattern | seq | mode | HF core ms | etkd `cpu` ms | HF / etkd | GFLOP/s | Flex ms | dense SDPA ms | "
            "etkd `reference` ms | peak MiB etkd / HF core |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = f"**{r[f'hf-core_over_{ours}']:.2f}×**" if f"hf-core_over_{ours}" in r else "—"
        gflops = f"{r[f'{ours}_useful_gflops']:.1f}" if f"{ours}_useful_gflops" in r else "—"
        mem = "—"
        if r.get(f"{ours}_peak_mib") is not None and r.get("hf-core_peak_mib"):
            mem = f"{r[f'{ours}_peak_mib']:.0f} / {r['hf-core_peak_mib']:.0f}"
        mode = "fwd+bwd" if r["mode"] == "fwd_bwd" else "fwd"
        lines.append(f"| {pattern_label(r['pattern'])} | {r['seq']} | {mode} | {ms(r, 'hf-core')} | {ms(r, ours)} | "
                     f"{ratio} | {gflops} | {ms(r, 'flex')} | {ms(r, 'sdpa')} | {ms(r, 'etkd-reference')} | {mem} |")  # fmt: skip
    return "\n".join(lines)


def markdown_heaps(by_heap: dict[str, list[dict] | dict], ours: str = "etkd-cpu") -> str:
    """`--heap`'s table: per pattern and mode, HF's core and `ours` side by side on each heap (each heap's rows
    from its own fresh process)."""
    heaps = list(by_heap)
    head = (
        "| pattern | seq | mode | "
        + " | ".join(f"{h}: HF core / etkd ms | {h}: page faults per call | {h}: HF / etkd" for h in heaps)
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keyed = {h: {(r["pattern"], r["seq"], r["mode"]): r for r in rows} if isinstance(rows, list) else {}
             for h, rows in by_heap.items()}  # fmt: skip
    cases = list(dict.fromkeys(key for rows in keyed.values() for key in rows))
    for pattern, seq, mode in cases:
        cells = []
        for h in heaps:
            r = keyed[h].get((pattern, seq, mode))
            if r is None:
                why = by_heap[h].get("status", "—") if isinstance(by_heap[h], dict) else "—"
                cells += [why, "—", "—"]
                continue
            ms = " / ".join(f"{r[f'{n}_ms']:.0f}" if f"{n}_ms" in r else "—" for n in ("hf-core", ours))
            flt = " / ".join(
                f"{r[f'{n}_minflt']:.0f}" if f"{n}_minflt" in r else "—" for n in ("hf-core", ours)
            )
            ratio = f"**{r[f'hf-core_over_{ours}']:.2f}×**" if f"hf-core_over_{ours}" in r else "—"
            cells += [ms, flt, ratio]
        shown = "fwd+bwd" if mode == "fwd_bwd" else "fwd"
        lines.append(f"| {pattern_label(pattern)} | {seq} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.splitlines()[0], heap=True, seq=4096, batch=1, repeats=3)
    p.add_argument("--patterns", default=",".join(P.PATTERNS))
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backends", default="cpu,reference", help="etkd backends (comma list)")
    p.add_argument("--providers", default=None, help="comma list (default: every provider that runs)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(P.DTYPES), default="fp32")
    p.add_argument(
        "--memory", action="store_true", help="peak extra memory per call, each in a fresh process"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", action="store_true", help="also print the README table")
    p.add_argument("--from-pytest-benchmark", metavar="JSON", default=None,
                   help="print the README table of a `make bench` result instead of measuring")  # fmt: skip
    a = p.parse_args(argv)
    by_heap = harness.per_heap(a, "etkd.benchmarks.core", argv, json_flag="--json")
    if by_heap is not None:  # each heap's rows measured in a fresh process of its own
        if a.json:
            with open(a.json, "w") as f:
                json.dump(by_heap, f, indent=2)
        print(markdown_heaps(by_heap))
        return 0
    if a.from_pytest_benchmark:
        rows = from_pytest_benchmark(a.from_pytest_benchmark)
        env = next((r["environment"] for r in rows if r.get("environment")), None)
        print(markdown(rows))
        if env:
            print(
                f"\n{env['cpu']} [{env['isa']}], {env['threads']} threads, torch {env['torch']}, {env['date']}"
            )
        return 0
    patterns = [s for s in a.patterns.split(",") if s]
    bad = [s for s in patterns if s not in P.PATTERNS]
    if bad:
        p.error(f"--patterns: unknown {bad}; expected some of {list(P.PATTERNS)}")
    env = environment(a.device)
    print(f"{env.line()}; {a.dtype} matmul {matmul_gflops(dtype=P.DTYPES[a.dtype]):.1f} GFLOP/s", flush=True)
    rows = []
    for pattern in patterns:
        setup = P.build(
            pattern, a.seq, a.heads, a.head_dim, a.batch, a.backends.split(","), a.device, a.dtype
        )
        for name, why in setup.skipped.items():
            print(f"# {pattern}: {name} skipped: {why}", flush=True)
        chosen = a.providers.split(",") if a.providers else None
        for row in measure(setup, a.modes.split(","), a.repeats, a.memory, chosen):
            rows.append(row)
            shown = {
                k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if k != "environment"
            }
            print(json.dumps(shown), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    if a.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
