"""`etkd demo`: the main job on a built-in default.

For now: a kernel comparison table. For each attention pattern and each backend that can run it here,
the forward time, the forward+backward time, and the max deviation from the `reference` backend, all
measured side by side in one run (ratios are what mean something on a shared CPU).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def kernel_table(seq: int = 1024, heads: int = 4, head_dim: int = 64, repeats: int = 3) -> list[dict]:
    import etkd_kernels as ek
    from etkd_kernels.dispatch import reasons

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, heads, seq, head_dim).unbind(0)
    real = torch.ones(1, seq, dtype=torch.bool)
    real[:, seq - seq // 8 :] = False
    glob = torch.zeros(1, seq, dtype=torch.bool)
    glob[:, 0] = True
    cases = {
        "full": ("full", lambda be, q, k, v: ek.full_attention(q, k, v, key_padding_mask=real, backend=be)),
        "sliding_window(256)+global": (
            "sliding_window",
            lambda be, q, k, v: ek.sliding_window_attention(
                q, k, v, 256, global_mask=glob, key_padding_mask=real, backend=be
            ),
        ),
        "block_sparse(longformer 64)": (
            "block_sparse",
            lambda be, q, k, v: ek.block_sparse_attention(
                q, k, v, ek.longformer_layout(seq, 64), key_padding_mask=real, backend=be
            ),
        ),
        "lsg(64)": (
            "lsg",
            lambda be, q, k, v: ek.lsg_attention(q, k, v, block_size=64, key_padding_mask=real, backend=be),
        ),
        "nystrom(64)": (
            "nystrom",
            lambda be, q, k, v: ek.nystrom_attention(q, k, v, 64, key_padding_mask=real, backend=be),
        ),
    }
    rows = []
    for label, (op, fn) in cases.items():
        ref = fn("reference", q, k, v)
        ref_time = None
        for backend in ("reference", "cpu", "triton", "cuda"):
            why = reasons(backend, op, q.device, q.dtype)
            if why:
                rows.append({"op": label, "backend": backend, "status": "; ".join(why)[:60]})
                continue
            out = fn(backend, q, k, v)
            err = (out - ref).abs().max().item()
            t_fwd = _time(lambda: fn(backend, q, k, v), repeats)
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            t_fb = _time(lambda: fn(backend, qq, kk, vv).sum().backward(), repeats)
            ref_time = ref_time or (t_fwd, t_fb)
            rows.append(
                {
                    "op": label,
                    "backend": backend,
                    "status": "ok",
                    "fwd_ms": 1e3 * t_fwd,
                    "fwd_bwd_ms": 1e3 * t_fb,
                    "speedup_fwd_vs_reference": ref_time[0] / t_fwd,
                    "speedup_fwd_bwd_vs_reference": ref_time[1] / t_fb,
                    "max_abs_err_vs_reference": err,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'op':30s} {'backend':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'x ref fwd':>9s} {'x ref f+b':>9s} {'max err':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['op']:30s} {r['backend']:10s} unavailable: {r['status']}")
            continue
        lines.append(
            f"{r['op']:30s} {r['backend']:10s} {r['fwd_ms']:9.1f} {r['fwd_bwd_ms']:11.1f} "
            f"{r['speedup_fwd_vs_reference']:9.2f} {r['speedup_fwd_bwd_vs_reference']:9.2f} "
            f"{r['max_abs_err_vs_reference']:9.1e}"
        )
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on a built-in default (kernel comparison table)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="demo_out", help="folder for the JSON results")
    p.set_defaults(func=run)


def run(args) -> int:
    print(
        f"etkd demo: attention kernels, batch 1, {args.heads} heads x 64, seq {args.seq}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = kernel_table(seq=args.seq, heads=args.heads, repeats=args.repeats)
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\nwrote {path}")
    return 0
