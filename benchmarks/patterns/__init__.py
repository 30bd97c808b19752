"""The benchmarks' side of each attention pattern: one module per pattern (`benchmarks/patterns/<name>.py`,
named as its `etkd.models.patterns` entry) registering a `Bench` record: its attention-core setup for
`providers.build` (the shared q/k/v, the etkd call, HF's module driven one way, the FLOP count, FlexAttention's
mask), the paper's settings of the whole models `etkd bench` builds, HF's core with attention dropout for
`benchmarks/dropout.py`, and its baseline when transformers has no class for it. Importing the package imports
every module in it (`pkgutil`), so this file names none of them.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from etkd.models.patterns import PATTERNS as REGISTRY


@dataclass
class PatternInputs:
    """What a pattern's setup gives `build`: the shared q/k/v (and extra tensors), the etkd call per backend
    name (`op(backend, **op_kwargs)`: extra keywords of the op, e.g. dropout_p, on top of the pattern's settings),
    the forward FLOPs, FlexAttention's mask and flash-attn's (left, right) band where they exist."""

    args: tuple
    op: Callable[..., Callable]
    flops: float
    mask_mod: Callable | None = None
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class Peer:
    """The baseline implementation of a pattern transformers has no class for, run outside this process.

    impl:   its row name in `etkd bench` (in place of "hf")
    row:    `fn(spec, timeout, config) -> dict`, one measured row (`bench.worker`'s spec; `config`: the etkd
            model's `EncoderConfig`, whose shapes and settings the peer copies)
    """

    impl: str
    row: Callable[..., dict]


@dataclass(frozen=True)
class Bench:
    """Everything the benchmarks know about one pattern.

    name:       the `etkd.models.patterns` name
    setup:      `fn(setup, x, real, glob) -> PatternInputs` for `providers.build`; it also adds the HF
                providers (or says in `setup.skipped` why there are none)
    sizes:      the paper's sizes of the attention-core benchmarks, by the names the registry's labels format
                (e.g. {"WINDOW": 512})
    settings:   the `EncoderConfig` fields of `etkd bench`'s whole models (the same paper sizes)
    positions:  the HF model_type whose position table `etkd bench`'s models copy
    configure:  `fn(config, seq)`: last changes to `etkd bench`'s model config for length `seq`, in place
    peer:       the baseline when transformers has no class for the pattern (`Peer`), else None
    dropout_core: `fn(setup, p) -> (callable, args, note) | None`: HF's core in training mode with attention
                dropout p (`benchmarks/dropout.py`), None where transformers has no such module
    fallback_replaced: whether `cpu` dropout of this pattern replaced a fallback to `reference` (issue 27;
                `benchmarks/dropout.py` times that fallback too)
    model_default: whether the whole-model comparisons with HF (`bench.add_attention_arg`: bench_bf16, hf_patch,
                train_step, dropout_placement) run this pattern when `--attention` is not given (one record sets it)
    model_note: what makes HF's whole model (eval mode) compute other than ours beyond rounding, printed beside
                the differences `bench_bf16` reports; "" when nothing does
    """

    name: str
    setup: Callable
    sizes: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    positions: str = "bert"
    configure: Callable | None = None
    peer: Peer | None = None
    dropout_core: Callable | None = None
    fallback_replaced: bool = False
    model_default: bool = False
    model_note: str = ""


BENCHES: dict[str, Bench] = {}


def register(bench: Bench) -> Bench:
    REGISTRY[bench.name]  # a KeyError here: the model registry has no such pattern
    if bench.name in BENCHES:
        raise ValueError(f"benchmark of pattern {bench.name!r} is registered already")
    BENCHES[bench.name] = bench
    return bench


class _Cached(torch.nn.Module):
    """A projection layer that computes its output once and then returns a copy of it (HF modifies some in
    place; copying 4096 x 768 costs ~1 ms), taking gradients when its input does."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer, self.out = layer, None

    def forward(self, x):
        if self.out is None or self.out.requires_grad != x.requires_grad:
            with torch.no_grad():
                self.out = self.layer(x).requires_grad_(x.requires_grad)
        self.out.grad = None
        return self.out.clone()


def cached_projections(module: torch.nn.Module, names) -> torch.nn.Module:
    """A shallow copy of an HF attention module whose projection layers return precomputed outputs."""
    core = copy.copy(module)
    core._modules = dict(module._modules)
    for n in names:
        core._modules[n] = _Cached(module._modules[n])
    return core


def hf_providers(setup, x: torch.Tensor, module: torch.nn.Module, names: tuple[str, ...], run: Callable,
                 *extra) -> None:  # fmt: skip
    """`hf` (HF's module on the hidden states x) and `hf-core` (its projections `names` precomputed)."""
    core = cached_projections(module, names)
    setup.providers["hf"] = (lambda x: run(module, x, *extra), (x,))
    setup.providers["hf-core"] = (lambda x: run(core, x, *extra), (x,))


def inputs(batch: int, seq: int, hidden: int, device, dtype):
    """The shared inputs of every setup: hidden states x (batch, seq, hidden), every token real, the first
    one global."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    real = torch.ones(batch, seq, dtype=torch.bool, device=device)
    glob = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    glob[:, 0] = True
    return x, real, glob


def _discover() -> None:
    """Import every pattern module of this package (by name): each registers itself."""
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_discover()
