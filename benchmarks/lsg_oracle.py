"""LSG attention core against its real peer, side by side in one run: etkd `cpu` and `reference` vs
lsg-converter's `LSGSelfAttention` (the attention layer behind the LSG checkpoints), forward and
forward+backward, on the same q, k, v.

    python -m etkd.benchmarks.lsg_oracle --types pooling,stride --repeats 3

Sparsity factor 4 by default: at lsg-converter's default of 2 its `LSGSelfAttention` builds empty sparse
windows (see `etkd_kernels/reference/lsg.py`), which would compare unequal work. lsg-converter is a test
dependency (`pip install --no-deps lsg-converter==0.1.9`).
"""

from __future__ import annotations

import json

import torch

from etkd_kernels import lsg_attention
from etkd_kernels.timing import environment, time_call

from . import harness
from .patterns.lsg import lsg_self_attention_class


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.split("\n\n")[0], heap=True, seq=4096, repeats=3)
    p.add_argument("--types", default="pooling,stride,block_stride,norm,bos_pooling")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    by_heap = harness.per_heap(a, "etkd.benchmarks.lsg_oracle", argv, json_flag="--json")
    if by_heap is not None:  # the whole comparison once per heap, each in a fresh process
        print(harness.heap_table(by_heap, "case", "lsg-converter", "etkd-cpu"))
        return 1 if any(r.get("status", "").startswith("error") for r in by_heap.values()) else 0
    LSG = lsg_self_attention_class()
    if LSG is None:
        p.error("lsg-converter is not installed: pip install --no-deps lsg-converter==0.1.9")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.seq, 64) for _ in range(3))
    real = torch.ones(1, a.seq, dtype=torch.bool)
    print(environment().as_dict())
    rows = []
    for st in a.types.split(","):
        peer = LSG(
            None, block_size=a.block, sparsity_factor=a.factor, sparsity_type=st, attention_dropout_prob=0.0
        )
        peer.eval()
        additive_mask = torch.zeros(1, 1, 1, a.seq)
        providers = {
            f"etkd-{b}": (
                lambda q, k, v, b=b: lsg_attention(
                    q,
                    k,
                    v,
                    block_size=a.block,
                    sparse_block_size=a.block,
                    sparsity_factor=a.factor,
                    sparsity_type=st,
                    num_global_tokens=1,
                    key_padding_mask=real,
                    backend=b,
                )
            )  # fmt: skip
            for b in ("cpu", "reference")
        }
        providers["lsg-converter"] = lambda q, k, v: peer(q, k, v, additive_mask.clone())
        for mode in ("fwd", "fwd_bwd"):
            ms = {}
            for name, f in providers.items():
                if mode == "fwd":
                    run = lambda f=f: torch.no_grad()(f)(q, k, v)
                else:
                    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
                    run = lambda f=f, leaves=leaves: f(*leaves).sum().backward()
                ms[name] = time_call(run, repeats=a.repeats).median * 1e3
            cpu = ms["etkd-cpu"]
            rows.append({"case": f"{st} {mode}", **{f"{n}_s": t / 1e3 for n, t in ms.items()}})
            cells = "  ".join(f"{n} {t:8.1f} ms" for n, t in ms.items())
            print(f"{st:12s} {mode:7s} {cells}  reference/cpu {ms['etkd-reference'] / cpu:.2f}x  "
                  f"lsg-converter/cpu {ms['lsg-converter'] / cpu:.2f}x", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": environment().as_dict(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
