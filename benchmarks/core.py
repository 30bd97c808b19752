"""Attention-core comparison, side by side in one run: `python -m etkd.benchmarks.core --seq 4096`.

HF's attention modules compute their own q/k/v projections, so "HF core" is the HF module run with each
projection layer replaced by its precomputed output (`cached_projections`): everything HF does after the
projections, forward and backward, and nothing else. etkd, FlexAttention and SDPA are timed on the same
precomputed q/k/v. Prints medians, ratios, useful GFLOP/s and the fp32 matmul rate of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch

import etkd_kernels as ek

from . import hf_reference as hr
from .cases import _flex, matmul_gflops
from .memory import PeakRSS


class _Cached(torch.nn.Module):
    """A projection layer that computes its output once and then returns a copy of it (HF modifies some in
    place; the copy of a 4096 x 768 tensor costs ~1 ms), taking gradients when the input does, so the module
    around it times only its attention core."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer, self.out = layer, None

    def forward(self, x):
        if self.out is None or self.out.requires_grad != x.requires_grad:
            with torch.no_grad():
                self.out = self.layer(x).requires_grad_(x.requires_grad)
        self.out.grad = None
        return self.out.clone()


def cached_projections(module: torch.nn.Module, names) -> torch.nn.Module:
    """A shallow copy of an HF attention module whose projection layers return precomputed outputs."""
    import copy

    core = copy.copy(module)
    core._modules = dict(module._modules)
    for n in names:
        core._modules[n] = _Cached(module._modules[n])
    return core


def _median(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _timer(f, args: tuple, backward: bool):
    """A no-arg callable running f(*args) (forward under no_grad, or forward + backward)."""
    if not backward:

        def run():
            with torch.no_grad():
                f(*args)

        return run
    leaves = tuple(a.detach().clone().requires_grad_(True) if a.is_floating_point() else a for a in args)
    return lambda: f(*leaves).sum().backward()


@dataclasses.dataclass
class Setup:
    """One pattern's callables on shared inputs: provider name -> (function, its arguments)."""

    pattern: str
    seq: int
    providers: dict
    flops: float  # forward attention FLOPs (QK^T and PV) on the pattern's nonzeros
    forward_only: tuple = ("flex",)  # FlexAttention has no CPU backward


def build(pattern: str, seq: int, heads: int, head_dim: int, backends: list[str]) -> Setup:
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(0)
    hidden = heads * head_dim
    x = torch.randn(1, seq, hidden)
    real = torch.ones(1, seq, dtype=torch.bool)
    glob = torch.zeros(1, seq, dtype=torch.bool)
    glob[:, 0] = True
    bm = None
    if pattern == "longformer":
        window = 512
        mod = hr.longformer_module(hidden, heads, window)
        hf = lambda x: hr.run_longformer(mod, x, real, glob)
        core = cached_projections(
            mod, ("query", "key", "value", "query_global", "key_global", "value_global")
        )
        hf_core = lambda x: hr.run_longformer(core, x, real, glob)
        q, k, v, g = hr.longformer_qkv(mod, x)
        args = tuple(t.detach().contiguous() for t in (q, k, v, *g))
        op = lambda b: (lambda q, k, v, *g: ek.sliding_window_attention(
            q, k, v, window, global_mask=glob, global_qkv=tuple(g), key_padding_mask=real, backend=b))  # fmt: skip
        w = window // 2
        pairs = sum(min(seq, i + w + 1) - max(0, i - w) for i in range(seq))
        gl = glob[0]
        bm = create_block_mask(
            lambda b, h, qi, ki: ((qi - ki).abs() <= w) | gl[ki] | gl[qi], None, None, seq, seq, device="cpu"
        )
    elif pattern == "bigbird":
        block, r = 64, 3
        mod = hr.bigbird_module(hidden, heads, block, r).eval()
        hf = lambda x: hr.run_bigbird(mod, x, real)
        core = cached_projections(mod, ("query", "key", "value"))
        hf_core = lambda x: hr.run_bigbird(core, x, real)
        args = tuple(t.detach().contiguous() for t in hr.projections(mod, x, heads))
        layout = ek.bigbird_layout(seq, block_size=block, num_random_blocks=r, seed=0)
        op = lambda b: (lambda q, k, v: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=b))  # fmt: skip
        pairs = int(layout.mask.sum()) * block * block
        dense = layout.mask[0]
        bm = create_block_mask(
            lambda b, h, qi, ki: dense[qi // block, ki // block], None, None, seq, seq, device="cpu"
        )
    elif pattern == "nystrom":
        landmarks = 64
        mod = hr.nystrom_module(hidden, heads, seq, landmarks)
        hf = lambda x: hr.run_nystrom(mod, x, real)
        core = cached_projections(mod, ("query", "key", "value"))
        hf_core = lambda x: hr.run_nystrom(core, x, real)
        args = tuple(t.detach().contiguous() for t in hr.projections(mod, x, heads))
        op = lambda b: (lambda q, k, v: ek.nystrom_attention(q, k, v, landmarks, key_padding_mask=real, pinv_init="hf_global", backend=b))  # fmt: skip
        pairs = 2 * seq * landmarks + landmarks * landmarks  # K1 (seq x L), K3 (L x seq), the landmark block
    else:
        raise ValueError(f"pattern: expected longformer, bigbird or nystrom, got {pattern!r}")
    providers = {"hf_module": (hf, (x,)), "hf_core": (hf_core, (x,))}
    for b in backends:
        providers[f"etkd_{b}"] = (op(b), args)
    if bm is not None:
        providers["flex"] = (lambda q, k, v, *_: _flex(q, k, v, bm, head_dim**-0.5), args)
    providers["sdpa_dense"] = (
        lambda q, k, v, *_: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        args,
    )
    return Setup(pattern, seq, providers, 4.0 * heads * head_dim * pairs)


def measure(setup: Setup, modes: list[str], repeats: int, memory: bool = False, argv_base=()) -> list[dict]:
    """Median times (and, with memory=True, peak extra MiB of one call in a fresh process) per mode."""
    rows = []
    for mode in modes:
        bwd = mode == "fwd_bwd"
        row = {"pattern": setup.pattern, "seq": setup.seq, "mode": mode}
        for name, (f, args) in setup.providers.items():
            if bwd and name in setup.forward_only:
                continue
            row[f"{name}_ms"] = 1e3 * _median(_timer(f, args, bwd), repeats)
            if memory:
                row[f"{name}_peak_mib"] = _memory_in_child([*argv_base, "--child", f"{name}:{mode}"])
        for name in setup.providers:
            if name.startswith("etkd_") and f"{name}_ms" in row:
                t = row[f"{name}_ms"] / 1e3
                row[f"{name}_useful_gflops"] = setup.flops * (3.5 if bwd else 1.0) / t / 1e9
                for base in ("hf_core", "flex", "sdpa_dense"):
                    if f"{base}_ms" in row:
                        row[f"{base}_over_{name}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
                if memory and row.get("hf_core_peak_mib") and row.get(f"{name}_peak_mib") is not None:
                    row[f"{name}_peak_over_hf_core"] = row[f"{name}_peak_mib"] / row["hf_core_peak_mib"]
        rows.append(row)
    return rows


def _memory_in_child(argv: list[str]) -> float | None:
    res = subprocess.run(
        [sys.executable, "-m", "etkd.benchmarks.core", *argv], capture_output=True, text=True
    )
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return float(res.stdout.strip().splitlines()[-1])


def _child(setup: Setup, spec: str) -> float:
    """Peak extra MiB of the second call of one provider (the first warms caches, pools and compiles)."""
    name, mode = spec.split(":")
    f, args = setup.providers[name]
    run = _timer(f, args, mode == "fwd_bwd")
    run()
    with PeakRSS() as peak:
        run()
    return peak.peak_mib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="longformer,bigbird,nystrom")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backends", default="cpu,reference")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--memory", action="store_true", help="also peak extra memory per call, each in a fresh process"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        setup = build(a.patterns, a.seq, a.heads, a.head_dim, a.backends.split(","))
        print(f"{_child(setup, a.child):.1f}")
        return 0
    print(
        f"fp32 matmul {matmul_gflops():.1f} GFLOP/s, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    for pattern in a.patterns.split(","):
        setup = build(pattern, a.seq, a.heads, a.head_dim, a.backends.split(","))
        base = ["--patterns", pattern, "--seq", str(a.seq), "--heads", str(a.heads), "--head-dim", str(a.head_dim),
                "--backends", a.backends]  # fmt: skip
        for row in measure(setup, a.modes.split(","), a.repeats, a.memory, base):
            rows.append(row)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
