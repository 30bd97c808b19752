"""An etkd `EncoderModel` as the plain HF class of its family (BERT / RoBERTa) that runs our pattern through
`attn_implementation` (what `etkd convert --format hf-attention` writes)."""

from __future__ import annotations

import json
import os

import torch

from etkd.models import PATTERNS, EncoderModel, to_hf
from etkd.models.encoder import apply_umask

from ._common import UnsupportedConfigError
from .attention_interface import CONFIG_KEY


def attention_settings(cfg) -> tuple[str, dict]:
    """(attn_implementation name, config.etkd_attention) equivalent to an etkd EncoderConfig's attention, from
    the pattern registry (`etkd.models.patterns`)."""
    pattern = PATTERNS[cfg.attention]
    if pattern.hf_name is None:
        raise UnsupportedConfigError(
            f"to_hf_attention: attention {cfg.attention!r} has no attn_implementation name in etkd.hf"
        )
    return pattern.hf_name, {key: getattr(cfg, f) for key, f in pattern.hf_settings.items()}


def to_hf_attention(model: EncoderModel):
    """The BERT/RoBERTa transformers model of `model`'s family and head, weights copied, whose config selects
    the etkd `attn_implementation` (saved in config.json with the pattern's settings under `etkd_attention`).

    Separate global projections (`global_projections`) cannot be carried (BERT/RoBERTa have none): they must
    equal the local ones (as `convert` initialises them), else this raises."""
    cfg = model.config
    why = PATTERNS[cfg.attention].hf_unsupported(cfg)
    if why is not None:
        raise UnsupportedConfigError(f"to_hf_attention: {why}")
    name, settings = attention_settings(cfg)
    sd = model.state_dict()
    if cfg.global_projections:
        for key in [k for k in sd if ".attn.qg." in k or ".attn.kg." in k or ".attn.vg." in k]:
            local = (
                key.replace(".attn.qg.", ".attn.q.")
                .replace(".attn.kg.", ".attn.k.")
                .replace(".attn.vg.", ".attn.v.")
            )
            if not torch.equal(sd[key], sd[local]):
                raise UnsupportedConfigError(
                    f"to_hf_attention: {key} differs from {local}; BERT/RoBERTa classes have no separate global "
                    f"projections, so a model with trained global projections cannot be written with --format hf-attention"
                )
            del sd[key]
    plain = EncoderModel(cfg.replace(attention="full", global_projections=False))
    plain.load_state_dict(sd)
    hf = to_hf(plain)
    setattr(hf.config, CONFIG_KEY, {"attn_implementation": name, **settings})
    hf.set_attn_implementation(name)
    return hf


def save_hf_attention(hf_model, path: str | os.PathLike) -> None:
    """`save_pretrained`, plus `attn_implementation` in config.json, so `from_pretrained(path)` (after
    `import etkd.hf`) selects the etkd pattern without being told. transformers itself never writes that key; a
    checkpoint it re-saved (e.g. by Trainer) keeps the name in `config.etkd_attention`, which `import etkd.hf`
    makes `from_pretrained` read (`attention_interface._checkpoint_default`); plain transformers runs it as
    full attention."""
    hf_model.save_pretrained(path)
    apply_umask(path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["attn_implementation"] = hf_model.config._attn_implementation
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
