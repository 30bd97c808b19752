"""HF's own attention modules as callables on (hidden states, padding, globals).

One place for how HF is driven: the parity tests and the benchmarks both build and call HF through these
functions, so a test and a benchmark can never disagree about what "HF" means.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    b, s, hidden = x.shape
    return x.view(b, s, heads, hidden // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def projections(module: nn.Module, x: torch.Tensor, heads: int, names=("query", "key", "value")):
    """q, k, v (batch, heads, seq, head_dim) from the HF module's own linear layers."""
    return tuple(split_heads(getattr(module, n)(x), heads) for n in names)


# --- Longformer --------------------------------------------------------------------------------------------


def longformer_module(hidden: int, heads: int, window: int) -> nn.Module:
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_window=[window],
        attention_probs_dropout_prob=0.0,
    )
    return LongformerSelfAttention(cfg, layer_id=0).eval()


def run_longformer(
    module: nn.Module, x: torch.Tensor, real: torch.Tensor, glob: torch.Tensor
) -> torch.Tensor:
    """HF LongformerSelfAttention on x (batch, seq, hidden). HF needs seq to be a multiple of the window:
    pad with masked tokens as LongformerModel does, and cut the result back."""
    b, s, _ = x.shape
    extra = (-s) % (module.one_sided_attn_window_size * 2)
    xp = F.pad(x, (0, 0, 0, extra))
    realp = F.pad(real, (0, extra), value=False)
    globp = F.pad(glob, (0, extra), value=False)
    ext = torch.zeros(b, s + extra, dtype=x.dtype, device=x.device)
    ext[~realp] = -10000.0
    ext[globp] = 10000.0
    out = module(
        xp,
        attention_mask=ext,
        is_index_masked=~realp,
        is_index_global_attn=globp,
        is_global_attn=bool(globp.any()),
    )[0]
    return out[:, :s]


def longformer_qkv(module: nn.Module, x: torch.Tensor):
    h = module.num_heads
    q, k, v = projections(module, x, h)
    g = projections(module, x, h, ("query_global", "key_global", "value_global"))
    return q, k, v, g


# --- BigBird -----------------------------------------------------------------------------------------------


def bigbird_module(
    hidden: int, heads: int, block_size: int, num_random_blocks: int, seed: int = 0, max_positions: int = 4096
) -> nn.Module:
    """HF BigBirdBlockSparseAttention. `seed` seeds its random-block generator; `max_positions` matters at
    seq 1024/3072/4096, where HF switches to the paper's legacy plan sized by it."""
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    cfg = BigBirdConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_type="block_sparse",
        block_size=block_size,
        num_random_blocks=num_random_blocks,
        max_position_embeddings=max_positions,
        attention_probs_dropout_prob=0.0,
    )
    return BigBirdBlockSparseAttention(cfg, seed=seed)


def record_random_blocks(module: nn.Module) -> nn.Module:
    """Make the module keep the random block indices it draws (whichever of HF's two generators its plan
    uses), for `recorded_random_blocks`."""
    module.recorded = {}
    for name in ("_bigbird_block_rand_mask_with_head", "_bigbird_block_rand_mask"):
        orig = getattr(module, name)

        def wrap(*args, _orig=orig, _name=name, **kwargs):
            res = _orig(*args, **kwargs)
            module.recorded.setdefault(_name, []).append(res)
            return res

        setattr(module, name, wrap)
    return module


def recorded_random_blocks(module: nn.Module, num_blocks: int):
    """The (heads, num_blocks - 2, r) random block indices of the module's last-recorded forward."""
    import numpy as np

    rec = module.recorded
    if "_bigbird_block_rand_mask_with_head" in rec:
        return np.stack(rec["_bigbird_block_rand_mask_with_head"][0])
    return np.stack([a[: num_blocks - 2] for a in rec["_bigbird_block_rand_mask"]])  # legacy: one per head


def run_bigbird(module: nn.Module, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """HF BigBirdBlockSparseAttention on x (batch, seq, hidden), seq a multiple of the block size."""
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel

    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        real.to(x.dtype), module.block_size
    )
    return module(
        x,
        band_mask=band,
        from_mask=from_mask,
        to_mask=to_mask,
        from_blocked_mask=blocked,
        to_blocked_mask=blocked,
    )[0]


# --- Nystromformer -----------------------------------------------------------------------------------------


def nystrom_module(
    hidden: int, heads: int, seq: int, num_landmarks: int, conv_kernel_size: int | None = None
) -> nn.Module:
    from transformers import NystromformerConfig
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

    cfg = NystromformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        segment_means_seq_len=seq,
        num_landmarks=num_landmarks,
        attention_probs_dropout_prob=0.0,
    )
    if conv_kernel_size is not None:
        cfg.conv_kernel_size = conv_kernel_size
    module = NystromformerSelfAttention(cfg).eval()
    if conv_kernel_size is None:
        # HF's config validator rejects conv_kernel_size=None, but the module skips its conv term when the
        # attribute is None: that is the attention core.
        module.conv_kernel_size = None
        del module.conv
    return module


def run_nystrom(module: nn.Module, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """HF NystromformerSelfAttention on x (batch, seq, hidden), with the classic (batch, 1, 1, seq) additive
    mask: transformers 5.x's NystromformerModel builds a (batch, 1, seq, seq) mask that cannot broadcast
    against HF's own (landmarks, seq) K3 scores, so the full model cannot run padded batches."""
    ext = torch.zeros(x.shape[0], 1, 1, x.shape[1], dtype=x.dtype, device=x.device)
    ext[~real[:, None, None, :]] = torch.finfo(x.dtype).min
    return module(x, attention_mask=ext)[0]


def lsg_self_attention_class():
    """lsg-converter's `LSGSelfAttention` (the attention behind the LSG checkpoints), loaded by file path: the
    package's `__init__` fails to import under transformers 5. None when lsg-converter is not installed."""
    spec = importlib.util.find_spec("lsg_converter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "attention_layers", "lsg_self_attention.py")
    mod_spec = importlib.util.spec_from_file_location("_lsg_self_attention", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.LSGSelfAttention
