"""The driver core every subcommand uses (with `config` for settings, `rundir` for the output folder and
`training` for the loop).

- heads: `with_head` gives a model the task head a driver needs (a fresh head, seeded, when the checkpoint
  has another one or none); `add_mlm_head` is its MLM case for `pretrain` / `distill` from a bare encoder;
- models and tokenizers: `load_model`, `load_tokenizer`, `check_vocab` (paths and hub names resolved by
  `hub.resolve_pretrained`);
- outputs: `check_output_file`, `start_run` (claims the output folder before the first step);
- the flags and builders the training commands share: `add_train_args` / `add_data_args` / `add_model_args`
  with their defaults, `train_config`, `tokenizer_for`, `mlm_data`, `save_model`, `require_mlm_head`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any

import torch

from etkd_kernels.dispatch import NAMES

from .data import MLMCollator, TextSource, build_mlm_dataset
from .errors import UserError
from .hub import TOKENIZER_FILES, offline, resolve_pretrained
from .training import TrainConfig, train

log = logging.getLogger("etkd")


def with_head(model, head: str, num_labels: int, *, seed: int, extra: dict[str, Any] | None = None):
    """`model` with a `head` of `num_labels` outputs: the model itself when it has that head already, else a
    new model holding its encoder weights and a fresh head.

    The fresh head is drawn from a generator seeded with `seed` alone, so the same seed gives the same head
    whatever ran before (the global RNG is left as it was). BERT-style sequence classification gets a pooler
    (fresh too when the checkpoint had none). MLM heads tie their decoder to the word embeddings when the
    config says so (the default), as HF's `AutoModelForMaskedLM` does.
    """
    from etkd.models import EncoderModel

    cfg = model.config
    if cfg.head == head and cfg.num_labels == num_labels:
        if extra:
            cfg.extra.update(extra)
        return model
    new_cfg = cfg.replace(head=head, num_labels=num_labels, extra={**cfg.extra, **(extra or {})})
    if head == "sequence_classification" and new_cfg.head_style == "bert" and not new_cfg.add_pooler:
        new_cfg = new_cfg.replace(add_pooler=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = EncoderModel(new_cfg)
    missing, unexpected = new.encoder.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"model: encoder weights do not fit (missing {missing}, unexpected {unexpected})")
    return new.train(model.training)


def add_mlm_head(model, *, seed: int, what: str = "--model"):
    """`model` with a fresh MLM head (tied to the word embeddings) when it has another head or none."""
    if model.config.head == "mlm":
        return model
    log.warning("%s has head=%r; adding a fresh MLM head (decoder tied to the word embeddings, seed %d)",
                what, model.config.head, seed)  # fmt: skip
    return with_head(model, "mlm", model.config.num_labels, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Models and tokenizers: local paths, else hub names (`hub`), checked before any work.


def load_tokenizer(
    path: str, flag: str = "--tokenizer", *, fast: bool = False, add_prefix_space: bool = False
):
    """A tokenizer via `AutoTokenizer` from a folder or hub name resolved as above. `fast`: offsets and word
    ids are needed; `add_prefix_space`: for pre-split words on byte-level BPE (NER)."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(path, flag, TOKENIZER_FILES)
    kwargs = {"local_files_only": os.path.isdir(path) or offline()}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        if add_prefix_space and getattr(tok, "add_prefix_space", None) is False:
            tok = AutoTokenizer.from_pretrained(path, add_prefix_space=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{flag} {path}: cannot load a tokenizer ({' '.join(str(exc).split())[:200]})"
        ) from None
    if fast and not getattr(tok, "is_fast", False):
        raise UserError(f"{flag} {path}: a slow tokenizer; offsets need a fast (tokenizers) one")
    return tok


def load_model(path: str, flag: str = "--model"):
    """Our checkpoint or an HF one (folder or hub name), resolved as above."""
    from etkd.models import load

    return load(resolve_pretrained(path, flag))


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The special-token ids `convert` takes (`bos_token_id`, `mask_token_id`) for a pattern whose
    `convert_tokens` says why it needs them: the tokenizer's bos, else cls, and its mask token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return {
        "bos_token_id": bos if bos is not None else getattr(tokenizer, "cls_token_id", None),
        "mask_token_id": getattr(tokenizer, "mask_token_id", None),
    }


def check_vocab(tokenizer, model, flag: str = "--tokenizer") -> None:
    """The tokenizer must fit the model's embedding table, and be that model's (not a much smaller one)."""
    n, v = len(tokenizer), model.config.vocab_size
    if n > v:
        raise UserError(
            f"{flag}: {n} tokens, more than the model's vocab_size {v}: not this model's tokenizer"
        )
    if n < 0.9 * v:
        raise UserError(f"{flag}: {n} tokens, but the model's vocab_size is {v}: not this model's tokenizer "
                        "(give the tokenizer the model was trained with)")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Outputs and the run folder.


def check_output_file(path: str | None, flag: str) -> None:
    """A file we will write at the end can be written: checked before the first step."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write there ({probe} is not a writable folder)")


def named_values(values: list[str] | None, flag: str) -> list[tuple[str, str]]:
    """`[NAME=]VALUE` items of a repeatable flag (`--eval-file`, `--eval-split`) -> (name, value); unnamed ones
    are named after their position ("" for one). A name given twice is an error: the second set would
    silently replace the first's scores."""
    out: dict[str, str] = {}
    for i, v in enumerate(values or []):
        name, sep, val = v.partition("=")
        if not (sep and name and os.sep not in name):
            name, val = ("" if len(values) == 1 else str(i)), v
        if name in out:
            raise UserError(
                f"{flag} {v}: the name {name!r} is already given to {out[name]}; give each set its own NAME="
            )
        out[name] = val
    return list(out.items())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start_run(ns, output_dir: str | None = None) -> None:
    """Claim the output folder for this run (lock, earlier-run check, settings.json); main process only."""
    from .config import settings_of
    from .rundir import claim

    if is_main_process():
        claim(output_dir or ns.output_dir, settings_of(ns), resume=bool(ns.resume),
              overwrite=bool(getattr(ns, "overwrite", False)))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The flags, defaults and builders the training commands share (pretrain, distill, kd-task).

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


def add_train_args(p: argparse.ArgumentParser, stop_at_step_help: str = HIDDEN) -> None:
    """The training flags, one spelling each (`--batch-size` sets per_device_batch_size); `--stop-at-step`
    is hidden unless the command documents it (`stop_at_step_help`)."""
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
    g.add_argument("--stop-at-step", dest="stop_at_step", type=int, default=None, help=stop_at_step_help)


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
    g.add_argument("--mlm-probability", dest="mlm_probability", type=float, default=None,
                   help="share of tokens masked; 0 = the clean text (distill's cosine-only default)")  # fmt: skip
    g.add_argument("--max-blocks", dest="max_blocks", type=int, default=None, help="cap on packed blocks")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", dest="backend", default=None, choices=NAMES,
                   help="attention kernel backend (default: auto)")  # fmt: skip
    p.add_argument("--attention-backend", dest="backend", default=None, choices=NAMES, help=HIDDEN)
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


def prepare_model(model, ns: argparse.Namespace):
    if getattr(ns, "backend", None):
        model.set_attention_backend(ns.backend)
    if getattr(ns, "gradient_checkpointing", False):
        model.set_gradient_checkpointing(True)
    return model


def tokenizer_for(ns: argparse.Namespace, *model_dirs: str | None):
    """--tokenizer, else the first model folder that holds a tokenizer."""
    if ns.tokenizer:
        return load_tokenizer(ns.tokenizer)
    for d in model_dirs:
        if d and os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES):
            return load_tokenizer(d, "--tokenizer (from the model folder)")
    raise UserError("--tokenizer: required (no tokenizer files next to the model)")


def save_model(model, directory: str, tokenizer=None, hf: bool = True) -> dict[str, str]:
    """Our format in `directory`; HF format in `directory`-hf where a transformers class exists, else the
    pattern's own checkpoint format (its `save_format`) in `directory`-<format>."""
    from etkd.models import PATTERNS, to_hf
    from etkd.models.encoder import apply_umask

    written = {}
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    written["etkd"] = directory
    fmt = PATTERNS[model.config.attention].save_format
    if hf and fmt:  # no transformers class: the pattern's own checkpoint format instead
        fmt_dir = directory.rstrip("/") + f"-{fmt}"
        model.save_pretrained(fmt_dir, format=fmt)
        if tokenizer is not None:
            tokenizer.save_pretrained(fmt_dir)
        written[fmt] = fmt_dir
        return written
    if hf:
        try:
            hf_model = to_hf(model)
        except ValueError as exc:  # a pattern with no transformers class
            print(f"[etkd] not saving an HF copy: {exc}")
        else:
            hf_dir = directory.rstrip("/") + "-hf"
            hf_model.save_pretrained(hf_dir)
            apply_umask(hf_dir)
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
        progress=bool(ns.progress) and is_main_process(),
    )
    if texts.skipped:
        log.warning("--data: skipped %d bad records (--skip-bad-records)", texts.skipped)
    return data, MLMCollator.from_tokenizer(tokenizer, mlm_probability=ns.mlm_probability)


# What `etkd pretrain` and `etkd distill` (the MLM-trained commands) both take.
MLM_DEFAULTS = {
    **TRAIN_DEFAULTS,
    **DATA_DEFAULTS,
    **MODEL_DEFAULTS,
    "add_mlm_head": False,
    "overwrite": False,
}


def add_mlm_run_args(p: argparse.ArgumentParser, what: str) -> None:
    """--add-mlm-head (for the model given by `what`), the model, data and training flags."""
    add_mlm_head_arg(p, what)
    add_model_args(p)
    add_data_args(p)
    add_train_args(p)


def train_mlm(ns: argparse.Namespace, model, tokenizer, step, command: str, save_as: str, keys=("step", "loss"),
              **train_kw) -> int:  # fmt: skip
    """The end `etkd pretrain` and `etkd distill` share: MLM data, `train`, and on the main process after the
    last step the model saved under output_dir/`save_as` and result.json (the result's `keys` + "saved")."""
    data, collate = mlm_data(ns, tokenizer, model.config.max_tokens)
    cfg = train_config(ns)
    start_run(ns)
    result = train(model, data, step, cfg, collate_fn=collate, **train_kw)
    if result["is_main_process"] and result["step"] >= cfg.max_steps:
        written = save_model(result["model"], os.path.join(cfg.output_dir, save_as), tokenizer)
        write_json(
            os.path.join(cfg.output_dir, "result.json"), {**{k: result[k] for k in keys}, "saved": written}
        )
        print(f"[etkd {command}] step {result['step']} loss {result['loss']:.4f}; saved {written}")
    return 0


def write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def add_mlm_head_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--add-mlm-head", dest="add_mlm_head", action="store_true", default=None,
                   help=f"give {what} a fresh MLM head (tied to the word embeddings) when it has none, e.g. "
                   "a bare or sentence-embedding encoder")  # fmt: skip


def require_mlm_head(model, ns: argparse.Namespace, what: str):
    """`model` if it has an MLM head; with --add-mlm-head a copy with a fresh one; else a user error."""
    if model.config.head == "mlm":
        return model
    if not ns.add_mlm_head:
        raise UserError(f"{what}: needs an MLM head, this checkpoint has head={model.config.head!r}; "
                        "--add-mlm-head adds a fresh one (tied to the word embeddings)")  # fmt: skip
    return add_mlm_head(model, seed=ns.seed, what=what)
