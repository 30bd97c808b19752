"""What attention dropout costs (issue 27): forward + backward of etkd's ops with dropout_p = 0.1 over the same
call with p = 0 (target: <= 1.15x for the sliding window and block-sparse ops on `cpu` at 4096, batch 1,
12 heads x 64, fp32), and HF's own attention core with its dropout on (training mode, p = 0.1) over ours with
dropout, side by side from one run:

    python -m etkd.benchmarks.dropout                     # seq 4096, backend cpu, 2 threads
    python -m etkd.benchmarks.dropout --seq 1024 --repeats 5 --backend reference

The inputs, layouts and HF modules are `providers.build`'s (Longformer window 512 + 1 global token with the
separate global projections; BigBird 64-blocks 3 + 2 + 3), so the rows compare with `python -m
etkd.benchmarks.core`. HF's BigBirdBlockSparseAttention applies no attention dropout at all (transformers 5.25:
only the full-attention BigBirdSelfAttention has `self.dropout`), so its row is HF without dropout, and says so.
"""

from __future__ import annotations

import argparse
import json

import torch

import etkd_kernels as ek

from . import hf_reference as hr
from . import providers as P
from .harness import environment, time_call

PATTERNS = ("longformer", "bigbird")


def _hf_core_with_dropout(pattern: str, setup: P.Setup, p: float):
    """(callable, args, note): HF's core (projections precomputed) in training mode with attention dropout p."""
    hidden = setup.heads * setup.head_dim
    x, real, glob = P._inputs(setup.batch, setup.seq, hidden, setup.device, setup.dtype)
    if pattern == "longformer":
        mod = hr.longformer_module(hidden, setup.heads, P.WINDOW).to(setup.device, setup.dtype)
        mod.dropout = p  # LongformerSelfAttention keeps attention_probs_dropout_prob as a float
        core = P.cached_projections(
            mod, ("query", "key", "value", "query_global", "key_global", "value_global")
        ).train()
        return (
            (lambda x: hr.run_longformer(core, x, real, glob)),
            (x,),
            f"LongformerSelfAttention, train, p={p}",
        )
    mod = hr.bigbird_module(hidden, setup.heads, P.BLOCK, P.RANDOM_BLOCKS).to(setup.device, setup.dtype)
    core = P.cached_projections(mod, ("query", "key", "value")).train()
    note = "BigBirdBlockSparseAttention, train: HF applies no attention dropout in block_sparse mode"
    return (lambda x: hr.run_bigbird(core, x, real)), (x,), note


def measure(pattern: str, seq: int, backend: str, repeats: int, p: float = 0.1) -> dict:
    setup = P.build(pattern, seq, backends=[backend])
    name = f"etkd-{backend}"
    f, args = setup.providers[name]
    ours = {}
    for drop in (0.0, p):
        # with dropout: a fresh seed per call, drawn from torch's generator, as in training
        g = f if drop == 0 else _with_dropout(pattern, setup, backend, drop)
        ours[drop] = time_call(P.fwd_bwd_call(g, args), repeats).median
    hf, hf_args, note = _hf_core_with_dropout(pattern, setup, p)
    t_hf = time_call(P.fwd_bwd_call(hf, hf_args), repeats).median
    return {
        "pattern": pattern, "seq": seq, "backend": backend, "mode": "fwd_bwd", "dropout_p": p,
        f"{name}_p0_ms": 1e3 * ours[0.0], f"{name}_p{p}_ms": 1e3 * ours[p],
        "dropout_over_no_dropout": ours[p] / ours[0.0],
        "hf_core_dropout_ms": 1e3 * t_hf, "hf_core_dropout_over_ours_dropout": t_hf / ours[p], "hf_note": note,
        "environment": environment(setup.device).as_dict(),
    }  # fmt: skip


def _with_dropout(pattern: str, setup: P.Setup, backend: str, p: float):
    """providers.build's etkd call for `pattern`, with dropout_p = p."""
    hidden = setup.heads * setup.head_dim
    _, real, glob = P._inputs(setup.batch, setup.seq, hidden, setup.device, setup.dtype)
    if pattern == "longformer":
        return lambda q, k, v, *g: ek.sliding_window_attention(
            q, k, v, P.WINDOW, global_mask=glob, global_qkv=tuple(g), key_padding_mask=real, dropout_p=p,
            backend=backend,
        )  # fmt: skip
    layout = ek.bigbird_layout(setup.seq, block_size=P.BLOCK, num_random_blocks=P.RANDOM_BLOCKS, seed=0)
    return lambda q, k, v: ek.block_sparse_attention(
        q, k, v, layout, key_padding_mask=real, dropout_p=p, backend=backend
    )


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
