"""NER from CoNLL-format files (CoNLL-2003, GONERD) or HF `datasets`: BIO tags PER/ORG/LOC/MISC.

File format: one token a line, fields separated by white space, the tag in the last field (CoNLL-2003:
`token POS chunk NER`); blank lines end a sentence; `-DOCSTART-` lines start a document. A sequence is a
sentence (CoNLL-2003, paper Table 1: mean 14.5 tokens) or a whole document (GONERD, mean 507.6).

Sub-word alignment: the first sub-token of every word carries the word's label, the others and the special
tokens carry -100 (ignored by the loss). A sequence longer than `max_length` is split into windows that
overlap by `stride` sub-tokens; when merging back, each word takes the prediction of the window in which
its first sub-token has the most context on both sides.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UserError
from ..metrics import ner_metrics
from . import DataError, check_file, iter_lines, load_hf_split

ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")  # CoNLL-2003's
CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")  # HF order
_PREFIXES = ("B-", "I-", "E-", "S-")


def _check_tag(tag: str, path: str, line: int) -> None:
    if tag != "O" and not (tag[:2] in _PREFIXES and len(tag) > 2):
        raise DataError(path, line, f"tag: expected O or B-/I-/E-/S-<TYPE>, got {tag!r}")


def read_conll(path: str | os.PathLike, unit: str = "sentence", group_sentences: int | None = None
               ) -> list[dict[str, Any]]:  # fmt: skip
    """Sequences `{"tokens", "tags", "line"}` of a CoNLL file (`line`: where the sequence starts).

    unit="document" joins the sentences between `-DOCSTART-` lines. A file without any `-DOCSTART-` has no
    documents: that is an error unless `group_sentences=N` makes a document of every N consecutive
    sentences (within each `-DOCSTART-` document when there are some; the last group may be shorter).
    """
    if unit not in ("sentence", "document"):
        raise ValueError(f"unit: expected 'sentence' or 'document', got {unit!r}")
    if group_sentences is not None and (unit != "document" or group_sentences < 1):
        raise UserError(f"--ner-group-sentences: expected N >= 1 with --ner-unit document, got {group_sentences} "
                        f"with --ner-unit {unit}")  # fmt: skip
    path = check_file(path)
    sentences: list[dict[str, Any]] = []  # each with "doc": the document counter
    doc, cur, saw_docstart = 0, None, False
    for lineno, raw in iter_lines(path):
        fields = raw.split()
        if not fields or fields[0] == "-DOCSTART-":
            if cur is not None:
                sentences.append(cur)
                cur = None
            if fields:
                saw_docstart = True
                doc += 1
            continue
        if len(fields) < 2:
            raise DataError(path, lineno, f"expected a token and a tag separated by white space, got {raw!r}")
        _check_tag(fields[-1], path, lineno)
        if cur is None:
            cur = {"tokens": [], "tags": [], "line": lineno, "doc": doc}
        cur["tokens"].append(fields[0])
        cur["tags"].append(fields[-1])
    if cur is not None:
        sentences.append(cur)
    if unit == "sentence":
        return [{k: s[k] for k in ("tokens", "tags", "line")} for s in sentences]
    if not saw_docstart and group_sentences is None:
        raise DataError(path, None, "--ner-unit document: the file has no -DOCSTART- line, so no documents; "
                        "give --ner-group-sentences N (N consecutive sentences make a document) or --ner-unit "
                        "sentence")  # fmt: skip
    docs: list[dict[str, Any]] = []
    count = 0  # sentences in the current document
    for s in sentences:
        same_doc = docs and docs[-1]["doc"] == s["doc"]
        if same_doc and (group_sentences is None or count < group_sentences):
            docs[-1]["tokens"] += s["tokens"]
            docs[-1]["tags"] += s["tags"]
            count += 1
        else:
            docs.append(
                {"tokens": list(s["tokens"]), "tags": list(s["tags"]), "line": s["line"], "doc": s["doc"]}
            )
            count = 1
    return [{k: d[k] for k in ("tokens", "tags", "line")} for d in docs]


def load_ner_hf(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """Sequences of an HF token-classification dataset with `tokens` and `ner_tags` (ClassLabel ids)."""
    ds = load_hf_split(name, config, split)
    names = ds.features["ner_tags"].feature.names
    return [{"tokens": list(r["tokens"]), "tags": [names[t] for t in r["ner_tags"]], "line": i}
            for i, r in enumerate(ds)]  # fmt: skip


def check_types(examples: list[dict[str, Any]], allowed: set[str] | None, source: str) -> None:
    """Every tag's entity type must be in `allowed` (None: any), else a DataError naming the line."""
    if allowed is None:
        return
    for e in examples:
        for tag in e["tags"]:
            if tag != "O" and tag[2:] not in allowed:
                raise DataError(source, e.get("line"), f"entity type {tag[2:]!r} (tag {tag!r}) is not one of "
                                f"{sorted(allowed)}; add it with --labels {tag[2:]} if it is meant")  # fmt: skip


def label_list(*example_sets: list[dict[str, Any]]) -> list[str]:
    """CoNLL's nine labels (in HF's order) plus any other tag seen, sorted."""
    seen = {t for examples in example_sets for e in examples for t in e["tags"]}
    return list(CONLL_LABELS) + sorted(seen - set(CONLL_LABELS))


def windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `size` covering range(n), consecutive ones overlapping by `stride`."""
    if size < 1:
        raise ValueError(f"max_length: leaves no room for tokens (window size {size})")
    if not 0 <= stride < size:
        raise ValueError(f"stride: expected 0 <= stride < window size {size}, got {stride}")
    if n <= size:
        return [(0, n)]
    out, start = [], 0
    while True:
        end = min(start + size, n)
        out.append((start, end))
        if end == n:
            return out
        start = end - stride


def encode(
    examples: list[dict[str, Any]], tokenizer, label2id: dict[str, int], max_length: int, stride: int = 128
) -> list[dict[str, Any]]:
    """Windowed features: input_ids, attention_mask, [token_type_ids], labels (first sub-token: label id,
    others -100), plus `example_index` and `word_index` (per position: the word whose first sub-token sits
    there, else -1) for merging predictions back.
    """
    if not examples:
        return []
    # verbose=False: sequences longer than the model are cut into windows below, on purpose, so transformers'
    # "Token indices sequence length is longer than the specified maximum" warning would mislead.
    enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, add_special_tokens=False,
                    verbose=False)  # fmt: skip
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError("tokenizer: NER windows need cls_token_id and sep_token_id")
    with_types = "token_type_ids" in tokenizer.model_input_names
    feats = []
    for i, e in enumerate(examples):
        ids, word_ids = enc["input_ids"][i], enc.word_ids(i)
        first = [
            w if w is not None and (j == 0 or word_ids[j - 1] != w) else -1 for j, w in enumerate(word_ids)
        ]
        for tag in e["tags"]:
            if tag not in label2id:
                raise ValueError(f"tag {tag!r} (sequence at line {e.get('line')}) is not in the label list")
        for start, end in windows(len(ids), max_length - 2, min(stride, max(max_length - 3, 0))):
            word_index = [-1] + first[start:end] + [-1]
            labels = [label2id[e["tags"][w]] if w >= 0 else -100 for w in word_index]
            f = {
                "input_ids": [cls] + ids[start:end] + [sep],
                "attention_mask": [1] * (end - start + 2),
                "labels": labels,
                "example_index": i,
                "word_index": word_index,
                "window": (start, end, len(ids)),
            }
            if with_types:
                f["token_type_ids"] = [0] * (end - start + 2)
            feats.append(f)
    return feats


def merge_predictions(
    features: list[dict[str, Any]],
    predictions: list[list[int]],
    examples: list[dict[str, Any]],
    id2label: list[str],
) -> list[list[str]]:
    """Per-word tags of every example from per-position label ids of its windows.

    A word's tag comes from the window where its first sub-token is furthest from a window edge (edges
    of the whole sequence do not count as edges); words that produced no sub-token get "O".
    """
    best: list[dict[int, tuple[int, str]]] = [{} for _ in examples]
    for f, pred in zip(features, predictions):
        start, end, n = f["window"]
        for pos, w in enumerate(f["word_index"]):
            if w < 0:
                continue
            j = start + pos - 1  # index among the sequence's sub-tokens
            left = j - start if start > 0 else n
            right = end - 1 - j if end < n else n
            score = min(left, right)
            slot = best[f["example_index"]]
            if w not in slot or score > slot[w][0]:
                slot[w] = (score, id2label[int(pred[pos])])
    return [[slot.get(w, (0, "O"))[1] for w in range(len(e["tokens"]))] for slot, e in zip(best, examples)]


def compute_metrics(examples: list[dict[str, Any]], predicted_tags: list[list[str]]) -> dict[str, float]:
    return ner_metrics([e["tags"] for e in examples], predicted_tags)
