"""`etkd report`: paper-style tables from `etkd evaluate` / `etkd finetune` result JSONs.

Tables (Markdown, plus one CSV each): GLUE scores (paper Table 3: CoLA MCC, MNLI m/mm, MRPC acc/F1, QNLI,
QQP acc/F1, RTE, SST-2, STS-B Pearson/Spearman, average), QA EM/F1 (Table 5), NER F1 per type and overall
(Table 6), student/teacher retention % per task, and the Table 7 form: a base model's scores with the
relative change (%) of KD, Convert and Convert+KD.

A task's score is the mean of its metrics (GLUE, as the paper averages MRPC acc/F1 into one number before
averaging tasks: RoBERTa 86.35 in Table 7), F1 for QA and overall entity F1 for NER. The GLUE average is
the mean of the task scores present.

Splits: a result file may hold several evaluation sets (`etkd finetune --eval-file dev=... --eval-file
test=...` writes `f1_dev`, `f1_test`, ... and a `splits` map). The tables are per split: `--split auto`
(the default) shows the first of test / dev / validation / eval present, `--split NAME` one split, `--split
all` each in turn; retention compares student and teacher on the same split. A result file without the
split, or without the metrics a table needs, is an error naming the file and the splits/keys it has
(`--allow-missing` shows '-' instead).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .tasks import GLUE_TASKS, NER_TASKS, QA_TASKS

GLUE_ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")  # paper Table 3 order
GLUE_TITLES = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE",
               "sst2": "SST-2", "stsb": "STS-B", "wnli": "WNLI"}  # fmt: skip
GLUE_COLUMNS = {
    "cola": ("mcc",),
    "mnli": ("accuracy_m", "accuracy_mm"),
    "mrpc": ("accuracy", "f1"),
    "qnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "rte": ("accuracy",),
    "sst2": ("accuracy",),
    "stsb": ("pearson", "spearman"),
    "wnli": ("accuracy",),
}
QA_TITLES = {"squad": "SQuAD1.1", "hotpotqa": "HotpotQA", "triviaqa": "TriviaQA"}
NER_TITLES = {"conll2003": "CoNLL-2003", "gonerd": "GONERD", "ner": "NER"}
NER_TYPES = ("PER", "ORG", "LOC", "MISC")


SPLIT_PREFERENCE = ("test", "dev", "validation", "eval")  # what `--split auto` shows, first present wins
UNNAMED_SPLIT = "eval"  # the split of metrics that carry no split suffix (one unnamed evaluation set)


@dataclass
class Result:
    """One result JSON: `splits` maps a split name to its metrics, without the split suffix."""

    path: str
    model: str
    task: str
    teacher: str | None
    splits: dict[str, dict[str, float]]


def split_metrics(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{split: metrics} of one result JSON.

    `etkd finetune` writes `splits` itself; older files (and hand-written ones) have only the flat
    `metrics`, whose keys end in `_<split>` for every named evaluation set listed in `eval_sets`
    (`f1_PER_test` -> split `test`, key `f1_PER`); keys without a suffix belong to split "eval". MNLI's
    matched / mismatched sets are parts of one split, not splits: `m`/`mm` (or `dev_m`/`dev_mm`) give the
    keys `accuracy_m`/`accuracy_mm` of split "eval" (or `dev`).
    """
    if isinstance(r.get("splits"), dict):
        raw = {str(n): dict(m) for n, m in r["splits"].items()}
    else:
        flat = dict(r["metrics"])
        raw: dict[str, dict[str, float]] = {}
        names = [n for n in (r.get("eval_sets") or {}) if n != UNNAMED_SPLIT]
        for name in sorted(names, key=len, reverse=True):  # "dev_mm" before "mm" before "m"
            suffix = "_" + name
            for key in [k for k in flat if k.endswith(suffix)]:
                raw.setdefault(name, {})[key[: -len(suffix)]] = flat.pop(key)
        if flat:
            raw.setdefault(UNNAMED_SPLIT, {}).update(flat)
    if r["task"] != "mnli":
        return raw
    out: dict[str, dict[str, float]] = {}
    for name, metrics in raw.items():
        split, part = name, ""
        for p in ("mm", "m"):
            if name == p or name.endswith("_" + p):
                split, part = name[: -len(p)].rstrip("_") or UNNAMED_SPLIT, "_" + p
                break
        out.setdefault(split, {}).update({k + part: v for k, v in metrics.items()})
    return out


def load_results(paths: list[str]) -> list[Result]:
    """Every result JSON (with `task` and `metrics`) among `paths` (files, or dirs searched recursively)."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"report: {p} does not exist")
    results = []
    for f in files:
        with open(f) as fh:
            try:
                r = json.load(fh)
            except json.JSONDecodeError as exc:
                raise UserError(f"{f}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(r, dict) or "task" not in r or not isinstance(r.get("metrics"), dict):
            continue  # predictions files and other JSONs
        model = r.get("model") or os.path.basename(os.path.dirname(os.path.abspath(f)))
        results.append(Result(f, model, r["task"], r.get("teacher"), split_metrics(r)))
    if not results:
        raise UserError(f"report: no result JSONs (with 'task' and 'metrics') in {paths}")
    return results


def choose_splits(results: list[Result], wanted: str) -> list[str]:
    """`all`: every split seen; `auto`: the first of SPLIT_PREFERENCE seen (else all); or the one named."""
    names = sorted({s for r in results for s in r.splits})
    if wanted == "all":
        return names
    if wanted == "auto":
        return next(([p] for p in SPLIT_PREFERENCE if p in names), names)
    if wanted not in names:
        raise UserError(f"--split {wanted}: no result has this split (splits seen: {', '.join(names)})")
    return [wanted]


def needed_keys(task: str) -> tuple[str, ...]:
    """Metric keys of which a task's score needs at least one."""
    if task in GLUE_COLUMNS:
        return GLUE_COLUMNS[task] + (("accuracy",) if task == "mnli" else ())
    return ("f1",)


def split_view(results: list[Result], split: str) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """({model: {task: metrics}} of one split, problems): a problem names a file that has no score there
    for its task, with the splits or keys it does have."""
    view: dict[str, dict[str, dict[str, float]]] = {}
    files: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        files.setdefault((r.model, r.task), []).append(r)
        if split in r.splits:
            view.setdefault(r.model, {}).setdefault(r.task, {}).update(r.splits[split])
    problems = []
    for (model, task), rs in files.items():
        metrics = view.get(model, {}).get(task)
        where = ", ".join(r.path for r in rs)
        if metrics is None:
            view.setdefault(model, {})[task] = {}  # a row of '-' under --allow-missing
            seen = sorted({s for r in rs for s in r.splits})
            problems.append(f"{where}: {model} / {task} has no split {split!r} (splits: {', '.join(seen)})")
        elif task_score(task, metrics) is None:
            problems.append(f"{where}: {model} / {task} split {split!r} has none of the keys "
                            f"{list(needed_keys(task))} (keys: {sorted(metrics)})")  # fmt: skip
    return view, problems


def task_score(task: str, metrics: dict[str, float]) -> float | None:
    """The number a task contributes to averages, retention and Δ (None when its metrics are missing)."""
    if task in GLUE_COLUMNS:
        vals = [metrics.get(k) for k in GLUE_COLUMNS[task]]
        if task == "mnli" and all(v is None for v in vals) and "accuracy" in metrics:
            vals = [metrics["accuracy"]]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None
    return metrics.get("f1")


def glue_average(tasks: dict[str, dict[str, float]]) -> float | None:
    scores = [task_score(t, tasks[t]) for t in GLUE_ORDER if t in tasks]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}%"


Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)


def glue_table(results) -> Table | None:
    models = [m for m, t in results.items() if any(k in GLUE_TASKS for k in t)]
    if not models:
        return None
    present = [t for t in GLUE_ORDER if any(t in results[m] for m in models)]
    rows = []
    for m in models:
        row = [m]
        for t in present:
            met = results[m].get(t)
            if met is None:
                row.append("-")
                continue
            cols = GLUE_COLUMNS[t]
            if t == "mnli" and not any(c in met for c in cols):
                cols = ("accuracy",)
            row.append(" / ".join(_fmt(met.get(c)) for c in cols))
        row.append(_fmt(glue_average(results[m]), 2))
        rows.append(row)
    return "GLUE", ["Model"] + [GLUE_TITLES[t] for t in present] + ["Avg"], rows


def _family_table(results, tasks, title: str, header_of, cells_of) -> Table | None:
    """A row per model with results in `tasks`: `header_of(task)` columns per task present, filled by
    `cells_of(metrics)` (metrics {} where the model has none for that task)."""
    models = [m for m, t in results.items() if any(k in tasks for k in t)]
    if not models:
        return None
    present = [t for t in tasks if any(t in results[m] for m in models)]
    header = ["Model"] + [h for t in present for h in header_of(t)]
    return (
        title,
        header,
        [[m] + [c for t in present for c in cells_of(results[m].get(t, {}))] for m in models],
    )


def qa_table(results) -> Table | None:
    return _family_table(
        results, QA_TASKS, "Question answering", lambda t: [f"{QA_TITLES[t]} {k}" for k in ("EM", "F1")],
        lambda met: [_fmt(met.get("exact_match"), 2), _fmt(met.get("f1"), 2)],
    )  # fmt: skip


def ner_table(results) -> Table | None:
    return _family_table(
        results, NER_TASKS, "Named entity recognition (F1)",
        lambda t: [f"{NER_TITLES[t]} {k}" for k in NER_TYPES + ("ALL",)],
        lambda met: [_fmt(met.get(f"f1_{k}")) for k in NER_TYPES] + [_fmt(met.get("f1"))],
    )  # fmt: skip


def _score_columns(results, models: list[str]) -> list[tuple[str, str]]:
    """(title, key) of every score column: the GLUE average, then each QA and NER task present."""
    cols = []
    if any(any(t in GLUE_TASKS for t in results[m]) for m in models):
        cols.append(("GLUE", "glue"))
    for t in QA_TASKS:
        if any(t in results[m] for m in models):
            cols.append((QA_TITLES[t], t))
    for t in NER_TASKS:
        if any(t in results[m] for m in models):
            cols.append((NER_TITLES[t], t))
    return cols


def _score(results, model: str | None, key: str) -> float | None:
    if model is None or model not in results:
        return None
    if key == "glue":
        return glue_average(results[model])
    met = results[model].get(key)
    return None if met is None else task_score(key, met)


def retention_table(results, pairs: list[tuple[str, str]]) -> Table | None:
    """Student score / teacher score x 100, per task (GLUE tasks one by one, then their average)."""
    if not pairs:
        return None
    for s, t in pairs:
        for m in (s, t):
            if m not in results:
                raise UserError(f"report: no results for model {m!r} (known: {sorted(results)})")
    glue_present = [t for t in GLUE_ORDER if any(t in results[m] for p in pairs for m in p)]
    other = [c for c in _score_columns(results, [m for p in pairs for m in p]) if c[1] != "glue"]
    cols = (
        [(GLUE_TITLES[t], t) for t in glue_present] + ([("GLUE avg", "glue")] if glue_present else []) + other
    )
    rows = []
    for s, t in pairs:
        row = [f"{s} / {t}"]
        for _, key in cols:
            ss, ts = _score(results, s, key), _score(results, t, key)
            row.append("-" if ss is None or not ts else f"{100.0 * ss / ts:.1f}%")
        rows.append(row)
    return "Retention (student / teacher)", ["Student / Teacher"] + [c for c, _ in cols], rows


def delta_table(results, base: str | None, kd: str | None, convert: str | None, convert_kd: str | None):
    """Paper Table 7: base scores, then relative change (%) of KD, Convert, Convert+KD. A column the base
    has no score for (long-context tasks) shows Convert's score and Convert+KD relative to Convert."""
    if not base:
        return None
    named = [m for m in (base, kd, convert, convert_kd) if m]
    for m in named:
        if m not in results:
            raise UserError(f"report: no results for model {m!r} (known: {sorted(results)})")
    cols = _score_columns(results, named)
    rows = [[base], ["Δ KD"], ["Δ Convert"], ["Δ Convert+KD"]]
    for _, key in cols:
        b, k, c, ck = (_score(results, m, key) for m in (base, kd, convert, convert_kd))

        def rel(x, ref):
            return None if x is None or not ref else 100.0 * (x - ref) / ref

        if b is not None:
            vals = [_fmt(b, 2), _pct(rel(k, b)), _pct(rel(c, b)), _pct(rel(ck, b))]
        else:
            vals = ["-", "-", _fmt(c, 2), _pct(rel(ck, c))]
        for row, v in zip(rows, vals):
            row.append(v)
    return "Effect of Convert and KD (Δ relative to the base)", ["Model"] + [t for t, _ in cols], rows


def to_markdown(table: Table) -> str:
    title, header, rows = table
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: str) -> None:
    _, header, rows = table
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def build_tables(results, pairs, base=None, kd=None, convert=None, convert_kd=None, teachers=None,
                 split: str = UNNAMED_SPLIT) -> dict[str, Table]:  # fmt: skip
    """Every table of one split's view `{model: {task: metrics}}`; titles name the split (unless "eval")."""
    teachers = teachers or {}
    pairs = list(pairs) + [(s, t) for s, t in teachers.items() if (s, t) not in pairs and t in results]
    tables = {
        "glue": glue_table(results),
        "qa": qa_table(results),
        "ner": ner_table(results),
        "retention": retention_table(results, pairs),
        "delta": delta_table(results, base, kd, convert, convert_kd),
    }
    label = "" if split == UNNAMED_SPLIT else f" ({split} split)"
    return {k: (v[0] + label, v[1], v[2]) for k, v in tables.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    pairs = []
    for p in args.pair or []:
        s, sep, t = p.partition("=")
        if not sep or not s or not t:
            raise UserError(f"--pair: expected STUDENT=TEACHER, got {p!r}")
        pairs.append((s, t))
    results = load_results(args.results)
    teachers = {r.model: r.teacher for r in results if r.teacher}
    splits = choose_splits(results, args.split)
    os.makedirs(args.out_dir, exist_ok=True)
    md = []
    for split in splits:
        view, problems = split_view(results, split)
        if problems and not args.allow_missing:
            raise UserError("report: results without the scores the tables need (--allow-missing shows them "
                            "as '-'):\n  " + "\n  ".join(problems))  # fmt: skip
        for problem in problems:
            print(f"[etkd report] warning: {problem}", file=sys.stderr)
        tables = build_tables(view, pairs, args.base, args.kd, args.convert, args.convert_kd, teachers, split)
        md += [to_markdown(t) for t in tables.values()]
        for name, t in tables.items():
            write_csv(
                t, os.path.join(args.out_dir, f"{name}.csv" if len(splits) == 1 else f"{name}_{split}.csv")
            )
    text = "\n".join(md)
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="paper-style score / retention / Δ tables from result JSONs",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("results", nargs="+", help="result JSON files or directories holding them")
    p.add_argument("--pair", action="append", help="STUDENT=TEACHER model names for retention, repeatable")
    p.add_argument("--split", default="auto",
                   help="evaluation split to tabulate (e.g. test, dev); 'auto': the first of "
                   f"{', '.join(SPLIT_PREFERENCE)} present; 'all': one set of tables per split")  # fmt: skip
    p.add_argument("--allow-missing", action="store_true",
                   help="show '-' for results without the split or metrics a table needs instead of failing")  # fmt: skip
    p.add_argument("--base", help="Table 7: the base model (e.g. RoBERTa)")
    p.add_argument("--kd", help="Table 7: the base distilled")
    p.add_argument("--convert", help="Table 7: the base converted to a long-input pattern (`etkd convert`)")
    p.add_argument("--convert-kd", help="Table 7: converted, then distilled")
    p.add_argument("--out-dir", default="report", help="where report.md and the CSVs go")
    p.set_defaults(func=run)
