"""HF `NystromformerSelfAttention` on `etkd_kernels.nystrom_attention` (and `full_attention` where HF's
module computes exact softmax attention: num_landmarks == segment_means_seq_len).

HF cuts the sequence into `num_landmarks` segments of `segment_means_seq_len // num_landmarks` tokens, so its
landmark path only runs at seq == segment_means_seq_len and without padding (it adds a (batch, 1, seq, seq)
mask to (batch, heads, landmarks, seq) scores); other inputs raise a clear error here instead of a result
HF would not give. The depthwise conv term (conv_kernel_size) is HF's own `conv` module, added as HF adds it;
both pseudo-inverse initialisations are served (`pinv_init` "hf_global" / "per_head").
"""

from __future__ import annotations

import torch
from transformers.models.nystromformer import modeling_nystromformer as hf

import etkd_kernels as ek

# HF's linear layers under bf16 on a CPU whose bf16 GEMMs are slow are not ours to route: told once
from etkd.models.precision import note_hf_linears

from ._common import (
    Options,
    UnsupportedConfigError,
    full_attention_hf_rows,
    merge_heads,
    options_of,
    padding_from_mask,
    refuse_attention_weights,
)
from ._common import split_heads as heads

HF_CLASS = hf.NystromformerSelfAttention
PINV_ITERATIONS = 6  # HF calls iterative_inv(mat) with its default n_iter


def check(module: torch.nn.Module) -> None:
    if module.num_landmarks != module.seq_len and module.seq_len % module.num_landmarks:
        raise UnsupportedConfigError(
            f"Nystromformer segment_means_seq_len={module.seq_len} is not a multiple of num_landmarks="
            f"{module.num_landmarks}; HF's landmark reshape cannot run it"
        )


class NystromformerSelfAttention(HF_CLASS):
    """HF's module with its forward on etkd's ops; parameters (conv included) and names unchanged."""

    class_options = Options()

    def __init__(self, config):
        super().__init__(config)
        check(self)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        opts = options_of(self)
        refuse_attention_weights(output_attentions, "NystromformerSelfAttention")
        note_hf_linears(self, hidden_states)
        # HF's module defines attention dropout but never applies it, so training needs no check here.
        b, s, _ = hidden_states.shape
        q, k, v = (
            heads(proj(hidden_states), self.num_attention_heads)
            for proj in (self.query, self.key, self.value)
        )
        real = padding_from_mask(attention_mask, s)
        scale = self.attention_head_size**-0.5
        if self.num_landmarks == self.seq_len:
            out = full_attention_hf_rows(q, k, v, real, scale, opts.backend)
        else:
            if s != self.seq_len:
                raise UnsupportedConfigError(
                    f"Nystromformer: input of {s} tokens, but HF's landmark path reshapes by "
                    f"segment_means_seq_len={self.seq_len} (pad inputs to that length)"
                )
            if real is not None and not bool(real.all()):
                raise UnsupportedConfigError(
                    "Nystromformer: padded input (attention_mask with zeros); HF's landmark path adds the "
                    "(batch, 1, seq, seq) mask to (batch, heads, landmarks, seq) scores and cannot run it"
                )
            out = ek.nystrom_attention(
                q,
                k,
                v,
                self.num_landmarks,
                pinv_iterations=PINV_ITERATIONS,
                pinv_init="hf_global" if self.init_option == "original" else "per_head",
                backend=opts.backend,
            )
        if self.conv_kernel_size is not None:
            out = out + self.conv(v)
        out = merge_heads(out)
        return (out,)


PATCHES = {HF_CLASS: NystromformerSelfAttention}
MODULE_NAMES = {hf: {"NystromformerSelfAttention": NystromformerSelfAttention}}
