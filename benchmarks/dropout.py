"""What attention dropout costs (issue 27): forward + backward of etkd's ops with dropout_p = 0.1 over the same
call with p = 0 (target: <= 1.15x for the sliding window and block-sparse ops on `cpu` at 4096, batch 1,
12 heads x 64, fp32), and HF's own attention core with its dropout on (training mode, p = 0.1) over ours with
dropout, side by side from one run. For full attention and the patterns whose `cpu` dropout used to fall back
to `reference` (`Bench.fallback_replaced`), the row also times that fallback (`reference` with p = 0.1) over
ours with dropout:

    python -m etkd.benchmarks.dropout                     # seq 4096, backend cpu, 2 threads, every pattern
    python -m etkd.benchmarks.dropout --patterns full --seq 2048
    python -m etkd.benchmarks.dropout --seq 1024 --repeats 5 --backend reference

The inputs, layouts and HF modules are `providers.build`'s (each pattern's paper settings, benchmarks/patterns/),
so the rows compare with `python -m etkd.benchmarks.core`; "full" is dense attention on random q, k, v of the
same shape. HF's core with dropout is each pattern's `Bench.dropout_core` (where an HF module applies no
attention dropout at all, its row is HF without dropout and its note says so; a pattern transformers has no
module for has no HF row); for "full" the baseline is torch's SDPA with dropout_p (the path HF's BERT/RoBERTa
`sdpa` attention takes in training: on a CPU, the unfused math kernel).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import etkd_kernels as ek

from . import providers as P
from .harness import environment, time_call
from .patterns import BENCHES

PATTERNS = (*P.PATTERNS, "full")
# Patterns whose `cpu` dropout replaced a fallback to `reference` (issue 27): their rows time that fallback too.
FALLBACK_REPLACED = (*(name for name, b in BENCHES.items() if b.fallback_replaced), "full")


def _hf_core_with_dropout(pattern: str, setup, p: float):
    """(callable, args, note): HF's core (projections precomputed) in training mode with attention dropout p, or
    None where transformers has no such module."""
    if pattern == "full":
        note = f"torch SDPA dropout_p={p} (HF BERT/RoBERTa sdpa attention in training)"
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p)), setup.args, note
    core = BENCHES[pattern].dropout_core
    return None if core is None else core(setup, p)


@dataclass
class _Dense:
    """The inputs of the "full" rows (providers.build has no dense pattern: SDPA is a provider of every one)."""

    seq: int
    heads: int = 12
    head_dim: int = 64
    batch: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        g = torch.Generator().manual_seed(0)
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        self.args = tuple(torch.randn(shape, generator=g).to(self.device, self.dtype) for _ in range(3))


def measure(pattern: str, seq: int, backend: str, repeats: int, p: float = 0.1) -> dict:
    setup = _Dense(seq) if pattern == "full" else P.build(pattern, seq, backends=[backend])
    args = setup.args if pattern == "full" else setup.providers[f"etkd-{backend}"][1]
    name = f"etkd-{backend}"
    ours = {}
    for drop in (0.0, p):
        # with dropout: a fresh seed per call, drawn from torch's generator, as in training
        ours[drop] = time_call(
            P.fwd_bwd_call(_with_dropout(pattern, setup, backend, drop), args), repeats
        ).median
    row = {
        "pattern": pattern, "seq": seq, "backend": backend, "mode": "fwd_bwd", "dropout_p": p,
        f"{name}_p0_ms": 1e3 * ours[0.0], f"{name}_p{p}_ms": 1e3 * ours[p],
        "dropout_over_no_dropout": ours[p] / ours[0.0],
    }  # fmt: skip
    if pattern in FALLBACK_REPLACED and backend != "reference":
        t_ref = time_call(P.fwd_bwd_call(_with_dropout(pattern, setup, "reference", p), args), repeats).median
        row.update(reference_dropout_ms=1e3 * t_ref, reference_dropout_over_ours_dropout=t_ref / ours[p])
    hf = _hf_core_with_dropout(pattern, setup, p)
    if hf is None:
        row["hf_note"] = f"transformers has no {pattern} attention module"
    else:
        f_hf, hf_args, note = hf
        t_hf = time_call(P.fwd_bwd_call(f_hf, hf_args), repeats).median
        row.update(
            hf_core_dropout_ms=1e3 * t_hf, hf_core_dropout_over_ours_dropout=t_hf / ours[p], hf_note=note
        )
    row["environment"] = environment(setup.device).as_dict()
    return row


def _with_dropout(pattern: str, setup, backend: str, p: float):
    """providers.build's etkd call for `pattern` (the same settings), with dropout_p = p."""
    if pattern == "full":
        return lambda q, k, v: ek.full_attention(q, k, v, dropout_p=p, backend=backend)
    return setup.etkd_op(backend, dropout_p=p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout-p", type=float, default=0.1)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for pattern in args.patterns:
        row = measure(pattern, args.seq, args.backend, args.repeats, args.dropout_p)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
