"""`etkd pretrain`: masked-LM training of a converted or fresh model (the paper pretrains LSG from scratch).

    etkd pretrain --model converted/ --data corpus/ --tokenizer tok/ --output-dir runs/pt --max-steps 10000
    etkd pretrain --model-config lsg.json --data wikipedia --data-config 20231101.en --streaming ...
    accelerate launch --multi_gpu --num_processes 8 -m etkd.distill.cli pretrain --config pt.yaml

The flags, loaders and savers it shares with `distill` and `kd-task` live in `core`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .config import add_config_arg, finish, resolve
from .core import (
    MLM_DEFAULTS,
    add_mlm_run_args,
    check_vocab,
    load_model,
    prepare_model,
    require_mlm_head,
    tokenizer_for,
    train_mlm,
)
from .errors import UserError
from .losses import mlm_loss

# ----------------------------------------------------------------------------------------------------------
# The pretrain command.

DEFAULTS = {**MLM_DEFAULTS, "model": None, "model_config": None}
DEFAULTS.update(output_dir="runs/pretrain", learning_rate=1e-4, warmup_ratio=0.05)


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="masked-LM training of a converted or fresh model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint dir (ours or HF) with an MLM head")
    src.add_argument("--model-config", dest="model_config", default=None,
                     help="JSON EncoderConfig for a fresh, randomly initialised model")  # fmt: skip
    add_mlm_run_args(p, "--model")
    finish(p, DEFAULTS, func=run)


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
    if ns.mlm_probability == 0:
        raise UserError("--mlm-probability 0: the masked-LM loss reads only masked tokens, and nothing would be "
                        "masked; give a value in (0, 1) (default 0.15)")  # fmt: skip
    model = build_pretrain_model(ns)
    tokenizer = tokenizer_for(ns, ns.model)
    check_vocab(tokenizer, model)
    return train_mlm(ns, model, tokenizer, mlm_step, "pretrain", "final")
