"""The benchmark harness: one timer, one peak-memory meter, one fresh-process runner, one environment record.

Everything that measures (`etkd bench`, `python -m etkd.benchmarks.core`, `make bench`, the demo's kernel
table) goes through these; the timer, meter and environment are `etkd_kernels.timing` (re-exported here),
so the GPU acceptance run in the kernel package uses the same ones.

`run_fresh("package.module:function", spec)` calls `function(spec)` in a new interpreter and returns its
dict: peak memory is only honest in a process that has run nothing else (allocator pools, compiled graphs
and freed-but-kept heap of earlier rows would hide or inflate it).

The heap a fresh process runs on (`HEAPS`, `heap_env`; `run_fresh(..., heap=)`, the scripts' `--heap`): with glibc's
defaults (`default`) a block above malloc's dynamic mmap threshold (at most 32 MiB) is mmapped, returned to the OS
when freed and page-faulted in afresh on the next call, so code that allocates large temporaries per call (HF's
attention modules: their score tensors) pays page faults that a long-running process on a caching allocator does
not. `warm` is that process: tcmalloc (Debian/Ubuntu: `apt install libtcmalloc-minimal4`) preloaded with its
defaults, which keeps freed blocks for the next call. `jemalloc` (`apt install libjemalloc2`) with its defaults is
not warm for them: a block above its `oversize_threshold` (8 MiB) comes from an arena that hands pages back at once.
`glibc-keep` is glibc told to keep everything (GLIBC_TUNABLES mmap threshold 4 GiB, trim threshold 16 GiB, as the
README's 2026-12-06 22:53 re-measure used): no block is mmapped, but torch's 64-byte-aligned blocks fragment the heap
(a freed block is a little too small for the next aligned request of its size), so the heap grows and faults in new
pages on many calls. A heap whose allocator is not installed is skipped with how to get it. Every row's
`environment()` says which heap it ran on (`etkd_kernels.timing.heap`).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile

from etkd_kernels.timing import (
    ALLOCATORS,
    HEAP_VAR,
    MALLOC_VARS,
    Environment,
    PeakMemory,
    Timing,
    environment,
    heap,
    time_call,
)

__all__ = [
    "HEAPS",
    "Environment",
    "HeapUnavailable",
    "PeakMemory",
    "add_heap_arg",
    "Timing",
    "environment",
    "fault_probe",
    "heap",
    "heap_env",
    "heap_table",
    "heaps_of",
    "parser",
    "per_heap",
    "rerun_per_heap",
    "run_fresh",
    "run_json",
    "time_call",
]

# What each heap is (for --help and the tables' headings).
HEAPS = {
    "default": "glibc malloc, its defaults: a block above the dynamic mmap threshold (<= 32 MiB) is mapped and "
    "faulted in afresh per allocation",
    "warm": "tcmalloc (minimal) preloaded, its defaults: freed blocks kept for the next call",
    "jemalloc": "jemalloc preloaded, its defaults: blocks above 8 MiB (oversize_threshold) handed back at once",
    "glibc-keep": "glibc malloc with GLIBC_TUNABLES glibc.malloc.mmap_threshold=4 GiB:trim_threshold=16 GiB",
}
KEEP_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296", "glibc.malloc.trim_threshold=17179869184")
# The preloaded allocators: the file to look for, and how to get it.
PRELOADS = {
    "warm": ("libtcmalloc_minimal.so.4", "apt install libtcmalloc-minimal4 (Debian/Ubuntu)"),
    "jemalloc": ("libjemalloc.so.2", "apt install libjemalloc2 (Debian/Ubuntu)"),
}
_ALLOCATOR_LIBS = tuple(f"lib{a}" for a in ALLOCATORS)  # a preload of one of these is replaced
_LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# glibc malloc's settings (timing.MALLOC_VARS) and jemalloc's MALLOC_CONF: removed from a child started on a named heap
_HEAP_VARS = (*MALLOC_VARS, "MALLOC_CONF")


class HeapUnavailable(RuntimeError):
    """A heap whose allocator is not installed here; the message says how to get it."""


def heaps_of(value: str | None) -> list[str]:
    """`--heap`'s value as heap names: `both` is default and warm; a comma list names them (HEAPS)."""
    if not value:
        return []
    names = ["default", "warm"] if value == "both" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in HEAPS]
    if bad or not names:
        raise ValueError(f"--heap: unknown {bad or value!r}; expected both or a comma list of {list(HEAPS)}")
    return names


def _preload_path(name: str) -> str:
    lib, how = PRELOADS[name]
    for d in _LIB_DIRS:
        for path in sorted(glob.glob(os.path.join(d, lib))):
            return path
    raise HeapUnavailable(f"heap {name}: {lib} not found in {', '.join(_LIB_DIRS)}; {how}")


def heap_env(name: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) for a child on heap `name`: glibc malloc settings and
    preloaded allocators of `base` removed, then the heap's own set, and `ETKD_BENCH_HEAP` naming it.
    HeapUnavailable (with how to install it) when the heap's allocator is not here."""
    if name not in HEAPS:
        raise ValueError(f"heap: unknown {name!r}; expected one of {list(HEAPS)}")
    env = dict(os.environ if base is None else base)
    for var in _HEAP_VARS:
        env.pop(var, None)
    tunables = [
        t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.")
    ]
    preload = [
        p for p in env.pop("LD_PRELOAD", "").split() if not os.path.basename(p).startswith(_ALLOCATOR_LIBS)
    ]
    if name == "glibc-keep":
        tunables += KEEP_TUNABLES
    elif name in PRELOADS:
        preload.insert(0, _preload_path(name))
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    env[HEAP_VAR] = name
    return env


# The flags every measurement script spells the same way (one name per concept): their help texts.
_SIZE_FLAGS = {
    "layers": "encoder layers",
    "seq": "sequence length",
    "batch": "batch size",
    "repeats": "timed calls (median)",
    "threads": "torch threads",
}


def parser(
    description: str, helps: dict[str, str] | None = None, heap: bool = False, **defaults: int
) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared size/measurement flags a script uses (`--layers`, `--seq`, `--batch`,
    `--repeats`, `--threads`), each added when the script gives its default here (`helps`: a script's own
    wording of a flag's help), and with `heap` the `--heap` flag of the scripts that compare with HF or a peer
    (`heaps_of` reads it; a script measuring in its own process calls `rerun_per_heap` or `per_heap`)."""
    unknown = set(defaults) - set(_SIZE_FLAGS)
    if unknown:
        raise TypeError(f"parser: no shared flag {sorted(unknown)}; expected some of {list(_SIZE_FLAGS)}")
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=description, formatter_class=fmt)
    for name, default in defaults.items():
        text = (helps or {}).get(name, _SIZE_FLAGS[name])
        ap.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    if heap:
        add_heap_arg(ap)
    return ap


def add_heap_arg(p: argparse.ArgumentParser) -> None:
    """The shared `--heap` flag (`heaps_of` reads it)."""
    p.add_argument(
        "--heap",
        default=None,
        metavar="HEAP",
        help="measure in a fresh process per heap: default, warm, both (= default,warm), jemalloc, glibc-keep, or a "
        "comma list (default: as this process was started). "
        + "; ".join(f"{k}: {v}" for k, v in HEAPS.items()),
    )


def per_heap(args: argparse.Namespace, module: str, argv: list[str] | None, json_flag: str | None = None):
    """For a script that measures in its own process: with `--heap` given (and this process not already a child
    started for a heap), run `python -m module argv` once per heap in a child on that heap, its output passed
    through under a heading, and return {heap: result}: the JSON the child wrote to `json_flag` (added to its
    argv) when given, else {"exit": code}, or {"status": "skipped: why"} for a heap not installed here. None
    means: measure here (no `--heap`, or this is the child)."""
    try:
        names = heaps_of(getattr(args, "heap", None))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not names or os.environ.get(HEAP_VAR):
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    out = {}
    for name in names:
        try:
            env = heap_env(name)
        except HeapUnavailable as exc:
            print(f"## heap {name}: skipped: {exc}", flush=True)
            out[name] = {"status": f"skipped: {exc}"}
            continue
        print(f"## heap {name}: {HEAPS[name]}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            extra = [json_flag, os.path.join(tmp, "rows.json")] if json_flag else []
            code = subprocess.run([sys.executable, "-m", module, *argv, *extra], env=env).returncode
            if code != 0:
                out[name] = {"status": f"error: exit code {code}"}
            elif json_flag:
                with open(extra[1]) as f:
                    out[name] = json.load(f)
            else:
                out[name] = {"exit": code}
    return out


def heap_table(by_heap: dict[str, dict], label: str, baseline: str, ours: str = "etkd") -> str:
    """`per_heap`'s results side by side: one line per row (the children's JSON `rows`, each with `label`, and
    seconds `<baseline>_s` and `<ours>_s`), per heap `<baseline> / <ours>` seconds and their ratio; a heap that did
    not run shows its status."""
    heaps = list(by_heap)
    head = (
        f"| {label} | "
        + " | ".join(f"{h}: {baseline} / {ours} s | {h}: {baseline} / {ours}" for h in heaps)
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keyed = {h: {str(r[label]): r for r in res.get("rows", [])} for h, res in by_heap.items()}
    for key in dict.fromkeys(k for rows in keyed.values() for k in rows):
        cells = []
        for h in heaps:
            r = keyed[h].get(key)
            if r is None:
                cells += [by_heap[h].get("status", "—"), "—"]
            else:
                b, o = r[f"{baseline}_s"], r[f"{ours}_s"]
                cells += [f"{b:.3f} / {o:.3f}", f"**{b / o:.2f}×**"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rerun_per_heap(args: argparse.Namespace, module: str, argv: list[str] | None = None) -> int | None:
    """`per_heap` for a script whose children print everything: the exit code to return (non-zero when a child
    failed), or None to measure in this process. The one line a script's main needs after parsing:
    `if (code := harness.rerun_per_heap(args, "etkd.benchmarks.<name>", argv)) is not None: return code`."""
    results = per_heap(args, module, argv)
    if results is None:
        return None
    return max((1 if r.get("status", "").startswith("error") else 0 for r in results.values()), default=0)


def run_fresh(target: str, spec: dict, timeout: float | None = None, heap: str | None = None) -> dict:
    """`target(spec)` ("package.module:function", returning a JSON-able dict) in a fresh interpreter, on `heap`
    (HEAPS: `heap_env`) or, when None, in this process's environment as it is.

    A failure comes back as {"status": "error: <last line of stderr>"}, {"status": "timeout after Ns"} or
    {"status": "skipped: <heap not installed, how to get it>"}, so a table can show the row as failed and go on."""
    try:
        env = None if heap is None else heap_env(heap)
    except HeapUnavailable as exc:
        return {"status": f"skipped: {exc}"}
    return run_json([sys.executable, "-m", "etkd.benchmarks.harness", target, json.dumps(spec)], timeout, env)


def run_json(cmd: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` (in `env`, default this process's) and return the JSON dict its last stdout line holds, or a
    failed row's {"status": ...}."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f}s"}
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return {"status": f"error: {last[:160]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fault_probe(spec: dict) -> dict:
    """Page faults (`getrusage` minflt) of allocating and filling a tensor of `spec["mib"]` MiB, freed again,
    `spec["calls"]` times in this process: what a per-call temporary of that size costs in faults on the heap the
    process runs on (`run_fresh(..., heap=)`); and `heap()`. Run it on a heap: `python -m etkd.benchmarks.harness
    etkd.benchmarks.harness:fault_probe '{"mib": 96, "calls": 4}'` under that heap's environment."""
    import resource

    import torch

    n = int(spec["mib"]) << 18  # float32 elements
    faults = []
    for _ in range(int(spec.get("calls", 4))):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(n).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"minflt": faults, "heap": heap()}


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[0]:
        raise SystemExit("usage: python -m etkd.benchmarks.harness package.module:function '<json spec>'")
    module, func = argv[0].split(":")
    result = getattr(importlib.import_module(module), func)(json.loads(argv[1]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
