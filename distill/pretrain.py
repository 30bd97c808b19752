"""`etkd pretrain`: masked-LM training of a converted or fresh model (the paper pretrains LSG from scratch).

    etkd pretrain --model converted/ --data corpus/ --tokenizer tok/ --output-dir runs/pt --max-steps 10000
    etkd pretrain --model-config lsg.json --data wikipedia --data-config 20231101.en --streaming ...
    accelerate launch --multi_gpu --num_processes 8 -m etkd.distill.cli pretrain --config pt.yaml

This module also holds the plumbing the other drivers share: training/data flags, model loading and saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import torch

from . import core
from .config import add_config_arg, finish, resolve
from .data import MLMCollator, TextSource, build_mlm_dataset
from .errors import UserError
from .losses import mlm_loss
from .training import TrainConfig, train

TRAIN_DEFAULTS: dict[str, Any] = {
    k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in ("stop_at_step",)
}
DATA_DEFAULTS: dict[str, Any] = {
    "data": None,
    "data_config": None,
    "split": "train",
    "text_field": "text",
    "streaming": False,
    "skip_bad_records": False,
    "tokenizer": None,
    "short_length": 512,
    "long_length": None,
    "long_fraction": 0.0,
    "mlm_probability": 0.15,
    "max_blocks": None,
}
MODEL_DEFAULTS: dict[str, Any] = {"backend": None, "gradient_checkpointing": False}
HIDDEN = argparse.SUPPRESS  # old spellings stay accepted, out of --help


# ----------------------------------------------------------------------------------------------------------
# Shared flags.


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", dest="output_dir", default=None, help="checkpoints, logs and the result")
    g.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--batch-size", dest="per_device_batch_size", type=int, default=None, help="per process")
    g.add_argument(
        "--learning-rate", dest="learning_rate", type=float, default=None, help="peak learning rate"
    )
    g.add_argument("--lr", dest="learning_rate", type=float, default=None, help=HIDDEN)
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=None)
    g.add_argument("--warmup-ratio", dest="warmup_ratio", type=float, default=None)
    g.add_argument("--grad-accum-steps", dest="grad_accum_steps", type=int, default=None,
                   help="micro-batches per optimizer step")  # fmt: skip
    g.add_argument("--grad-accum", dest="grad_accum_steps", type=int, default=None, help=HIDDEN)
    g.add_argument("--mixed-precision", dest="mixed_precision", choices=("no", "bf16", "fp16"), default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--save-every", dest="save_every", type=int, default=None, help="checkpoint interval")
    g.add_argument("--log-every", dest="log_every", type=int, default=None)
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=None)
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, default=None)
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --output-dir from its last checkpoint (same settings)")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the earlier run in --output-dir (its files are deleted)")  # fmt: skip
    g.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even with a GPU")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )
    g.add_argument(
        "--find-unused-parameters", dest="find_unused_parameters", action="store_true", default=None
    )
    g.add_argument("--stop-at-step", dest="stop_at_step", type=int, default=None, help=argparse.SUPPRESS)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", nargs="+", default=None, help="files/dirs (.txt/.jsonl/.parquet) or dataset names"
    )
    g.add_argument("--data-config", dest="data_config", default=None, help="datasets config name")
    g.add_argument("--split", default=None)
    g.add_argument("--text-field", dest="text_field", default=None)
    g.add_argument("--streaming", action="store_true", default=None, help="stream instead of loading whole")
    g.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true", default=None,
                   help="skip (and count) corrupt lines / missing fields instead of stopping")  # fmt: skip
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model/teacher dir)")
    g.add_argument("--short-length", dest="short_length", type=int, default=None)
    g.add_argument("--long-length", dest="long_length", type=int, default=None, help="default: model limit")
    g.add_argument("--long-fraction", dest="long_fraction", type=float, default=None)
    g.add_argument("--mlm-probability", dest="mlm_probability", type=float, default=None)
    g.add_argument("--max-blocks", dest="max_blocks", type=int, default=None, help="cap on packed blocks")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", dest="backend", default=None,
                   help="attention kernel backend: auto, reference, cpu, triton, cuda (default: auto)")  # fmt: skip
    p.add_argument("--attention-backend", dest="backend", default=None, help=HIDDEN)
    p.add_argument(
        "--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None
    )


def train_config(ns: argparse.Namespace, output_dir: str | None = None) -> TrainConfig:
    values = {k: getattr(ns, k) for k in TRAIN_DEFAULTS}
    values["stop_at_step"] = getattr(ns, "stop_at_step", None)
    if output_dir is not None:
        values["output_dir"] = output_dir
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------------------
# Models and tokenizers.


def load_model(path: str, flag: str = "--model"):
    return core.load_model(path, flag)


def prepare_model(model, ns: argparse.Namespace):
    if getattr(ns, "backend", None):
        model.set_attention_backend(ns.backend)
    if getattr(ns, "gradient_checkpointing", False):
        model.set_gradient_checkpointing(True)
    return model


def tokenizer_for(ns: argparse.Namespace, *model_dirs: str | None):
    """--tokenizer, else the first model folder that holds a tokenizer."""
    if ns.tokenizer:
        return core.load_tokenizer(ns.tokenizer)
    for d in model_dirs:
        if d and os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f)) for f in core.TOKENIZER_FILES):
            return core.load_tokenizer(d, "--tokenizer (from the model folder)")
    raise UserError("--tokenizer: required (no tokenizer files next to the model)")


def check_vocab(tokenizer, model, name: str) -> None:
    core.check_vocab(tokenizer, model, f"--tokenizer (vs the {name})")


def save_model(model, directory: str, tokenizer=None, hf: bool = True) -> dict[str, str]:
    """Our format in `directory`; HF format in `directory`-hf where a transformers class exists."""
    from etkd.models import to_hf

    written = {}
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    written["etkd"] = directory
    if hf:
        try:
            hf_model = to_hf(model)
        except ValueError as exc:  # e.g. LSG has no transformers class
            print(f"[etkd] not saving an HF copy: {exc}")
        else:
            hf_dir = directory.rstrip("/") + "-hf"
            hf_model.save_pretrained(hf_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(hf_dir)
            written["hf"] = hf_dir
    return written


def mlm_data(ns: argparse.Namespace, tokenizer, max_tokens: int):
    """Packed MLM blocks (list, or a stream with --streaming) and the masking collator."""
    if not ns.data:
        raise UserError("--data: required (files, directories or dataset names)")
    texts = TextSource(
        ns.data,
        text_field=ns.text_field,
        config=ns.data_config,
        split=ns.split,
        streaming=ns.streaming,
        on_error="skip" if ns.skip_bad_records else "raise",
    )
    long_length = min(ns.long_length or max_tokens, max_tokens)
    short_length = min(ns.short_length, long_length)
    data = build_mlm_dataset(
        texts,
        tokenizer,
        streaming=ns.streaming,
        seed=ns.seed,
        max_blocks=ns.max_blocks,
        short_length=short_length,
        long_length=long_length,
        long_fraction=ns.long_fraction,
        progress=bool(ns.progress) and core.is_main_process(),
    )
    if texts.skipped:
        core.log.warning("--data: skipped %d bad records (--skip-bad-records)", texts.skipped)
    return data, MLMCollator.from_tokenizer(tokenizer, mlm_probability=ns.mlm_probability)


def write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


# ----------------------------------------------------------------------------------------------------------
# The pretrain command.

DEFAULTS = {**TRAIN_DEFAULTS, **DATA_DEFAULTS, **MODEL_DEFAULTS, "model": None, "model_config": None,
            "add_mlm_head": False, "overwrite": False}  # fmt: skip
DEFAULTS.update(output_dir="runs/pretrain", learning_rate=1e-4, warmup_ratio=0.05)


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="masked-LM training of a converted or fresh model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint dir (ours or HF) with an MLM head")
    src.add_argument("--model-config", dest="model_config", default=None,
                     help="JSON EncoderConfig for a fresh, randomly initialised model")  # fmt: skip
    add_mlm_head_arg(p, "--model")
    add_model_args(p)
    add_data_args(p)
    add_train_args(p)
    finish(p, DEFAULTS, func=run)


def add_mlm_head_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--add-mlm-head", dest="add_mlm_head", action="store_true", default=None,
                   help=f"give {what} a fresh MLM head (tied to the word embeddings) when it has none, e.g. "
                   "a bare or sentence-embedding encoder")  # fmt: skip


def require_mlm_head(model, ns: argparse.Namespace, what: str):
    """`model` if it has an MLM head; with --add-mlm-head a copy with a fresh one; else a user error."""
    from .core import add_mlm_head

    if model.config.head == "mlm":
        return model
    if not ns.add_mlm_head:
        raise UserError(f"{what}: needs an MLM head, this checkpoint has head={model.config.head!r}; "
                        "--add-mlm-head adds a fresh one (tied to the word embeddings)")  # fmt: skip
    return add_mlm_head(model, seed=ns.seed, what=what)


def mlm_step(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = mlm_loss(out.logits, batch["labels"])
    return loss, {"mlm": loss.detach()}


def build_pretrain_model(ns: argparse.Namespace):
    from etkd.models import EncoderConfig, EncoderModel

    if ns.model:
        model = load_model(ns.model)
    elif ns.model_config:
        if not os.path.isfile(ns.model_config):
            raise UserError(f"--model-config {ns.model_config}: no such file")
        with open(ns.model_config) as f:
            try:
                cfg = EncoderConfig.from_dict(json.load(f))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise UserError(f"--model-config {ns.model_config}: {exc}") from None
        torch.manual_seed(ns.seed)
        model = EncoderModel(cfg.replace(head="mlm"))
    else:
        raise UserError("pretrain: give --model DIR or --model-config JSON")
    return prepare_model(require_mlm_head(model, ns, "--model"), ns)


def run(args: argparse.Namespace) -> int:
    ns = resolve(args, DEFAULTS)
    model = build_pretrain_model(ns)
    tokenizer = tokenizer_for(ns, ns.model)
    check_vocab(tokenizer, model, "model")
    data, collate = mlm_data(ns, tokenizer, model.config.max_tokens)
    cfg = train_config(ns)
    core.start_run(ns)
    result = train(model, data, mlm_step, cfg, collate_fn=collate)
    if result["is_main_process"] and result["step"] >= cfg.max_steps:
        written = save_model(result["model"], os.path.join(cfg.output_dir, "final"), tokenizer)
        write_json(os.path.join(cfg.output_dir, "result.json"),
                   {"step": result["step"], "loss": result["loss"], "saved": written})  # fmt: skip
        print(f"[etkd pretrain] step {result['step']} loss {result['loss']:.4f}; saved {written}")
    return 0
