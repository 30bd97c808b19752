"""`etkd data-stats FILES`: sequence-length summary and tag distribution of CoNLL-format NER sets
(paper Tables 1 and 9) and a length-distribution plot (histogram + Gaussian KDE, paper Figure 1).

Length = words per sequence (or sub-word tokens with `--tokenizer`); a sequence is a sentence or, with
`--unit document`, everything between `-DOCSTART-` lines. std is the sample std (ddof=1, as pandas'
`describe`); quartiles interpolate linearly (numpy's default). Tag shares: p over all tokens, p¹ over the
non-O tokens.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
from typing import Any

import numpy as np

from .tasks.ner import CONLL_LABELS, read_conll

THRESHOLDS = (512, 4096)


def length_summary(lengths: list[int]) -> dict[str, float]:
    """count, mean, std (ddof=1), min, 25%, 50%, 75%, max, and the share of lengths above 512 and 4096."""
    if not lengths:
        raise ValueError("lengths: expected at least one sequence, got none")
    x = np.asarray(lengths, dtype=np.float64)
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    out = {
        "count": float(len(x)),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "min": float(x.min()),
        "25%": float(q25),
        "50%": float(q50),
        "75%": float(q75),
        "max": float(x.max()),
    }
    for t in THRESHOLDS:
        out[f">{t}"] = float((x > t).mean())
    return out


def tag_distribution(tags: list[str]) -> dict[str, dict[str, float]]:
    """{tag: {"count", "p", "p1"}} in CoNLL order (then others sorted), plus "Total"; p1 is None for O."""
    counts = collections.Counter(tags)
    total = sum(counts.values())
    non_o = total - counts.get("O", 0)
    order = [t for t in CONLL_LABELS if t in counts] + sorted(set(counts) - set(CONLL_LABELS))
    out: dict[str, dict[str, Any]] = {}
    for t in order:
        out[t] = {
            "count": counts[t],
            "p": counts[t] / total if total else 0.0,
            "p1": None if t == "O" else (counts[t] / non_o if non_o else 0.0),
        }
    out["Total"] = {"count": total, "p": 1.0 if total else 0.0, "p1": 1.0 if non_o else 0.0}
    return out


def sequence_lengths(sequences: list[dict[str, Any]], tokenizer=None) -> list[int]:
    if tokenizer is None:
        return [len(s["tokens"]) for s in sequences]
    # verbose=False: no "sequence length is longer than the maximum" warning; lengths are what we measure.
    enc = tokenizer([s["tokens"] for s in sequences], is_split_into_words=True, add_special_tokens=False,
                    verbose=False)  # fmt: skip
    return [len(ids) for ids in enc["input_ids"]]


def file_stats(path: str, unit: str = "sentence", tokenizer=None, group_sentences: int | None = None
               ) -> dict[str, Any]:  # fmt: skip
    seqs = read_conll(path, unit, group_sentences)
    lengths = sequence_lengths(seqs, tokenizer)
    return {
        "file": path,
        "unit": unit,
        "lengths": lengths,
        "length": length_summary(lengths),
        "tags": tag_distribution([t for s in seqs for t in s["tags"]]),
    }


def _short(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:g}"


def markdown(stats: list[dict[str, Any]], names: list[str]) -> str:
    keys = ["mean", "std", "min", "25%", "50%", "75%", "max", ">512", ">4096"]
    lines = [
        "### Sequence length",
        "",
        "| Length | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in keys:
        label = {"std": "std. dev.", ">512": "> 512", ">4096": "> 4096"}.get(k, k)
        vals = [
            f"{100 * s['length'][k]:.1f}%" if k.startswith(">") else f"{s['length'][k]:.1f}" for s in stats
        ]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines += ["", "### Tag distribution", ""]
    tags = []
    for s in stats:
        tags += [t for t in s["tags"] if t not in tags and t != "Total"]
    tags.append("Total")
    lines.append("| Type | " + " | ".join(f"{n} # | {n} p | {n} p¹" for n in names) + " |")
    lines.append("|---|" + "---|---|---|" * len(names))
    for t in tags:
        cells = []
        for s in stats:
            d = s["tags"].get(t)
            if d is None:
                cells += ["-", "-", "-"]
            else:
                cells += [_short(d["count"]), f"{d['p']:.3f}", "-" if d["p1"] is None else f"{d['p1']:.3f}"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(stats: list[dict[str, Any]], names: list[str], path: str) -> None:
    """Density histogram and Gaussian KDE of each file's lengths on one axis (log-x when they span > 2
    decades, as CoNLL-2003 vs GONERD do)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    all_len = np.concatenate([np.asarray(s["lengths"], dtype=float) for s in stats])
    log = all_len.min() > 0 and all_len.max() / max(all_len.min(), 1) > 100
    for s, name in zip(stats, names):
        x = np.asarray(s["lengths"], dtype=float)
        bins = np.geomspace(max(x.min(), 1), x.max() + 1, 40) if log else 40
        ax.hist(x, bins=bins, density=True, alpha=0.35, label=f"{name} (n={len(x)})")
        if len(x) > 1 and x.std() > 0:
            from scipy.stats import gaussian_kde

            grid = np.geomspace(max(x.min(), 1), x.max(), 200) if log else np.linspace(x.min(), x.max(), 200)
            ax.plot(grid, gaussian_kde(x)(grid))
    if log:
        ax.set_xscale("log")
    for t in THRESHOLDS:
        if all_len.max() > t / 2:
            ax.axvline(t, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        from .finetune import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, "ner")
    names = args.names.split(",") if args.names else [os.path.basename(f) for f in args.files]
    if len(names) != len(args.files):
        raise ValueError(f"--names: expected {len(args.files)} names, got {len(names)}")
    unit = args.unit or ("document" if args.group_sentences else "sentence")
    stats = [file_stats(f, unit, tokenizer, args.group_sentences) for f in args.files]
    md = markdown(stats, names)
    print(md)
    if args.out_dir is None:
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "data_stats.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "data_stats.json"), "w") as f:
        json.dump(
            {n: {k: v for k, v in s.items() if k != "lengths"} for n, s in zip(names, stats)}, f, indent=2
        )
    with open(os.path.join(args.out_dir, "lengths.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stat"] + names)
        for k in stats[0]["length"]:
            w.writerow([k] + [s["length"][k] for s in stats])
    plot(stats, names, os.path.join(args.out_dir, "lengths.png"))
    print(
        f"wrote data_stats.md, data_stats.json, lengths.csv, lengths.png to {os.path.abspath(args.out_dir)}"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data-stats", help="length summary + tag distribution of CoNLL files (Tables 1, 9)"
    )
    p.add_argument("files", nargs="+", help="CoNLL-format files")
    p.add_argument("--names", help="comma-separated display names (default: file names)")
    p.add_argument("--ner-unit", "--unit", dest="unit", choices=("sentence", "document"), default=None,
                   help="a sequence is a sentence (default) or a document (between -DOCSTART- lines)")  # fmt: skip
    p.add_argument("--ner-group-sentences", dest="group_sentences", type=int, metavar="N", default=None,
                   help="a document is N consecutive sentences (for files without -DOCSTART-)")  # fmt: skip
    p.add_argument("--tokenizer", help="count sub-word tokens of this tokenizer instead of words")
    p.add_argument(
        "--out-dir",
        default=None,
        help="also write data_stats.md/.json, lengths.csv/.png into this folder (default: print the table only)",
    )
    p.set_defaults(func=run)
