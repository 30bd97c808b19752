"""`etkd finetune` and `etkd evaluate`: GLUE, extractive QA (SQuAD / HotpotQA / TriviaQA) and NER (CoNLL-2003,
GONERD) on our encoders (or any HF checkpoint, loaded through `etkd.models.from_hf`).

finetune = load model + tokenizer -> task head of the right size -> `training.train` (accelerate, progress,
checkpoints, `--resume`) -> save `<output_dir>/model` (our format + tokenizer) -> evaluate every eval set ->
`<output_dir>/eval_results.json`. evaluate = the last step alone. Results JSONs feed `etkd report`; every
metric in them is a percentage.

Options come from the CLI, or from `--config FILE` (YAML/JSON, keys = option names with underscores);
the CLI wins. Data: `--train-file` / `--eval-file [NAME=]PATH` (local files never touch the network), else
`--dataset NAME [--dataset-config C]` or the task's default HF dataset.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from etkd.models import patterns

from .config import finish, resolve
from .core import (
    TRAIN_DEFAULTS,
    add_model_args,
    add_train_args,
    check_output_file,
    check_vocab,
    named_values,
    prepare_model,
    start_run,
    train_config,
)
from .errors import UserError
from .tasks import GLUE_TASKS, NER_TASKS, QA_TASKS, task_family

# HF datasets used when no local file and no --dataset is given: (name, config, train split, eval splits).
HF_DEFAULTS = {
    **{t: ("nyu-mll/glue", t, "train", None) for t in GLUE_TASKS},
    "squad": ("rajpurkar/squad", None, "train", ["validation"]),
    "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "train", ["validation"]),
    "triviaqa": ("mandarjoshi/trivia_qa", "rc", "train", ["validation"]),
    "conll2003": ("eriktks/conll2003", None, "train", ["validation"]),
}
HEADS = {"glue": "sequence_classification", "qa": "question_answering", "ner": "token_classification"}
# The driver core's training settings (`core.TRAIN_DEFAULTS`, one spelling each) with fine-tuning's own
# defaults, and the task settings.
DEFAULTS: dict[str, Any] = {
    **TRAIN_DEFAULTS,
    "tokenizer": None,
    "train_file": None,
    "eval_file": None,
    "dataset": None,
    "dataset_config": None,
    "train_split": None,
    "eval_split": None,
    "evidence_dir": None,
    "max_length": None,  # default: what the model's position table covers
    "doc_stride": 128,
    "max_query_length": 64,
    "n_best": 20,
    "max_answer_length": 30,
    "ner_unit": None,  # sentence (conll2003) / document (gonerd; or any task with --ner-group-sentences)
    "ner_group_sentences": None,
    "ner_stride": 128,
    "output_dir": "runs/finetune",
    "per_device_batch_size": 16,
    "learning_rate": 3e-5,
    "warmup_ratio": 0.06,
    "stop_at_step": None,
    "eval_batch_size": 32,
    "global_prefix": 0,
    "backend": None,
    "gradient_checkpointing": False,
    "dtype": "fp32",
    "name": None,
    "teacher": None,
    "output": None,
    "limit": None,
    "progress": True,
    "overwrite": False,
    "labels": None,
}


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer.


def load_tokenizer(path: str, family: str, flag: str = "--tokenizer"):
    """A fast tokenizer (offsets and word ids are needed); NER on byte-level BPE needs add_prefix_space."""
    from .core import load_tokenizer as load

    return load(path, flag, fast=True, add_prefix_space=family == "ner")


def load_model(path: str, head: str, num_labels: int, extra: dict[str, Any] | None = None, *, seed: int = 0):
    """Our checkpoint or an HF one, with a `head` of `num_labels` outputs (a new head drawn from `seed` when
    the checkpoint has another head or size; the encoder weights are kept)."""
    from .core import load_model as load
    from .core import with_head

    model = load(path, "--model")
    want = num_labels if head != "question_answering" else model.config.num_labels
    return with_head(model, head, want, seed=seed, extra=extra)


# ----------------------------------------------------------------------------------------------------------
# Data.


def read_examples(
    task: str, source: str, *, hf: bool, o: dict[str, Any], limit: int | None = None
) -> list[dict[str, Any]]:
    """Examples of one local file (hf=False) or one split of an HF dataset (hf=True, source = split); the first
    `limit` of them when given (`--limit`: finetune's training set, evaluate's sets)."""
    from .tasks import glue, ner, qa

    family = task_family(task)
    name, config = (
        (o["dataset"], o["dataset_config"]) if o["dataset"] else HF_DEFAULTS.get(task, (None,) * 2)[:2]
    )
    if hf and name is None:
        raise UserError(f"--task {task}: no public dataset; give --train-file / --eval-file")
    unit = o["ner_unit"] or ("document" if task == "gonerd" or o["ner_group_sentences"] else "sentence")
    if family == "glue":
        ex = glue.load_glue_hf(task, source, name) if hf else glue.read_glue_file(source, task)
    elif family == "qa":
        ex = (
            qa.load_qa_hf(task, name, source, config)
            if hf
            else qa.read_qa_file(source, task, o["evidence_dir"])
        )
    else:
        ex = (
            ner.load_ner_hf(name, source, config)
            if hf
            else ner.read_conll(source, unit, o["ner_group_sentences"])
        )
        ner.check_types(ex, entity_types(task, o), source)
    if limit:
        ex = ex[: int(limit)]
    if not ex:
        raise UserError(f"{source}: no examples")
    return ex


def entity_types(task: str, o: dict[str, Any]) -> set[str] | None:
    """Entity types NER data may use: CoNLL-2003's four (conll2003, gonerd) plus `--labels`; None = any."""
    from .tasks.ner import ENTITY_TYPES

    extra = o["labels"] or []
    extra = extra.split(",") if isinstance(extra, str) else list(extra)
    if task == "ner" and not extra:
        return None
    return set(ENTITY_TYPES) | {t.strip() for t in extra if t.strip()}


def eval_sources(task: str, o: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(metric suffix, file or split, is_hf) for every evaluation set."""
    if o["eval_file"]:
        named = named_values(o["eval_file"], "--eval-file")
        if task == "mnli" and len(named) == 2 and all(n in ("0", "1") for n, _ in named):
            named = [("m", named[0][1]), ("mm", named[1][1])]
        return [(n, p, False) for n, p in named]
    if o["eval_split"]:
        return [(n, s, True) for n, s in named_values(o["eval_split"], "--eval-split")]
    if o["train_file"]:
        return []  # local training data and no local eval file: never reach for the network
    if task in GLUE_TASKS:
        from .tasks.glue import get_task

        return [(suffix, split, True) for split, suffix in get_task(task).eval_splits]
    return [("", s, True) for s in HF_DEFAULTS.get(task, (None, None, None, ["validation"]))[3]]


def labels_for(task: str, model_path: str | None, examples: list[list[dict[str, Any]]]) -> list[str]:
    """Label names: GLUE's fixed ones; NER: a token-classification checkpoint's own list if it has one
    (another head's labels, e.g. a classifier's, say nothing about tags), else from the data."""
    family = task_family(task)
    if family == "glue":
        from .tasks.glue import get_task

        t = get_task(task)
        return list(t.label_names) or ["score"]
    if family == "qa":
        return []
    if model_path and os.path.isfile(os.path.join(model_path, "config.json")):
        with open(os.path.join(model_path, "config.json")) as f:
            saved = json.load(f)
        if saved.get("head") == "token_classification" and saved.get("extra", {}).get("labels"):
            return list(saved["extra"]["labels"])
    from .tasks.ner import label_list

    return label_list(*examples)


def set_max_length(o: dict[str, Any], model, tokenizer, example_sets) -> None:
    """`--max-length` (default: what both the model's positions and the tokenizer take), then the windows it
    leaves checked before any training: a QA window must hold more context tokens than `--doc-stride` next to
    the longest question of `example_sets` (cut to `--max-query-length`), else the tokenizer fails mid-run."""
    given = o["max_length"] is not None
    if not given:
        o["max_length"] = min(model.config.max_tokens, getattr(tokenizer, "model_max_length", 10**9))
    if task_family(o["task"]) != "qa":
        return
    questions = [e["question"].lstrip() for examples in example_sets for e in examples]
    lengths = tokenizer(questions, add_special_tokens=False)["input_ids"] if questions else []
    longest = min(max((len(ids) for ids in lengths), default=0), o["max_query_length"])
    special = tokenizer.num_special_tokens_to_add(pair=True)
    room = o["max_length"] - longest - special
    if o["doc_stride"] >= room:
        length = f"--max-length {o['max_length']}" + ("" if given else " (the model's)")
        raise UserError(
            f"--doc-stride {o['doc_stride']}: expected less than a window's context tokens, {length} - "
            f"{longest} (the longest question, at most --max-query-length {o['max_query_length']}) - {special} "
            f"special tokens = {room}; lower --doc-stride or --max-query-length, or raise --max-length"
        )


def encode(task: str, examples, tokenizer, labels: list[str], o: dict[str, Any], train: bool) -> list[dict]:
    from .tasks import glue, ner, qa

    family = task_family(task)
    if family == "glue":
        return glue.encode(examples, tokenizer, o["max_length"])
    if family == "qa":
        return qa.encode(examples, tokenizer, o["max_length"], o["doc_stride"], o["max_query_length"], train)
    return ner.encode(
        examples, tokenizer, {t: i for i, t in enumerate(labels)}, o["max_length"], o["ner_stride"]
    )


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "global_attention_mask")
TARGET_KEYS = ("labels", "start_positions", "end_positions")


def make_collate(
    pad_id: int, cls_global: bool, global_prefix: int = 0
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pads to the longest feature; drops bookkeeping keys. `cls_global` gives token 0 global attention
    (models whose pattern has global tokens) where the features carry no global mask of their own, and also the
    `global_prefix` tokens after it (a title, header or question at the start of every sequence)."""

    def collate(feats: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in feats)
        batch: dict[str, torch.Tensor] = {}
        pads = {"input_ids": pad_id, "labels": -100}
        for k in MODEL_KEYS + TARGET_KEYS:
            if k not in feats[0]:
                continue
            v0 = feats[0][k]
            if isinstance(v0, list):
                pad = pads.get(k, 0)
                batch[k] = torch.tensor([f[k] + [pad] * (n - len(f[k])) for f in feats])
            else:
                batch[k] = torch.tensor([f[k] for f in feats])
        if cls_global and "global_attention_mask" not in batch:
            g = torch.zeros_like(batch["input_ids"])
            g[:, : 1 + global_prefix] = 1
            if "attention_mask" in batch:
                g = g * batch["attention_mask"]  # padding is never global
            batch["global_attention_mask"] = g
        if not cls_global:
            batch.pop("global_attention_mask", None)
        return batch

    return collate


def collate_for(model, tokenizer, o: dict[str, Any]) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """`make_collate` for this model and the options; says so when `--global-prefix` cannot take effect."""
    glob = uses_global_tokens(model)
    if o["global_prefix"] and not glob:
        from .core import log

        log.warning(
            "--global-prefix %d: ignored, model attention %r has no global tokens (patterns with them: %s)",
            o["global_prefix"],
            model.config.attention,
            ", ".join(global_token_patterns()),
        )
    return make_collate(tokenizer.pad_token_id, glob, int(o["global_prefix"]))


def uses_global_tokens(model) -> bool:
    """Whether the model's attention pattern takes a per-token global mask (its registry entry says so)."""
    return patterns.get(model.config.attention).global_tokens


def global_token_patterns() -> list[str]:
    """The registered patterns that take global tokens (`Pattern.global_tokens`)."""
    return [p.name for p in patterns.PATTERNS.values() if p.global_tokens]


def forward(model, batch: dict[str, torch.Tensor]):
    return model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}).logits


def make_loss(family: str, regression: bool):
    def loss_fn(model, batch):
        logits = forward(model, batch)
        if family == "glue":
            if regression:
                loss = F.mse_loss(logits.squeeze(-1).float(), batch["labels"].float())
            else:
                loss = F.cross_entropy(logits.float(), batch["labels"])
        elif family == "ner":
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        else:
            s = logits.shape[1]
            loss = 0.5 * (
                F.cross_entropy(logits[..., 0].float(), batch["start_positions"].clamp(0, s - 1))
                + F.cross_entropy(logits[..., 1].float(), batch["end_positions"].clamp(0, s - 1))
            )
        return loss, {}

    return loss_fn


# ----------------------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def predict(
    model, features: list[dict], collate, batch_size: int, progress: bool = False
) -> list[torch.Tensor]:
    """Logits per feature (unpadded length for token-level heads), batching features of similar length."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out: list[torch.Tensor | None] = [None] * len(features)
    for b in tqdm(range(0, len(order), batch_size), desc="evaluate", unit="batch", disable=not progress,
                  dynamic_ncols=True):  # fmt: skip
        idx = order[b : b + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
        logits = forward(model, batch).float().cpu()
        for row, i in enumerate(idx):
            n = len(features[i]["input_ids"])
            out[i] = logits[row, :n] if logits.dim() == 3 else logits[row]
    return out  # type: ignore[return-value]


def evaluate_set(task: str, model, tokenizer, examples, labels, o) -> tuple[dict[str, float], Any]:
    """(metrics, predictions) of one evaluation set."""
    from .tasks import glue, ner, qa

    family = task_family(task)
    feats = encode(task, examples, tokenizer, labels, o, train=False)
    collate = collate_for(model, tokenizer, o)
    logits = predict(model, feats, collate, o["eval_batch_size"], bool(o["progress"]))
    if family == "glue":
        if not labels or labels == ["score"]:
            preds = [float(x[0]) for x in logits]
        else:
            preds = [int(x.argmax()) for x in logits]
        return glue.compute_metrics(task, preds, [e["label"] for e in examples]), preds
    if family == "qa":
        answers = qa.postprocess(examples, feats, [x[:, 0].tolist() for x in logits],
                                 [x[:, 1].tolist() for x in logits], o["n_best"], o["max_answer_length"])  # fmt: skip
        return qa.compute_metrics(examples, answers), answers
    tags = ner.merge_predictions(feats, [x.argmax(-1).tolist() for x in logits], examples, labels)
    return ner.compute_metrics(examples, tags), tags


def read_eval_sets(
    task: str, o: dict[str, Any], sources, limit: int | None = None
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(name, source, examples) of every evaluation set, read before training so a bad one fails early."""
    return [(suffix, src, read_examples(task, src, hf=hf, o=o, limit=limit)) for suffix, src, hf in sources]


def evaluate_all(task, model, tokenizer, labels, o, sets) -> tuple[dict[str, float], dict[str, Any]]:
    """(flat metrics, per-set info). Flat keys carry the set's name as a suffix (`f1_test`); info[name]
    holds the unsuffixed `metrics` too (name "eval" for one unnamed set)."""
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    for suffix, src, examples in sets:
        m, preds = evaluate_set(task, model, tokenizer, examples, labels, o)
        for k, v in m.items():
            metrics[f"{k}_{suffix}" if suffix else k] = v
        info[suffix or "eval"] = {
            "source": src,
            "num_examples": len(examples),
            "metrics": m,
            "predictions": preds,
        }
    return metrics, info


def write_results(path: str, task: str, name: str, model_path: str, metrics, info, o) -> dict[str, Any]:
    result = {
        "task": task,
        "model": name,
        "model_path": model_path,
        "teacher": o["teacher"],
        "metrics": metrics,
        "splits": {k: v["metrics"] for k, v in info.items()},  # the same numbers, by evaluation set
        "eval_sets": {k: {"source": v["source"], "num_examples": v["num_examples"]} for k, v in info.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    pred_path = os.path.splitext(path)[0] + "_predictions.json"
    with open(pred_path, "w") as f:
        json.dump({k: v["predictions"] for k, v in info.items()}, f)
    return result


# ----------------------------------------------------------------------------------------------------------
# Commands.


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    """DEFAULTS < config file < options given on the CLI, every value checked (`config.resolve`)."""
    o = vars(resolve(args, {**DEFAULTS, "task": None, "model": None}))
    for k in ("task", "model"):
        if not o.get(k):
            raise UserError(f"--{k}: required (on the command line or in --config)")
    if o["task"] not in GLUE_TASKS + QA_TASKS + NER_TASKS:
        raise UserError(f"task: expected one of {GLUE_TASKS + QA_TASKS + NER_TASKS}, got {o['task']!r}")
    return o


def _start(args: argparse.Namespace):
    """(options, task, task family, tokenizer): how `finetune` and `evaluate` both begin."""
    o = merge_options(args)
    family = task_family(o["task"])
    tokenizer = load_tokenizer(
        o["tokenizer"] or o["model"], family, "--tokenizer" if o["tokenizer"] else "--model"
    )
    return o, o["task"], family, tokenizer


def run_finetune(args: argparse.Namespace) -> int:
    from .training import train

    o, task, family, tokenizer = _start(args)
    limit = o["limit"]  # the training set only: the scores stay those of the whole evaluation sets
    if o["train_file"]:
        train_ex = read_examples(task, o["train_file"], hf=False, o=o, limit=limit)
    else:
        split = o["train_split"] or HF_DEFAULTS.get(task, (0, 0, "train"))[2]
        train_ex = read_examples(task, split, hf=True, o=o, limit=limit)
    eval_sets = read_eval_sets(task, o, eval_sources(task, o))  # every input is checked before training
    check_output_file(o["output"], "--output")
    labels = labels_for(task, o["model"], [train_ex])
    regression = labels == ["score"]
    model = load_model(o["model"], HEADS[family], max(len(labels), 1), {"task": task, "labels": labels},
                       seed=int(o["seed"]))  # fmt: skip
    check_vocab(tokenizer, model)
    ns = argparse.Namespace(**o)
    prepare_model(model, ns)
    set_max_length(o, model, tokenizer, [train_ex] + [ex for _, _, ex in eval_sets])
    feats = encode(task, train_ex, tokenizer, labels, o, train=True)
    cfg = train_config(ns)
    start_run(ns)
    collate = collate_for(model, tokenizer, o)
    result = train(model, feats, make_loss(family, regression), cfg, collate_fn=collate)
    if not result["is_main_process"]:
        return 0
    model = result["model"]
    model_dir = os.path.join(o["output_dir"], "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(
        f"[etkd finetune] {task}: {result['step']} step{'' if result['step'] == 1 else 's'}, loss {result['loss']:.4f}; model in {model_dir}"
    )
    if eval_sets:
        metrics, info = evaluate_all(task, model, tokenizer, labels, o, eval_sets)
        name = o["name"] or os.path.basename(os.path.normpath(o["output_dir"]))
        out = o["output"] or os.path.join(o["output_dir"], "eval_results.json")
        write_results(out, task, name, model_dir, metrics, info, o)
        print(json.dumps({"task": task, "model": name, "metrics": metrics}, indent=2))
    return 0


EVAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_evaluate(args: argparse.Namespace) -> int:
    o, task, family, tokenizer = _start(args)
    sources = eval_sources(task, o)
    if not sources:
        raise UserError("evaluate: give --eval-file or --eval-split")
    eval_sets = read_eval_sets(task, o, sources, limit=o["limit"])
    check_output_file(o["output"], "--output")
    labels = labels_for(task, o["model"], [ex for _, _, ex in eval_sets])
    model = load_model(o["model"], HEADS[family], max(len(labels), 1), seed=int(o["seed"]))
    check_vocab(tokenizer, model)
    prepare_model(model, argparse.Namespace(**o))
    set_max_length(o, model, tokenizer, [ex for _, _, ex in eval_sets])
    device_type = next(model.parameters()).device.type
    # --dtype bf16/fp16: weights stay fp32, matmuls and the attention kernels run in 16 bits (autocast).
    with torch.autocast(device_type, dtype=EVAL_DTYPES[o["dtype"]], enabled=o["dtype"] != "fp32"):
        metrics, info = evaluate_all(task, model, tokenizer, labels, o, eval_sets)
    name = o["name"] or os.path.basename(os.path.normpath(o["model"]))
    if o["output"]:
        write_results(o["output"], task, name, o["model"], metrics, info, o)
    print(json.dumps({"task": task, "model": name, "metrics": metrics}, indent=2))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    """The flags `finetune` and `evaluate` share (the model flags, --backend included, from the core)."""
    tasks = GLUE_TASKS + QA_TASKS + NER_TASKS
    p.add_argument("--config", help="YAML/JSON file of options (keys as below, with underscores)")
    p.add_argument("--task", choices=tasks, help="the task (required)")
    p.add_argument("--model", help="our checkpoint folder, or an HF checkpoint folder / hub name (required)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub name (default: --model)")
    p.add_argument("--eval-file", action="append", help="[NAME=]PATH, repeatable (MNLI: m=... mm=...)")
    p.add_argument("--dataset", help="HF dataset name (default: the task's public dataset)")
    p.add_argument("--dataset-config", help="HF dataset config name")
    p.add_argument("--eval-split", action="append", help="[NAME=]SPLIT of the HF dataset, repeatable")
    p.add_argument("--evidence-dir", help="TriviaQA: evidence root of original-format files")
    p.add_argument("--max-length", type=int, help="tokens per window (default: the model's positions)")
    p.add_argument("--doc-stride", type=int, help="QA: overlap of context windows, tokens")
    p.add_argument("--max-query-length", type=int, help="QA: question tokens kept")
    p.add_argument("--n-best", type=int, help="QA: start/end candidates per window")
    p.add_argument("--max-answer-length", type=int, help="QA: answer tokens at most")
    p.add_argument("--ner-unit", choices=("sentence", "document"),
                   help="NER sequence: a sentence, or a document (between -DOCSTART- lines)")  # fmt: skip
    p.add_argument("--ner-group-sentences", type=int, metavar="N",
                   help="NER: a document is N consecutive sentences (for files without -DOCSTART-)")  # fmt: skip
    p.add_argument("--ner-stride", type=int, help="NER: overlap of windows over long documents, tokens")
    p.add_argument("--labels", help="NER: extra entity types the data may use, comma-separated (conll2003 / gonerd "
                   "accept PER, ORG, LOC, MISC; another type is an error naming its line)")  # fmt: skip
    p.add_argument("--eval-batch-size", type=int, help="sequences per evaluation batch")
    p.add_argument("--global-prefix", type=int, metavar="N",
                   help=f"models with global tokens ({', '.join(global_token_patterns())}): the first N tokens "
                   "after [CLS] of every sequence get global attention too, like a question in QA (default: 0, "
                   "[CLS] only); ignored by other models")  # fmt: skip
    add_model_args(p)
    p.add_argument("--name", help="model name in the results (and in `etkd report`)")
    p.add_argument("--teacher", help="name of this model's teacher (for retention in `etkd report`)")
    p.add_argument("--output", help="results JSON path")


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune on GLUE / QA / NER, then evaluate")
    _add_common(p)
    p.add_argument("--train-file", help="local training file (GLUE TSV/CSV/JSONL, SQuAD JSON, CoNLL)")
    p.add_argument("--train-split", help="HF dataset split to train on (default: train)")
    p.add_argument("--limit", type=int, metavar="N", help="train on the first N training examples only (the "
                   "evaluation sets are never cut, so their scores compare with full runs)")  # fmt: skip
    add_train_args(p, stop_at_step_help="stop (checkpoint, save, evaluate) at this step of --max-steps")
    p.add_argument("--new-hparams-on-resume", action="store_true", default=None,
                   help="on --resume, take this learning rate / weight decay / warm-up (used by `etkd tune`)")  # fmt: skip
    finish(p, DEFAULTS, func=run_finetune)

    p = subparsers.add_parser("evaluate", help="evaluate a fine-tuned model on GLUE / QA / NER")
    _add_common(p)
    p.add_argument("--dtype", choices=tuple(EVAL_DTYPES), help="compute dtype (bf16/fp16: autocast)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate on the first N examples of every set (a "
                   "quick check: the scores are then not those of the whole sets)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed of a fresh head")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )
    finish(p, DEFAULTS, func=run_evaluate)
