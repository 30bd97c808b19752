"""One small BERT-style encoder whose attention pattern is a config field and whose kernel backend swaps
at run time. Shapes: b = batch, s = seq, d = hidden, h = heads, hd = head_dim.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch.utils.checkpoint import checkpoint

from etkd_kernels.dispatch import check_name

from .config import LSG_MAX_GLOBAL_TOKENS, EncoderConfig, is_etkd_checkpoint
from .heads import activation, build_head
from .patterns import get, get_attention
from .precision import bf16_gemm, fp32_gemms, linear

WEIGHTS_NAME = "model.safetensors"
# Other checkpoint formats `save_pretrained(format=...)` writes: name -> fn(model, directory), registered by
# the module that implements it (it imports this one, so this one cannot import it).
SAVE_FORMATS: dict[str, Callable[[EncoderModel, str | os.PathLike], None]] = {}
TOKEN_HEADS = ("mlm", "token_classification", "question_answering")  # heads with one output per token


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or every file under a folder) the mode new files get under the user's umask.

    safetensors creates its files 0600 whatever the umask (ours, HF's save_pretrained, accelerate's
    checkpoints), so a model written for a team to read would be readable by its writer alone."""
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        if not os.path.islink(p):
            os.chmod(p, mode)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (b, s, d)
    logits: torch.Tensor | None = None  # head output; QA: (b, s, 2) = start, end
    pooled: torch.Tensor | None = None  # (b, d) when the config has a pooler
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer, when asked

    @property
    def start_logits(self) -> torch.Tensor:
        return self.logits[..., 0]

    @property
    def end_logits(self) -> torch.Tensor:
        return self.logits[..., 1]


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        # RoBERTa's padded tokens sit on position row pad_token_id, which (as in HF) gets no gradient.
        pad_row = (
            cfg.pad_token_id
            if cfg.position_style == "padded" and cfg.pad_token_id < cfg.max_positions
            else None
        )
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=pad_row)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        # LSG: lsg-converter's global embeddings (a fixed table of 512 rows, the first num_global_tokens used).
        self.global_tokens = (
            nn.Embedding(LSG_MAX_GLOBAL_TOKENS, cfg.hidden_size) if cfg.attention == "lsg" else None
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_ids(
        self, input_ids: torch.Tensor | None, b: int, s: int, device: torch.device
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.position_style == "padded" and input_ids is not None:
            # fairseq/RoBERTa: real tokens count from pad+1, pad tokens sit on row pad.
            real = input_ids.ne(cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + cfg.pad_token_id
        first = cfg.pad_token_id + 1 if cfg.position_style == "padded" else cfg.position_offset
        return (torch.arange(s, device=device) + first).expand(b, s)

    def forward(self, input_ids, token_type_ids=None, position_ids=None, inputs_embeds=None):
        x = self.word(input_ids) if inputs_embeds is None else inputs_embeds  # (b, s, d)
        b, s = x.shape[:2]
        if self.cfg.rescale_embeddings:
            x = x * self.cfg.hidden_size**0.5
        if position_ids is None:
            position_ids = self.position_ids(input_ids, b, s, x.device)
        x = x + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(b, s, dtype=torch.long, device=x.device)
            x = x + self.token_type(token_type_ids)
        if self.global_tokens is not None:  # LSG: (b, s, d) -> (b, g + s, d), globals first
            g = self.global_tokens.weight[: self.cfg.num_global_tokens]
            x = torch.cat([g.to(x.dtype).expand(b, -1, -1), x], dim=1)
        return self.dropout(self.norm(x))


class _QKV(torch.autograd.Function):
    """The q/k/v projections of x (b, s, d) as one GEMM against their stacked weights, returned as the (b, h, s, hd)
    head views of its (b, s, 3, h, hd) output. Backward: dx = dq Wq + dk Wk + dv Wv accumulated by the GEMMs
    (addmm_), dW and db per projection, from dq, dk, dv in whatever layout they come (the cpu kernels give them in
    the views' head order, so their (b * s, d) matrices are views): autograd's own backward of the views would first
    stack the three into a (b, s, 3d) gradient (a copy of 3 x b x s x d), and separate projections add the three
    input gradients (two more passes)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, heads, wq, wk, wv, bq, bk, bv, out_dtype=None):
        b, s, d = x.shape
        x2 = x.reshape(b * s, d)
        qkv = torch.addmm(torch.cat([bq, bk, bv]), x2, torch.cat([wq, wk, wv]).t())
        # out_dtype: the fp32 GEMM route of a bf16 model (models/precision.py) hands the attention its bf16 q/k/v,
        # and its backward runs the GEMMs in the forward's dtype (fp32), not in the gradients' bf16.
        ctx.gemm_dtype = None if out_dtype is None else qkv.dtype
        if out_dtype is not None:
            qkv = qkv.to(out_dtype)
        ctx.save_for_backward(x2, wq, wk, wv)
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)  # an output without a gradient comes as None: no GEMMs on zeros
        return tuple(t.transpose(1, 2) for t in qkv.view(b, s, 3, heads, -1).unbind(2))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dq, dk, dv):
        x2, *ws = ctx.saved_tensors
        n = x2.shape[0]
        if ctx.gemm_dtype is not None:
            dq, dk, dv = (None if g is None else g.to(ctx.gemm_dtype) for g in (dq, dk, dv))
        # (b, h, s, hd) -> (b * s, h * hd): a view when the gradient is in the heads' (b, s, h, hd) order
        gs = [None if g is None else g.transpose(1, 2).reshape(n, -1) for g in (dq, dk, dv)]
        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(gs, ws):
                if g is not None:
                    dx = torch.mm(g, w.to(g.dtype)) if dx is None else dx.addmm_(g, w.to(g.dtype))
            dx = None if dx is None else dx.view(ctx.shape)
        dws = [None if g is None or not ctx.needs_input_grad[2 + i] else g.t().mm(x2.to(g.dtype))
               for i, g in enumerate(gs)]  # fmt: skip
        dbs = [None if g is None or not ctx.needs_input_grad[5 + i] else g.sum(0) for i, g in enumerate(gs)]
        return dx, None, *dws, *dbs, None


# The FFN's row chunks hold at most this many bytes of its (rows, intermediate) activation: glibc's malloc serves a
# block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so every such block is
# faulted in page by page on every step (4096 x 3072 fp32 = 48 MiB: 12 k faults of ~3 us each, four of them per layer
# per training step); chunks under the cap come from the heap. As few chunks as that allows: each chunk adds a pass
# over the weight gradients (3 chunks of 1366 rows measured slower than the unchunked FFN on a Zen 3, 2 of 2048 faster).
FFN_CHUNK_BYTES = 24 << 20
# hidden_act -> the `approximate` argument of F.gelu / gelu_backward: the activations `_FFN` computes itself.
_FFN_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _row_chunks(n: int, width: int, itemsize: int) -> list[tuple[int, int]]:
    """(start, stop) of the equal row chunks of an (n, width) activation, each at most FFN_CHUNK_BYTES (or one row)."""
    parts = max(1, -(-n * width * itemsize // FFN_CHUNK_BYTES))
    rows = -(-n // parts) if n else 0
    return [(r, min(r + rows, n)) for r in range(0, n, rows)] if rows else []


class _FFN(torch.autograd.Function):
    """ffn_out(gelu(ffn_in(x))) of x (b, s, d) in row chunks of at most FFN_CHUNK_BYTES of the intermediate activation,
    with the same GEMMs, GELU and saved tensors (the pre-activation and the activation of every row) as the three
    modules under autograd, so the same values to rounding. Why: the unchunked (b * s, intermediate) tensors (the
    forward's two and the backward's two) are over glibc's mmap threshold and are faulted in afresh on every step; a
    chunk's backward temporaries are reused by the next chunk, and its activation gradient is computed in place."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, w1, b1, w2, b2, approximate):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], w2.shape[0])
        saved = []
        for r0, r1 in _row_chunks(x2.shape[0], w1.shape[0], x2.element_size()):
            h = torch.addmm(b1, x2[r0:r1], w1.t())
            a = F.gelu(h, approximate=approximate)
            torch.addmm(b2, a, w2.t(), out=y[r0:r1])
            saved += [h, a]
        ctx.save_for_backward(x2, w1, w2, *saved)
        ctx.approximate, ctx.shape = approximate, x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        x2, w1, w2, *saved = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need = ctx.needs_input_grad
        dx = x2.new_empty(x2.shape) if need[0] else None
        dw1 = w1.new_zeros(w1.shape) if need[1] else None
        db1 = w1.new_zeros(w1.shape[0]) if need[2] else None
        dw2 = w2.new_zeros(w2.shape) if need[3] else None
        db2 = dy2.sum(0) if need[4] else None
        chunks = _row_chunks(x2.shape[0], w1.shape[0], x2.element_size())
        for (r0, r1), h, a in zip(chunks, saved[0::2], saved[1::2]):
            g = dy2[r0:r1]
            if dw2 is not None:
                dw2.addmm_(g.t(), a)
            if not (need[0] or need[1] or need[2]):
                continue
            # dL/dh, in place in dL/da (an elementwise op may write over its own input)
            dh = torch.mm(g, w2)
            torch.ops.aten.gelu_backward.grad_input(dh, h, approximate=ctx.approximate, grad_input=dh)
            if dw1 is not None:
                dw1.addmm_(dh.t(), x2[r0:r1])
            if db1 is not None:
                db1 += dh.sum(0)
            if dx is not None:
                torch.mm(dh, w1, out=dx[r0:r1])
        return None if dx is None else dx.view(ctx.shape), dw1, db1, dw2, db2, None


def _plain_linear(m: nn.Module) -> bool:
    """An `nn.Linear` exactly (no subclass, wrapper or parametrisation) with a bias and no forward hooks: what
    `_QKV` computes is then what calling it computes."""
    return (
        type(m) is nn.Linear
        and m.bias is not None
        and not (m._forward_hooks or m._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


_told_unfused = False


def _say_unfused(layer: int, mods) -> None:
    global _told_unfused
    if not _told_unfused:
        _told_unfused = True
        kinds = sorted({type(m).__name__ for m in mods})
        warnings.warn(
            f"etkd encoder layer {layer}: the q/k/v projections are not plain nn.Linear modules without hooks "
            f"({', '.join(kinds)}), so they run one by one instead of as one stacked GEMM (a few % of a training "
            f"step); the stacked GEMM would bypass what the modules add (said once)",
            stacklevel=3,
        )


_told_unchunked = False


def _say_unchunked(mods, act: str) -> None:
    global _told_unchunked
    if not _told_unchunked:
        _told_unchunked = True
        kinds = ", ".join(sorted({type(m).__name__ for m in mods}))
        why = (f"hidden_act {act!r} is not a GELU" if act not in _FFN_GELU
               else f"ffn_in/ffn_out are not plain nn.Linear modules without hooks ({kinds})")  # fmt: skip
        warnings.warn(
            f"etkd encoder: the feed-forward block runs unchunked as its modules ({why}): its (tokens x "
            f"intermediate) activations are then allocated whole, and above glibc's 32 MiB mmap threshold take fresh "
            f"page faults on every step (said once)",
            stacklevel=3,
        )


class SelfAttention(nn.Module):
    """q/k/v projections -> the configured pattern (registry lookup) -> output projection."""

    def __init__(self, cfg: EncoderConfig, layer_index: int):
        super().__init__()
        self.config = cfg
        self.layer_index = layer_index
        d, h = cfg.hidden_size, cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qg = self.kg = self.vg = None
        if cfg.global_projections and get(cfg.attention).global_projections:
            self.qg, self.kg, self.vg = (nn.Linear(d, d) for _ in range(3))
        self.conv = None
        if cfg.attention == "nystrom" and cfg.conv_kernel_size:
            ks = cfg.conv_kernel_size
            self.conv = nn.Conv2d(h, h, (ks, 1), padding=(ks // 2, 0), bias=False, groups=h)
        self.window = cfg.layer_window(layer_index)
        self.rand_attn: torch.Tensor | None = None  # bigbird: fixed random blocks (heads, nb-2, r), optional
        self.cache: dict = {}  # per-length structures an adapter builds once (bigbird block masks)
        self.attend = get_attention(cfg)

    @property
    def dropout_p(self) -> float:
        """Dropout on the attention probabilities for this call: `config.attention_dropout` (HF's
        attention_probs_dropout_prob) in training mode, 0 in eval mode. The adapters pass it to the op where
        HF applies it (see each pattern module in models/patterns/); the op draws its seed from torch's generator."""
        return self.config.attention_dropout if self.training else 0.0

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (b, h, s, hd) of x (b, s, d): one GEMM against the three projections stacked (3d x d; the
        parameters stay `q`, `k`, `v`, so state_dict keys and HF conversion are unchanged), the heads as views of its
        (b, s, 3, h, hd) output (the cpu kernels read them in place; out and the gradients come back in the same head
        order, so the output projection reads a view). `_QKV`'s backward takes dq, dk, dv as they come (no stack of
        them into one gradient) and sums x's gradient inside the GEMMs (no adds)."""
        mods = (self.q, self.k, self.v)
        if all(_plain_linear(m) for m in mods):
            if bf16_gemm(x, self.q.weight.dtype) and fp32_gemms():  # this CPU's bf16 GEMMs are slow
                with torch.autocast("cpu", enabled=False):  # the stacked GEMM in fp32 (models/precision.py)
                    ws = tuple(m.weight.float() for m in mods)
                    bs = tuple(m.bias.float() for m in mods)
                    return _QKV.apply(
                        x.to(torch.bfloat16).float(), self.config.num_heads, *ws, *bs, torch.bfloat16
                    )
            return _QKV.apply(x, self.config.num_heads, self.q.weight, self.k.weight, self.v.weight,
                              self.q.bias, self.k.bias, self.v.bias)  # fmt: skip
        # A projection replaced or wrapped (PEFT/LoRA, quantisation, parametrisation, a forward hook): the stacked
        # GEMM reads the weights directly and would bypass what the module's own call adds, so call each module.
        _say_unfused(self.layer_index, mods)
        b, s, _ = x.shape
        return tuple(linear(m, x).view(b, s, self.config.num_heads, -1).transpose(1, 2) for m in mods)

    def forward(self, x, key_padding_mask=None, global_mask=None, backend="auto"):
        b, s, d = x.shape
        q, k, v = self.projections(x)  # (b, h, s, hd)
        y = self.attend(self, x, q, k, v, key_padding_mask, global_mask, backend)  # (b, h, s, hd)
        y = y.transpose(1, 2).reshape(b, s, d)
        return linear(self.o, y)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig, layer_index: int):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn = SelfAttention(cfg, layer_index)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)
        self.hidden_act = cfg.hidden_act
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def ffn(self, x):
        """ffn_out(act(ffn_in(x))), as `_FFN` (row chunks: no per-step page faults of mmapped activations) when the two
        are plain nn.Linear modules, the activation is a GELU and no autocast or bf16 GEMM is in play; else as the
        modules, through `linear` (models/precision.py routes a bf16 GEMM this CPU runs slowly)."""
        mods = (self.ffn_in, self.ffn_out)
        approximate = _FFN_GELU.get(self.hidden_act)
        plain = all(_plain_linear(m) for m in mods)
        if torch.is_autocast_enabled(x.device.type) or bf16_gemm(x, self.ffn_in.weight.dtype):
            return self.dropout(linear(self.ffn_out, self.act(linear(self.ffn_in, x))))
        if approximate is not None and plain:
            w1, b1, w2, b2 = self.ffn_in.weight, self.ffn_in.bias, self.ffn_out.weight, self.ffn_out.bias
            return self.dropout(_FFN.apply(x, w1, b1, w2, b2, approximate))
        _say_unchunked(mods, self.hidden_act)
        return self.dropout(self.ffn_out(self.act(self.ffn_in(x))))

    def forward(self, x, key_padding_mask=None, global_mask=None, backend="auto"):  # (b, s, d) -> (b, s, d)
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.norm1(x), key_padding_mask, global_mask, backend))
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.dropout(self.attn(x, key_padding_mask, global_mask, backend)))
        return self.norm2(x + self.ffn(x))


class Encoder(nn.Module):
    """Embeddings + layers (+ final norm when pre-norm, + pooler when configured)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.add_pooler else None
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.backend = "auto"  # the kernel backend of every layer (`EncoderModel.set_attention_backend`)

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, global_attention_mask=None,
        position_ids=None, inputs_embeds=None, output_hidden_states=False,
    ) -> EncoderOutput:  # fmt: skip
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: give exactly one of them")
        kpm = None if attention_mask is None else attention_mask.bool()  # (b, s), True = real token
        gmask = None if global_attention_mask is None else global_attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (b, s, d)
        lsg = self.embeddings.global_tokens is not None
        if lsg:  # x is (b, g + s, d) -> (b, g + s + pad, d)
            n = x.shape[1]
            kpm = self._lsg_mask(kpm, x)
            x, kpm = self._lsg_pad(x, kpm)
        states = [x]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, kpm, gmask, self.backend, use_reentrant=False)
            else:
                x = layer(x, kpm, gmask, self.backend)
            states.append(x)
        if self.final_norm is not None:
            x = states[-1] = self.final_norm(x)
        if lsg:  # drop the globals again, as LSGRobertaEncoder does
            g = self.config.num_global_tokens
            out = x[:, g:n]
            if self.config.pool_with_global and out.shape[1]:
                out = torch.cat([x[:, :1], out[:, 1:]], dim=1)  # the first token gets global 0's output
            x = out
            states = [t[:, g:n] for t in states[:-1]] + [x]
        pooled = torch.tanh(linear(self.pooler, x[:, 0])) if self.pooler is not None else None
        return EncoderOutput(x, pooled=pooled, hidden_states=tuple(states) if output_hidden_states else None)

    def _lsg_pad(self, x: torch.Tensor, kpm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """lsg-converter's adaptive padding (LSGRobertaEncoder): past two blocks, zero hidden states (not real)
        up to a multiple of block_size tokens after the globals, run through every layer like the others. Their
        outputs matter where bos_pooling pools a group of padding (`lsg_attention`'s variant "model")."""
        cfg = self.config
        b, n = x.shape[:2]
        s = n - cfg.num_global_tokens
        pad = -s % cfg.block_size
        if not cfg.adaptive or s <= 2 * cfg.block_size or not pad:
            return x, kpm
        if kpm is None:
            kpm = torch.ones(b, n, dtype=torch.bool, device=x.device)
        x = torch.cat([x, x.new_zeros(b, pad, x.shape[2])], dim=1)
        return x, torch.cat([kpm, kpm.new_zeros(b, pad)], dim=1)

    def _lsg_mask(self, kpm: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """The (b, g + s) key mask of an LSG sequence: globals real, then the tokens' own mask."""
        cfg = self.config
        b, n = x.shape[:2]
        g = cfg.num_global_tokens
        s = n - g
        if not cfg.adaptive and s > 2 * cfg.block_size and s % cfg.block_size:
            raise ValueError(
                f"input length {s}: adaptive=False takes lengths that are a multiple of block_size "
                f"({cfg.block_size}) past two blocks (lsg-converter asserts the same)"
            )
        if kpm is None and not cfg.mask_first_token:
            return None
        tokens = torch.ones(b, s, dtype=torch.bool, device=x.device) if kpm is None else kpm
        if cfg.mask_first_token and s:
            # lsg-converter hides the first token as a key; its own output row is replaced by
            # pool_with_global (forced with mask_first_token), so the op's zero row there never shows.
            tokens = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, 1:]], dim=1)
        return torch.cat([torch.ones(b, g, dtype=torch.bool, device=x.device), tokens], dim=1)


class EncoderModel(nn.Module):
    """The encoder plus the configured task head (`config.head`, None = bare encoder).

    forward(input_ids, attention_mask, token_type_ids, global_attention_mask, ...) -> EncoderOutput with
    `logits` from the head: MLM (b, s, vocab), sequence classification (b, num_labels), token
    classification (b, s, num_labels), QA (b, s, 2).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.head = build_head(config, self.encoder)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init for fresh models (loaded checkpoints overwrite it): N(0, initializer_range) weights,
        zero biases, unit LayerNorms. PyTorch's defaults (N(0, 1) embeddings, tied to the MLM decoder)
        start an MLM at a loss of ~19 nats and stall training behind gradient clipping."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, global_attention_mask=None,
                position_ids=None, inputs_embeds=None, output_hidden_states=False,
                head_positions=None) -> EncoderOutput:  # fmt: skip
        """head_positions: (b, s) bool; a token-level head (MLM, token classification, QA) then runs only at
        these positions and `logits` is (n, out) for their n True entries in row-major order (as
        `full_logits[head_positions]`). An MLM loss that reads 15% of the tokens need not pay for the rest."""
        cfg = self.config
        n_global = get(cfg.attention).classification_globals
        if global_attention_mask is None and n_global and cfg.head == "sequence_classification":
            # As the pattern's HF classifier: the first tokens are global unless the call says otherwise.
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            global_attention_mask = torch.zeros(ref.shape[:2], dtype=torch.bool, device=ref.device)
            global_attention_mask[:, :n_global] = True
        out = self.encoder(input_ids, attention_mask, token_type_ids, global_attention_mask, position_ids,
                           inputs_embeds, output_hidden_states)  # fmt: skip
        if self.head is not None:
            out.logits = (
                self.head(out)
                if head_positions is None
                else self.logits_at(out.last_hidden_state, head_positions)
            )
        return out

    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The token-level head on the encoder's last hidden states (b, s, d) at `positions` (b, s) bool only:
        (n, out) rows in row-major order, equal to the full head's logits `[positions]`."""
        if self.config.head not in TOKEN_HEADS:
            raise ValueError(f"head_positions: only a token-level head ({', '.join(TOKEN_HEADS)}) runs per "
                             f"position; this model's head is {self.config.head!r}")  # fmt: skip
        if positions.shape != hidden.shape[:2] or positions.dtype != torch.bool:
            raise ValueError(f"head_positions: expected a bool tensor of shape {tuple(hidden.shape[:2])}, got "
                             f"{positions.dtype} {tuple(positions.shape)}")  # fmt: skip
        return self.head(EncoderOutput(hidden[positions]))

    # Run-time switches (no weights touched).
    def set_attention_backend(self, backend: str) -> EncoderModel:
        """Use kernel backend `backend` ("auto", "reference", "cpu", "triton", "cuda") in every layer (one
        attribute, `encoder.backend`, passed to each layer's attention call)."""
        self.encoder.backend = check_name(backend)
        return self

    @property
    def attention_backend(self) -> str:
        return self.encoder.backend

    def set_gradient_checkpointing(self, enabled: bool = True) -> EncoderModel:
        self.encoder.gradient_checkpointing = enabled
        self.config.gradient_checkpointing = enabled
        return self

    # Our own format: config.json + model.safetensors.
    def save_pretrained(self, directory: str | os.PathLike, format: str = "etkd") -> None:
        """format "etkd" (our config.json + model.safetensors) or another format a module above registered
        in `SAVE_FORMATS` ("lsg": an LSG model as lsg-converter's checkpoint folder, loadable with
        transformers' `trust_remote_code=True`; models/lsg.py)."""
        if format != "etkd":
            if format not in SAVE_FORMATS:
                raise ValueError(f"format: expected one of {['etkd', *SAVE_FORMATS]}, got {format!r}")
            return SAVE_FORMATS[format](self, directory)
        self.config.save(directory)
        save_model(self, os.path.join(directory, WEIGHTS_NAME))
        apply_umask(os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> EncoderModel:
        """Load our own format (config.json with the etkd marker + model.safetensors). HF checkpoints load
        through `etkd.models.load` (either format) or `etkd.models.from_hf`."""
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(
                f"from_pretrained: {directory} has no config.json (not an etkd checkpoint)"
            )
        if not is_etkd_checkpoint(directory):
            raise ValueError(
                f"from_pretrained: {directory} is not an etkd checkpoint (an HF one?); "
                "etkd.models.load(path) loads either format"
            )
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_pretrained: no {WEIGHTS_NAME} in {directory}")
        model = cls(EncoderConfig.load(directory))
        load_model(model, path)
        return model.eval()
