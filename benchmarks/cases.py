"""Benchmark setups: one per attention pattern, each with its providers.

A case builds the inputs once (hidden states, padding, globals, HF's module) and returns, per provider, a
callable of x (batch, seq, hidden) -> (batch, seq, hidden). Every provider includes the same q/k/v
projections (HF's own linear layers), so the comparison is module for module and only the attention differs:
  hf         HF's own attention module (LongformerSelfAttention, BigBirdBlockSparseAttention,
             NystromformerSelfAttention)
  etkd-<b>   the same projections + the etkd op on backend <b>
  sdpa       the same projections + dense torch SDPA (the full-attention baseline)
  flex       the same projections + compiled FlexAttention with the pattern's mask (forward only on CPU)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import etkd_kernels as ek
from etkd_kernels.dispatch import BACKENDS, reasons

from . import hf_reference as hr

OP_OF_CASE = {"longformer": "sliding_window", "bigbird": "block_sparse", "nystrom": "nystrom"}


@dataclass
class Case:
    name: str
    seq: int
    heads: int
    head_dim: int
    batch: int
    x: torch.Tensor
    providers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    useful_flops: float = 0.0  # forward attention FLOPs (QK^T and PV) on the pattern's nonzeros

    def run(self, provider: str, backward: bool) -> Callable[[], None]:
        fn = self.providers[provider]
        if not backward:

            def fwd():
                with torch.no_grad():
                    fn(self.x)

            return fwd
        x = self.x.detach().clone().requires_grad_(True)

        def fwd_bwd():
            fn(x).sum().backward()

        return fwd_bwd


def _etkd_backends(op: str, x: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for b in BACKENDS:
        why = reasons(b, op, x.device, x.dtype)
        if why:
            skipped[f"etkd-{b}"] = "; ".join(why)
        else:
            ok.append(b)
    return ok, skipped


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, scale):
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


def _inputs(batch, seq, hidden, device, pad_fraction=0.0, n_global=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, hidden, generator=g).to(device)
    real = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if pad_fraction:
        real[-1, seq - int(seq * pad_fraction) :] = False
    glob = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    glob[:, :n_global] = True
    return x, real, glob


def longformer_case(seq, window=512, heads=12, head_dim=64, batch=1, device="cpu", flex=True) -> Case:
    hidden = heads * head_dim
    x, real, glob = _inputs(batch, seq, hidden, device)
    mod = hr.longformer_module(hidden, heads, window).to(device)
    case = Case("longformer", seq, heads, head_dim, batch, x)
    w = min(window // 2, seq)
    band_pairs = sum(min(seq, i + w + 1) - max(0, i - w) for i in range(seq))
    case.useful_flops = 4.0 * batch * heads * head_dim * band_pairs

    case.providers["hf"] = lambda x: hr.run_longformer(mod, x, real, glob)
    backends, case.skipped = _etkd_backends("sliding_window", x)

    def etkd(backend):
        def fn(x):
            q, k, v, g = hr.longformer_qkv(mod, x)
            out = ek.sliding_window_attention(
                q, k, v, window, global_mask=glob, global_qkv=g, key_padding_mask=real, backend=backend
            )
            return hr.merge_heads(out)

        return fn

    for b in backends:
        case.providers[f"etkd-{b}"] = etkd(b)
    case.providers["sdpa"] = _sdpa_provider(mod, heads, real)
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        gl = glob[0]

        def mask_mod(b, h, qi, ki):
            return ((qi - ki).abs() <= window // 2) | gl[ki] | gl[qi]

        bm = create_block_mask(mask_mod, None, None, seq, seq, device=device)

        def flex_fn(x):
            q, k, v = hr.projections(mod, x, heads)
            return hr.merge_heads(_flex(q, k, v, bm, head_dim**-0.5))

        case.providers["flex"] = flex_fn
    return case


def bigbird_case(
    seq, block=64, num_random=3, heads=12, head_dim=64, batch=1, device="cpu", flex=True
) -> Case:
    hidden = heads * head_dim
    x, real, _ = _inputs(batch, seq, hidden, device)
    mod = hr.bigbird_module(hidden, heads, block, num_random).to(device).eval()
    case = Case("bigbird", seq, heads, head_dim, batch, x)
    layout = ek.bigbird_layout(seq, block_size=block, num_random_blocks=num_random, seed=0)
    nnz = int(layout.mask.sum()) * block * block * (heads if layout.num_heads == 1 else 1)
    case.useful_flops = 4.0 * batch * head_dim * nnz
    case.providers["hf"] = lambda x: hr.run_bigbird(mod, x, real)
    backends, case.skipped = _etkd_backends("block_sparse", x)

    def etkd(backend):
        def fn(x):
            q, k, v = hr.projections(mod, x, heads)
            return hr.merge_heads(
                ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=backend)
            )

        return fn

    for b in backends:
        case.providers[f"etkd-{b}"] = etkd(b)
    case.providers["sdpa"] = _sdpa_provider(mod, heads, real)
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        dense = layout.mask[0].to(device)

        def mask_mod(b, h, qi, ki):
            return dense[qi // block, ki // block]

        bm = create_block_mask(mask_mod, None, None, seq, seq, device=device)

        def flex_fn(x):
            q, k, v = hr.projections(mod, x, heads)
            return hr.merge_heads(_flex(q, k, v, bm, head_dim**-0.5))

        case.providers["flex"] = flex_fn
    return case


def nystrom_case(seq, landmarks=64, heads=12, head_dim=64, batch=1, device="cpu", flex=False) -> Case:
    hidden = heads * head_dim
    x, real, _ = _inputs(batch, seq, hidden, device)
    mod = hr.nystrom_module(hidden, heads, seq, landmarks).to(device)
    case = Case("nystrom", seq, heads, head_dim, batch, x)
    # K1 (s x m), K2 (m x m), K3 (m x s) products and their value products.
    case.useful_flops = (
        2.0 * batch * heads * head_dim * (2 * seq * landmarks + 2 * landmarks * seq + landmarks**2)
    )
    case.providers["hf"] = lambda x: hr.run_nystrom(mod, x, real)
    backends, case.skipped = _etkd_backends("nystrom", x)

    def etkd(backend):
        def fn(x):
            q, k, v = hr.projections(mod, x, heads)
            out = ek.nystrom_attention(
                q, k, v, landmarks, key_padding_mask=real, pinv_init="hf_global", backend=backend
            )
            return hr.merge_heads(out)

        return fn

    for b in backends:
        case.providers[f"etkd-{b}"] = etkd(b)
    case.providers["sdpa"] = _sdpa_provider(mod, heads, real)
    return case


def _sdpa_provider(mod, heads, real):
    def fn(x):
        q, k, v = hr.projections(mod, x, heads)
        return hr.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :]))

    return fn


CASES = {"longformer": longformer_case, "bigbird": bigbird_case, "nystrom": nystrom_case}


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GEMM rate of this machine in this run: the roofline next to every kernel's achieved rate."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
