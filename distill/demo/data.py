"""The built-in default data of `make demo`: a small synthetic language with a tokenizer, an MLM corpus
(short and long documents), a CoNLL NER set (PER/ORG/LOC/MISC), a two-class classification set, and the
long-range NER and classification sets of `demo.longrange` (2-4k-token documents).

Everything is generated from a seed, so the demo needs no network. The tasks are learnable on purpose:
entity words come from closed lists, and the class of a review is decided by which of two word lists its
opinion words come from, so a fine-tuned model beats chance clearly and a retention table means something.
"""

from __future__ import annotations

import json
import random

FIRST = [
    "anna",
    "boris",
    "clara",
    "david",
    "elena",
    "felix",
    "greta",
    "hugo",
    "irene",
    "jonas",
    "karin",
    "lukas",
]
LAST = ["berg", "costa", "dahl", "eriksen", "fischer", "garcia", "hansen", "ivanov", "jensen", "klein"]
ORG = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark", "wayne", "tyrell", "cyberdyne"]
ORG_SUFFIX = ["corp", "labs", "group", "bank"]
LOC = ["paris", "oslo", "lima", "cairo", "tokyo", "berlin", "madrid", "quito", "dublin", "kyoto", "sydney"]
MISC = ["olympics", "eurovision", "oscars", "worldcup", "nobel", "grammys"]
VERBS = ["met", "visited", "joined", "left", "praised", "criticised", "called", "thanked", "hired", "advised"]
FILLER = ["the", "a", "today", "yesterday", "in", "at", "with", "after", "before", "during", "and", "then", "of",
          "report", "meeting", "city", "company", "team", "event", "news", "people", "week", "year", "about"]  # fmt: skip
GOOD = ["excellent", "wonderful", "great", "superb", "lovely", "brilliant", "delightful", "fantastic"]
BAD = ["terrible", "awful", "dreadful", "poor", "horrible", "boring", "disappointing", "bad"]
CODENAMES = ["zib", "kor", "mav", "tal", "pem", "rux", "vok", "nep", "dax", "lum", "fep", "gor"]
KINDS = {"person": "PER", "firm": "ORG", "town": "LOC", "match": "MISC"}
# The long-range sets (`longrange`): codenames whose type a declaration gives; filler: short words carrying no
# evidence, most of every long document is made of them.
FILLER_CODE = ["la", "na", "ta", "ka", "ma", "pa", "ra", "sa", "da", "ga", "ba", "fa"]
MENTION_VERBS = ["met", "visited", "joined", "left", "praised", "called", "thanked", "hired"]
CODE_WORDS = CODENAMES + list(KINDS) + FILLER_CODE + ["is", "a", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    words = (
        FIRST
        + LAST
        + ORG
        + ORG_SUFFIX
        + LOC
        + MISC
        + VERBS
        + FILLER
        + GOOD
        + BAD
        + ["movie", "film", "was", "it", "not", "."]
        + CODE_WORDS
    )
    seen, out = set(), []
    for w in SPECIAL + words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def tokenizer(directory: str | None = None):
    """A word-level BERT tokenizer over the synthetic vocabulary (saved to `directory` when given)."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocabulary())}, do_lower_case=True)
    if directory:
        tok.save_pretrained(directory)
    return tok


def _entity(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.choice(["PER", "PER", "ORG", "LOC", "MISC"])
    if kind == "PER":
        words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.6 else [])
    elif kind == "ORG":
        words = [rng.choice(ORG)] + ([rng.choice(ORG_SUFFIX)] if rng.random() < 0.5 else [])
    elif kind == "LOC":
        words = [rng.choice(LOC)]
    else:
        words = [rng.choice(MISC)]
    return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    """One tagged sentence: filler words around two entities and a verb."""
    out = [(w, "O") for w in rng.sample(FILLER, rng.randint(1, 3))]
    out += _entity(rng) + [(rng.choice(VERBS), "O")] + _entity(rng)
    out += [(w, "O") for w in rng.sample(FILLER, rng.randint(0, 3))] + [(".", "O")]
    return out


def declared_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """One sentence that declares a codename's type and mentions it again, e.g. "kor is a firm la met kor ."
    (both `kor` tagged B-ORG): the short NER set mixes these in so that a model learns, within a sentence, that
    a codename takes its type from its declaration — what the long-range set then asks across > 640 tokens."""
    code, kind = rng.choice(CODENAMES), rng.choice(list(KINDS))
    tag = "B-" + KINDS[kind]
    out = [(code, tag), ("is", "O"), ("a", "O"), (kind, "O")]
    for _ in range(rng.randint(1, 2)):
        out += [(rng.choice(FILLER_CODE), "O") for _ in range(rng.randint(0, 3))]
        out += [(rng.choice(MENTION_VERBS), "O"), (code, tag)]
    return out + [(".", "O")]


def is_declaration(words: list[str]) -> bool:
    """Whether a sentence's words are a `declared_sentence` ("kor is a firm ..."): its second and third words."""
    return words[1:3] == ["is", "a"]


def write_corpus(path: str, n_docs: int = 400, seed: int = 0, long_share: float = 0.25,
                 declared_share: float = 0.0) -> str:  # fmt: skip
    """jsonl {"text": ...}: mostly short documents, a `long_share` of long ones (hundreds of words); each
    sentence a `declared_sentence` with probability `declared_share` (default 0: `sentence`s only, the same
    file as before the option)."""
    rng = random.Random(seed)

    def one() -> list[tuple[str, str]]:  # no extra draw at share 0: the default corpus stays bit-identical
        return declared_sentence(rng) if declared_share and rng.random() < declared_share else sentence(rng)

    with open(path, "w") as f:
        for _ in range(n_docs):
            n = rng.randint(40, 120) if rng.random() < long_share else rng.randint(2, 8)
            words = [w for _ in range(n) for w, _ in one()]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def write_conll(path: str, n_docs: int = 60, seed: int = 1, declared_share: float = 0.5) -> str:
    """CoNLL documents of `sentence`s and, with probability `declared_share` each, sentences that declare a
    codename's type and mention it (`declared_sentence`): those need context, not just the word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write("-DOCSTART- -X- -X- O\n\n")
            for _ in range(rng.randint(3, 10)):
                make = declared_sentence if rng.random() < declared_share else sentence
                for w, tag in make(rng):
                    f.write(f"{w} NN O {tag}\n")
                f.write("\n")
    return path


def write_classification(path: str, n: int = 400, seed: int = 2, negation: float = 0.2) -> str:
    """jsonl {"sentence", "label"} in SST-2's columns: label 1 when the opinion is positive. An opinion word
    from GOOD or BAD, preceded by "not" with probability `negation` (which flips it), makes the task need
    word order, not just a bag of words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            negate = rng.random() < negation
            pool = GOOD if label != negate else BAD
            words = [w for w, _ in sentence(rng)][:-1]
            phrase = (["not"] if negate else []) + [rng.choice(pool)]
            at = rng.randint(0, len(words))
            words[at:at] = phrase
            f.write(
                json.dumps({"sentence": " ".join(["the", "movie", "was"] + words), "label": label}) + "\n"
            )
    return path
