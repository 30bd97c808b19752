"""Whole-model training step, ours vs HF side by side in one process (issue 28):
`python -m etkd.benchmarks.train_step` (2-layer Longformer-base, 1 x 4096, fp32).

One step is `etkd_kernels.timing.model_step(..., "train")` (forward, a scalar loss on the last hidden state,
backward, AdamW step), the same call `etkd bench --mode train` times. Both models hold the same weights: ours
built by `bench.build_model` (dropout off on both sides, as there) with `--layers` layers, HF's `to_hf` of
an identical copy. After one warm-up step each (AdamW's state), the sides alternate step by step for
`--repeats` rounds, so load on a shared machine falls on both alike; the table gives each side's median and
the ratio of every round. `--profile` adds one `torch.profiler` step per side: the self-CPU time per op.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from etkd_kernels.timing import model_step

from .bench import SIZES, build_model
from .harness import environment, parser

SIDES = ("etkd-cpu", "hf")


def models(size: str, layers: int, seq: int) -> dict[str, torch.nn.Module]:
    """Ours (cpu backend) and HF's LongformerModel on the same weights."""
    from etkd.models import EncoderModel, to_hf

    cfg = build_model("longformer", size, seq, False, meta=True).replace(num_layers=layers)
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


def profile_table(call, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0], layers=2, seq=4096, batch=1, repeats=3, threads=2)
    ap.add_argument("--size", choices=list(SIZES), default="base", help="model shapes (default base)")
    ap.add_argument("--profile", action="store_true", help="one torch.profiler step per side: self CPU per op")
    ap.add_argument("--rows", type=int, default=25, help="rows of each --profile table (default 25)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    built = models(args.size, args.layers, args.seq)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SIZES[args.size][4], (args.batch, args.seq), generator=g)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = {side: model_step(m, kwargs, "train") for side, m in built.items()}
    for call in calls.values():
        call()  # warm-up: AdamW's state, allocator pools
    times: dict[str, list[float]] = {side: [] for side in calls}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for side, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[side].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    env = environment(torch.device("cpu")).as_dict()
    print(f"{env}\nload average (1 min) during the run: {min(loads):.1f}-{max(loads):.1f}")
    print(f"{args.layers}-layer Longformer-{args.size}, {args.batch} x {args.seq}, fp32, {args.threads} threads")
    for side, ts in times.items():
        print(f"{side:10s} median {statistics.median(ts):8.2f} s   steps: {', '.join(f'{t:.2f}' for t in ts)}")
    ratios = [h / e for h, e in zip(times["hf"], times["etkd-cpu"])]
    med = statistics.median(times["hf"]) / statistics.median(times["etkd-cpu"])
    print(f"HF / etkd: {med:.2f}x (medians); per round {', '.join(f'{r:.2f}' for r in ratios)}")
    if args.profile:
        for side, call in calls.items():
            print(f"\n== {side}: one step, self CPU time per op\n{profile_table(call, args.rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
