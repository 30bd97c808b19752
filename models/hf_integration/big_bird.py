"""HF `BigBirdBlockSparseAttention` on `etkd_kernels.block_sparse_attention`.

The random key blocks are HF's own: this forward draws them with the module's own generator methods, in
the same order and with the same numpy seeding as HF's forward (training mode: `np.random.seed(layer)`, then
the plan for the length; eval mode: HF's all-zero indices), so the global numpy RNG stream and the result
are HF's. HF's softmax counts a key block as often as it is listed (eval mode lists block 0 `1 + r` times);
when that happens the counts are folded into extra head-dim columns (`fold_block_counts`), which keeps
the result exact.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from transformers.models.big_bird import modeling_big_bird as hf

import etkd_kernels as ek

# HF's linear layers under bf16 on a CPU whose bf16 GEMMs are slow are not ours to route: told once
from etkd.models.precision import note_hf_linears
from etkd_kernels.layouts.bigbird import bigbird_block_counts, fold_block_counts

from ._common import (
    Options,
    UnsupportedConfigError,
    merge_heads,
    options_of,
    refuse_attention_weights,
)
from ._common import split_heads as heads

HF_SPARSE = hf.BigBirdBlockSparseAttention
HF_ATTENTION = hf.BigBirdAttention


def check(attention: torch.nn.Module) -> None:
    """`attention`: an HF BigBirdAttention (the parent that owns the sparse/full switch)."""
    if attention.attention_type != "block_sparse":
        raise UnsupportedConfigError(
            f"BigBird attention_type={attention.attention_type!r}: etkd.hf serves block_sparse only (HF runs "
            f"original_full when the config says so, or after switching a block_sparse model on an input of "
            f"<= (5 + 2 * num_random_blocks) * block_size tokens, and never switches back); use "
            f"attention_type='block_sparse' and longer inputs, or leave this model unpatched"
        )


def hf_rand_attn(module: torch.nn.Module, seq_len: int) -> np.ndarray:
    """HF's random block indices (heads, seq_len // block_size - 2, r) for this call, drawn exactly as
    `BigBirdBlockSparseAttention.bigbird_block_sparse_attention` draws them (it consumes numpy's global RNG)."""
    bs, r, h = module.block_size, module.num_random_blocks, module.num_attention_heads
    if module.training:
        np.random.seed(module.seed)
    if seq_len in (1024, 3072, 4096):  # HF's "old plans used in paper"
        rand = [
            module._bigbird_block_rand_mask(module.max_seqlen, module.max_seqlen, bs, bs, r, last_idx=1024)[
                : seq_len // bs - 2
            ]
            for _ in range(h)
        ]
    else:
        plan_length, plan_blocks = module._get_rand_attn_plan(seq_len, bs, r)
        rand = module._bigbird_block_rand_mask_with_head(
            from_seq_length=seq_len,
            to_seq_length=seq_len,
            from_block_size=bs,
            to_block_size=bs,
            num_heads=h,
            plan_from_length=plan_length,
            plan_num_rand_blocks=plan_blocks,
        )
    return np.stack(rand, axis=0)


@contextlib.contextmanager
def _folded_head_dim(d: int, folded: int):
    """Warnings of the block-sparse call on folded inputs name head_dim `folded` (the model's `d` plus
    `fold_block_counts`' columns), a size the user never chose: say it is the model's head_dim d plus those."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = str(w.message)
        if f"head_dim {folded} " in msg:
            msg = msg.replace(
                f"head_dim {folded} ",
                f"head_dim {folded} (this BigBird's head_dim {d} + {folded - d} columns that fold HF eval mode's "
                f"repeated random blocks into the softmax exactly) ",
            )
        warnings.warn_explicit(
            msg, w.category, w.filename, w.lineno, registry=globals().setdefault("__warningregistry__", {}),
            source=w.source,
        )  # fmt: skip


class BigBirdBlockSparseAttention(HF_SPARSE):
    """HF's module with its forward on `block_sparse_attention`; parameters and names unchanged."""

    class_options = Options()

    def forward(
        self,
        hidden_states,
        band_mask=None,
        from_mask=None,
        to_mask=None,
        from_blocked_mask=None,
        to_blocked_mask=None,
        **kwargs,
    ):
        opts = options_of(self)
        refuse_attention_weights(kwargs.get("output_attentions", False), "BigBirdBlockSparseAttention")
        note_hf_linears(self, hidden_states)
        # HF's block-sparse path applies no attention dropout, so training needs no check here.
        b, s, _ = hidden_states.shape
        bs = self.block_size
        if s % bs:
            raise ValueError(f"BigBird: sequence length {s} must be a multiple of block_size {bs}")
        q, k, v = (
            heads(proj(hidden_states), self.num_attention_heads)
            for proj in (self.query, self.key, self.value)
        )
        counts = bigbird_block_counts(s, bs, hf_rand_attn(self, s)).to(q.device)
        real = None if to_mask is None else to_mask.reshape(b, s) > 0.5
        layout = ek.BlockLayout(counts > 0, bs)
        if bool((counts > 1).any()):
            d = q.shape[-1]
            q2, k2, v2, scale = fold_block_counts(q, k, v, counts, bs)
            with _folded_head_dim(d, q2.shape[-1]):
                out = ek.block_sparse_attention(
                    q2, k2, v2, layout, key_padding_mask=real, scale=scale, backend=opts.backend
                )[..., :d]
        else:
            out = ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=opts.backend)
        return merge_heads(out), None


class BigBirdAttention(HF_ATTENTION):
    """HF's BigBirdAttention whose sparse/full switch keeps the block-sparse module on etkd."""

    class_options = Options()

    def set_attention_type(self, value: str, layer_idx=None):
        super().set_attention_type(value, layer_idx=layer_idx)
        if type(self.self) is HF_SPARSE:
            self.self.__class__ = BigBirdBlockSparseAttention
            if "_etkd_options" in self.__dict__:
                self.self._etkd_options = self._etkd_options
        elif value == "original_full":
            warnings.warn(
                "etkd.hf: HF switched this BigBird model to original_full attention (input too short for "
                "block_sparse); that dense attention runs HF's own code, and HF keeps it for later inputs",
                stacklevel=2,
            )


PATCHES = {HF_SPARSE: BigBirdBlockSparseAttention, HF_ATTENTION: BigBirdAttention}
MODULE_NAMES = {
    hf: {"BigBirdBlockSparseAttention": BigBirdBlockSparseAttention, "BigBirdAttention": BigBirdAttention}
}
