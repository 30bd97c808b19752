"""Evaluation metrics of the fine-tuning tasks: scipy.stats, sklearn.metrics and seqeval where they have
the formula, the official SQuAD v1.1 rules written out.

Every metric returned to a driver is a percentage (0-100), the scale of the paper's tables (MCC too:
0.636 -> 63.6). GLUE: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.
SQuAD: exact match and token F1 with the official v1.1 answer normalisation. NER: entity-level precision,
recall and F1 per type and overall through `seqeval` (conlleval rules: an I- tag after O or after another
type starts a new entity).
"""

from __future__ import annotations

import collections
import re
import statistics
import string
from collections.abc import Iterable, Sequence


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of a score over seeds."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip


def _check_lengths(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(
            f"predictions and labels: expected equal lengths, got {len(preds)} and {len(labels)}"
        )
    if not len(labels):
        raise ValueError("labels: expected at least one example, got none")


def accuracy(preds: Sequence, labels: Sequence) -> float:
    _check_lengths(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2·tp / (2·tp + fp + fn); 0 when there is no positive at all."""
    from sklearn.metrics import f1_score

    _check_lengths(preds, labels)
    return float(f1_score(labels, preds, pos_label=positive, average="binary", zero_division=0))


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Multiclass MCC (Gorodkin's R_K, sklearn's); 0 when either side predicts a single class."""
    from sklearn.metrics import matthews_corrcoef as mcc

    _check_lengths(preds, labels)
    return float(mcc(labels, preds))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 for a constant input (scipy gives NaN there, a table wants a number)."""
    from scipy.stats import pearsonr

    _check_lengths(x, y)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(pearsonr(x, y)[0])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the tie-averaged ranks; 0 for a constant input."""
    from scipy.stats import spearmanr

    _check_lengths(x, y)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(spearmanr(x, y)[0])


# GLUE: which metrics each task reports (paper Table 3), in table order.
GLUE_METRICS = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def glue_metrics(task: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's metrics as percentages. `preds` are class ids (regression: floats for STS-B)."""
    if task not in GLUE_METRICS:
        raise ValueError(f"task: expected one of {sorted(GLUE_METRICS)}, got {task!r}")
    fns = {
        "mcc": matthews_corrcoef,
        "accuracy": accuracy,
        "f1": f1_binary,
        "pearson": pearson,
        "spearman": spearman,
    }
    return {name: 100.0 * fns[name](preds, labels) for name in GLUE_METRICS[task]}


# SQuAD v1.1 (the official evaluate-v1.1.py rules).
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, Iterable[str]]) -> dict[str, float]:
    """EM and F1 (percent), each the max over an example's gold answers, averaged over `references`.

    A reference with no prediction counts as 0 (the official script does the same, with a warning).
    """
    if not references:
        raise ValueError("references: expected at least one question, got none")
    em = f1 = 0.0
    for qid, truths in references.items():
        truths = list(truths)
        if not truths:
            raise ValueError(f"references: question {qid!r} has no gold answer")
        pred = predictions.get(qid)
        if pred is None:
            continue
        em += max(squad_exact_match(pred, t) for t in truths)
        f1 += max(squad_f1(pred, t) for t in truths)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# NER.
def ner_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval entity-level metrics (percent): `precision`, `recall`, `f1` overall (micro) and
    `precision_<TYPE>`, `recall_<TYPE>`, `f1_<TYPE>`, `support_<TYPE>` per entity type; `accuracy` per token.
    """
    from seqeval.metrics import accuracy_score, classification_report

    _check_lengths(pred_tags, true_tags)
    for i, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sequence {i}: {len(t)} gold tags but {len(p)} predicted")
    report = classification_report(
        [list(t) for t in true_tags], [list(p) for p in pred_tags], output_dict=True, zero_division=0
    )
    out: dict[str, float] = {}
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    out["precision"] = 100.0 * micro["precision"]
    out["recall"] = 100.0 * micro["recall"]
    out["f1"] = 100.0 * micro["f1-score"]
    for name, row in report.items():
        if name.endswith(" avg"):
            continue
        out[f"precision_{name}"] = 100.0 * row["precision"]
        out[f"recall_{name}"] = 100.0 * row["recall"]
        out[f"f1_{name}"] = 100.0 * row["f1-score"]
        out[f"support_{name}"] = float(row["support"])
    out["accuracy"] = 100.0 * accuracy_score([list(t) for t in true_tags], [list(p) for p in pred_tags])
    return out
