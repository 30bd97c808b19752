"""Built-in long-range tasks: generated documents of 1,200-1,600 tokens whose labels depend on evidence that
lies further away than 512 tokens, so a model that sees 512 tokens at a time must guess where one that sees
the whole document can know. (Longer documents make the same point and cost more: the demo fine-tunes six
models on these sets within its 10 minutes on 2 cores; `length=` makes them as long as you like.) Everything is generated from a seed (no download) in the small word-level language
of `demo.data` (every word is one token of its tokenizer), so a tiny model learns the tasks in a few hundred
CPU steps: the long distance is made of cheap filler words.

longrange-ner   CoNLL NER, one document per `-DOCSTART-`. The document opens with a declaration
                "<codename> is a <kind> ." (kind: person / firm / town / match), said 8 times in the
                opening paragraph and never again. More than `min_gap`
                tokens later, the codename is mentioned again and again: every mention is tagged with the
                declared type (B-PER, B-ORG, B-LOC, B-MISC), and nothing near a mention tells the type.
                Mentions and ordinary entities are dense there (`mention_rate`, `sentence_rate`).
                The codenames come from one shared pool, so a codename's type changes from document to
                document. Ordinary entities (closed word lists, as in `demo.data`) are mixed in; they are
                learnable from local context and show that a short-context model does learn NER here.
longrange-cls   Two-class classification in SST-2's columns ("sentence", "label"): a long neutral
                document with 24 opinion sentences of one polarity ("the film was <opinion> .") all
                placed more than `min_gap` tokens from the start; label 1 when the opinion is positive.
                Truncating to 512 tokens cuts all the evidence off.

`near=True` generates the control variant of either task: the same documents with the evidence within
reach of a 512-token window (the opening paragraph restated every `near_every` tokens; the opinions in the
first `near_every` tokens). A 512-token model that does well on the near variant and badly on the far one is
limited by its context, not by anything else.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from ..metrics import ner_metrics
from ..tasks.ner import windows
from .data import BAD, CODENAMES, FILLER_CODE, GOOD, KINDS, MENTION_VERBS, sentence, tokenizer

TASKS = ("longrange-ner", "longrange-cls")
LENGTH = (1200, 1600)  # words (= tokens) per document
MIN_GAP = 640  # no evidence closer than this to where it is needed: beyond a 512-token window
OPINIONS = 24
REPEAT = 8  # the declaration "<codename> is a <kind> ." opens an NER document this many times
OPENING = 5 * REPEAT  # its tokens: a model with global tokens makes them global (`finetune --global-prefix`)
# The classification set's short documents (`long_cls_short_train`): the same task at 256-384 tokens, the
# opinions anywhere after the first sentence, for a curriculum (short documents first: see `demo.pipeline`).
SHORT = (256, 384)


def _filler(rng: random.Random, n: int) -> list[str]:
    """`n` filler words cut into sentences of 8-24 words ending in "."."""
    out: list[str] = []
    while len(out) < n:
        k = min(rng.randint(8, 24), n - len(out))
        out += [rng.choice(FILLER_CODE) for _ in range(max(k - 1, 0))] + ["."]
    return out[:n]


def _split_sentences(tagged: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out, cur = [], []
    for w, t in tagged:
        cur.append((w, t))
        if w == ".":
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def ner_document(
    rng: random.Random,
    length: tuple[int, int] = LENGTH,
    min_gap: int = MIN_GAP,
    near: bool = False,
    near_every: int = 300,
    repeat: int = REPEAT,
    mention_rate: float = 0.4,
    sentence_rate: float = 0.2,
) -> list[list[tuple[str, str]]]:
    """Sentences of (word, tag) of one document of about `length` words (see the module docstring). The
    opening paragraph states the declaration `repeat` times (a strong signal to find among 2k tokens)."""
    n = rng.randint(*length)
    code = rng.choice(CODENAMES)
    kind = rng.choice(list(KINDS))
    tag = KINDS[kind]
    opening = [(code, "B-" + tag), ("is", "O"), ("a", "O"), (kind, "O"), (".", "O")] * repeat
    doc: list[tuple[str, str]] = list(opening)
    doc += [(w, "O") for w in _filler(rng, (near_every if near else min_gap) - len(doc))]
    next_restate = len(doc)
    while len(doc) < n:
        r = rng.random()
        if r < mention_rate:  # a codename mention: ambiguous without the declaration
            left = [rng.choice(FILLER_CODE) for _ in range(rng.randint(1, 3))]
            doc += [(w, "O") for w in left] + [(rng.choice(MENTION_VERBS), "O"), (code, "B-" + tag)]
            doc += [(rng.choice(FILLER_CODE), "O") for _ in range(rng.randint(1, 3))] + [(".", "O")]
        elif (
            r < mention_rate + sentence_rate
        ):  # an ordinary sentence with two entities known from their words
            doc += sentence(rng)
        else:
            doc += [(w, "O") for w in _filler(rng, rng.randint(8, 24))]
        if near and len(doc) >= next_restate:
            doc += opening
            next_restate = len(doc) + near_every
    return _split_sentences(doc)


def cls_document(
    rng: random.Random,
    length: tuple[int, int] = LENGTH,
    min_gap: int = MIN_GAP,
    near: bool = False,
    near_every: int = 300,
    opinions: int = OPINIONS,
) -> tuple[str, int]:
    """(text, label) of one document (see the module docstring): `opinions` opinion sentences of one
    polarity, all further than `min_gap` tokens from the start (near: all within the first `near_every`)."""
    n = rng.randint(*length)
    label = rng.randint(0, 1)
    words: list[str] = []
    while len(words) < n - 5 * opinions:
        if rng.random() < 0.15:
            words += [w for w, _ in sentence(rng)]
        else:
            words += _filler(rng, rng.randint(20, 60))
    words = words[: n - 5 * opinions]
    lo, hi = (1, near_every - 5 * opinions) if near else (min_gap, len(words))
    # Sentence boundaries in [lo, hi): each opinion sentence goes in whole after one of them (several may
    # follow one boundary, back to back, so any number of opinions fits).
    bounds = [i for i in range(max(lo, 1), hi) if words[i - 1] == "."]
    slots = sorted(rng.choices(bounds, k=opinions), reverse=True)
    for at in slots:  # back to front, so earlier slots keep their positions
        words[at:at] = ["the", "film", "was", rng.choice(GOOD if label else BAD), "."]
    return " ".join(words), label


def write_ner(path: str, n_docs: int, seed: int, **kwargs: Any) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write("-DOCSTART- -X- -X- O\n\n")
            for sent in ner_document(rng, **kwargs):
                f.write("".join(f"{w} NN O {t}\n" for w, t in sent) + "\n")
    return path


def write_cls(path: str, n: int, seed: int, **kwargs: Any) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text, label = cls_document(rng, **kwargs)
            f.write(json.dumps({"sentence": text, "label": label}) + "\n")
    return path


def write_all(
    directory: str, seed: int = 0, n_train: int = 160, n_dev: int = 40, near: bool = False, **kwargs: Any
) -> dict[str, str]:
    """Train and dev files of both tasks under `directory`, and the classification set's short documents
    (`SHORT` tokens, `long_cls_short_train`); returns their paths by name."""
    os.makedirs(directory, exist_ok=True)
    tag = "near_" if near else ""
    j = os.path.join
    return {
        "long_ner_train": write_ner(j(directory, f"long_{tag}ner_train.conll"), n_train, seed + 11, near=near, **kwargs),
        "long_ner_dev": write_ner(j(directory, f"long_{tag}ner_dev.conll"), n_dev, seed + 111, near=near, **kwargs),
        "long_cls_train": write_cls(j(directory, f"long_{tag}cls_train.jsonl"), n_train, seed + 12, near=near, **kwargs),
        "long_cls_dev": write_cls(j(directory, f"long_{tag}cls_dev.jsonl"), n_dev, seed + 112, near=near, **kwargs),
        "long_cls_short_train": write_cls(j(directory, f"long_{tag}cls_short_train.jsonl"), n_train, seed + 13,
                                          **{**kwargs, "length": SHORT, "min_gap": 1}),
    }  # fmt: skip


def breakdown(examples: list[dict[str, Any]], predicted: list[list[str]]) -> dict[str, float]:
    """Where a model's NER score comes from: entity F1 over the codename mentions after the declaration
    (the long-range part) and over the ordinary entities (learnable from local context), in percent.

    examples: `ner.read_conll(path, "document")` of a longrange-ner file; predicted: per-word tags.
    """

    def only(tags: list[str], words: list[str], codename: bool) -> list[str]:
        declared = [i + 1 < len(words) and words[i + 1] == "is" for i in range(len(words))]
        keep = [not d and (w in CODENAMES) == codename for w, d in zip(words, declared)]
        # An entity is kept whole: its I- tags follow their B- tag's decision.
        out, last = [], False
        for t, k in zip(tags, keep):
            last = k if t.startswith("B-") or t == "O" else last
            out.append(t if last else "O")
        return out

    out = {}
    for name, codename in (("codename", True), ("ordinary", False)):
        gold = [only(e["tags"], e["tokens"], codename) for e in examples]
        pred = [only(p, e["tokens"], codename) for p, e in zip(predicted, examples)]
        out[f"f1_{name}"] = ner_metrics(gold, pred)["f1"]
    return out


def context_ceiling(examples: list[dict[str, Any]], context: int, stride: int = 128) -> dict[str, float]:
    """Entity F1 (percent) of the best model that sees `context` tokens at a time, read in windows with
    overlap `stride` (as `finetune --ner-unit document` does): it tags every ordinary entity right, and a
    codename mention right when a window holds both the mention and the opening paragraph; otherwise the
    type is unknowable and it guesses the most frequent one (PER). A property of the data, no model: what
    separates a 512-token model from a 4096-token one at best. Words are tokens here (one token a word).
    """
    size = context - 2  # [CLS] and [SEP]
    pred = []
    for e in examples:
        words, tags = e["tokens"], list(e["tags"])
        said = [i for i in range(len(words) - 1) if words[i] in CODENAMES and words[i + 1] == "is"]
        spans = windows(len(words), size, min(stride, max(size - 1, 0)))
        for i, w in enumerate(words):
            seen = any(a <= i < b and any(a <= d < b for d in said) for a, b in spans)
            if w in CODENAMES and not seen:
                tags[i] = "B-PER"
        pred.append(tags)
    out = ner_metrics([e["tags"] for e in examples], pred)
    return {"f1": out["f1"], **breakdown(examples, pred)}


def cls_attention(model_dir: str, path: str, max_docs: int = 40) -> dict[str, Any]:
    """Where the [CLS] row of each layer looks on long-range classification documents (what decides whether a
    model learns the task): per layer, the mean share of its attention on the opinion words and on the whole
    opinion sentences ("the film was <opinion> ."), the share uniform attention would give them, and the
    largest single weight; plus the model's accuracy on the documents. In a model with global tokens the
    [CLS] row is global: its weights are softmax(q_g k_g^T * scale) over every real token (its global
    projections; the local ones for a model without them). `model_dir`: a sequence-classification checkpoint over the demo's
    vocabulary; `path`: a longrange-cls jsonl file (its first `max_docs` documents).
    """
    import torch

    from etkd.models import EncoderModel

    model = EncoderModel.from_pretrained(model_dir).eval()
    h = model.config.num_heads
    vocab = tokenizer().vocab
    opinion_ids = {vocab[w] for w in GOOD + BAD}
    film = vocab["film"]
    rows: dict[int, list[torch.Tensor]] = {}

    def hook(attn, args):  # args: (x, key_padding_mask, global_mask, backend) of SelfAttention.forward
        x = args[0]
        qp, kp = (attn.qg, attn.kg) if attn.qg is not None else (attn.q, attn.k)
        q, k = qp(x[:, :1]).view(1, h, -1), kp(x).view(x.shape[1], h, -1)
        w = torch.einsum("hd,shd->hs", q[0], k) * q.shape[-1] ** -0.5
        rows.setdefault(attn.layer_index, []).append(w.softmax(-1))  # (heads, seq)

    handles = [layer.attn.register_forward_pre_hook(hook) for layer in model.encoder.layers]
    with open(path) as f:
        docs = [json.loads(line) for line in f if line.strip()][:max_docs]
    masks, correct = [], 0
    try:
        with torch.no_grad():
            for d in docs:
                words = d["sentence"].split()[: model.config.max_positions - 4]
                ids = torch.tensor([[vocab["[CLS]"], *(vocab[w] for w in words), vocab["[SEP]"]]])
                correct += int(model(input_ids=ids).logits.argmax(-1).item() == d["label"])
                opinion = torch.tensor([i in opinion_ids for i in ids[0].tolist()])
                sentence = opinion.clone()
                for j in torch.nonzero(ids[0] == film).flatten().tolist():
                    sentence[j - 1 : j + 4] = True  # "the film was <opinion> ."
                masks.append((opinion, sentence))
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, Any] = {
        "documents": len(docs),
        "accuracy": 100.0 * correct / max(len(docs), 1),
        "layers": [],
    }
    for layer in sorted(rows):
        share = torch.tensor(
            [[a[:, m].sum(-1).mean().item() for m in ms] + [a.max(-1).values.mean().item()] + [m.float().mean().item() for m in ms]
             for a, ms in zip(rows[layer], masks)]
        ).mean(0).tolist()  # fmt: skip
        out["layers"].append(dict(zip(("opinion_words", "opinion_sentences", "max_weight", "uniform_words",
                                       "uniform_sentences"), share)))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m etkd.distill.demo.longrange", description="write the long-range task files"
    )
    p.add_argument("--out", help="folder for the files (and the tokenizer, under tokenizer/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=160, help="training documents per task")
    p.add_argument("--dev", type=int, default=40, help="dev documents per task")
    p.add_argument("--near", action="store_true", help="the control variant: evidence within 300 tokens")
    p.add_argument("--cls-attention", metavar="MODEL",
                   help="instead: where MODEL's [CLS] attention looks on --eval-file (`cls_attention`)")  # fmt: skip
    p.add_argument("--eval-file", help="--cls-attention: a long_cls_*.jsonl file")
    p.add_argument("--docs", type=int, default=40, help="--cls-attention: documents read")
    args = p.parse_args(argv)
    if args.cls_attention:
        if not args.eval_file:
            p.error("--cls-attention needs --eval-file (a long_cls_*.jsonl file)")
        r = cls_attention(args.cls_attention, args.eval_file, args.docs)
        print(f"{r['documents']} documents, accuracy {r['accuracy']:.1f}%; [CLS] attention per layer:")
        for i, a in enumerate(r["layers"]):
            print(f"  layer {i}: on opinion words {a['opinion_words']:.3f} (uniform {a['uniform_words']:.3f}), on "
                  f"opinion sentences {a['opinion_sentences']:.3f} (uniform {a['uniform_sentences']:.3f}), "
                  f"largest weight {a['max_weight']:.3f}")  # fmt: skip
        return 0
    if not args.out:
        p.error("--out: the folder for the files is required")
    paths = write_all(args.out, seed=args.seed, n_train=args.train, n_dev=args.dev, near=args.near)
    tokenizer(os.path.join(args.out, "tokenizer"))
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
