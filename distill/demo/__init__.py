"""`etkd demo`: the paper's pipeline end to end on a built-in default, sized for ~10 minutes on 2 CPU cores.

  0. built-in data: a synthetic language with its tokenizer, an MLM corpus of short and long documents,
     a CoNLL NER set and a two-class classification set (`demo.data`)
  1. a small full-attention teacher (RoBERTa-style), MLM-pretrained briefly on the corpus
  2. convert it to Longformer (positions copied out to --max-positions, global projections from local)
  3. short MLM pretraining of the converted model on long inputs
  4. distil it to half depth (DistilBERT-style: 2·MLM + 5·KL at T=2 + 1·cosine)
  5. fine-tune the full teacher, the Longformer teacher and the student on NER and classification
  6. the long-range sets (`demo.longrange`): each model's step-5 checkpoints fine-tuned further on long
     documents whose evidence lies > 640 tokens away (classification after a curriculum on the task's
     short documents); the 512-token teacher against the 4096-token models
  7. `etkd report`: scores and student/teacher retention, and the long-range table
  8. `etkd bench`: inference time and peak memory, ours vs HF, at 2,048 tokens
  9. the kernel comparison table: every pattern x every backend that runs here, time and max deviation
     from `reference`, measured side by side in one run
Every step is the same `etkd` subcommand a user runs; the paper-scale run is the same commands with
real checkpoints, datasets and sizes (see README). Files go to one folder (--out).
"""

from __future__ import annotations

import json
import os
import time

import torch


def write_all(directory: str, seed: int = 0, n_long_train: int = 160, n_long_dev: int = 40) -> dict[str, str]:
    """Every built-in file under `directory` (the short sets of `demo.data`, and the long-range sets of
    `demo.longrange`); returns their paths by name."""
    from . import data, longrange  # here, so `python -m etkd.distill.demo.longrange` runs a fresh module

    os.makedirs(directory, exist_ok=True)
    paths = {
        "tokenizer": os.path.join(directory, "tokenizer"),
        "corpus": data.write_corpus(os.path.join(directory, "corpus.jsonl"), seed=seed),
        "ner_train": data.write_conll(os.path.join(directory, "ner_train.conll"), seed=seed + 1),
        "ner_dev": data.write_conll(os.path.join(directory, "ner_dev.conll"), n_docs=15, seed=seed + 101),
        "cls_train": data.write_classification(os.path.join(directory, "cls_train.jsonl"), seed=seed + 2),
        "cls_dev": data.write_classification(
            os.path.join(directory, "cls_dev.jsonl"), n=120, seed=seed + 102
        ),
        **longrange.write_all(directory, seed=seed, n_train=n_long_train, n_dev=n_long_dev),
    }
    data.tokenizer(paths["tokenizer"])
    return paths


def kernel_table(seq: int = 1024, heads: int = 4, head_dim: int = 64, repeats: int = 3) -> list[dict]:
    import etkd_kernels as ek
    from etkd.benchmarks.harness import time_call
    from etkd_kernels.dispatch import reasons

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, heads, seq, head_dim).unbind(0)
    real = torch.ones(1, seq, dtype=torch.bool)
    real[:, seq - seq // 8 :] = False
    glob = torch.zeros(1, seq, dtype=torch.bool)
    glob[:, 0] = True
    cases = {
        "full": ("full", lambda be, q, k, v: ek.full_attention(q, k, v, key_padding_mask=real, backend=be)),
        "sliding_window(256)+global": (
            "sliding_window",
            lambda be, q, k, v: ek.sliding_window_attention(
                q, k, v, 256, global_mask=glob, key_padding_mask=real, backend=be
            ),
        ),
        "block_sparse(longformer 64)": (
            "block_sparse",
            lambda be, q, k, v: ek.block_sparse_attention(
                q, k, v, ek.longformer_layout(seq, 64), key_padding_mask=real, backend=be
            ),
        ),
        "lsg(64)": (
            "lsg",
            lambda be, q, k, v: ek.lsg_attention(q, k, v, block_size=64, key_padding_mask=real, backend=be),
        ),
        "nystrom(64)": (
            "nystrom",
            lambda be, q, k, v: ek.nystrom_attention(q, k, v, 64, key_padding_mask=real, backend=be),
        ),
    }
    rows = []
    for label, (op, fn) in cases.items():
        ref = fn("reference", q, k, v)
        ref_time = None
        for backend in ("reference", "cpu", "triton", "cuda"):
            why = reasons(backend, op, q.device, q.dtype)
            if why:
                rows.append({"op": label, "backend": backend, "status": "; ".join(why)[:60]})
                continue
            out = fn(backend, q, k, v)
            err = (out - ref).abs().max().item()
            t_fwd = time_call(lambda: fn(backend, q, k, v), repeats).median
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            t_fb = time_call(lambda: fn(backend, qq, kk, vv).sum().backward(), repeats).median
            ref_time = ref_time or (t_fwd, t_fb)
            rows.append(
                {
                    "op": label,
                    "backend": backend,
                    "status": "ok",
                    "fwd_ms": 1e3 * t_fwd,
                    "fwd_bwd_ms": 1e3 * t_fb,
                    "speedup_fwd_vs_reference": ref_time[0] / t_fwd,
                    "speedup_fwd_bwd_vs_reference": ref_time[1] / t_fb,
                    "max_abs_err_vs_reference": err,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'op':30s} {'backend':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'x ref fwd':>9s} {'x ref f+b':>9s} {'max err':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['op']:30s} {r['backend']:10s} unavailable: {r['status']}")
            continue
        lines.append(
            f"{r['op']:30s} {r['backend']:10s} {r['fwd_ms']:9.1f} {r['fwd_bwd_ms']:11.1f} "
            f"{r['speedup_fwd_vs_reference']:9.2f} {r['speedup_fwd_bwd_vs_reference']:9.2f} "
            f"{r['max_abs_err_vs_reference']:9.1e}"
        )
    return "\n".join(lines)


def _etkd(*argv: str) -> None:
    from ..cli import main

    print(f"\n$ etkd {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"etkd demo: step `etkd {argv[0]}` failed with exit code {code}")


def _finetune_timed(argv: list[str]) -> dict[str, float]:
    """`etkd finetune ...` with its wall time and peak resident memory above the start level."""
    from etkd.benchmarks.harness import PeakMemory

    t0 = time.perf_counter()
    with PeakMemory() as peak:
        _etkd(*argv)
    return {"seconds": time.perf_counter() - t0, "peak_mib": peak.peak_mib}


def cls_f1(path: str, predicted: list[int]) -> float:
    """F1 (percent) of the positive class of a jsonl classification set (`label` per line) given the
    predicted labels in file order."""
    from sklearn.metrics import f1_score

    with open(path) as f:
        gold = [json.loads(line)["label"] for line in f if line.strip()]
    return 100.0 * f1_score(gold, predicted, zero_division=0)


def long_table(rows: list[dict]) -> str:
    """The long-range table: one row per model, scores, retention vs the Longformer teacher, cost."""
    head = (f"{'model':20s} {'context':>7s} {'NER F1':>7s} {'codename':>8s} {'ordinary':>8s} {'cls F1':>7s} "
            f"{'cls acc':>7s} {'ret NER':>7s} {'ret cls':>7s} {'ft s NER':>8s} {'ft s cls':>8s} {'MiB NER':>8s} "
            f"{'MiB cls':>8s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    teacher = next((r for r in rows if r["name"] == "longformer"), None)

    def ret(r: dict, key: str) -> str:
        if r["name"] != "longformer-student" or not teacher or not teacher[key]:
            return "-"
        return f"{100 * r[key] / teacher[key]:.1f}%"

    for r in rows:
        lines.append(
            f"{r['name']:20s} {r['context']:7d} {r['f1']:7.1f} {r['f1_codename']:8.1f} {r['f1_ordinary']:8.1f} "
            f"{r['cls_f1']:7.1f} {r['accuracy']:7.1f} {ret(r, 'f1'):>7s} {ret(r, 'cls_f1'):>7s} {r['seconds_ner']:8.0f} "
            f"{r['seconds_cls']:8.0f} {r['peak_mib_ner']:8.0f} {r['peak_mib_cls']:8.0f}"
        )
    return "\n".join(lines)


def seeds_table(runs: dict[int, dict]) -> str:
    """The long-range table over seeds (markdown): per model, each score as mean ± sample standard deviation
    with every seed's value, then what separates the models per seed: the gaps of the 4096-token models over
    the 512-token teacher and the student's retention of the Longformer teacher.

    runs: seed -> that seed's `long_range.json` (`{"models": [row, ...]}`, rows as `pipeline` writes them).
    """
    from ..metrics import spread

    seeds = sorted(runs)
    by = {s: {r["name"]: r for r in runs[s]["models"]} for s in seeds}
    names = [r["name"] for r in runs[seeds[0]]["models"]]

    def cell(values: list[float]) -> str:
        m = spread(values)
        return f"{m['mean']:.1f} ± {m['std']:.1f} ({' / '.join(f'{v:.1f}' for v in values)})"

    cols = (("NER F1", "f1"), ("codename", "f1_codename"), ("ordinary", "f1_ordinary"), ("cls F1", "cls_f1"),
            ("cls acc", "accuracy"))  # fmt: skip
    lines = [f"Seeds {' '.join(map(str, seeds))}: mean ± sample standard deviation (each seed's value)", "",
             "| model | context | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for name in names:
        row = [by[s][name] for s in seeds]
        lines.append(
            f"| {name} | {row[0]['context']} | "
            + " | ".join(cell([r[k] for r in row]) for _, k in cols)
            + " |"
        )
    short, long, student = "roberta-full", "longformer", "longformer-student"
    derived = []
    for model in (long, student):
        # cls accuracy beside cls F1: a model at chance that predicts one class scores F1 0 or ~60 on it
        for label, key in (("NER F1", "f1"), ("cls F1", "cls_f1"), ("cls acc", "accuracy")):
            derived.append(
                (f"{label} gap, {model} − {short}", [by[s][model][key] - by[s][short][key] for s in seeds])
            )
    for label, key in (("NER F1", "f1"), ("cls F1", "cls_f1")):
        derived.append((f"{label} retention (%), {student} / {long}",
                        [100 * by[s][student][key] / by[s][long][key] if by[s][long][key] else float("nan") for s in seeds]))  # fmt: skip
    lines += ["", "| per seed | mean ± std (each seed) |", "|---|---|"]
    lines += [f"| {label} | {cell(values)} |" for label, values in derived]
    return "\n".join(lines)


def run_seeds(args) -> None:
    """`pipeline` once per seed of `--seeds` (each in OUT/seed<S>), then `seeds_table` over them, also written to
    OUT/long_range_seeds.json (every seed's long_range.json) and OUT/long_range_seeds.md."""
    import argparse

    runs = {}
    for seed in args.seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed, "out": os.path.join(args.out, f"seed{seed}")})
        print(f"\n=== seed {seed} -> {one.out}", flush=True)
        pipeline(one)
        with open(os.path.join(one.out, "long_range.json")) as f:
            runs[seed] = json.load(f)
    text = seeds_table(runs)
    print("\nLong-range sets over seeds\n" + text)
    with open(os.path.join(args.out, "long_range_seeds.json"), "w") as f:
        json.dump({str(s): r for s, r in runs.items()}, f, indent=2)
    with open(os.path.join(args.out, "long_range_seeds.md"), "w") as f:
        f.write(text + "\n")


def _steps_1_to_5(args, out: str, files: dict[str, str], models, quiet: list[str], finetune) -> None:
    """Steps 1-5 of `pipeline`: the teacher, its Longformer conversion and pretraining, the student, and their
    short-set fine-tunes (`models`: (name, path, teacher name) where the steps leave each model)."""
    from etkd.models import EncoderConfig, EncoderModel

    from . import data

    tok, steps = files["tokenizer"], args.steps
    n_vocab = len(data.vocabulary())
    (_, teacher, _), (_, long_teacher, _), (_, student, _) = models
    results = os.path.join(out, "results")
    print("[1] a small full-attention teacher (RoBERTa-style, 512 tokens), MLM-pretrained on the corpus")
    cfg = EncoderConfig(
        vocab_size=n_vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        intermediate_size=4 * args.hidden, max_positions=512 + 2, position_style="padded", pad_token_id=0,
        layer_norm_eps=1e-5, attention="full", head="mlm", hidden_dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    EncoderModel(cfg).save_pretrained(os.path.join(out, "teacher_init"))
    # --overwrite: a rerun of the demo replaces its earlier runs (output folders refuse them otherwise)
    common = ["--data", files["corpus"], "--tokenizer", tok, "--seed", str(args.seed), "--overwrite", *quiet]
    _etkd("pretrain", "--model", os.path.join(out, "teacher_init"), "--output-dir", os.path.join(out, "teacher"),
          "--max-steps", str(2 * steps), "--batch-size", "16", "--lr", "1e-3", "--short-length", "64",
          "--long-length", "512", "--long-fraction", "0.1", "--save-every", str(2 * steps), *common)  # fmt: skip

    print(f"[2] convert to Longformer: {args.max_positions} positions, window {args.window}")
    _etkd("convert", "--from", teacher, "--to", "longformer", "--max-positions", str(args.max_positions),
          "--window", str(args.window), "--out", os.path.join(out, "longformer"))  # fmt: skip

    print("[3] short MLM pretraining of the converted model on long inputs")
    _etkd("pretrain", "--model", os.path.join(out, "longformer"), "--output-dir", os.path.join(out, "longformer_pt"),
          "--max-steps", str(steps // 2), "--batch-size", "4", "--lr", "5e-4", "--short-length", "128",
          "--long-length", str(min(1024, args.max_positions)), "--long-fraction", "0.5", "--save-every", str(steps), *common)  # fmt: skip

    print("[4] distil to half depth (every other layer)")
    _etkd("distill", "--teacher", long_teacher, "--output-dir", os.path.join(out, "student"),
          "--max-steps", str(steps), "--batch-size", "8", "--lr", "5e-4", "--short-length", "128",
          "--long-length", str(min(1024, args.max_positions)), "--long-fraction", "0.25", "--save-every", str(steps), *common)  # fmt: skip

    print("[5] fine-tune teachers and student on the short NER and classification sets")
    for task, train, dev in (
        ("conll2003", files["ner_train"], files["ner_dev"]),
        ("sst2", files["cls_train"], files["cls_dev"]),
    ):
        for name, path, teacher_name in models:
            # NER gets more steps: half its sentences type a codename by its declaration, which takes longer
            # to learn than the classification set (measured: F1 ~70 after 150 steps, 100 after 600)
            finetune(name, path, teacher_name, task, train, dev, results, args.ner_steps if task == "conll2003" else steps, 16)  # fmt: skip


def _global_prefix(model_dir: str) -> list[str]:
    """`--global-prefix` (the NER documents' opening paragraph) for a model whose pattern has global tokens;
    nothing for the others (the full-attention teacher), which would only be told it is ignored."""
    from etkd.models import EncoderConfig
    from etkd.models.patterns import PATTERNS

    from . import longrange

    attention = EncoderConfig.load(model_dir).attention
    return ["--global-prefix", str(longrange.OPENING)] if PATTERNS[attention].global_tokens else []


def pipeline(args) -> None:
    from ..errors import UserError
    from ..tasks import ner
    from . import longrange

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"[0] built-in data -> {out}/data")
    files = write_all(
        os.path.join(out, "data"), seed=args.seed, n_long_train=args.long_train, n_long_dev=args.long_dev
    )
    tok = files["tokenizer"]
    quiet = ["--no-progress"] if args.no_progress else []
    teacher = os.path.join(out, "teacher", "final")
    long_teacher = os.path.join(out, "longformer_pt", "final")
    student = os.path.join(out, "student", "student")
    models = [("roberta-full", teacher, None), ("longformer", long_teacher, None),
              ("longformer-student", student, "longformer")]  # fmt: skip
    results = os.path.join(out, "results")

    def finetune(name, path, teacher_name, task, train, dev, results, steps, batch, *extra, lr=2e-3):
        tag = os.path.basename(results)
        return _finetune_timed(
            ["finetune", "--task", task, "--model", path, "--tokenizer", tok, "--train-file", train,
             *(["--eval-file", dev, "--output", os.path.join(results, f"{name}-{task}.json")] if dev else []),
             "--output-dir", os.path.join(out, "finetune", f"{name}-{task}-{tag}"),
             "--max-steps", str(steps), "--batch-size", str(batch), "--learning-rate", str(lr),
             "--seed", str(args.seed), "--overwrite", "--name", name,
             *(["--teacher", teacher_name] if teacher_name else []), *extra, *quiet]
        )  # fmt: skip

    def tuned(name: str, task: str) -> str:  # the step-5 model of `name` on `task`
        return os.path.join(out, "finetune", f"{name}-{task}-{os.path.basename(results)}", "model")

    if args.long_only:
        missing = [p for name, _, _ in models for task in ("conll2003", "sst2")
                   for p in (tuned(name, task), os.path.join(results, f"{name}-{task}.json")) if not os.path.exists(p)]  # fmt: skip
        if missing:
            raise UserError(f"--long-only: {out} holds no finished steps 1-5 of an earlier demo run (missing "
                            f"{', '.join(missing)}); run the demo there without --long-only first")  # fmt: skip
        print("[1-5] --long-only: the step-5 checkpoints of the earlier run in this folder")
    else:
        _steps_1_to_5(args, out, files, models, quiet, finetune)

    long_results = os.path.join(out, "results_long")
    # names the folders of the curriculum's first fine-tunes (they write no scores)
    short_results = os.path.join(out, "results_long_short")
    dev_docs = ner.read_conll(files["long_ner_dev"], "document")
    rows = []
    ceiling = {c: longrange.context_ceiling(dev_docs, c) for c in (512, args.max_positions)}
    lo, hi = longrange.LENGTH
    print(f"[6] long-range sets: {lo:,}-{hi:,}-token documents, evidence > {longrange.MIN_GAP} tokens away "
          f"({os.path.dirname(files['long_ner_train'])}/long_*). The best F1 a model can reach on the NER dev set "
          f"when it sees 512 tokens at a time (windows, stride 128): {ceiling[512]['f1']:.1f} (codename mentions "
          f"{ceiling[512]['f1_codename']:.1f}); with {args.max_positions}: {ceiling[args.max_positions]['f1']:.1f}. "
          "Classification truncated to 512 tokens keeps no evidence (50% at best).")  # fmt: skip
    if args.long_steps:
        print(f"    each model's step-5 checkpoint (NER / classification) fine-tuned further on the long set of "
              f"the same task, {args.long_steps} (NER) / {args.long_cls_steps} (classification) steps of {args.long_batch} documents each; the Longformers give the "
              f"NER documents' opening paragraph ({longrange.OPENING} tokens) global attention (--global-prefix)")  # fmt: skip
        if args.long_cls_short_steps:
            print(f"    classification first takes {args.long_cls_short_steps} steps on the task's short documents "
                  f"({longrange.SHORT[0]}-{longrange.SHORT[1]} tokens, {os.path.basename(files['long_cls_short_train'])}): "
                  "a curriculum, where [CLS] learns to find the opinions among fewer tokens")  # fmt: skip
    else:
        print("    (`--long-steps 0`: no fine-tuning on them)")

    for name, path, teacher_name in models if args.long_steps else []:
        row = {"name": name, "context": 512 if path == teacher else args.max_positions}
        cost = finetune(name, tuned(name, "conll2003"), teacher_name, "conll2003", files["long_ner_train"],
                        files["long_ner_dev"], long_results, args.long_steps, args.long_batch, "--ner-unit",
                        "document", "--eval-batch-size", "4", *_global_prefix(tuned(name, "conll2003")),
                        lr=args.long_lr)  # fmt: skip
        row.update(seconds_ner=cost["seconds"], peak_mib_ner=cost["peak_mib"])
        with open(os.path.join(long_results, f"{name}-conll2003.json")) as f:
            row["f1"] = json.load(f)["metrics"]["f1"]
        with open(os.path.join(long_results, f"{name}-conll2003_predictions.json")) as f:
            row.update(longrange.breakdown(dev_docs, json.load(f)["eval"]))
        start, first = tuned(name, "sst2"), {"seconds": 0.0, "peak_mib": 0.0}
        if args.long_cls_short_steps:  # the curriculum: the task's short documents first
            first = finetune(name, start, teacher_name, "sst2", files["long_cls_short_train"], None, short_results,
                             args.long_cls_short_steps, args.long_batch, lr=args.long_lr)  # fmt: skip
            start = os.path.join(out, "finetune", f"{name}-sst2-{os.path.basename(short_results)}", "model")
        cost = finetune(name, start, teacher_name, "sst2", files["long_cls_train"],
                        files["long_cls_dev"], long_results, args.long_cls_steps, args.long_batch, "--eval-batch-size",
                        "4", lr=args.long_lr)  # fmt: skip
        row.update(
            seconds_cls=first["seconds"] + cost["seconds"],
            peak_mib_cls=max(first["peak_mib"], cost["peak_mib"]),
        )
        with open(os.path.join(long_results, f"{name}-sst2.json")) as f:
            row["accuracy"] = json.load(f)["metrics"]["accuracy"]
        with open(os.path.join(long_results, f"{name}-sst2_predictions.json")) as f:
            row["cls_f1"] = cls_f1(files["long_cls_dev"], json.load(f)["eval"])
        rows.append(row)

    print("[7] retention report" + (": short sets, then the long-range table" if rows else ""))
    _etkd(
        "report", results, "--pair", "longformer-student=longformer", "--out-dir", os.path.join(out, "report")
    )
    if rows:
        print(
            f"\nLong-range sets (dev: {args.long_dev} documents each). NER F1 = all entities; codename = the "
            f"mentions whose type was declared > {longrange.MIN_GAP} tokens earlier; ordinary = entities known from their own "
            f"words; cls F1 / acc = F1 of the positive class and accuracy with all {longrange.OPINIONS} opinion sentences > "
            f"{longrange.MIN_GAP} tokens from the start; ret = student / "
            "Longformer teacher; ft s / MiB = fine-tune wall time and peak memory (training + evaluation)\n"
        )
        print(long_table(rows))
    with open(os.path.join(out, "long_range.json"), "w") as f:
        json.dump({"ceiling": {str(c): v for c, v in ceiling.items()}, "models": rows}, f, indent=2)

    if not (args.skip_bench or args.long_only):
        print("[8] etkd bench: ours vs HF, inference time and peak memory")
        # Longformer x (teacher, student) x (HF, etkd cpu) at one length = 4 fresh-process rows (~1 min);
        # `etkd bench` with its defaults covers every family, backend and length.
        _etkd("bench", "--size", "small", "--batch", "2", "--seq-lens", "2048", "--models", "longformer",
              "--backends", "cpu", "--repeats", "3", "--out", os.path.join(out, "bench"), *quiet)  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser("demo", help="the pipeline end to end on built-in data (~10 min on 2 CPU cores)")
    p.add_argument("--out", default="demo_out", help="folder for every file the demo writes")
    p.add_argument("--steps", type=int, default=150, help="training steps per stage (scales the run time)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--ner-steps", type=int, default=600, help="fine-tuning steps on the short NER set")
    p.add_argument("--long-steps", type=int, default=50,
                   help="fine-tuning steps on the long-range NER set (0: skip the six long-document fine-tunes)")  # fmt: skip
    p.add_argument("--long-cls-steps", type=int, default=150,
                   help="fine-tuning steps on the long-range classification set (after --long-cls-short-steps)")  # fmt: skip
    p.add_argument("--long-cls-short-steps", type=int, default=100,
                   help="the long-range classification curriculum: fine-tuning steps on the task's short documents "
                        "(256-384 tokens, data/long_cls_short_train.jsonl) before --long-cls-steps on the long ones; "
                        "without them [CLS] must find 24 opinion words among ~1,400 tokens from the start, which "
                        "left it at chance on some seeds (0: none)")  # fmt: skip
    p.add_argument("--long-batch", type=int, default=4, help="documents per step on the long-range sets")
    p.add_argument("--long-lr", type=float, default=3e-3, help="learning rate on the long-range sets")
    p.add_argument("--long-train", type=int, default=200, help="training documents of each long-range set")
    p.add_argument("--long-dev", type=int, default=40, help="dev documents of each long-range set")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="run the pipeline once per seed (OUT/seed<S>; --seed is then unused) and print the "
                        "long-range table as mean ± spread over them")  # fmt: skip
    p.add_argument("--seq", type=int, default=1024, help="kernel table: sequence length")
    p.add_argument("--repeats", type=int, default=3, help="kernel table: timed repeats")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel comparison table")
    p.add_argument("--skip-bench", action="store_true", help="leave out the `etkd bench` step")
    p.add_argument("--long-only", action="store_true",
                   help="only steps 6-7 (the long-range fine-tunes and the report), from the step-5 checkpoints "
                        "an earlier run left in --out (each seed's folder with --seeds): to re-run the "
                        "long-range sets with other --long-* settings")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    t0 = time.perf_counter()
    if args.seeds and not args.kernels_only:
        os.makedirs(args.out, exist_ok=True)
        run_seeds(args)
    elif not args.kernels_only:
        pipeline(args)
    if args.long_only:  # steps 6-7 only: no kernel table either
        print(f"\neverything under {os.path.abspath(args.out)} ({time.perf_counter() - t0:.0f} s)")
        return 0
    from etkd.benchmarks.harness import environment

    env = environment()
    print(f"\n[9] attention kernels, batch 1, 4 heads x 64, seq {args.seq}, fp32; {env.line()}")
    rows = [
        {**r, "environment": env.as_dict()} for r in kernel_table(seq=args.seq, heads=4, repeats=args.repeats)
    ]
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(
        f"\nwrote {path}; everything else under {os.path.abspath(args.out)} ({time.perf_counter() - t0:.0f} s)"
    )
    return 0
