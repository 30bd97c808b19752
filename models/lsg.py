"""lsg-converter's LSG checkpoints, both ways: `LSGRobertaModel` / `LSGBertModel` and their MaskedLM,
SequenceClassification, TokenClassification and QuestionAnswering heads (lsg-converter 0.1.9,
`lsg_converter/{roberta,bert}/modeling_lsg_*.py`).

Such a folder has a config.json of `model_type` "roberta" / "bert" that names the LSG class in `architectures`,
carries the LSG settings (`LSGRobertaConfig`: block_size, sparse_block_size, sparsity_factor, sparsity_type,
num_global_tokens, pool_with_global, mask_first_token, adaptive, lsh_num_pre_rounds, base_model_prefix "lsg")
and maps the Auto classes to the model file beside the weights (`auto_map`, loaded with
`trust_remote_code=True`). The weights are the RoBERTa/BERT ones plus `embeddings.global_embeddings.weight`.

`load_lsg(dir)` gives the equal `EncoderModel` (attention "lsg"); `save_lsg(model, dir)` writes such a folder
(config.json, model.safetensors, and lsg-converter's model file when lsg-converter is installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, EncoderConfig
from .convert import NEW_WEIGHTS
from .encoder import SAVE_FORMATS, EncoderModel, apply_umask
from .hf import EMBEDDINGS, FAMILIES, OTHER_FORMATS, config_from_hf, hf_config, hf_name, load_mapped
from .loader import LOAD_FORMATS

# model_type -> class stem; lsg-converter has an LSG model file for each of these families.
LSG_FAMILIES = {"roberta": "Roberta", "bert": "Bert"}
# LSGRobertaConfig's own keys and their defaults there (what a config.json without the key means).
LSG_DEFAULTS = {
    "adaptive": True,
    "block_size": 128,
    "lsh_num_pre_rounds": 1,
    "mask_first_token": False,
    "num_global_tokens": 1,
    "pool_with_global": True,
    "sparse_block_size": 128,
    "sparsity_factor": 2,
    "sparsity_type": "norm",
}
LSG_HEADS = {None: "Model", "mlm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification",
             "token_classification": "ForTokenClassification", "question_answering": "ForQuestionAnswering"}  # fmt: skip
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# from_hf refuses these (their config.json has a plain model_type) and names the reader
OTHER_FORMATS["LSG"] = "an lsg-converter checkpoint (LSGRoberta*/LSGBert*)"
EMBEDDINGS["global_tokens"] = (
    "global_embeddings"  # the prepended global embeddings (`Embeddings.global_tokens`)
)


def auto_map(family: str) -> dict[str, str]:
    """lsg-converter's AUTO_MAP for `family` (the Auto classes -> `modeling_lsg_<family>.<class>`)."""
    stem = LSG_FAMILIES[family]
    module = f"modeling_lsg_{family}"
    heads = {"AutoModel": "Model", "AutoModelForMaskedLM": "ForMaskedLM",
             "AutoModelForQuestionAnswering": "ForQuestionAnswering",
             "AutoModelForSequenceClassification": "ForSequenceClassification",
             "AutoModelForTokenClassification": "ForTokenClassification"}  # fmt: skip
    return {auto: f"{module}.LSG{stem}{suffix}" for auto, suffix in heads.items()}


def is_lsg_config(d: dict) -> bool:
    """Whether a config.json dict describes an lsg-converter model (by class, prefix or auto_map)."""
    archs = d.get("architectures") or []
    return (
        any(str(a).startswith("LSG") for a in archs)
        or d.get("base_model_prefix") == "lsg"
        or any("modeling_lsg_" in str(v) for v in (d.get("auto_map") or {}).values())
    )


def lsg_class(d: dict, where: str) -> tuple[str, str | None]:
    """(family, head) of the LSG class a config.json names; anything else is refused with the reason."""
    archs = d.get("architectures") or []
    family = d.get("model_type")
    if family not in LSG_FAMILIES:
        raise ValueError(
            f"{where}: an LSG checkpoint of model_type {family!r}; etkd reproduces LSG {sorted(LSG_FAMILIES)}"
        )
    name = archs[0] if archs else f"LSG{LSG_FAMILIES[family]}Model"
    for head, suffix in LSG_HEADS.items():
        if name == f"LSG{LSG_FAMILIES[family]}{suffix}":
            return family, head
    expected = [f"LSG{LSG_FAMILIES[family]}{s}" for s in LSG_HEADS.values()]
    raise ValueError(f"{where}: architectures names {name}; etkd reproduces exactly {expected}")


def config_from_lsg(d: dict, head: str | None, has_pooler: bool, where: str) -> EncoderConfig:
    """The EncoderConfig of an lsg-converter config.json dict; a setting etkd does not reproduce is refused."""
    import transformers

    family = d["model_type"]
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise ValueError(f"{where}: is_decoder / add_cross_attention (causal LSG) is not implemented")
    lsg = {k: d.get(k, v) for k, v in LSG_DEFAULTS.items()}
    plain = {k: v for k, v in d.items() if k not in LSG_DEFAULTS and k not in (
        "architectures", "auto_map", "base_model_prefix", "model_type", "transformers_version", "_name_or_path")}  # fmt: skip
    hf = getattr(transformers, FAMILIES[family].stem + "Config")(**plain)
    cfg = config_from_hf(hf, head, has_pooler)
    stype = lsg["sparsity_type"]
    if stype is None or not lsg["sparse_block_size"] or lsg["sparsity_factor"] <= 0:
        stype = "none"  # lsg-converter skips the sparse keys then
    try:
        return cfg.replace(
            attention="lsg", block_size=lsg["block_size"], sparse_block_size=lsg["sparse_block_size"],
            sparsity_factor=max(lsg["sparsity_factor"], 1), sparsity_type=stype,
            num_global_tokens=lsg["num_global_tokens"], pool_with_global=lsg["pool_with_global"],
            mask_first_token=lsg["mask_first_token"], adaptive=lsg["adaptive"],
        )  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors"):
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"model: {directory} has none of {list(WEIGHT_FILES)}")


def load_lsg(directory: str | os.PathLike) -> EncoderModel:
    """The `EncoderModel` (eval mode) equal to the lsg-converter checkpoint in `directory`."""
    directory = str(directory)
    where = os.path.join(directory, CONFIG_NAME)
    with open(where) as f:
        d = json.load(f)
    family, head = lsg_class(d, where)
    sd = _read_weights(directory)
    has_pooler = any(re.fullmatch(r"(\w+\.)?pooler\.dense\.weight", k) for k in sd)
    cfg = config_from_lsg(d, head, has_pooler, where)

    def source_of(key: str) -> str:
        src = hf_name(key, family, head)
        if src not in sd and key == "head.decoder.weight" and cfg.tie_word_embeddings:
            src = hf_name("encoder.embeddings.word.weight", family, head)  # tied: saved once
        return src

    return load_mapped(EncoderModel(cfg), sd, source_of, f"load_lsg: {directory}")


def lsg_family(cfg: EncoderConfig) -> str:
    """The lsg-converter family an etkd LSG model saves as: RoBERTa positions (padded) or BERT's (from 0)."""
    if cfg.position_style == "padded":
        return "roberta"
    if cfg.position_offset == 0:
        return "bert"
    raise ValueError(f"save_lsg: no LSG model file computes positions from offset {cfg.position_offset}")


def save_lsg(model: EncoderModel, directory: str | os.PathLike) -> None:
    """Write `model` (attention "lsg") as an lsg-converter checkpoint: config.json (with `auto_map`),
    model.safetensors, and lsg-converter's model file when lsg-converter is installed (else a warning says
    that `trust_remote_code` loading needs it)."""
    cfg = model.config
    if cfg.attention != "lsg":
        raise ValueError(f"save_lsg: format 'lsg' holds LSG models; this one has attention={cfg.attention!r}")
    family = lsg_family(cfg)
    plain = cfg.replace(attention="full", source=family)
    d = hf_config(plain).to_dict()
    stem = LSG_FAMILIES[family]
    d.update(
        architectures=[f"LSG{stem}{LSG_HEADS[cfg.head]}"], auto_map=auto_map(family), base_model_prefix="lsg",
        model_type=family, adaptive=cfg.adaptive, block_size=cfg.block_size,
        lsh_num_pre_rounds=LSG_DEFAULTS["lsh_num_pre_rounds"], mask_first_token=cfg.mask_first_token,
        num_global_tokens=cfg.num_global_tokens, pool_with_global=cfg.pool_with_global,
        sparse_block_size=cfg.sparse_block_size, sparsity_factor=cfg.sparsity_factor,
        sparsity_type=cfg.sparsity_type,
    )  # fmt: skip
    sd = {hf_name(k, family, cfg.head): v for k, v in model.state_dict().items()}
    if cfg.head == "mlm":
        sd[hf_name("head.decoder.weight", family, "mlm").replace("weight", "bias")] = model.head.bias
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, os.path.join(directory, WEIGHT_FILES[0]),
              metadata={"format": "pt"})  # fmt: skip
    spec = importlib.util.find_spec("lsg_converter")
    source = None
    if spec is not None and spec.submodule_search_locations:
        source = os.path.join(spec.submodule_search_locations[0], family, f"modeling_lsg_{family}.py")
    if source and os.path.isfile(source):
        shutil.copy(source, os.path.join(directory, f"modeling_lsg_{family}.py"))
    else:
        warnings.warn(
            f"save_lsg: lsg-converter is not installed, so {directory} lacks modeling_lsg_{family}.py; "
            f"`from_pretrained(..., trust_remote_code=True)` needs it (pip install --no-deps lsg-converter==0.1.9 "
            f"and save again, or copy the file in)",
            stacklevel=2,
        )
    apply_umask(directory)  # safetensors writes 0600 whatever the umask


SAVE_FORMATS["lsg"] = save_lsg
LOAD_FORMATS["lsg"] = (is_lsg_config, load_lsg)


# --- converting a model to LSG: lsg-converter's `LSGConverter` ------------------------------------------------


def order_positions(
    positions: torch.Tensor, stride: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """lsg-converter's `order_positions`: 512 position rows (fewer are padded with normal rows of their
    mean/std, more are thinned to every (n // 512)-th) reordered so global i takes row (i mod m) * stride + i // m,
    m = 512 / stride: consecutive globals sit `stride` positions apart."""
    n, d = positions.shape
    if n % 512:
        if n > 512:
            positions = positions[: 512 * (n // 512)]
        else:
            mean = positions.mean(dim=0, keepdim=True).expand(512 - n, -1)
            std = positions.std(dim=0, keepdim=True).expand(512 - n, -1)
            positions = torch.cat([positions, torch.normal(mean, std, generator=generator)], dim=0)
        n = positions.shape[0]
    factor = n // 512
    positions = positions.reshape(-1, factor, d)[:, 0]
    return positions.reshape(-1, stride // factor, d).transpose(0, 1).reshape(-1, d)


def lsg_global_embeddings(
    word: torch.Tensor, positions: torch.Tensor, bos_token_id: int, mask_token_id: int, *,
    token_type: torch.Tensor | None = None, stride: int = 64, random_init: bool = False, seed: int = 123,
) -> torch.Tensor:  # fmt: skip
    """The 512 global embeddings lsg-converter's `LSGConverter` gives a converted model (`update_global`):
    the ordered positions (`order_positions` of the real-token rows) plus the bos embedding for global 0 and
    the [MASK] embedding for the others, plus `token_type` (the type-0 embedding: lsg-converter's BERT script,
    `use_token_ids`; its RoBERTa script adds none); with `random_init` (`update_global_randomly`) the others
    are drawn from a normal with the word embeddings' mean and covariance instead.

    Same operations, same random draws in the same order, so the result is bit-identical to LSGConverter's
    run after `torch.manual_seed(seed)` (its own `seed` argument is never used; it draws from torch's global
    generator): its loader first initialises the new (512, hidden) global table (one normal draw of that
    size, discarded here), then `MultivariateNormal(...).sample((512,))` (random_init), then the normal rows
    `order_positions` pads a table of fewer than 512 positions with. That holds when the source checkpoint
    has every other weight of the LSG class (else its loader initialises those too, drawing more first).
    The draws run on a forked global generator, whose state is restored afterwards."""
    from torch.distributions import MultivariateNormal

    u = word.detach().float().cpu()
    tt = None if token_type is None else token_type.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.empty(512, u.shape[1]).normal_()  # the loader's init of the new global table
        if random_init:
            try:
                w = MultivariateNormal(u.mean(dim=0), torch.cov(u.T)).sample((512,))
            except ValueError as exc:  # LSGConverter fails the same way
                raise ValueError(
                    f"random_global_init: the word embeddings' covariance ({u.shape[1]} x {u.shape[1]} from "
                    f"{u.shape[0]} rows) is not positive definite, so no normal can be drawn from it: {exc}"
                ) from None
        pos = order_positions(positions.detach().float().cpu().clone(), stride)
    if random_init:
        w[0] = u[bos_token_id]
        if tt is not None:
            pos += tt.unsqueeze(0)
            w[0] = u[bos_token_id] + tt
        return (w + pos).to(word.dtype)
    pos[0] += u[bos_token_id]
    pos[1:] += u[mask_token_id].unsqueeze(0)
    if tt is not None:
        pos += tt.unsqueeze(0)
    return pos.to(word.dtype)


def _converted_global_tokens(old_sd: dict, cfg: EncoderConfig, first: int, options: dict) -> torch.Tensor:
    """`convert(..., to="lsg")` is lsg-converter's `LSGConverter`: positions extended as for any target, and the
    global embeddings (a new weight) made by `lsg_global_embeddings` from the *original* position table and the
    embeddings of `bos_token_id` (the tokenizer's bos, else cls) and `mask_token_id` (required then), with
    `global_positional_stride`, `random_global_init`, `use_token_ids` (BERT-style sources) as LSGConverter's
    options, and `seed` as the `torch.manual_seed` LSGConverter ran under (its random draws are reproduced). An
    LSG source keeps its global embeddings (LSGConverter's `resize_lsg`: `convert` copies them)."""
    bos, mask = options["bos_token_id"], options["mask_token_id"]
    if bos is None or mask is None:
        raise ValueError(
            "bos_token_id / mask_token_id: converting to lsg initialises the global embeddings from these tokens' "
            "embeddings (as LSGConverter does); give both (the tokenizer's bos or cls id, and its mask id)"
        )
    # lsg-converter's BERT script adds the type-0 embedding (use_token_ids), its RoBERTa one not
    tt = old_sd.get("encoder.embeddings.token_type.weight") if cfg.position_style != "padded" else None
    return lsg_global_embeddings(
        old_sd["encoder.embeddings.word.weight"], old_sd["encoder.embeddings.position.weight"][first:], bos, mask,
        token_type=None if tt is None or not options["use_token_ids"] else tt[0],
        stride=options["global_positional_stride"], random_init=options["random_global_init"], seed=options["seed"],
    )  # fmt: skip


NEW_WEIGHTS["encoder.embeddings.global_tokens.weight"] = _converted_global_tokens
