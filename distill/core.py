"""The driver core every subcommand uses (with `config` for settings, `rundir` for the output folder and
`training` for the loop).

- heads: `with_head` gives a model the task head a driver needs (a fresh head, seeded, when the checkpoint
  has another one or none); `add_mlm_head` is its MLM case for `pretrain` / `distill` from a bare encoder;
- models and tokenizers: `resolve_pretrained` (a local path that does not exist is an error at once; hub
  lookups only for names that are not paths, never in offline mode), `load_model`, `load_tokenizer`,
  `check_vocab`;
- outputs: `check_output_file`, `start_run` (claims the output folder before the first step).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .errors import UserError

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
# Models and tokenizers: local paths, else hub names (offline mode respected), checked before any work.

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model")


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def looks_like_path(value: str) -> bool:
    """A value that can only mean a local path (a hub id is `name` or `owner/name`)."""
    if value.startswith(("/", ".", "~")) or value.endswith(("/", os.sep)) or "\\" in value:
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def resolve_pretrained(value: str, flag: str, files: tuple[str, ...] = MODEL_FILES) -> str:
    """`value` if it is a local folder holding one of `files`, or a hub name that exists (or is cached);
    else a UserError at once: a missing local path never goes to the hub, offline mode never goes online,
    and an unreachable hub is one line, not a minute of retries."""
    if os.path.exists(value):
        if not os.path.isdir(value):
            raise UserError(f"{flag} {value}: expected a folder, got a file")
        if not any(os.path.isfile(os.path.join(value, f)) for f in files):
            raise UserError(f"{flag} {value}: no {' / '.join(files)} in this folder")
        return value
    if looks_like_path(value):
        raise UserError(f"{flag} {value}: no such folder")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(value, files[0]), str):  # a cached file path
        return value
    if offline():
        raise UserError(f"{flag} {value}: not a local folder, not in the cache, and offline mode is on")
    try:
        exists = huggingface_hub.repo_exists(value)
    except Exception as exc:  # no network, proxy, ...: one probe, no retries
        raise UserError(f"{flag} {value}: not a local folder, and the hub could not be reached "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None  # fmt: skip
    if not exists:
        raise UserError(f"{flag} {value}: no such local folder or hub model")
    return value


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
    from etkd.models import EncoderModel

    return EncoderModel.from_pretrained(resolve_pretrained(path, flag))


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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start_run(ns, output_dir: str | None = None) -> None:
    """Claim the output folder for this run (lock, earlier-run check, settings.json); main process only."""
    from .config import settings_of
    from .rundir import claim

    if is_main_process():
        claim(output_dir or ns.output_dir, settings_of(ns), resume=bool(ns.resume),
              overwrite=bool(getattr(ns, "overwrite", False)))  # fmt: skip
