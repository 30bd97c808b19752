"""What every driver shares: model heads, seeding, and (as the drivers grow) loading and checking.

`with_head` gives a model the task head a driver needs (a fresh head, seeded, when the checkpoint has
another one or none); `add_mlm_head` is its MLM case for `pretrain` / `distill` from a bare encoder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

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
