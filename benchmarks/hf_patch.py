"""etkd.hf.patch on a whole HF model, side by side in one run: `python -m etkd.benchmarks.hf_patch`.

The HF model of `--attention`'s family (`<Family>Model`; choices: every pattern with a benchmark module and a
transformers class, default the sliding window with global tokens) at base shape (12 layers x 768, 12 heads,
the pattern's paper settings as `etkd bench` builds it: attention_window 512 by default), batch 1 x 4096
tokens, one global token (<s>) where the pattern has global tokens, random weights, fp32, eval mode for
forward and train mode (dropout 0) for forward+backward. The unpatched model and its patched deep copy (same
weights) alternate, median of `--repeats` each, so both see the same machine load. Also checks the two outputs
agree.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from etkd.models.patterns import PATTERNS

from . import harness
from .bench import SIZES, add_attention_arg, hf_pair, model_config
from .harness import Timing, environment, time_call


def _build(attention: str, layers: int, hidden: int, heads: int, window: int | None, seq: int):
    """(etkd's config, HF's bare model of the pattern's family with no pooler: `to_hf` of `etkd bench`'s model
    at this shape)."""
    cfg = model_config(attention, seq, (hidden, layers, heads, 4 * hidden, SIZES["base"][4]), window)
    return cfg, hf_pair(cfg)[1]


def main(argv: list[str] | None = None) -> int:
    import etkd.hf

    p = harness.parser(__doc__.splitlines()[0], heap=True, layers=12, seq=4096, batch=1, repeats=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    add_attention_arg(p)
    p.add_argument("--window", type=int, help="a window setting (default: the pattern's, 512)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    by_heap = harness.per_heap(args, "etkd.benchmarks.hf_patch", argv, json_flag="--json")
    if by_heap is not None:  # the whole comparison once per heap, each in a fresh process
        print(harness.heap_table(by_heap, "mode", "hf", "etkd"))
        return 1 if any(r.get("status", "").startswith("error") for r in by_heap.values()) else 0
    pattern = PATTERNS[args.attention]
    if args.window is not None and "window" not in pattern.settings:
        p.error(f"--window: attention {args.attention!r} has no window setting")

    cfg, hf_model = _build(args.attention, args.layers, args.hidden, args.heads, args.window, args.seq)
    ours = etkd.hf.patch(copy.deepcopy(hf_model), backend=args.backend)
    ids = torch.randint(3, 1000, (args.batch, args.seq))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if pattern.global_tokens:
        kw["global_attention_mask"] = torch.zeros_like(ids)
        kw["global_attention_mask"][:, 0] = 1

    with torch.no_grad():
        hf_model.eval(), ours.eval()
        ref, got = hf_model(**kw).last_hidden_state, ours(**kw).last_hidden_state
    err = float((ref - got).abs().max() / ref.abs().max())

    def step(model, mode):
        if mode == "fwd":
            model.eval()
            with torch.no_grad():
                model(**kw)
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            model(**kw).last_hidden_state.square().mean().backward()

    env = environment("cpu")
    settings = ", ".join(f"{k} {getattr(cfg, k)}" for k in pattern.settings)
    print(
        f"{type(hf_model).__name__} {args.layers}x{args.hidden}, {args.heads} heads, {settings}, "
        f"{args.batch}x{args.seq}, fp32, {env.cpu} ({env.isa}), {env.threads} threads, torch {env.torch}, heap {env.heap}, "
        f"load {os.getloadavg()[0]:.1f}; max |patched - HF| / max |HF| = {err:.1e}"
    )
    rows = []
    for mode in args.modes:
        times = {"hf": [], "etkd": []}
        step(hf_model, mode), step(ours, mode)  # warm-up
        for _ in range(args.repeats):  # alternating single calls of the one timer
            for name, model in (("hf", hf_model), ("etkd", ours)):
                times[name].append(time_call(lambda m=model: step(m, mode), repeats=1, warmup=0).median)
        hf_s, ours_s = Timing.of(times["hf"]).median, Timing.of(times["etkd"]).median
        row = {"mode": mode, "hf_s": hf_s, "etkd_s": ours_s, "ratio": hf_s / ours_s, "times": times,
               "load": os.getloadavg()[0]}  # fmt: skip
        rows.append(row)
        print(
            f"{mode:8s} HF {hf_s:8.2f} s   patched {ours_s:8.2f} s   HF / patched {hf_s / ours_s:5.2f}x   "
            f"(median of {args.repeats}, load {row['load']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "environment": env.as_dict(), "max_rel_err": err, "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
