"""Whole-model bf16 inference against HF fp32, side by side in one run: `python -m etkd.benchmarks.bench_bf16`.

The base-shape model of `--attention` (12 layers, 768 hidden, 12 heads, the pattern's paper settings as
`etkd bench` builds it, random weights; default the sliding window 512 with one global token), batch 1: HF's
model of the pattern's family (`to_hf`: `<Family>Model`) in fp32, our `EncoderModel` with the same
weights in fp32, and ours under `torch.autocast("cpu", dtype=torch.bfloat16)`. Prints median seconds, the
speed-ups over HF fp32 (wall, and process CPU time of the same calls: steadier on a shared machine) and the max abs
difference of the last hidden states to HF fp32 (bf16 keeps 8 mantissa bits: LayerNorm-scaled states are expected
within a few 1e-2).

Which GEMMs the bf16 row's linear layers ran is printed (`# bf16 linear layers: ...`, and "gemm" in the JSON):
torch's bf16 GEMMs where they are fast (oneDNN: AVX-512 CPUs), else fp32 GEMMs on bf16-rounded inputs
(etkd.models.precision; an AVX2-only CPU, where torch's bf16 GEMM is ~6x slower than fp32). Attention runs in
bf16 either way. ETKD_CPU_BF16_LINEAR=bf16|fp32 forces either path, to measure both on one CPU.
"""

from __future__ import annotations

import json
import os

import torch

from etkd_kernels.timing import heap, time_call

from . import harness
from .bench import SIZES, add_attention_arg, hf_pair, model_config
from .core import pattern_label
from .patterns import BENCHES


def _median(fn, repeats: int, warmup: bool = True) -> tuple[float, float, torch.Tensor]:
    """Median wall seconds of `fn()` by the project's one timer, the median process CPU seconds of the same calls
    (`Timing.cpu_median`), and the last call's output."""
    last = {}
    timing = time_call(lambda: last.update(out=fn()), repeats=repeats, warmup=int(warmup))
    return timing.median, timing.cpu_median, last["out"]


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0], heap=True, seq=4096, layers=12, repeats=2, threads=2)
    ap.add_argument("--no-warmup", action="store_true", help="time the first call too (long runs)")
    ap.add_argument("--json", help="write the rows here")
    add_attention_arg(ap)
    a = ap.parse_args(argv)
    by_heap = harness.per_heap(a, "etkd.benchmarks.bench_bf16", argv, json_flag="--json")
    if by_heap is not None:  # the whole comparison once per heap, each in a fresh process
        print(harness.heap_table(by_heap, "etkd", "hf", "etkd"))
        return 1 if any(r.get("status", "").startswith("error") for r in by_heap.values()) else 0
    torch.set_num_threads(a.threads)
    from etkd.models.patterns import PATTERNS
    from etkd_kernels.cpu import bf16_matmul, bf16_matmul_summary, isa_summary

    cfg = model_config(a.attention, a.seq, SIZES["base"]).replace(num_layers=a.layers)
    ours, hf = hf_pair(cfg)
    ids = torch.randint(5, cfg.vocab_size, (1, a.seq))
    kw = {"attention_mask": torch.ones(1, a.seq, dtype=torch.long)}
    if PATTERNS[a.attention].global_tokens:  # one global token, <s>
        kw["global_attention_mask"] = torch.zeros(1, a.seq, dtype=torch.long)
        kw["global_attention_mask"][:, 0] = 1
    with torch.no_grad():
        t_hf, c_hf, y_hf = _median(lambda: hf(ids, **kw).last_hidden_state, a.repeats, not a.no_warmup)
        t32, c32, y32 = _median(lambda: ours(ids, **kw).last_hidden_state, a.repeats, not a.no_warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t16, c16, y16 = _median(lambda: ours(ids, **kw).last_hidden_state, a.repeats, not a.no_warmup)
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    print(
        f"# {model}; cpu backend {isa_summary()}; torch {torch.__version__}; {a.threads} threads; heap {heap()}; "
        f"load {os.getloadavg()}"
    )
    stem = type(hf).__name__.removesuffix("Model")
    print(f"# {stem} {a.layers} layers x {cfg.hidden_size}, {pattern_label(a.attention)}, batch 1 x {a.seq}, "
          f"median of {a.repeats}")  # fmt: skip
    gemm = "bf16" if bf16_matmul().fast else "fp32"  # what the bf16 row's linear layers ran
    print(f"# {bf16_matmul_summary()}")
    if BENCHES[a.attention].model_note:
        print(f"# note: {BENCHES[a.attention].model_note}")
    print(f"{f'HF {type(hf).__name__} fp32':28s} {t_hf:8.3f} s  1.00x  (cpu {c_hf:.3f} s, 1.00x)")
    print(
        f"etkd fp32                    {t32:8.3f} s  {t_hf / t32:.2f}x  (cpu {c32:.3f} s, {c_hf / c32:.2f}x)  "
        f"max|diff| {float((y32 - y_hf).abs().max()):.2e}"
    )
    print(
        f"etkd bf16 autocast           {t16:8.3f} s  {t_hf / t16:.2f}x  (cpu {c16:.3f} s, {c_hf / c16:.2f}x)  max|diff| "
        f"{float((y16.float() - y_hf).abs().max()):.2e}  mean|diff| {float((y16.float() - y_hf).abs().mean()):.2e}"
        f"  ({gemm} GEMMs)"
    )
    if a.json:
        rows = [
            {"etkd": "fp32", "hf_s": t_hf, "etkd_s": t32, "hf_cpu_s": c_hf, "etkd_cpu_s": c32},
            {
                "etkd": f"bf16 autocast, {gemm} GEMMs",
                "hf_s": t_hf,
                "etkd_s": t16,
                "hf_cpu_s": c_hf,
                "etkd_cpu_s": c16,
                "gemm": gemm,
            },  # fmt: skip
        ]
        with open(a.json, "w") as f:
            json.dump({"heap": heap(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
