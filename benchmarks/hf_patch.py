"""etkd.hf.patch on a whole HF model, side by side in one run: `python -m etkd.benchmarks.hf_patch`.

Default: LongformerModel at base shape (12 layers x 768, 12 heads, attention_window 512), batch 1 x 4096
tokens, one global token (<s>), random weights, fp32, eval mode for forward and train mode (dropout 0) for
forward+backward. The unpatched model and its patched deep copy (same weights) alternate, median of
`--repeats` each, so both see the same machine load. Also checks the two outputs agree.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from . import harness
from .harness import Timing, environment, time_call


def _build(layers: int, hidden: int, heads: int, window: int, seq: int):
    from transformers import LongformerConfig, LongformerModel

    cfg = LongformerConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
        attention_window=window, max_position_embeddings=seq + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LongformerModel(cfg, add_pooling_layer=False)


def main(argv: list[str] | None = None) -> int:
    import etkd.hf

    p = harness.parser(__doc__.splitlines()[0], layers=12, seq=4096, batch=1, repeats=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--backend", default="auto")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    hf_model = _build(args.layers, args.hidden, args.heads, args.window, args.seq)
    ours = etkd.hf.patch(copy.deepcopy(hf_model), backend=args.backend)
    ids = torch.randint(3, 1000, (args.batch, args.seq))
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), global_attention_mask=glob)

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
    print(
        f"LongformerModel {args.layers}x{args.hidden}, {args.heads} heads, window {args.window}, "
        f"{args.batch}x{args.seq}, fp32, {env.cpu} ({env.isa}), {env.threads} threads, torch {env.torch}, "
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
