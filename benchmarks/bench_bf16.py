"""Whole-model bf16 inference against HF fp32, side by side in one run: `python -m etkd.benchmarks.bench_bf16`.

Longformer-base shape (12 layers, 768 hidden, 12 heads, window 512, random weights, one global token), batch 1:
HF `LongformerModel` in fp32, our `EncoderModel` converted from it in fp32, and ours under
`torch.autocast("cpu", dtype=torch.bfloat16)`. Prints median seconds, the speed-ups over HF fp32 and the max
abs difference of the last hidden states to HF fp32 (bf16 keeps 8 mantissa bits: LayerNorm-scaled states are
expected within a few 1e-2).
"""

from __future__ import annotations

import os

import torch

from etkd_kernels.timing import time_call

from . import harness


def _median(fn, repeats: int, warmup: bool = True) -> tuple[float, torch.Tensor]:
    """Median seconds of `fn()` by the project's one timer, and the last call's output."""
    last = {}
    timing = time_call(lambda: last.update(out=fn()), repeats=repeats, warmup=int(warmup))
    return timing.median, last["out"]


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0], seq=4096, layers=12, repeats=2, threads=2)
    ap.add_argument("--no-warmup", action="store_true", help="time the first call too (long runs)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import LongformerConfig, LongformerModel

    from etkd.models.hf import from_hf
    from etkd_kernels.cpu import isa_summary

    torch.manual_seed(0)
    cfg = LongformerConfig(
        num_hidden_layers=a.layers, attention_window=[512] * a.layers, max_position_embeddings=a.seq + 2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    hf = LongformerModel(cfg).eval()
    ours = from_hf(hf).eval()
    ids = torch.randint(5, cfg.vocab_size, (1, a.seq))
    mask = torch.ones(1, a.seq, dtype=torch.long)
    glob = torch.zeros(1, a.seq, dtype=torch.long)
    glob[:, 0] = 1
    with torch.no_grad():
        t_hf, y_hf = _median(
            lambda: hf(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state,
            a.repeats,
            not a.no_warmup,
        )
        t32, y32 = _median(
            lambda: ours(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state,
            a.repeats,
            not a.no_warmup,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t16, y16 = _median(
                lambda: ours(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state,
                a.repeats,
                not a.no_warmup,
            )
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    print(
        f"# {model}; cpu backend {isa_summary()}; torch {torch.__version__}; {a.threads} threads; load {os.getloadavg()}"
    )
    print(f"# Longformer {a.layers} layers x 768, window 512, batch 1 x {a.seq}, median of {a.repeats}")
    print(f"HF LongformerModel fp32      {t_hf:8.3f} s  1.00x")
    print(
        f"etkd fp32                    {t32:8.3f} s  {t_hf / t32:.2f}x  max|diff| {float((y32 - y_hf).abs().max()):.2e}"
    )
    print(
        f"etkd bf16 autocast           {t16:8.3f} s  {t_hf / t16:.2f}x  max|diff| "
        f"{float((y16.float() - y_hf).abs().max()):.2e}  mean|diff| {float((y16.float() - y_hf).abs().mean()):.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
