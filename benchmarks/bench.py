"""`etkd bench`: paper Tables 2 and 4 — inference time and peak memory per model and sequence length — and,
with `--mode train`, the time and peak memory of one training step (forward + backward + AdamW step).

For each model family (full-attention baselines at 512 and extended to 4096; a teacher of every pattern with a
benchmark module, benchmarks/patterns/, at its paper settings) and its half-depth student (`make_student`,
every other layer), each implementation — HF's own model class (`to_hf` of the same weights; for a pattern
transformers has no class for, the baseline its module names as `Bench.peer`, run outside this process) and
our encoder on each available backend — runs in a fresh process (`harness.run_fresh`): a warm-up call, then `repeats` timed calls
(median and 20/80% quantiles) and their peak memory above the level after warm-up (`PeakMemory`: process
high-water mark on a CPU, `max_memory_allocated` on a GPU). `--dtype bf16|fp16` casts the weights of both sides. Output: the table
(on the CPU it leads with ours-vs-HF ratios), JSON with the environment, and a PNG plot.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from etkd_kernels.timing import model_step

from .harness import HEAPS, PeakMemory, add_heap_arg, environment, heaps_of, run_fresh, time_call
from .patterns import BENCHES
from .providers import DTYPES

# impl name -> the pattern whose `Bench.peer` it is (rows run by the peer, not by `worker`)
PEERS = {b.peer.impl: name for name, b in BENCHES.items() if b.peer is not None}

SIZES = {
    # name: (hidden, layers, heads, intermediate, vocab)
    "base": (768, 12, 12, 3072, 30522),  # BERT-base shapes, as the paper
    "small": (256, 4, 4, 1024, 8000),
    "tiny": (64, 2, 2, 256, 1000),
}
# family -> (attention, settings); "full" is BERT at 512 positions, "full-4096" the same extended (Table 4); the
# efficient patterns at the paper's sizes (their `Bench.settings`, as the attention-core benchmarks).
FAMILIES = {
    "full": ("full", {}),
    "full-4096": ("full", {}),
    **{name: (name, b.settings) for name, b in BENCHES.items()},
}


@dataclass
class Row:
    family: str
    student: bool
    impl: str  # "hf" or "etkd-<backend>"
    seq: int
    batch: int
    mode: str = "infer"  # or "train": forward + backward + AdamW step
    dtype: str = "fp32"
    params_m: float = 0.0
    time_s: float | None = None
    time_p20: float | None = None
    time_p80: float | None = None
    peak_mib: float | None = None
    status: str = "ok"
    heap: str | None = None  # the heap (harness.HEAPS) its process ran on; None: as `etkd bench` was started


def model_config(family: str, seq: int, shape: tuple[int, int, int, int, int], window: int | None = None):
    """The `EncoderConfig` of the benchmarked model of `family` at `shape` = (hidden, layers, heads, intermediate,
    vocab): its pattern's paper settings (`Bench.settings`, `window` replacing a window setting), dropout off,
    positions for `seq` tokens laid out as the HF class it exports to."""
    from etkd.models import EncoderConfig
    from etkd.models.patterns import HF_FAMILIES

    hidden, layers, heads, inter, vocab = shape
    attention, settings = FAMILIES[family]
    settings = dict(settings)
    if window is not None and "window" in settings:
        settings["window"] = window
    max_tokens = 512 if family == "full" else max(4096, seq)
    # Position tables as the HF classes the patterns' models export to (`Bench.positions`): RoBERTa-style ones
    # have two reserved rows (pad 1), others start at the family's offset; plain BERT for full attention.
    bench = BENCHES.get(attention)
    fam = HF_FAMILIES[bench.positions if bench else "bert"]
    extra_rows = 2 if fam.fairseq else fam.position_offset
    cfg = EncoderConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
        max_positions=max_tokens + extra_rows, position_style="padded" if fam.fairseq else "absolute",
        pad_token_id=1 if fam.fairseq else 0, position_offset=fam.position_offset, attention=attention,
        hidden_dropout=0.0, attention_dropout=0.0, **settings,
    )  # fmt: skip
    if bench and bench.configure:
        bench.configure(cfg, seq)
    return cfg


def build_model(
    family: str, size: str, seq: int, student: bool, window: int | None = None, meta: bool = False
):
    """The benchmarked model (eval); with `meta` only its config (the student's: half the layers)."""
    from etkd.models import EncoderModel, make_student

    cfg = model_config(family, seq, SIZES[size], window)
    if meta:
        return cfg.replace(num_layers=len(range(0, cfg.num_layers, 2))) if student else cfg
    torch.manual_seed(0)
    model = EncoderModel(cfg).eval()
    if student:
        model = make_student(model).eval()
    return model


def model_attentions() -> tuple[str, ...]:
    """The patterns a whole model of which has an HF class of its own to compare with (a `Bench` record and a
    transformers model family: `Pattern.hf_model_type`)."""
    from etkd.models.patterns import PATTERNS

    return tuple(name for name in BENCHES if PATTERNS[name].hf_model_type)


def add_attention_arg(ap) -> None:
    """`--attention`: the pattern of a whole-model comparison with HF (bench_bf16, hf_patch, train_step,
    dropout_placement), one of `model_attentions()`; default the `Bench` record with `model_default`."""
    choices = model_attentions()
    default = next(name for name in choices if BENCHES[name].model_default)
    ap.add_argument("--attention", choices=choices, default=default,
                    help=f"the model's attention pattern (default {default})")  # fmt: skip


def hf_pair(cfg):
    """(ours, HF's model of the pattern's family) with the same weights (`to_hf`), eval mode; seed 0."""
    from etkd.models import EncoderModel, to_hf

    torch.manual_seed(0)
    ours = EncoderModel(cfg).eval()
    return ours, to_hf(ours)


def peer_row(spec: dict, timeout: float) -> dict:
    """One row of a pattern's peer baseline (`Bench.peer`), with the shapes and settings of `build_model`'s."""
    row = spec["row"]
    cfg = build_model(row["family"], spec["size"], row["seq"], row["student"], spec.get("window"), meta=True)
    return BENCHES[PEERS[row["impl"]]].peer.row(spec, timeout, cfg)


def worker(spec: dict) -> dict:
    """One row, in its own process (`run_fresh("etkd.benchmarks.bench:worker", spec)`): build, warm up,
    peak memory of one call, then the timed calls. Returns the Row as a dict."""
    row = Row(**spec["row"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = build_model(row.family, spec["size"], row.seq, row.student, spec.get("window"))
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if row.impl == "hf":
        from etkd.models import to_hf

        model = to_hf(model)
    else:
        model.set_attention_backend(row.impl.removeprefix("etkd-"))
    model.to(device, DTYPES[row.dtype])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SIZES[spec["size"]][4], (row.batch, row.seq), generator=g).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    call = model_step(model, kwargs, row.mode)
    call()  # warm-up: lazy initialisation, allocator pools; in train mode AdamW's state
    with PeakMemory(device) as peak:  # every timed call is the same work: the peak is that of one call
        t = time_call(call, spec["repeats"], warmup=spec["warmup"] - 1, device=device)
    row.peak_mib, row.time_s, row.time_p20, row.time_p80 = peak.peak_mib, t.median, t.p20, t.p80
    return asdict(row)


def implementations(
    family: str, device: torch.device, backends: list[str] | None, dtype: torch.dtype = torch.float32
) -> list[str]:
    from etkd.models import PATTERNS
    from etkd_kernels.dispatch import BACKENDS, reasons

    attention = FAMILIES[family][0]
    op = PATTERNS[attention].op
    peer = getattr(BENCHES.get(attention), "peer", None)
    if peer is not None:
        impls = [peer.impl]  # transformers has no class for it: the pattern's own baseline
    else:
        impls = [] if PATTERNS[attention].hf_model_type is None else ["hf"]  # no transformers class
    for b in backends or BACKENDS:
        if not reasons(b, op, device, dtype):
            impls.append(f"etkd-{b}")
    return impls


def run_bench(
    families: list[str],
    seq_lens: list[int],
    batch: int,
    size: str,
    device: str = "cpu",
    backends: list[str] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    students: bool = True,
    timeout: float = 1800.0,
    window: int | None = None,
    progress: bool = True,
    mode: str = "infer",
    dtype: str = "fp32",
    heaps: list[str] | None = None,
) -> list[dict]:
    """Every row in a fresh process (`harness.run_fresh`), once per heap of `heaps` (harness.HEAPS; None: as this
    process was started)."""
    from tqdm import tqdm

    dev = torch.device(device)
    jobs = []
    for fam in families:
        for student in (False, True) if students else (False,):
            for impl in implementations(fam, dev, backends, DTYPES[dtype]):
                for seq in seq_lens:
                    if fam == "full" and seq > 512:
                        continue  # BERT's own 512 positions; "full-4096" is the Table 4 extension
                    for heap in heaps or [None]:
                        row = Row(fam, student, impl, seq, batch, mode, dtype, heap=heap)
                        jobs.append({"row": asdict(row), "size": size, "device": device, "repeats": repeats,
                                     "warmup": warmup, "window": window})  # fmt: skip
    rows = []
    for spec in tqdm(jobs, desc="etkd bench", disable=not progress):
        heap = spec["row"]["heap"]
        if spec["row"]["impl"] in PEERS and heap is not None:
            res = {"status": f"skipped: the peer's side environment does not take --heap (heap {heap})"}
        elif spec["row"]["impl"] in PEERS:
            res = peer_row(spec, timeout)
        else:
            res = run_fresh("etkd.benchmarks.bench:worker", spec, timeout, heap=heap)
            if heap not in (None, "default") and "peak_mib" in res:
                res["peak_mib"] = (
                    None  # a warm heap serves the call from pages kept since the warm-up: not a peak
                )
        rows.append(res if "time_s" in res else {**spec["row"], **res})
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_tables(rows: list[dict], seq_lens: list[int], device: str) -> str:
    """Paper Table 2 layout (time and memory per seq len); on the CPU, HF/etkd ratios first (for a pattern with
    a peer baseline, peer/etkd)."""
    lines = []
    keyed = {(r["family"], r["student"], r["impl"], r["seq"]): r for r in rows}
    groups = sorted(
        {(r["family"], r["student"]) for r in rows}, key=lambda g: (list(FAMILIES).index(g[0]), g[1])
    )
    baselines = ("hf", *PEERS)
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (i not in baselines, i))
    if device == "cpu":
        lines.append(
            "Ratios HF / etkd from one run (> 1: etkd faster or smaller"
            + "".join(f"; {name}: {impl} / etkd" for impl, name in PEERS.items())
            + "). Absolute CPU times mean little."
        )
        head = f"{'model':22s} {'etkd impl':16s}" + "".join(f" {'time ' + str(s):>10s}" for s in seq_lens)
        head += "".join(f" {'mem ' + str(s):>10s}" for s in seq_lens)
        lines += [head, "-" * len(head)]
        for fam, st in groups:
            peer = getattr(BENCHES.get(FAMILIES[fam][0]), "peer", None)
            base = peer.impl if peer else "hf"
            for impl in impls:
                if impl in baselines:
                    continue
                cells_t, cells_m, any_ = [], [], False
                for s in seq_lens:
                    hf, us = keyed.get((fam, st, base, s)), keyed.get((fam, st, impl, s))
                    ok = hf and us and hf["status"] == "ok" and us["status"] == "ok"
                    any_ |= bool(us)
                    cells_t.append(f"{hf['time_s'] / us['time_s']:10.2f}" if ok else f"{'-':>10s}")
                    okm = ok and us["peak_mib"] and hf["peak_mib"] is not None
                    cells_m.append(f"{hf['peak_mib'] / us['peak_mib']:10.2f}" if okm else f"{'-':>10s}")
                if any_:
                    name = ("  ↳ student " if st else "") + fam
                    lines.append(f"{name:22s} {impl:16s} " + " ".join(cells_t) + " " + " ".join(cells_m))
        lines.append("")
    head = f"{'model':22s} {'params M':>8s} {'impl':16s}" + "".join(
        f" {'time s ' + str(s):>11s}" for s in seq_lens
    )
    head += "".join(f" {'MiB ' + str(s):>9s}" for s in seq_lens)
    lines += [head, "-" * len(head)]
    for fam, st in groups:
        for impl in impls:
            rs = [keyed.get((fam, st, impl, s)) for s in seq_lens]
            if not any(rs):
                continue
            params = next((r["params_m"] for r in rs if r and r.get("params_m")), None)
            name = ("  ↳ student " if st else "") + fam
            t = "".join(
                f" {_fmt(r and r['time_s'], '11.3f') if r and r['status'] == 'ok' else '-':>11s}" for r in rs
            )
            m = "".join(
                f" {_fmt(r and r['peak_mib'], '9.0f') if r and r['status'] == 'ok' else '-':>9s}" for r in rs
            )
            lines.append(f"{name:22s} {_fmt(params, '8.1f')} {impl:16s}{t}{m}")
            for r in rs:
                if r and r["status"] != "ok":
                    lines.append(f"{'':22s} {'':8s} {'':16s} seq {r['seq']}: {r['status']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in rows:
        if r["status"] == "ok":
            key = f"{r['family']}{' student' if r['student'] else ''} [{r['impl']}]"
            series.setdefault(key, []).append((r["seq"], r["time_s"], r["peak_mib"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=key)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=key)
    mode = "training step" if rows and rows[0].get("mode") == "train" else "inference"
    for ax, what in zip(axes, (f"{mode} time (s)", "peak extra memory (MiB)")):
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("bench", help="paper Tables 2/4: inference time and peak memory, ours vs HF")
    p.add_argument("--models", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", choices=list(SIZES), default="base", help="model shapes (base = BERT-base)")
    p.add_argument("--backends", default=None, help="comma list of etkd backends (default: every available)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="attention window of the patterns that have one (default: their paper setting)",
    )
    p.add_argument("--no-students", action="store_true", help="teachers only")
    p.add_argument("--mode", choices=("infer", "train"), default="infer",
                   help="infer: a forward pass under no_grad; train: forward + backward + AdamW step")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights of both sides cast to it")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measured row")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_heap_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    families = [f.strip() for f in args.models.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        from etkd.distill.errors import UserError

        raise UserError(f"--models: unknown {unknown}; expected some of {list(FAMILIES)}")
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    try:
        heaps = heaps_of(args.heap)
    except ValueError as exc:
        from etkd.distill.errors import UserError

        raise UserError(str(exc)) from None
    env = environment(args.device)
    print(f"etkd bench: mode={args.mode} dtype={args.dtype} size={args.size} batch={args.batch} "
          f"seq={args.seq_lens} device={args.device} ({env.line()})")  # fmt: skip
    rows = run_bench(families, args.seq_lens, args.batch, args.size, args.device, backends, args.repeats,
                     args.warmup, not args.no_students, args.timeout, args.window, args.progress, mode=args.mode,
                     dtype=args.dtype, heaps=heaps)  # fmt: skip
    for r in rows:
        r["environment"] = env.as_dict()
    device = torch.device(args.device).type
    if heaps:  # one table per heap, each comparing rows of that heap
        table = "\n\n".join(f"heap {h}: {HEAPS[h]}\n" + format_tables([r for r in rows if r.get("heap") == h],
                              args.seq_lens, device) for h in heaps)  # fmt: skip
    else:
        table = format_tables(rows, args.seq_lens, device)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(
            {"environment": env.as_dict(), "args": vars(args) | {"func": None}, "rows": rows}, f, indent=2
        )
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("```\n" + table + "\n```\n")
    plot(rows, os.path.join(args.out, "bench.png"))
    print(f"\nwrote {args.out}/bench.json, bench.md, bench.png")
    return 0
