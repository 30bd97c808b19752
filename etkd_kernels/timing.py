"""The one timer and the one peak-memory meter of the project, and the environment every figure carries.

`etkd.benchmarks` (the harness behind `etkd bench`, the core comparison and `make bench`) and the GPU
acceptance run (`etkd_kernels.gpu_check`) both measure with these. They live in the kernel package rather
than in `etkd.benchmarks` because the layers only import downwards: the kernel package cannot import the
benchmarks, while everything above can import this.
"""

from __future__ import annotations

import gc
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles of the timed repeats; `cpu_median`, where measured
    (`time_call` on the host), the median process CPU seconds of the same calls, every thread's (steadier than wall
    time on a shared, loaded machine)."""

    median: float
    p20: float
    p80: float
    repeats: int
    cpu_median: float | None = None

    @classmethod
    def of(cls, times: list[float], cpu: list[float] | None = None) -> Timing:
        if not times:
            raise ValueError("times: expected at least one measurement, got none")
        cpu_median = statistics.median(cpu) if cpu else None
        if len(times) == 1:
            return cls(times[0], times[0], times[0], 1, cpu_median)
        q = statistics.quantiles(times, n=5, method="inclusive")  # the 20/40/60/80% cut points
        return cls(statistics.median(times), q[0], q[3], len(times), cpu_median)


def time_call(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str | None = None
) -> Timing:
    """Time `fn()` after `warmup` untimed calls. On a CUDA device each call is bracketed by CUDA events
    (kernels run asynchronously, so a host clock would time the launch); elsewhere by `perf_counter`, and by
    `process_time` for `Timing.cpu_median`."""
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return Timing.of(times, cpu)


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a stretch of code in MiB above the level at its start: `with PeakMemory(dev) as m: ...`,
    then `m.peak_mib`. Meaningful in a process of its own (see `etkd.benchmarks.harness.run_fresh`).

    CUDA: `torch.cuda.max_memory_allocated` growth. CPU on Linux: writing 5 to /proc/self/clear_refs resets
    the high-water mark (VmHWM) to the current RSS, so the peak is VmHWM - VmRSS(start), whatever allocator
    the code used; freed heap pages are handed back to the OS first so the start level holds only live
    memory. Elsewhere: ru_maxrss growth (a lower bound when an earlier peak was higher; `exact` is False).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.exact = True
        self.peak_mib = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_mib("VmHWM") is not None
        except OSError:
            self.exact = False
        self.start = (
            _status_mib("VmRSS") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            end = torch.cuda.max_memory_allocated() / 2**20
        elif self.exact:
            end = _status_mib("VmHWM")
        else:
            end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mib = max(0.0, end - self.start)


# glibc malloc's settings a process can be started with (GLIBC_TUNABLES glibc.malloc.*, or their older MALLOC_*_
# spellings), and the allocators a process can be started on instead (LD_PRELOAD): what `heap()` reports.
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                "MALLOC_ARENA_MAX")  # fmt: skip
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
HEAP_VAR = "ETKD_BENCH_HEAP"  # the name of the heap `etkd.benchmarks.harness` started this process under


def heap() -> str:
    """The allocator and heap settings this process runs under, e.g. "glibc malloc, defaults", "warm: glibc malloc,
    glibc.malloc.mmap_threshold=4294967296:..." or "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)".

    Why it matters: with glibc's defaults a block above its dynamic mmap threshold (at most 32 MiB) is mmapped,
    unmapped when freed and page-faulted in afresh the next time, so code allocating large temporaries per call
    (HF's attention modules) pays page faults in a fresh process that a long-running one with a caching
    allocator does not (README, "Benchmarks": the heap)."""
    import os

    name = os.environ.get(HEAP_VAR, "")
    loaded = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.count("/") else ""
                base = path.rsplit("/", 1)[-1]
                if any(base.startswith(f"lib{a}") for a in ALLOCATORS):
                    loaded = f"{base.split('.so')[0].removeprefix('lib').split('_')[0]} ({path})"
                    break
    except OSError:
        pass
    if loaded is None:
        tunables = [
            t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")
        ]
        tunables += [f"{v}={os.environ[v]}" for v in MALLOC_VARS if os.environ.get(v)]
        loaded = "glibc malloc, " + (":".join(tunables) if tunables else "defaults")
    return f"{name}: {loaded}" if name else loaded


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16")


@dataclass(frozen=True)
class Environment:
    """What a figure was measured on; recorded with every benchmark row."""

    cpu: str
    isa: str  # the relevant CPU flags, and torch's own vector ISA in brackets
    threads: int
    torch: str
    device: str  # "cpu" or the GPU's name
    date: str
    heap: str = ""  # the allocator and its settings (`heap()`): HF's side moves with it

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.cpu} [{self.isa}], {self.threads} threads, torch {self.torch}, {self.device}, heap {self.heap}"


def environment(device: torch.device | str = "cpu") -> Environment:
    cpu, fields = None, {}
    try:
        with open("/proc/cpuinfo") as f:  # the first processor's entry, which ends with its flags
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # generic model names ("Intel Xeon Processor") say little on cloud VMs
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    isa = " ".join(f for f in _ISA_FLAGS if f in flags) or "unknown"
    isa += f" (torch {torch.backends.cpu.get_cpu_capability()}"
    try:  # the target our cpu kernels run, when the extension is built
        from etkd_kernels.cpu import isa as etkd_isa

        isa += f", etkd cpu {etkd_isa()}"
    except (ImportError, RuntimeError):
        pass
    isa += ")"
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return Environment(
        cpu, isa, torch.get_num_threads(), torch.__version__, name, time.strftime("%Y-%m-%d %H:%M"), heap()
    )


def model_step(
    model: torch.nn.Module, kwargs: dict, mode: str, fused_adamw: bool = False
) -> Callable[[], None]:
    """The whole-model call a benchmark row times: `"train"` is forward + a scalar loss on the last hidden
    state + backward + an AdamW step (the model is put in train mode, the optimiser made here), anything else
    an inference forward under no_grad (eval mode). Shared by `etkd bench` and the peer baselines' side
    environment (which loads this file by path), so both sides of a comparison time the same work.
    `fused_adamw`: torch's fused AdamW kernel (the same update to rounding; transformers' Trainer default with
    torch >= 2.8) instead of the per-parameter loop."""
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw or None)

        def call() -> None:
            out = model(**kwargs).last_hidden_state
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return call
    model.eval()

    def infer() -> None:
        with torch.no_grad():
            model(**kwargs)

    return infer
