"""HuggingFace interop: `from_hf` maps a transformers checkpoint onto an `EncoderModel`, `to_hf` maps back.

Supported: the transformers families in `FAMILIES` (each an `HFFamily` record registered by the pattern module
that runs it, `models/patterns/<name>.py`; BERT and RoBERTa by `full`), each bare (`*Model`) or with
`*ForMaskedLM`, `*ForSequenceClassification`, `*ForTokenClassification`, `*ForQuestionAnswering` (less the
classes a family lists as `unsupported`). Names are mapped one parameter at a time by `hf_name`, so the same
table serves both directions.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch

from .config import EncoderConfig
from .encoder import EncoderModel
from .patterns import HF_CONFIG_KEY, PATTERNS, by_hf_name
from .patterns import HF_FAMILIES as FAMILIES

HEAD_SUFFIX = {
    None: "Model",
    "mlm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
LAYER = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.qg": "attention.self.query_global",
    "attn.kg": "attention.self.key_global",
    "attn.vg": "attention.self.value_global",
    "attn.conv": "attention.self.conv",
    "attn.o": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "norm2": "output.LayerNorm",
}
EMBEDDINGS = {
    "word": "word_embeddings",
    "position": "position_embeddings",
    "token_type": "token_type_embeddings",
    "norm": "LayerNorm",
}  # fmt: skip  (a module whose models have more embeddings adds their names)
# HF state-dict entries that are buffers or tied copies, never weights of their own.
IGNORED = re.compile(r"(position_ids|\.token_type_ids|decoder\.bias)$")


def head_from_class_name(name: str) -> str | None:
    for head, suffix in HEAD_SUFFIX.items():
        if head is not None and name.endswith(suffix):
            return head
    if name.endswith("Model"):
        return None
    raise ValueError(
        f"model: unsupported HF class {name}; expected *Model or one of {list(HEAD_SUFFIX.values())[1:]}"
    )


def hf_name(key: str, family: str, head: str | None) -> str:
    """Our parameter name -> the HF parameter name in `family`'s class for `head`."""
    fam = FAMILIES[family]
    base = "" if head is None else fam.prefix + "."
    mlm = "lm_head" if fam.fairseq else "cls.predictions"
    if m := re.fullmatch(r"encoder\.embeddings\.(\w+)\.(weight|bias)", key):
        return f"{base}embeddings.{EMBEDDINGS[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        return f"{base}encoder.layer.{m[1]}.{LAYER[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.pooler\.(weight|bias)", key):
        return f"{base}{fam.pooler}.{m[1]}"
    if head == "mlm":
        transform = "" if mlm == "lm_head" else ".transform"
        norm = "layer_norm" if mlm == "lm_head" else "LayerNorm"
        table = {"head.dense": f"{mlm}{transform}.dense", "head.norm": f"{mlm}{transform}.{norm}",
                 "head.decoder": f"{mlm}.decoder"}  # fmt: skip
        if key == "head.bias":
            return f"{mlm}.bias"
    elif head == "sequence_classification":
        table = {"head.dense": "classifier.dense", "head.out": "classifier.out_proj"}
        if fam.head_style == "bert":
            table = {"head.out": "classifier"}
    elif head == "token_classification":
        table = {"head.out": "classifier"}
    elif head == "question_answering":
        table = {"head.out": "qa_outputs"}
    else:
        table = {}
    module, _, leaf = key.rpartition(".")
    if module in table:
        return f"{table[module]}.{leaf}"
    raise KeyError(f"no HF name for parameter {key!r} ({family}, head {head})")


def config_from_hf(hf_config, head: str | None, has_pooler: bool) -> EncoderConfig:
    c = hf_config
    family = c.model_type
    if family not in FAMILIES:
        raise ValueError(f"model: unsupported HF model_type {family!r}; expected one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    if getattr(c, "position_embedding_type", None) not in (None, "absolute"):
        raise ValueError(
            f"position_embedding_type: only absolute positions are supported, got {c.position_embedding_type}"
        )
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
        max_positions=c.max_position_embeddings + fam.position_offset, position_offset=fam.position_offset,
        type_vocab_size=c.type_vocab_size, pad_token_id=pad,
        layer_norm_eps=c.layer_norm_eps, hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob, add_pooler=has_pooler, head=head,
        num_labels=c.num_labels, tie_word_embeddings=getattr(c, "tie_word_embeddings", True), source=family,
        mlm_act=c.hidden_act, head_style=fam.head_style, classifier_act=c.hidden_act,
    )  # fmt: skip
    if fam.fairseq:
        kw.update(position_style="padded", mlm_act="gelu", classifier_act="tanh")
    kw.update(fam.from_config(c))
    kw.update(_requested_pattern(c))
    return EncoderConfig(**kw)


def hf_attention_request(hf_config) -> tuple[str | None, dict]:
    """(name, settings) of the `etkd.hf` attention a transformers config asks for: `config.etkd_attention` holds
    the settings and, under "attn_implementation", the name (`--format hf-attention` writes both there, where
    transformers' own `save_pretrained` keeps them; it drops the top-level `attn_implementation`); without that
    entry, the name the config runs if it is an etkd one. (None, {}) when it asks for none."""
    settings = getattr(hf_config, HF_CONFIG_KEY, None)
    if not settings:
        return None, {}
    if not isinstance(settings, dict):
        raise ValueError(
            f"config.{HF_CONFIG_KEY}: expected a dict of settings, got {type(settings).__name__}"
        )
    running = getattr(hf_config, "_attn_implementation", None)
    name = settings.get("attn_implementation") or (running if str(running).startswith("etkd_") else None)
    return name, settings


def _requested_pattern(hf_config) -> dict:
    """The `EncoderConfig` attention and settings of the etkd pattern the checkpoint's config asks for ({} when
    none): a checkpoint written with `--format hf-attention` is a BERT/RoBERTa class whose attention is etkd's,
    and loading it as the family's full attention would silently change the model."""
    name, settings = hf_attention_request(hf_config)
    if name is None and not settings:
        return {}
    pattern = by_hf_name(name)
    if pattern is None:
        known = sorted(p.hf_name for p in PATTERNS.values() if p.hf_name)
        raise ValueError(
            f"config.{HF_CONFIG_KEY}: "
            + (f"names attn_implementation {name!r}, which no etkd pattern registers" if name else
               "holds settings but no 'attn_implementation' name")
            + f" (expected one of {known}); loading the checkpoint as full attention would silently change it"
        )  # fmt: skip
    fields = {field: settings[key] for key, field in pattern.hf_settings.items() if key in settings}
    return {"attention": pattern.name, **fields}


_told_running: set[tuple[str, str]] = set()


def _warn_if_running_other(hf) -> None:
    """Once per (asked, running) pair: an HF instance whose config asks for an etkd attention but that runs
    another (a checkpoint re-saved by transformers and loaded without `import etkd.hf`, or with an explicit
    `attn_implementation=`) computes full attention, while `from_hf` follows the checkpoint."""
    name, _ = hf_attention_request(hf.config)
    running = getattr(hf.config, "_attn_implementation", None)
    if name is None or running == name or (name, str(running)) in _told_running:
        return
    _told_running.add((name, str(running)))
    warnings.warn(
        f"from_hf: {type(hf).__name__}'s config.{HF_CONFIG_KEY} asks for attn_implementation {name!r}, but this "
        f"transformers model runs {running!r} (full attention); the etkd model follows the checkpoint "
        f"({by_hf_name(name).name if by_hf_name(name) else name} attention), so its outputs differ from this "
        f"instance's. To run the etkd attention in transformers: `import etkd.hf`, then load with "
        f"attn_implementation={name!r} (or call model.set_attn_implementation({name!r}))",
        stacklevel=3,
    )


def supported_class(name: str) -> bool:
    """Whether `name` is a transformers class etkd reproduces exactly (a FAMILIES stem + a HEAD_SUFFIX)."""
    return any(
        name == f.stem + suffix and name not in f.unsupported
        for f in FAMILIES.values()
        for suffix in HEAD_SUFFIX.values()
    )


# Architecture-name prefix -> the checkpoint format another module reads (that module registers its prefix).
OTHER_FORMATS: dict[str, str] = {}


def _check_architecture(d: dict, where: str) -> None:
    """Refuse a checkpoint that names a model etkd does not reproduce, rather than load it as another one."""
    archs = d.get("architectures") or []
    for prefix, what in OTHER_FORMATS.items():
        if any(str(a).startswith(prefix) for a in archs):
            raise ValueError(f"{where}: {what} ({archs[0]}); etkd.models.load reads it")
    if archs and not supported_class(archs[0]):
        stems = "/".join(f.stem for f in FAMILIES.values())
        raise ValueError(
            f"{where}: architectures names {archs[0]}, a model etkd does not reproduce; loading its weights into "
            f"another class would silently change the architecture (supported: {stems} *Model and heads"
            + "".join(f", {what}" for what in OTHER_FORMATS.values())
            + ")"
        )
    if d.get("auto_map"):
        raise ValueError(
            f"{where}: auto_map points at custom model code ({d['auto_map']}); etkd does not run it"
        )


def _unexpected_weights(path: str, hf) -> list[str]:
    """Weights in a local checkpoint's files that the loaded transformers model has no place for (transformers
    drops them with a note; for etkd that is an architecture change). The class's own benign ones excepted."""
    from safetensors import safe_open

    names: list[str] = []
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        with safe_open(st, "pt") as f:
            names = list(f.keys())
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        names = list(torch.load(os.path.join(path, "pytorch_model.bin"), mmap=True, weights_only=True))
    ours = set(hf.state_dict())
    prefix = hf.base_model_prefix + "."
    benign = [re.compile(p) for p in getattr(hf, "_keys_to_ignore_on_load_unexpected", None) or []]
    out = []
    for n in names:
        alt = n[len(prefix) :] if n.startswith(prefix) else prefix + n
        if n in ours or alt in ours or IGNORED.search(n) or any(p.search(n) for p in benign):
            continue
        out.append(n)
    return out


def _load_hf(path: str, **kwargs):
    import transformers

    config_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and not os.path.isfile(config_path):
        raise FileNotFoundError(f"model: {path} has no config.json (neither an HF nor an etkd checkpoint)")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            d = json.load(f)
    else:  # a hub name: let transformers resolve it
        d = transformers.AutoConfig.from_pretrained(path, **kwargs).to_dict()
    _check_architecture(d, config_path if os.path.isfile(config_path) else path)
    archs = d.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    asked = d.get("attn_implementation")
    asked = asked if isinstance(asked, str) and asked.startswith("etkd_") else None
    if (asked or d.get(HF_CONFIG_KEY)) and "attn_implementation" not in kwargs:
        # Only the weights are read here (the pattern comes from the config, `_requested_pattern`), and
        # transformers refuses etkd's names unless `etkd.hf` registered them.
        kwargs = {**kwargs, "attn_implementation": "eager"}
    hf = cls.from_pretrained(path, **kwargs)
    if asked and kwargs["attn_implementation"] == "eager":
        setattr(hf.config, HF_CONFIG_KEY, {"attn_implementation": asked, **(d.get(HF_CONFIG_KEY) or {})})
    if os.path.isdir(path):
        unexpected = _unexpected_weights(path, hf)
        if unexpected:
            raise ValueError(
                f"model: {path} has weights {type(hf).__name__} has no place for: {unexpected[:8]}; they belong to "
                f"another architecture, so loading without them would silently change the model"
            )
    return hf


def from_hf(model_or_path, **kwargs) -> EncoderModel:
    """An `EncoderModel` with the weights (and head) of an HF model instance, local dir or hub name.

    The result is in eval mode; kwargs go to transformers' `from_pretrained` when a path is given. A BERT/RoBERTa
    checkpoint whose `config.etkd_attention` asks for an etkd attention (`--format hf-attention`, also after a
    transformers re-save) gets that pattern and its settings, not the family's full attention.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        hf = _load_hf(str(model_or_path), **kwargs)
    else:
        hf = model_or_path
        _warn_if_running_other(hf)
    name = type(hf).__name__
    why = getattr(FAMILIES.get(getattr(hf.config, "model_type", None)), "unsupported", {}).get(name)
    if why:
        raise NotImplementedError(f"{name} {why}")
    head = head_from_class_name(name)
    sd = hf.state_dict()
    has_pooler = any(re.fullmatch(r"(\w+\.)?pooler\.(dense\.)?weight", k) for k in sd)
    cfg = config_from_hf(hf.config, head, has_pooler)
    return load_mapped(EncoderModel(cfg), sd, lambda key: hf_name(key, cfg.source, head), f"from_hf: {name}")


def load_mapped(model: EncoderModel, sd: dict, source_of, where: str) -> EncoderModel:
    """`model` (eval mode) with each of its weights `key` taken from `sd[source_of(key)]`; a missing source
    (KeyError) and a weight of `sd` with no place in the model (ValueError, IGNORED ones aside) are errors
    naming `where` (the caller and the checkpoint)."""
    ours, used = {}, set()
    for key in model.state_dict():
        src = source_of(key)
        if src not in sd:
            raise KeyError(f"{where} has no weight {src!r} (needed for {key!r})")
        ours[key] = sd[src]
        used.add(src)
    unused = [k for k in sd if k not in used and not IGNORED.search(k)]
    if unused:
        raise ValueError(f"{where}: weights with no place in the etkd model: {unused[:8]}")
    model.load_state_dict(ours)
    return model.eval()


def hf_family(cfg: EncoderConfig) -> str:
    """The HF model_type an etkd config exports to."""
    pattern = PATTERNS[cfg.attention]
    if pattern.hf_model_type is None:
        raise ValueError(
            f"to_hf: transformers has no model class for {cfg.attention!r} attention; save with save_pretrained "
            "instead"
            + (
                f" (format={pattern.save_format!r} writes its checkpoint format)"
                if pattern.save_format
                else ""
            )
        )
    if pattern.hf_model_type:
        family = pattern.hf_model_type
    elif cfg.source in FAMILIES and FAMILIES[cfg.source].holds_full:
        family = cfg.source
    else:
        family = "roberta" if cfg.position_style == "padded" else "bert"
    fam = FAMILIES[family]
    padded = fam.fairseq
    offset = fam.position_offset
    if (cfg.position_style == "padded") != padded or (not padded and cfg.position_offset != offset):
        raise ValueError(
            f"to_hf: HF {family} computes positions {'fairseq-style' if padded else f'from {offset}'}, but this "
            f"model uses position_style={cfg.position_style!r}, offset {cfg.position_offset}"
        )
    if cfg.pre_norm:
        raise ValueError(f"to_hf: HF {family} is post-norm; this model is pre-norm")
    # Head details HF fixes per family; a mismatch would export a model that computes something else.
    fairseq = fam.fairseq
    wanted = {
        "head_style": (fam.head_style, cfg.head == "sequence_classification"),
        "classifier_act": ("tanh" if fairseq else cfg.hidden_act, cfg.head == "sequence_classification"),
        "mlm_act": ("gelu" if fairseq else cfg.hidden_act, cfg.head == "mlm"),
    }
    for name, (value, used) in wanted.items():
        if used and getattr(cfg, name) != value:
            raise ValueError(
                f"to_hf: HF {family} uses {name}={value!r}, this model has {getattr(cfg, name)!r}"
            )
    return family


def hf_config(cfg: EncoderConfig):
    import transformers

    fam = FAMILIES[hf_family(cfg)]
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_positions - fam.position_offset, type_vocab_size=cfg.type_vocab_size,
        pad_token_id=cfg.pad_token_id, layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, num_labels=cfg.num_labels,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    kw.update(fam.to_config(cfg))
    return getattr(transformers, fam.stem + "Config")(**kw)


def to_hf(model: EncoderModel):
    """The matching transformers model (class chosen by attention pattern and head), weights copied, eval."""
    import transformers

    cfg = model.config
    family = hf_family(cfg)
    fam = FAMILIES[family]
    cls = getattr(transformers, fam.stem + HEAD_SUFFIX[cfg.head])
    if cfg.head is None and fam.pooling_arg:
        hf = cls(hf_config(cfg), add_pooling_layer=cfg.add_pooler)
    else:
        hf = cls(hf_config(cfg))
    sd = {hf_name(k, family, cfg.head): v for k, v in model.state_dict().items()}
    if fam.to_weights is not None:
        fam.to_weights(cfg, sd)
    if cfg.head == "mlm":
        sd[hf_name("head.decoder.weight", family, "mlm").replace("weight", "bias")] = model.head.bias
    expected = hf.state_dict()
    missing = [k for k in expected if k not in sd and not IGNORED.search(k)]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        raise ValueError(f"to_hf: {cls.__name__} weights missing {missing[:8]}, unexpected {extra[:8]}")
    with torch.no_grad():
        for k, v in sd.items():
            expected[k].copy_(v)
    return hf.eval()
