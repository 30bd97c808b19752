"""etkd.hf: etkd's attention kernels inside HuggingFace transformers models.

    import etkd.hf
    etkd.hf.patch(model)                # a Longformer*/BigBird*/Nystromformer* model, in place
    etkd.hf.unpatch(model)              # back to HF's own attention code
    etkd.hf.patch_longformer()          # every Longformer model built afterwards (also patch_big_bird,
                                        # patch_nystromformer; unpatch_* undo them)
    AutoModel.from_pretrained(path, attn_implementation="etkd_sliding_window")   # BERT, RoBERTa, ...

Patching swaps the class of each attention module for a subclass whose forward runs an `etkd_kernels`
op; parameters, buffers and state-dict names are untouched, so `save_pretrained`, `Trainer`, `pipeline`,
`torch.compile` and gradient checkpointing see the same model. Training applies the model's own
attention_probs_dropout_prob where HF does (Longformer's local and global probabilities; HF's BigBird
block-sparse and Nystromformer modules apply none), inside the op. What HF would compute differently from our
ops (output_attentions, BigBird original_full, Nystromformer inputs HF's landmark path cannot take) raises
`UnsupportedConfigError` naming it.
"""

from __future__ import annotations

import torch

from . import _version, big_bird, longformer, nystromformer  # noqa: F401  (_version first: it checks transformers)
from ._common import Options, UnsupportedConfigError, warn_ignore_attention_dropout
from ._version import MIN_TRANSFORMERS, require_transformers
from .attention_interface import IMPLEMENTATIONS, register_attention_implementations
from .export import save_hf_attention, to_hf_attention

__all__ = [
    "IMPLEMENTATIONS",
    "MIN_TRANSFORMERS",
    "UnsupportedConfigError",
    "is_patched",
    "patch",
    "patch_big_bird",
    "patch_longformer",
    "patch_nystromformer",
    "register_attention_implementations",
    "require_transformers",
    "save_hf_attention",
    "to_hf_attention",
    "unpatch",
    "unpatch_big_bird",
    "unpatch_longformer",
    "unpatch_nystromformer",
]

FAMILIES = {"longformer": longformer, "big_bird": big_bird, "nystromformer": nystromformer}
PATCHES = {hf_cls: ours for fam in FAMILIES.values() for hf_cls, ours in fam.PATCHES.items()}
ORIGINALS = {ours: hf_cls for hf_cls, ours in PATCHES.items()}


def _check(module: torch.nn.Module) -> None:
    if isinstance(module, big_bird.HF_ATTENTION):
        big_bird.check(module)
    elif isinstance(module, nystromformer.HF_CLASS):
        nystromformer.check(module)


def patch(
    model: torch.nn.Module, backend: str = "auto", *, ignore_attention_dropout: bool | None = None
) -> torch.nn.Module:
    """Run the attention of an HF Longformer / BigBird (block_sparse) / Nystromformer model, any head class,
    on etkd's ops, in place. Returns `model`.

    backend: the etkd backend ("auto", "cpu", "reference", "triton", "cuda"; see
    `etkd_kernels.available_backends()`). A training-mode forward applies the model's
    attention_probs_dropout_prob where HF does. ignore_attention_dropout: deprecated, no effect (a
    DeprecationWarning; removed in the next release). Patching again changes the options. Every module is
    checked before any is changed: an unsupported configuration raises `UnsupportedConfigError` and leaves
    the model as it was.
    """
    warn_ignore_attention_dropout(ignore_attention_dropout, "etkd.hf.patch")
    opts = Options(backend)
    targets = [m for m in model.modules() if type(m) in PATCHES or type(m) in ORIGINALS]
    if not any(
        isinstance(m, (longformer.HF_CLASS, big_bird.HF_ATTENTION, nystromformer.HF_CLASS)) for m in targets
    ):
        raise UnsupportedConfigError(
            f"patch: {type(model).__name__} has no Longformer, BigBird or Nystromformer self-attention module; "
            f"for BERT/RoBERTa-style models load with attn_implementation='etkd_...' (etkd.hf.IMPLEMENTATIONS)"
        )
    for m in targets:
        _check(m)
    for m in targets:
        m.__class__ = PATCHES.get(type(m), type(m))
        m._etkd_options = opts
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch` (and the effect of a class-level patch on this model): HF's own attention code again."""
    for m in model.modules():
        if type(m) in ORIGINALS:
            m.__class__ = ORIGINALS[type(m)]
            m.__dict__.pop("_etkd_options", None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return any(type(m) in ORIGINALS for m in model.modules())


def _patch_classes(family, backend: str, ignore_attention_dropout: bool | None) -> None:
    warn_ignore_attention_dropout(ignore_attention_dropout, "etkd.hf.patch_*", stacklevel=4)
    opts = Options(backend)
    for module, names in family.MODULE_NAMES.items():
        for name, ours in names.items():
            ours.class_options = opts
            setattr(module, name, ours)


def _unpatch_classes(family) -> None:
    for module, names in family.MODULE_NAMES.items():
        for name, ours in names.items():
            setattr(module, name, ORIGINALS[ours])


def patch_longformer(backend: str = "auto", *, ignore_attention_dropout: bool | None = None) -> None:
    """Every Longformer model (any head class) built from now on runs on etkd (options as in `patch`);
    models built before are unchanged (use `patch`). Undo with `unpatch_longformer()`."""
    _patch_classes(longformer, backend, ignore_attention_dropout)


def patch_big_bird(backend: str = "auto", *, ignore_attention_dropout: bool | None = None) -> None:
    """Every block_sparse BigBird model built from now on runs on etkd. original_full models still build
    (they run HF's dense code); models built before are unchanged. Undo with `unpatch_big_bird()`."""
    _patch_classes(big_bird, backend, ignore_attention_dropout)


def patch_nystromformer(backend: str = "auto", *, ignore_attention_dropout: bool | None = None) -> None:
    """Every Nystromformer model built from now on runs on etkd; a configuration etkd cannot serve raises at
    construction. Undo with `unpatch_nystromformer()`."""
    _patch_classes(nystromformer, backend, ignore_attention_dropout)


def unpatch_longformer() -> None:
    _unpatch_classes(longformer)


def unpatch_big_bird() -> None:
    _unpatch_classes(big_bird)


def unpatch_nystromformer() -> None:
    _unpatch_classes(nystromformer)


register_attention_implementations()
