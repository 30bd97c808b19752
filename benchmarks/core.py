"""Attention-core comparison, side by side in one run: `python -m etkd.benchmarks.core --seq 4096`.

HF's attention modules compute their own q/k/v projections, so "HF core" is the HF module's time minus
the time of exactly those projections, measured in the same run; etkd, FlexAttention and SDPA are timed on
the same precomputed q/k/v. Prints medians, ratios, useful GFLOP/s and the fp32 matmul rate of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import etkd_kernels as ek

from . import hf_reference as hr
from .cases import _flex, matmul_gflops


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


def measure(
    pattern: str, seq: int, heads: int, head_dim: int, backends: list[str], modes: list[str], repeats: int
):
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(0)
    hidden = heads * head_dim
    x = torch.randn(1, seq, hidden)
    real = torch.ones(1, seq, dtype=torch.bool)
    glob = torch.zeros(1, seq, dtype=torch.bool)
    glob[:, 0] = True
    rows = []
    if pattern == "longformer":
        window = 512
        mod = hr.longformer_module(hidden, heads, window)
        hf = lambda x: hr.run_longformer(mod, x, real, glob)

        def proj(x):
            q, k, v, g = hr.longformer_qkv(mod, x)
            return sum(t.sum() for t in (q, k, v, *g))

        q, k, v, g = (t.detach().contiguous() for t in hr.longformer_qkv(mod, x)[:3]), None, None, None
        q, k, v = list(q)
        g = [t.detach().contiguous() for t in hr.longformer_qkv(mod, x)[3]]
        ops = {b: (lambda q, k, v, *g, b=b: ek.sliding_window_attention(
            q, k, v, window, global_mask=glob, global_qkv=tuple(g), key_padding_mask=real, backend=b)) for b in backends}  # fmt: skip
        args = (q, k, v, *g)
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
        proj = lambda x: sum(t.sum() for t in hr.projections(mod, x, heads))
        q, k, v = (t.detach().contiguous() for t in hr.projections(mod, x, heads))
        layout = ek.bigbird_layout(seq, block_size=block, num_random_blocks=r, seed=0)
        ops = {b: (lambda q, k, v, b=b: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=b)) for b in backends}  # fmt: skip
        args = (q, k, v)
        pairs = int(layout.mask.sum()) * block * block
        dense = layout.mask[0]
        bm = create_block_mask(
            lambda b, h, qi, ki: dense[qi // block, ki // block], None, None, seq, seq, device="cpu"
        )
    else:
        landmarks = 64
        mod = hr.nystrom_module(hidden, heads, seq, landmarks)
        hf = lambda x: hr.run_nystrom(mod, x, real)
        proj = lambda x: sum(t.sum() for t in hr.projections(mod, x, heads))
        q, k, v = (t.detach().contiguous() for t in hr.projections(mod, x, heads))
        ops = {b: (lambda q, k, v, b=b: ek.nystrom_attention(q, k, v, landmarks, key_padding_mask=real, pinv_init="hf_global", backend=b)) for b in backends}  # fmt: skip
        args = (q, k, v)
        pairs = 4 * seq * landmarks + landmarks * landmarks  # the K1, K3 products and the landmark block
        bm = None
    flops = 4.0 * heads * head_dim * pairs
    for mode in modes:
        bwd = mode == "fwd_bwd"
        t_mod = _median(_timer(hf, (x,), bwd), repeats)
        t_proj = _median(_timer(proj, (x,), bwd), repeats)
        row = {"pattern": pattern, "seq": seq, "mode": mode, "hf_module_ms": 1e3 * t_mod, "hf_projections_ms": 1e3 * t_proj,
               "hf_core_ms": 1e3 * (t_mod - t_proj)}  # fmt: skip
        for b, f in ops.items():
            t = _median(_timer(f, args, bwd), repeats)
            row[f"etkd_{b}_ms"] = 1e3 * t
            row[f"etkd_{b}_useful_gflops"] = flops * (3.5 if bwd else 1.0) / t / 1e9
            row[f"hf_core_over_etkd_{b}"] = (t_mod - t_proj) / t
        if bm is not None and not bwd:  # FlexAttention has no CPU backward
            t = _median(_timer(lambda q, k, v: _flex(q, k, v, bm, head_dim**-0.5), (q, k, v), False), repeats)
            row["flex_ms"] = 1e3 * t
        t = _median(
            _timer(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), (q, k, v), bwd),
            repeats,
        )
        row["sdpa_dense_ms"] = 1e3 * t
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="longformer,bigbird,nystrom")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backends", default="cpu,reference")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    print(
        f"fp32 matmul {matmul_gflops():.1f} GFLOP/s, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    for pattern in a.patterns.split(","):
        for row in measure(
            pattern, a.seq, a.heads, a.head_dim, a.backends.split(","), a.modes.split(","), a.repeats
        ):
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
