"""GLUE: the eight tasks of paper Table 3 (and WNLI), read from local TSV/CSV/JSONL or HF `nyu-mll/glue`.

Every reader yields examples `{"text_a": str, "text_b": str | None, "label": int | float}`. Local files may
use the HF column names (`sentence`, `sentence1`, `question1`, `premise`, ..., `label`) or the original
GLUE release's (`#1 String`, `is_duplicate`, `gold_label`, `score`, CoLA's header-less four columns);
string labels (`entailment`, ...) map to HF's label ids.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any

from ..metrics import glue_metrics
from . import DataError, check_file, iter_lines, load_hf_split, read_jsonl


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_a: tuple[str, ...]  # accepted column names, first match wins
    text_b: tuple[str, ...] = ()
    label: tuple[str, ...] = ("label",)
    label_names: tuple[str, ...] = ("0", "1")  # index = label id; () for regression
    eval_splits: tuple[tuple[str, str], ...] = (("validation", ""),)  # (HF split, metric suffix)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names


_PAIR = ("sentence1", "#1 string")
_PAIR_B = ("sentence2", "#2 string")
GLUE = {
    "cola": GlueTask("cola", ("sentence",)),
    "sst2": GlueTask("sst2", ("sentence",)),
    "mrpc": GlueTask("mrpc", _PAIR, _PAIR_B, ("label", "quality")),
    "qqp": GlueTask("qqp", ("question1",), ("question2",), ("label", "is_duplicate")),
    "stsb": GlueTask("stsb", _PAIR, _PAIR_B, ("label", "score"), ()),
    "mnli": GlueTask(
        "mnli",
        ("premise", "sentence1"),
        ("hypothesis", "sentence2"),
        ("label", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        (("validation_matched", "m"), ("validation_mismatched", "mm")),
    ),
    "qnli": GlueTask("qnli", ("question",), ("sentence",), ("label",), ("entailment", "not_entailment")),
    "rte": GlueTask("rte", _PAIR, _PAIR_B, ("label",), ("entailment", "not_entailment")),
    "wnli": GlueTask("wnli", _PAIR, _PAIR_B, ("label",), ("not_entailment", "entailment")),
}
COLA_RAW_COLUMNS = ("source", "label", "original_label", "sentence")  # the original in_domain_*.tsv


def get_task(name: str) -> GlueTask:
    if name not in GLUE:
        raise ValueError(f"task: expected a GLUE task {sorted(GLUE)}, got {name!r}")
    return GLUE[name]


def _parse_label(task: GlueTask, value: Any, path: str, line: int | None) -> int | float:
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(path, line, f"label: expected a number, got {value!r}") from None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        i = int(value)
        if 0 <= i < task.num_labels:
            return i
        raise DataError(path, line, f"label: expected an id in [0, {task.num_labels}), got {i}")
    if isinstance(value, str) and value.strip() in task.label_names:
        return task.label_names.index(value.strip())
    raise DataError(path, line, f"label: expected one of {list(task.label_names)} or its id, got {value!r}")


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in row:
            return n
    return None


def _example(task: GlueTask, row: dict[str, Any], path: str, line: int | None) -> dict[str, Any]:
    row = {str(k).strip().lower(): v for k, v in row.items()}
    ka, kb, kl = _pick(row, task.text_a), _pick(row, task.text_b), _pick(row, task.label)
    missing = [what for what, k, need in (("text", ka, True), ("second text", kb, bool(task.text_b)),
                                           ("label", kl, True)) if need and k is None]  # fmt: skip
    if missing:
        wanted = {"text": task.text_a, "second text": task.text_b, "label": task.label}
        raise DataError(
            path, line, "; ".join(f"missing {m} column (one of {list(wanted[m])})" for m in missing)
        )
    a, b = row[ka], row[kb] if kb else None
    if not isinstance(a, str) or (kb and not isinstance(b, str)):
        raise DataError(path, line, "text columns must hold strings")
    return {"text_a": a, "text_b": b, "label": _parse_label(task, row[kl], path, line)}


def read_glue_file(path: str | os.PathLike, task: str | GlueTask) -> list[dict[str, Any]]:
    """Examples of a local GLUE file: `.jsonl`/`.json` (one object a line), `.tsv` or `.csv` with a header."""
    task = get_task(task) if isinstance(task, str) else task
    path = check_file(path)
    if path.endswith((".jsonl", ".json")):
        return [_example(task, obj, path, line) for line, obj in read_jsonl(path)]
    delimiter = "," if path.endswith(".csv") else "\t"
    # GLUE's TSVs contain bare quote characters inside sentences: no quoting for TSV.
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    rows = list(csv.reader((line for _, line in iter_lines(path)), delimiter=delimiter, quoting=quoting))
    if not rows:
        raise DataError(path, None, "empty file")
    header = [h.strip().lower() for h in rows[0]]
    start = 1
    if task.name == "cola" and "sentence" not in header and len(rows[0]) == len(COLA_RAW_COLUMNS):
        header, start = list(COLA_RAW_COLUMNS), 0
    examples = []
    for i, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(path, i, f"expected {len(header)} fields (as in the header), got {len(row)}")
        examples.append(_example(task, dict(zip(header, row)), path, i))
    return examples


def load_glue_hf(task: str | GlueTask, split: str, name: str = "nyu-mll/glue") -> list[dict[str, Any]]:
    """Examples of an HF GLUE split (`datasets.load_dataset(name, task)`)."""
    task = get_task(task) if isinstance(task, str) else task
    ds = load_hf_split(name, task.name, split)
    where = f"{name}/{task.name}[{split}]"
    return [_example(task, row, where, i) for i, row in enumerate(ds)]


def encode(examples: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenised features (no padding; the collator pads): input_ids, attention_mask, [token_type_ids], labels."""
    if not examples:
        return []
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length) if b else tokenizer(a, truncation=True,
                                                                                      max_length=max_length)  # fmt: skip
    feats = []
    for i, e in enumerate(examples):
        f = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        f["labels"] = e["label"]
        feats.append(f)
    return feats


def compute_metrics(task: str | GlueTask, preds: list, labels: list) -> dict[str, float]:
    task = get_task(task) if isinstance(task, str) else task
    return glue_metrics(task.name, preds, labels)
