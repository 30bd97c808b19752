"""Whole-model training step, ours vs HF side by side in one process (issue 28):
`python -m etkd.benchmarks.train_step` (2-layer base model of `--attention`, 1 x 4096, fp32).

One step is `etkd_kernels.timing.model_step(..., "train")` (forward, a scalar loss on the last hidden state,
backward, AdamW step), the same call `etkd bench --mode train` times. Both models hold the same weights: ours
built by `bench.build_model` (dropout off on both sides, as there) with `--layers` layers and the pattern of
`--attention` (default the sliding window 512 + 1 global token), HF's `to_hf` of an identical copy (its class
of the pattern's family, `<Family>Model`). `--optimizers` gives both sides the same AdamW (lr 1e-5, torch's
defaults otherwise):
`adamw` torch's per-parameter loop (torch.optim.AdamW's default on a CPU, `etkd bench`'s), `fused` its fused
kernel (the same update to rounding; transformers' Trainer default with torch >= 2.8, and etkd's training
driver's). After one warm-up step each (AdamW's state), the sides alternate step by step for `--repeats`
rounds, so load on a shared machine falls on both alike; the table gives each median and the ratio of every
round. `--heap default,warm` (harness.py) runs the whole comparison once per heap in a fresh process. `--profile`
adds one `torch.profiler` step per side and optimizer: the self-CPU time per op, then per
group (GEMMs, our attention kernels, copies, AdamW, other) with the bound the shared GEMMs put on the ratio.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from etkd_kernels.timing import model_step

from .bench import SIZES, add_attention_arg, build_model
from .harness import environment, parser, rerun_per_heap

SIDES = ("etkd-cpu", "hf")
OPTIMIZERS = ("adamw", "fused")


def models(size: str, layers: int, seq: int, attention: str) -> dict[str, torch.nn.Module]:
    """Ours (cpu backend) and HF's model of the pattern's family on the same weights."""
    from etkd.models import EncoderModel, to_hf

    cfg = build_model(attention, size, seq, False, meta=True).replace(num_layers=layers)
    out = {}
    for side in SIDES:
        torch.manual_seed(0)
        model = EncoderModel(cfg)
        if side == "hf":
            out[side] = to_hf(model)
        else:
            model.set_attention_backend(side.removeprefix("etkd-"))
            out[side] = model
    return out


# Self-CPU groups of a profiled step (torch.profiler op names; a name ending in "::" is a prefix). The GEMMs are the
# same MKL calls on both sides (the linear layers' shapes are the model's), so a side's step can be no faster than
# its GEMM time: HF's step over ours' GEMMs bounds the ratio whatever the rest of ours costs (Amdahl).
GROUPS = (
    ("GEMMs (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")),
    ("etkd attention kernels", ("etkd_cpu::",)),
    ("copies, fills, gathers", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::index_select",
                                "aten::gather", "aten::scatter_", "aten::masked_fill_", "aten::index_put_")),
    ("AdamW (fused)", ("aten::_fused_adamw_",)),
)  # fmt: skip


def group_of(name: str) -> str:
    for label, names in GROUPS:
        if any(name.startswith(n) if n.endswith("::") else name == n for n in names):
            return label
    return "other"


def profile_step(call, rows: int) -> tuple[str, dict[str, float]]:
    """One profiled step: the per-op self-CPU table and the seconds per group (GROUPS, "other", "total")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    groups = {label: 0.0 for label, _ in GROUPS} | {"other": 0.0}
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total / 1e6
    groups["total"] = sum(groups.values())
    return events.table(sort_by="self_cpu_time_total", row_limit=rows), groups


def group_lines(groups: dict[str, float]) -> str:
    total = groups["total"]
    return "\n".join(f"  {k:24s} {1e3 * v:9.1f} ms  {100 * v / total:5.1f} %" for k, v in groups.items())


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0], heap=True, layers=2, seq=4096, batch=1, repeats=3, threads=2)
    ap.add_argument("--size", choices=list(SIZES), default="base", help="model shapes (default base)")
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                    help="AdamW implementations, each given to both sides (default: both)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="one torch.profiler step per run: self CPU per op")
    ap.add_argument("--rows", type=int, default=25, help="rows of each --profile table (default 25)")
    add_attention_arg(ap)
    args = ap.parse_args(argv)
    if (code := rerun_per_heap(args, "etkd.benchmarks.train_step", argv)) is not None:
        return code  # --heap: one child per heap, each printing its own table
    torch.set_num_threads(args.threads)
    built = models(args.size, args.layers, args.seq, args.attention)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SIZES[args.size][4], (args.batch, args.seq), generator=g)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = {
        (side, opt): model_step(m, kwargs, "train", fused_adamw=opt == "fused")
        for opt in args.optimizers
        for side, m in built.items()
    }
    for call in calls.values():
        call()  # warm-up: AdamW's state, allocator pools
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    env = environment(torch.device("cpu")).as_dict()
    print(f"{env}\nload average (1 min) during the run: {min(loads):.1f}-{max(loads):.1f}")
    print(
        f"{args.layers}-layer {type(built['hf']).__name__.removesuffix('Model')}-{args.size}, {args.batch} x "
        f"{args.seq}, fp32, {args.threads} threads"
    )
    for (side, opt), ts in times.items():
        steps = ", ".join(f"{t:.3g}" for t in ts)  # 3 significant digits: a tiny step is not "0.00"
        print(f"{side:9s} {opt:6s} median {statistics.median(ts):8.3g} s   steps: {steps}")
    for opt in args.optimizers:
        ours, hf = times[("etkd-cpu", opt)], times[("hf", opt)]
        ratios = ", ".join(f"{h / e:.2f}" for h, e in zip(hf, ours))
        med = statistics.median(hf) / statistics.median(ours)
        print(f"HF / etkd with {opt}: {med:.2f}x (medians); per round {ratios}")
    if args.profile:
        profiled = {}
        for (side, opt), call in calls.items():
            table, profiled[(side, opt)] = profile_step(call, args.rows)
            print(f"\n== {side}, {opt}: one step, self CPU time per op\n{table}")
        for opt in args.optimizers:
            ours, hf = profiled[("etkd-cpu", opt)], profiled[("hf", opt)]
            print(f"\n== {opt}: self CPU per group (one profiled step each)\netkd-cpu\n{group_lines(ours)}\n"
                  f"hf\n{group_lines(hf)}")  # fmt: skip
            gemm = GROUPS[0][0]
            print(f"bound: HF's step / our GEMMs alone = {hf['total'] / ours[gemm]:.2f}x (the ratio if everything of "
                  f"ours outside the GEMMs cost nothing); HF's step / ours = {hf['total'] / ours['total']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
