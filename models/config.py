"""`EncoderConfig`: everything that shapes an etkd encoder, as one dataclass saved to / loaded from JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import patterns
from .patterns.lsg import MAX_GLOBAL_TOKENS as LSG_MAX_GLOBAL_TOKENS
from .patterns.lsg import SPARSITY_TYPES as LSG_SPARSITY_TYPES

HEAD_TYPES = (None, "mlm", "sequence_classification", "token_classification", "question_answering")
POSITION_STYLES = ("absolute", "padded")
CONFIG_NAME = "config.json"
FORMAT_KEY = "etkd_format"  # marks our own config.json (HF checkpoints never have it)


@dataclass
class EncoderConfig:
    """A BERT-style encoder with a swappable attention pattern.

    Positions: "absolute" uses rows `position_offset + arange(seq)` (BERT, BigBird: offset 0; Nystromformer:
    offset 2); "padded" is fairseq/RoBERTa's: real tokens count from `pad_token_id + 1`, padding tokens use
    row `pad_token_id` (RoBERTa, Longformer). `max_positions` is the number of rows in the position table,
    offset included (RoBERTa-base: 514).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    position_style: str = "absolute"
    position_offset: int = 0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # std of the normal init of fresh weights (BERT's)
    hidden_dropout: float = 0.1
    # HF's attention_probs_dropout_prob: dropout on the attention probabilities inside the op, in training mode,
    # where the pattern's HF model applies it (none in bigbird's block-sparse path or nystrom, as in HF)
    attention_dropout: float = 0.1
    pre_norm: bool = False  # BERT/RoBERTa checkpoints are post-norm
    rescale_embeddings: bool = False  # BigBird option: word embeddings * sqrt(hidden)
    add_pooler: bool = False  # dense + tanh on token 0 (BERT-style sequence classification uses it)
    gradient_checkpointing: bool = False

    # Attention pattern and its settings.
    attention: str = "full"
    window: int | list[int] = 512  # longformer: HF attention_window (even), one per layer or one for all
    global_projections: bool = False  # longformer: separate q/k/v projections for global tokens
    block_size: int = 64  # bigbird / lsg
    num_random_blocks: int = 3  # bigbird
    random_seed: int = 0  # bigbird: layer i uses seed random_seed + i for its random blocks
    sparse_block_size: int = 64  # lsg
    sparsity_factor: int = 2  # lsg
    sparsity_type: str = "pooling"  # lsg
    # lsg: LSG RoBERTa as lsg-converter's model files have it (`LSGRobertaConfig`): `num_global_tokens`
    # learned global embeddings prepended to every sequence before the embedding LayerNorm and dropped at the
    # output; `pool_with_global` puts the first global's output on the first token; `mask_first_token` hides
    # the first token as a key; `adaptive` pads a length that is not a multiple of block_size (else such a
    # length past two blocks is refused, as lsg-converter asserts).
    num_global_tokens: int = 1  # lsg: 1..512
    pool_with_global: bool = True  # lsg
    mask_first_token: bool = False  # lsg
    adaptive: bool = True  # lsg
    num_landmarks: int = 64  # nystrom
    pinv_iterations: int = 6  # nystrom
    pinv_init: str = "per_head"  # nystrom; "hf_global" reproduces HF exactly (batch rows then interact)
    conv_kernel_size: int | None = None  # nystrom: depthwise conv on values (HF option)
    num_local_blocks: int = 4  # fixed: blocks per segment (block_size tokens each)
    num_global_blocks: int = 1  # fixed: summary blocks at the end of every segment, seen by every query

    # Task head.
    head: str | None = None
    num_labels: int = 2
    head_style: str = "bert"  # "bert": pooler + linear / cls.predictions; "roberta": dense + act + out_proj
    classifier_act: str = "tanh"  # activation inside a roberta-style classification head
    mlm_act: str = "gelu"  # activation inside the MLM transform
    tie_word_embeddings: bool = True

    # Where the weights came from (HF model_type), so to_hf can export to the matching class.
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. HF config fields kept)

    def __post_init__(self) -> None:
        patterns.get(self.attention)  # a registered pattern, else a ValueError naming them
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head: expected one of {HEAD_TYPES}, got {self.head!r}")
        if self.position_style not in POSITION_STYLES:
            raise ValueError(
                f"position_style: expected one of {POSITION_STYLES}, got {self.position_style!r}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: expected a multiple of num_heads ({self.num_heads}), got {self.hidden_size}"
            )
        if isinstance(self.window, list) and len(self.window) != self.num_layers:
            raise ValueError(
                f"window: expected one value per layer ({self.num_layers}), got {len(self.window)}"
            )
        if self.attention == "lsg":
            self._check_lsg()
        for w in self.window if isinstance(self.window, list) else [self.window]:
            if w < 2 or w % 2:
                raise ValueError(f"window: expected even ints >= 2 (HF attention_window), got {self.window}")

    def _check_lsg(self) -> None:
        if not 1 <= self.num_global_tokens <= LSG_MAX_GLOBAL_TOKENS:
            raise ValueError(
                f"num_global_tokens: LSG has 1..{LSG_MAX_GLOBAL_TOKENS} global embeddings, got {self.num_global_tokens}"
            )
        if self.sparsity_type not in LSG_SPARSITY_TYPES:
            raise ValueError(
                f"sparsity_type: expected one of {LSG_SPARSITY_TYPES} for LSG, got {self.sparsity_type!r}"
                + (" (lsg-converter's 'lsh' draws fresh random hash planes on every call; not implemented)"
                   if self.sparsity_type == "lsh" else "")
            )  # fmt: skip
        if self.mask_first_token and not self.pool_with_global:
            raise ValueError(
                "pool_with_global: mask_first_token=True needs pool_with_global=True (lsg-converter forces it)"
            )
        if (
            self.sparsity_type != "none"
            and self.sparse_block_size > 0
            and self.block_size % self.sparsity_factor
        ):
            raise ValueError(
                f"sparsity_factor: expected a divisor of block_size ({self.block_size}), got {self.sparsity_factor}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table covers."""
        first = self.pad_token_id + 1 if self.position_style == "padded" else self.position_offset
        return self.max_positions - first

    def layer_window(self, i: int) -> int:
        return self.window[i] if isinstance(self.window, list) else self.window

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {FORMAT_KEY: 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {FORMAT_KEY}
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EncoderConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no {CONFIG_NAME} in {directory}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def is_etkd_checkpoint(directory: str | os.PathLike) -> bool:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return FORMAT_KEY in json.load(f)
