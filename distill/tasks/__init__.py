"""Fine-tuning tasks: data readers (local files, or HF `datasets` by name), preprocessing and metrics.

Three families, one module each: `glue` (sequence classification / regression), `qa` (extractive QA in
SQuAD v1.1 form, with HotpotQA and TriviaQA converters) and `ner` (CoNLL-format token classification).
Local files never touch the network; a malformed file raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import UserError

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
QA_TASKS = ("squad", "hotpotqa", "triviaqa")
NER_TASKS = ("conll2003", "gonerd", "ner")


def task_family(task: str) -> str:
    """ "glue", "qa" or "ner" for a task name."""
    if task in GLUE_TASKS:
        return "glue"
    if task in QA_TASKS:
        return "qa"
    if task in NER_TASKS:
        return "ner"
    raise ValueError(f"task: expected one of {GLUE_TASKS + QA_TASKS + NER_TASKS}, got {task!r}")


class DataError(UserError):
    """A malformed data file: the message starts with `path:line:` (or `path:` when there is no line)."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


def check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file: {path} does not exist or is not a file")
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    path = check_file(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_json(path: str | os.PathLike) -> Any:
    path = check_file(path)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def load_hf_split(name: str, config: str | None, split: str, **kwargs: Any):
    """`datasets.load_dataset(name, config, split=split)`: the only place that may reach the network."""
    import datasets

    return datasets.load_dataset(name, config, split=split, **kwargs)
