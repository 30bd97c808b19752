"""HF `LongformerSelfAttention` on `etkd_kernels.sliding_window_attention`.

Same inputs and outputs as HF's module (LongformerModel pads to a multiple of the window and builds the
masks; this forward only replaces the attention core): local band of `attention_window[layer]` keys,
global rows from the separate `*_global` projections, padded query rows zero, exactly as HF.
"""

from __future__ import annotations

import torch
from transformers.models.longformer import modeling_longformer as hf

import etkd_kernels as ek

# HF's linear layers under bf16 on a CPU whose bf16 GEMMs are slow are not ours to route: told once
from etkd.models.precision import note_hf_linears

from ._common import (
    Options,
    merge_heads,
    options_of,
    refuse_attention_weights,
)
from ._common import split_heads as heads

HF_CLASS = hf.LongformerSelfAttention


class LongformerSelfAttention(HF_CLASS):
    """HF's module with its forward on `sliding_window_attention`; parameters and names unchanged."""

    class_options = Options()

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        is_index_masked=None,
        is_index_global_attn=None,
        is_global_attn=None,
        output_attentions=False,
    ):
        opts = options_of(self)
        refuse_attention_weights(output_attentions, "LongformerSelfAttention")
        note_hf_linears(self, hidden_states)
        if is_index_masked is None and attention_mask is not None:
            is_index_masked = attention_mask < 0
        if is_index_global_attn is None and attention_mask is not None:
            is_index_global_attn = attention_mask > 0
        if is_global_attn is None:
            is_global_attn = is_index_global_attn is not None and bool(is_index_global_attn.any())
        h = self.num_heads
        q, k, v = (heads(proj(hidden_states), h) for proj in (self.query, self.key, self.value))
        global_mask = global_qkv = None
        if is_global_attn:
            global_mask = is_index_global_attn
            # Only global rows read the global queries: in eager mode project those rows alone (as HF does),
            # saving a seq x hidden x hidden matmul per layer; a compiled graph keeps static shapes instead.
            if torch.compiler.is_compiling():
                qg = self.query_global(hidden_states)
            else:
                qg = hidden_states.new_zeros(hidden_states.shape[:-1] + (self.embed_dim,))
                qg[global_mask] = self.query_global(hidden_states[global_mask])
            global_qkv = (
                heads(qg, h),
                heads(self.key_global(hidden_states), h),
                heads(self.value_global(hidden_states), h),
            )
        out = ek.sliding_window_attention(
            q,
            k,
            v,
            2 * self.one_sided_attn_window_size,
            global_mask=global_mask,
            global_qkv=global_qkv,
            key_padding_mask=None if is_index_masked is None else ~is_index_masked,
            dropout_p=self.dropout if self.training else 0.0,  # HF: on local and global probabilities
            backend=opts.backend,
        )
        return (merge_heads(out),)


PATCHES = {HF_CLASS: LongformerSelfAttention}
MODULE_NAMES = {hf: {"LongformerSelfAttention": LongformerSelfAttention}}
