"""`etkd kd-task`: task-specific KD with the Taylor-series loss (paper 2, eq. 8-9); the teacher is not
fine-tuned on the task.

    etkd kd-task --teacher bert/ --student-layers every_other --train-file sst2/train.jsonl \
        --eval-file sst2/dev.jsonl --loss taylor-mse --lambda-sweep 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 --output-dir runs/sst2

Data: local .jsonl/.parquet with `--text-field` (and `--text-pair-field`) and `--label-field`; integer or
string labels are classes, float labels (STS-B) are Platt-scaled, p = 1/(1+exp(-(t - 2.5))), into two-class
targets. Losses: taylor (eq. 8 as printed; equals CE - H(teacher), see losses.py), taylor-mse (the
authors' first released loss, carries the teacher), kd (KL at T, x T^2), ce (no teacher);
L = lambda * CE + (1 - lambda) * L_KD. With --lambda-sweep each lambda trains a fresh student into
OUTPUT_DIR/lambda_<value> and results.json lists the eval metric of each.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from .config import add_config_arg, finish, resolve
from .core import (
    MODEL_DEFAULTS,
    TRAIN_DEFAULTS,
    add_model_args,
    add_train_args,
    check_vocab,
    is_main_process,
    load_model,
    log,
    named_values,
    prepare_model,
    save_model,
    start_run,
    tokenizer_for,
    train_config,
    with_head,
    write_json,
)
from .data import ClassificationCollator, load_classification
from .distill import STUDENT_DEFAULTS, add_student_args, build_student
from .errors import UserError
from .losses import TASK_LOSSES, inverse_platt, platt_scale, task_kd_loss
from .training import train

DEFAULTS = {
    **TRAIN_DEFAULTS,
    **MODEL_DEFAULTS,
    **STUDENT_DEFAULTS,
    "tokenizer": None,
    "train_file": None,
    "eval_file": None,
    "text_field": None,  # auto: the first of TEXT_FIELDS in the data
    "text_pair_field": None,
    "label_field": "label",
    "label_names": None,
    "num_labels": None,
    "max_length": 128,
    "skip_bad_records": False,
    "loss": "taylor",
    "lam": 0.5,
    "lambda_sweep": None,
    "temperature": 1.0,
    "platt_center": 2.5,
    "eval_batch_size": 32,
    "overwrite": False,
}
TEXT_FIELDS = ("text", "sentence", "sentence1", "question1", "premise", "question")  # as `finetune` GLUE
DEFAULTS.update(output_dir="runs/kd-task", learning_rate=5e-5, max_steps=1000)


def register(subparsers) -> None:
    p = subparsers.add_parser("kd-task", help="task-specific KD (Taylor-series loss) on a classification set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arg(p)
    add_student_args(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the teacher dir)")
    g = p.add_argument_group("task data")
    g.add_argument("--train-file", dest="train_file", default=None, help=".jsonl/.parquet file or dir")
    g.add_argument("--train", dest="train_file", default=None, help=argparse.SUPPRESS)
    g.add_argument("--eval-file", dest="eval_file", action="append", default=None,
                   help="[NAME=]FILE: .jsonl/.parquet file or dir, repeatable (as finetune's; a named set's "
                   "metrics are reported as accuracy_NAME / pearson_NAME)")  # fmt: skip
    g.add_argument("--eval", dest="eval_file", action="append", default=None, help=argparse.SUPPRESS)
    g.add_argument("--text-field", dest="text_field", default=None,
                   help=f"text column (default: the first of {', '.join(TEXT_FIELDS)} present)")  # fmt: skip
    g.add_argument("--text-pair-field", dest="text_pair_field", default=None)
    g.add_argument("--label-field", dest="label_field", default=None)
    g.add_argument("--label-names", dest="label_names", default=None, help="comma-separated, fixes the order")
    g.add_argument("--num-labels", dest="num_labels", type=int, default=None, help="default: from the data")
    g.add_argument("--max-length", dest="max_length", type=int, default=None)
    g.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true", default=None)
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=TASK_LOSSES, default=None, help="taylor | taylor-mse | kd | ce")
    g.add_argument("--lambda", dest="lam", type=float, default=None, help="weight of CE (0.5)")
    g.add_argument("--lambda-sweep", dest="lambda_sweep", default=None, help="comma-separated lambdas")
    g.add_argument("--temperature", type=float, default=None, help="KD temperature (1.0, as the paper)")
    g.add_argument("--platt-center", dest="platt_center", type=float, default=None)
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=None)
    add_model_args(p)
    add_train_args(p)
    finish(p, DEFAULTS, func=run)


def with_classification_head(model, num_labels: int, seed: int):
    """`model` itself if it already has a `num_labels` classification head, else a copy of its encoder with
    a fresh (seeded) one, as paper 2 uses a teacher that was never fine-tuned on the task."""
    return with_head(model, "sequence_classification", num_labels, seed=seed)


def targets(labels: torch.Tensor, regression: bool, center: float) -> torch.Tensor:
    return platt_scale(labels, center) if regression else labels


def make_loss(teacher, name: str, lam: float, temperature: float, regression: bool, center: float):
    def step(student, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = student(**inputs).logits
        t_logits = None
        if teacher is not None and name != "ce":
            with torch.no_grad():
                t_logits = teacher(**inputs).logits
        return task_kd_loss(
            name, logits, t_logits, targets(batch["labels"], regression, center), lam, temperature
        )

    return step


@torch.no_grad()
def evaluate(model, records, collate, batch_size: int, regression: bool, center: float) -> dict[str, float]:
    """Accuracy (classes) or Pearson r of the inverse-Platt score against the target (regression)."""
    device = next(model.parameters()).device
    model.eval()
    preds, gold = [], []
    for i in range(0, len(records), batch_size):
        batch = collate(records[i : i + batch_size])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float().cpu()
        if regression:
            preds.append(inverse_platt(logits.softmax(-1)[:, 1], center))
        else:
            preds.append(logits.argmax(-1))
        gold.append(batch["labels"])
    p, g = torch.cat(preds), torch.cat(gold)
    model.train()
    if regression:  # percentages, as every etkd metric
        pc, gc = p - p.mean(), g - g.mean()
        r = float((pc * gc).sum() / ((pc.norm() * gc.norm()) + 1e-12))
        return {"pearson": 100.0 * r}
    return {"accuracy": 100.0 * float((p == g).float().mean())}


def detect_text_field(path: str) -> str:
    """The first of TEXT_FIELDS that the first record of `path` has."""
    from .data import _Skips, iter_records, list_files

    for file in list_files(path, "--train-file"):
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = [dict.fromkeys(pq.ParquetFile(file).schema_arrow.names, "")]
        else:
            rows = iter_records(file, _Skips("skip"), ())
        for row in rows:
            found = next((f for f in TEXT_FIELDS if isinstance(row.get(f), str)), None)
            if found is None:
                raise UserError(f"{file}: no text field among {list(TEXT_FIELDS)} (fields: {sorted(row)}); "
                                "give --text-field")  # fmt: skip
            log.info("--text-field: using %r", found)
            return found
    raise UserError(f"--train-file {path}: no records")


def lambdas(ns: argparse.Namespace) -> list[float]:
    if not ns.lambda_sweep:
        return [float(ns.lam)]
    values = ns.lambda_sweep if isinstance(ns.lambda_sweep, list) else str(ns.lambda_sweep).split(",")
    try:
        out = [float(v) for v in values if str(v).strip()]
    except ValueError:
        raise UserError(
            f"--lambda-sweep: expected comma-separated numbers, got {ns.lambda_sweep!r}"
        ) from None
    bad = [v for v in out if not 0.0 <= v <= 1.0]
    if not out or bad:
        raise UserError(f"--lambda-sweep: expected values in [0, 1], got {ns.lambda_sweep!r}")
    return out


def run(args: argparse.Namespace) -> int:
    ns = resolve(args, DEFAULTS)
    if not ns.teacher or not ns.train_file:
        raise UserError("--teacher and --train-file: both required")
    if ns.text_field is None:
        ns.text_field = detect_text_field(ns.train_file)
    on_error = "skip" if ns.skip_bad_records else "raise"
    label_names = ns.label_names.split(",") if isinstance(ns.label_names, str) else ns.label_names
    fields = dict(text_field=ns.text_field, text_pair_field=ns.text_pair_field, label_field=ns.label_field,
                  label_names=label_names, on_error=on_error)  # fmt: skip
    train_records, info = load_classification(ns.train_file, **fields)
    eval_sets = [  # (name, records) of every [NAME=]FILE, read before the teacher and any training
        (
            name,
            load_classification(path, **{**fields, "label_names": info["label_names"]}, flag="--eval-file")[
                0
            ],
        )
        for name, path in named_values(ns.eval_file, "--eval-file")
    ]
    num_labels = ns.num_labels or info["num_labels"]
    if info["regression"] and num_labels != 2:
        raise UserError(f"--num-labels: Platt-scaled regression targets need 2 classes, got {num_labels}")
    regression = info["regression"]

    base_teacher = load_model(ns.teacher, "--teacher")
    teacher = prepare_model(with_classification_head(base_teacher, num_labels, ns.seed), ns)
    tokenizer = tokenizer_for(ns, ns.teacher, ns.student)
    collate = ClassificationCollator(tokenizer, max_length=ns.max_length)
    check_vocab(tokenizer, base_teacher)
    is_main = is_main_process()
    start_run(ns)

    results = []
    sweep = lambdas(ns)
    for lam in sweep:
        torch.manual_seed(ns.seed)
        student = prepare_model(
            with_classification_head(build_student(base_teacher, ns), num_labels, ns.seed), ns
        )
        out_dir = os.path.join(ns.output_dir, f"lambda_{lam:g}") if len(sweep) > 1 else ns.output_dir
        loss_fn = make_loss(teacher, ns.loss, lam, ns.temperature, regression, ns.platt_center)
        result = train(student, train_records, loss_fn, train_config(ns, out_dir), collate_fn=collate,
                       extra_modules=(teacher,))  # fmt: skip
        row = {"lambda": lam, "loss": result["loss"], "step": result["step"], "dir": out_dir}
        for name, records in eval_sets:
            scores = evaluate(
                result["model"], records, collate, ns.eval_batch_size, regression, ns.platt_center
            )
            row.update({f"{k}_{name}" if name else k: v for k, v in scores.items()})
        if result["is_main_process"] and result["step"] >= ns.max_steps:
            row["saved"] = save_model(result["model"], os.path.join(out_dir, "student"), tokenizer)
        results.append(row)
        print(f"[etkd kd-task] loss={ns.loss} lambda={lam:g}: " +
              ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "lambda"))  # fmt: skip
    metric = "pearson" if regression else "accuracy"
    if eval_sets and eval_sets[0][0]:  # named sets: "best" is chosen on the first one
        metric = f"{metric}_{eval_sets[0][0]}"
    scored = [r for r in results if metric in r and not math.isnan(r[metric])]
    summary = {"loss": ns.loss, "metric": metric, "runs": results, "label_names": info["label_names"],
               "regression": regression, "skipped_records": info["skipped"]}  # fmt: skip
    if scored:
        summary["best"] = max(scored, key=lambda r: r[metric])
    if is_main:
        write_json(os.path.join(ns.output_dir, "results.json"), summary)
    return 0
