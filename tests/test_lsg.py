"""lsg_attention (reference backend) against lsg-converter's LSGSelfAttention (the peer the checkpoints
come from) and against brute-force constructions of LSG's key sets."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from etkd.benchmarks.patterns.lsg import lsg_self_attention_class
from etkd_kernels import BlockLayout, block_sparse_attention, lsg_attention, lsg_layout


def brute_lsg(q, k, v, block, sparse_block, factor, sparsity_type, n_global, real=None):
    """Row by row: list each query's keys explicitly (definition in etkd_kernels/reference/lsg.py)."""
    b, h, s, d = q.shape
    scale = d**-0.5
    sp = -(-s // block) * block  # the op pads to a block multiple; padded tokens are not real
    real = torch.ones(b, s, dtype=torch.bool) if real is None else real
    real = torch.cat([real, torch.zeros(b, sp - s, dtype=torch.bool)], dim=1)
    pad = torch.zeros(b, h, sp - s, d, dtype=q.dtype)
    k, v = torch.cat([k, pad], dim=2), torch.cat([v, pad], dim=2)
    step = block // factor
    o = step % 2  # LSG's odd-step window shift
    nb = sp // block
    rows = []
    for bi in range(b):
        usable = [bool(real[bi, j]) and j >= n_global for j in range(sp)]
        for hi in range(h):
            for i in range(s):
                if not real[bi, i]:
                    rows.append(torch.zeros(d, dtype=q.dtype))
                    continue
                if i < n_global:
                    idx = [j for j in range(sp) if real[bi, j]]
                    keys, vals = k[bi, hi, idx], v[bi, hi, idx]
                else:
                    n = i // block
                    idx = [j for j in range(n_global) if real[bi, j]]
                    idx += [j for j in range((n - 1) * block, (n + 2) * block) if 0 <= j < sp and usable[j]]
                    keys, vals = [k[bi, hi, idx]], [v[bi, hi, idx]]
                    if sparsity_type != "none" and sparse_block > 0 and nb > 2:
                        left = range((n - 1) * step - sparse_block + o, (n - 1) * step + o)
                        right = range((n + 2) * step - 2 * o, (n + 2) * step - 2 * o + sparse_block)
                        for p in [*left, *right]:
                            if not 0 <= p < sp // factor:
                                continue
                            group = list(range(p * factor, (p + 1) * factor))
                            if factor > 1 and sparsity_type == "pooling":  # attended even if empty (LSG)
                                ok = [j for j in group if usable[j]]
                                keys.append(k[bi, hi, ok].sum(0, keepdim=True) / (len(ok) + 1e-6))
                                vals.append(v[bi, hi, ok].sum(0, keepdim=True) / (len(ok) + 1e-6))
                                continue
                            if factor > 1 and sparsity_type == "bos_pooling":
                                ok = [j for j in group if real[bi, j]] or group  # none real: uniform
                                w = torch.zeros(factor, dtype=q.dtype)
                                w[[j - group[0] for j in ok]] = (
                                    k[bi, hi, ok] @ q[bi, hi, 0] * scale
                                ).softmax(0)
                                keys.append((w[:, None] * k[bi, hi, group]).sum(0, keepdim=True))
                                vals.append((w[:, None] * v[bi, hi, group]).sum(0, keepdim=True))
                                continue
                            if factor == 1:
                                j = p
                            elif sparsity_type == "stride":
                                j = p * factor + hi % factor
                            elif sparsity_type == "block_stride":  # a contiguous run of step tokens per block
                                j = (p // step) * block + (hi * step + p % step) % block
                            else:  # norm: the block's step usable keys of largest norm, by rank
                                blk = range((p // step) * block, (p // step + 1) * block)
                                ranked = sorted(
                                    blk, key=lambda j: -float(k[bi, hi, j].norm()) if usable[j] else 1
                                )
                                j = ranked[p % step]
                            if usable[j]:
                                keys.append(k[bi, hi, [j]])
                                vals.append(v[bi, hi, [j]])
                    keys, vals = torch.cat(keys), torch.cat(vals)
                if keys.shape[0] == 0:
                    rows.append(torch.zeros(d, dtype=q.dtype))
                    continue
                p_ = ((keys @ q[bi, hi, i]) * scale).softmax(-1)
                rows.append(p_ @ vals)
    return torch.stack(rows).view(b, h, s, d)


def _inputs(b, h, s, d, pad, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen, dtype=dtype).requires_grad_(True) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    return q, k, v, real


CASES = [
    # (batch, heads, seq, block, sparse_block, factor, n_global, pad)
    (2, 3, 48, 8, 2, 2, 2, 5),  # several blocks, globals, padding
    (1, 2, 45, 8, 3, 4, 1, 0),  # seq not a multiple of the block (op pads)
    (2, 2, 40, 4, 4, 2, 0, 9),  # no globals, padding spanning a block, sparse windows past the ends
    (1, 4, 36, 6, 2, 3, 3, 2),  # block / factor = 2, 4 heads: stride/block-stride offsets differ by head
    (1, 2, 24, 4, 1, 4, 1, 0),  # block == factor (one compressed token per block), odd step: shifted windows
    (1, 2, 30, 3, 2, 1, 1, 4),  # factor 1: sparse keys are plain tokens
]


@pytest.mark.parametrize("sparsity_type", ["norm", "stride", "block_stride", "pooling", "bos_pooling"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_brute_force(case, sparsity_type):
    b, h, s, block, sblock, factor, n_global, pad = case
    if sparsity_type == "bos_pooling" and n_global == 0:
        pytest.skip("bos_pooling needs a global first token")
    q, k, v, real = _inputs(b, h, s, 4, pad)
    kw = dict(block_size=block, sparse_block_size=sblock, sparsity_factor=factor, num_global_tokens=n_global)
    out = lsg_attention(q, k, v, sparsity_type=sparsity_type, key_padding_mask=real, **kw)
    exp = brute_lsg(q, k, v, block, sblock, factor, sparsity_type, n_global, real)
    assert torch.isfinite(out).all()
    assert_close(out, exp, atol=1e-10, name="forward")
    g = torch.randn_like(out)
    for got, want, name in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(exp, (q, k, v), g), ("dq", "dk", "dv")
    ):
        assert_close(got, want, atol=1e-10, name=name)


@pytest.mark.parametrize("s, pad", [(32, 0), (29, 4)])
def test_local_only_equals_tridiagonal_block_sparse(s, pad):
    q, k, v, real = _inputs(2, 2, s, 8, pad, dtype=torch.float32)
    out = lsg_attention(
        q, k, v, block_size=8, sparsity_type="none", num_global_tokens=0, key_padding_mask=real
    )
    nb = -(-s // 8)
    i = torch.arange(nb)
    layout = BlockLayout(((i[:, None] - i[None, :]).abs() <= 1)[None], 8)
    exp = block_sparse_attention(q, k, v, layout, key_padding_mask=real)
    assert_close(out, exp, atol=1e-6)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(exp, (q, k, v), g)):
        assert_close(got, want, atol=1e-5)


def test_whole_global_block_equals_lsg_layout():
    """With the whole first block global and no sparse keys, LSG is exactly the block layout lsg_layout gives."""
    q, k, v, real = _inputs(1, 2, 40, 8, 3, dtype=torch.float32)
    out = lsg_attention(
        q, k, v, block_size=8, sparsity_type="none", num_global_tokens=8, key_padding_mask=real
    )
    exp = block_sparse_attention(q, k, v, lsg_layout(40, 8, num_global_blocks=1), key_padding_mask=real)
    assert_close(out, exp, atol=1e-6)


def test_sparse_block_size_zero_is_local_plus_global():
    q, k, v, real = _inputs(1, 2, 40, 4, 0)
    kw = dict(block_size=8, sparsity_factor=2, num_global_tokens=2, key_padding_mask=real)
    a = lsg_attention(q, k, v, sparse_block_size=0, sparsity_type="pooling", **kw)
    bb = lsg_attention(q, k, v, sparse_block_size=4, sparsity_type="none", **kw)
    assert_close(a, bb, atol=1e-12)


def test_fully_padded_rows_are_zero_not_nan():
    q, k, v, real = _inputs(2, 2, 32, 4, 0)
    real[1] = False
    real[0, 20:] = False
    out = lsg_attention(
        q,
        k,
        v,
        block_size=8,
        sparse_block_size=2,
        sparsity_factor=2,
        num_global_tokens=1,
        key_padding_mask=real,
    )
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[0, :, 20:].abs().max() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_block_not_multiple_of_factor_raises():
    q, k, v, _ = _inputs(1, 1, 16, 4, 0)
    with pytest.raises(ValueError, match="sparsity_factor"):
        lsg_attention(q, k, v, block_size=6, sparse_block_size=2, sparsity_factor=4, sparsity_type="stride")


@pytest.mark.parametrize(
    "sparsity_type", ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling"]
)
def test_gradcheck_float64(sparsity_type):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 2, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    real = torch.ones(1, 7, dtype=torch.bool)
    real[0, 6] = False

    def fn(q, k, v):
        return lsg_attention(
            q,
            k,
            v,
            block_size=2,
            sparse_block_size=1,
            sparsity_factor=2,
            sparsity_type=sparsity_type,
            num_global_tokens=1,
            key_padding_mask=real,
            backend="reference",
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- lsg-converter's LSGSelfAttention, the real peer -------------------------------------------------------


LSG_ORACLE = lsg_self_attention_class()
needs_converter = pytest.mark.skipif(
    LSG_ORACLE is None, reason="lsg-converter is not installed (pip install --no-deps lsg-converter==0.1.9)"
)

CONVERTER_CASES = [
    # (batch, heads, seq, block, factor, pad); LSGSelfAttention's windows are well formed for factor >= 4
    # or an odd factor with an odd step (reference/lsg.py, difference (5)); lower factors: brute force above
    (2, 4, 64, 8, 4, 11),  # 8 blocks, padding spanning whole pooled groups and a block
    (1, 4, 45, 8, 4, 0),  # seq not a multiple of the block: both sides pad inside
    (2, 2, 70, 8, 4, 5),  # not a multiple and padded; block_stride rotation over 2 heads
    (2, 4, 100, 16, 8, 21),  # step 2, 4 heads of stride offsets, padding over two blocks
    (1, 3, 63, 9, 3, 4),  # odd step (3): LSG's shifted sparse windows overlap the local ones
    (2, 2, 75, 15, 5, 9),  # odd step (3), factor 5
    (2, 2, 14, 8, 2, 3),  # seq <= 2 blocks: LSG runs full attention
]
ORACLE_TYPES = ["norm", "pooling", "stride", "block_stride", "bos_pooling"]


@needs_converter
@pytest.mark.parametrize("with_global", [True, False], ids=["global", "no-global"])
@pytest.mark.parametrize("sparsity_type", ORACLE_TYPES)
@pytest.mark.parametrize("case", CONVERTER_CASES, ids=[str(c) for c in CONVERTER_CASES])
def test_equals_lsg_converter(case, sparsity_type, with_global):
    b, h, s, block, factor, pad = case
    if sparsity_type == "bos_pooling" and not with_global:
        pytest.skip("bos_pooling pools with the global first query's scores (LSG computes it either way)")
    if sparsity_type == "norm" and (block // factor) % 2:
        pytest.skip("norm: LSG's shifted windows cut a block's top-k set, whose order LSG leaves unspecified")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, 8, generator=gen).requires_grad_(True) for _ in range(3))
    real = torch.ones(b, s, dtype=torch.bool)
    if pad:
        real[-1, s - pad :] = False
    oracle = LSG_ORACLE(
        None,
        block_size=block,
        sparsity_factor=factor,
        sparsity_type=sparsity_type,
        compute_global_attention=with_global,
        attention_dropout_prob=0.0,
    ).eval()
    # LSG's mask is additive (0 / finfo.min), (batch, 1, 1, seq); it writes into it, so a fresh one per call.
    additive = torch.zeros(b, 1, 1, s).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    exp = oracle(q, k, v, additive.clone())
    out = lsg_attention(
        q,
        k,
        v,
        block_size=block,
        sparse_block_size=block,
        sparsity_factor=factor,
        sparsity_type=sparsity_type,
        num_global_tokens=int(with_global),
        key_padding_mask=real,
        backend="reference",
    )
    rows = real[:, None, :, None]  # LSG's padded query rows are an average, ours zero: compare real rows
    assert_close(out * rows, exp * rows, atol=1e-5, name="forward")
    g = torch.randn(out.shape, generator=gen) * rows
    for got, want, name in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(exp, (q, k, v), g), ("dq", "dk", "dv")
    ):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=name)


@needs_converter
def test_lsg_converter_benchmark_runs(capsys):
    from etkd.benchmarks import lsg_oracle

    assert (
        lsg_oracle.main(
            ["--seq", "256", "--heads", "1", "--block", "32", "--types", "pooling", "--repeats", "1"]
        )
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pooling")]
    assert [r.split()[1] for r in rows] == ["fwd", "fwd_bwd"] and all("lsg-converter/cpu" in r for r in rows)


@pytest.mark.parametrize("sparsity_type", ["bos_pooling", "pooling", "norm"])
def test_model_variant_padded_rows_on_every_backend(sparsity_type):
    """variant="model": bos_pooling gives padded non-global query rows what a real row of their block gets
    (lsg-converter's model computes them and pools groups of padding from them a layer later), other types
    zeros; cpu (and triton: tests/test_triton_lsg.py) equal reference there too, outputs and gradients."""
    from etkd_kernels import available_backends

    b, h, s, d, block, n_global = 2, 2, 90, 8, 8, 2
    gen = torch.Generator().manual_seed(4)
    q, k, v, grad = (torch.randn(b, h, s, d, generator=gen) for _ in range(4))
    real = torch.ones(b, s, dtype=torch.bool)
    real[-1, 50:] = False  # whole groups and blocks of padding, and a partial block
    results = {}
    for backend in [n for n in ("reference", "cpu") if available_backends()[n].available]:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = lsg_attention(
            *leaves, block_size=block, sparse_block_size=block, sparsity_factor=2, sparsity_type=sparsity_type,
            num_global_tokens=n_global, key_padding_mask=real, variant="model", backend=backend,
        )  # fmt: skip
        out.backward(grad)
        results[backend] = (out.detach(), [t.grad for t in leaves])
    out = results["reference"][0]
    padded = out[-1, :, 50:]
    if sparsity_type == "bos_pooling":
        assert padded.abs().amax(-1).min() > 0, "a padded row got no output"
    else:
        assert padded.abs().max() == 0
    for backend, (got, grads) in results.items():
        assert_close(got, out, 1e-5, 2e-6, name=f"{backend} forward")
        for g, want, name in zip(grads, results["reference"][1], ("dq", "dk", "dv")):
            assert_close(g, want, 1e-5, 1e-5, name=f"{backend} {name}")
