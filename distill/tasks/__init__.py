"""Fine-tuning tasks: data readers (local files, or HF `datasets` by name), preprocessing and metrics.

Three families, one module each: `glue` (sequence classification / regression), `qa` (extractive QA in
SQuAD v1.1 form, with HotpotQA and TriviaQA converters) and `ner` (CoNLL-format token classification).
Local files never touch the network; a malformed file raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import DataError

__all__ = ["DataError", "check_file", "iter_lines", "read_json", "read_jsonl", "task_family"]

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


def check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    return path


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"


def iter_lines(path: str, on_bad: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file, decoded line by line, so a bad byte is reported
    at its own line: a `DataError`, or `on_bad(line, message)` (which may skip the line) when given."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if on_bad is None:
                    raise DataError(path, lineno, _not_utf8(raw, exc)) from None
                on_bad(lineno, _not_utf8(raw, exc))


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    path = check_file(path)
    for lineno, line in iter_lines(path):
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
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw[line_start : raw.find(b"\n", exc.start) if b"\n" in raw[exc.start :] else len(raw)]
        exc.start -= line_start
        raise DataError(path, raw.count(b"\n", 0, exc.start + line_start) + 1, _not_utf8(line, exc)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def load_hf_split(name: str, config: str | None, split: str, **kwargs: Any):
    """`datasets.load_dataset(name, config, split=split)`: the only place that may reach the network."""
    import datasets

    return datasets.load_dataset(name, config, split=split, **kwargs)
