"""Tests generated from the support matrix: every (op, backend) that `support_matrix` says can run here is
opchecked (forward and backward custom ops), compared with `reference` (forward and gradients), and run on
an empty sequence; every op runs on meta tensors. Which pairs run is decided in this process from the
backends' declared capabilities (the triton backend joins under TRITON_INTERPRET=1), so a backend that
claims an op cannot skip its tests.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import etkd_kernels as ek
from etkd_kernels.dispatch import BACKENDS, OPS

CPU = torch.device("cpu")
B, H, S, D = 2, 2, 24, 8


def _kpm(q: torch.Tensor) -> torch.Tensor:
    b, s = q.shape[0], q.shape[2]
    real = torch.ones(b, s, dtype=torch.bool, device=q.device)
    real[-1, max(s - 5, 0) :] = False  # a padded tail in the last batch row
    return real


# op -> function (q, k, v, backend, extra) calling the public op on small shapes (any batch and length);
# `extra` are further tensors that get gradients (the separate global projections). Also used by
# test_op_registration.py (gradcheck, torch.compile).
def _sliding_window(q, k, v, backend, extra=()):
    glob = (torch.arange(q.shape[2], device=q.device) == 1).expand(q.shape[0], -1).contiguous()
    gqkv = tuple(extra) if extra else None
    return ek.sliding_window_attention(
        q, k, v, 4, global_mask=glob, global_qkv=gqkv, key_padding_mask=_kpm(q), backend=backend
    )


def _block_sparse(q, k, v, backend, extra=()):
    s = q.shape[2]
    layout = (
        ek.longformer_layout(s, block_size=8, num_window_blocks=1)
        if s
        else ek.BlockLayout(torch.zeros(1, 0, 0, dtype=torch.bool), 8)
    )
    return ek.block_sparse_attention(q, k, v, layout, key_padding_mask=_kpm(q), backend=backend)


def _full(q, k, v, backend, extra=()):
    return ek.full_attention(q, k, v, key_padding_mask=_kpm(q), backend=backend)


def _lsg(q, k, v, backend, extra=()):
    return ek.lsg_attention(
        q, k, v, block_size=8, sparse_block_size=4, sparsity_factor=2, num_global_tokens=1,
        key_padding_mask=_kpm(q), backend=backend,
    )  # fmt: skip


def _nystrom(q, k, v, backend, extra=()):
    return ek.nystrom_attention(q, k, v, 4, key_padding_mask=_kpm(q), backend=backend)


CALLS = {
    "sliding_window": _sliding_window,
    "block_sparse": _block_sparse,
    "full": _full,
    "lsg": _lsg,
    "nystrom": _nystrom,
}
N_EXTRA = {"sliding_window": 3}  # separate global projections qg, kg, vg


def test_every_op_has_a_case():
    assert set(CALLS) == set(OPS)


def _claimed(dtype=torch.float32) -> list[tuple[str, str]]:
    matrix = ek.support_matrix(CPU, dtype, D)
    return [(op, b) for op in OPS for b in BACKENDS if matrix[op][b] == "ok"]


CLAIMED = _claimed()
# (op, backend, dtype) for every dtype a fused backend claims: parity runs in each.
DTYPES = {
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}  # atol = rtol, vs reference in dtype
KERNELS = [(op, b, dt) for dt in DTYPES for op, b in _claimed(dt) if b != "reference"]


def test_reference_claims_every_op():
    assert {op for op, b in CLAIMED if b == "reference"} == set(OPS)


def _leaves(op: str, s: int = S, dtype=torch.float32, device=CPU):
    g = torch.Generator().manual_seed(0)
    n = 3 + N_EXTRA.get(op, 0)
    return [torch.randn(B, H, s, D, generator=g).to(device, dtype).requires_grad_(True) for _ in range(n)]


def _run(op: str, backend: str, leaves):
    out = CALLS[op](*leaves[:3], backend, leaves[3:])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("op, backend, dtype", KERNELS, ids=str)
def test_parity_with_reference(op, backend, dtype):
    """Forward and every gradient close to `reference` given the same inputs in the same dtype (2e-5 in fp32;
    a few ulps of the 16-bit output types), with padding, global tokens and ragged blocks."""
    tol = DTYPES[dtype]
    leaves = _leaves(op, dtype=dtype)
    out, grads = _run(op, backend, leaves)
    ref_out, ref_grads = _run(op, "reference", [t.detach().clone().requires_grad_(True) for t in leaves])
    assert out.dtype == dtype
    assert_close(out, ref_out, tol, tol, name=f"{op}/{backend} out")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert (a is None) == (e is None), f"{op}/{backend} grad[{i}] present in one backend only"
        if a is not None:
            assert_close(a, e, tol, tol, name=f"{op}/{backend} grad[{i}]")


@pytest.mark.parametrize("op, backend", CLAIMED)
def test_empty_sequence(op, backend):
    """seq 0: an empty result and empty gradients, on every backend (it used to crash the interpreter)."""
    leaves = _leaves(op, s=0)
    out, grads = _run(op, backend, leaves)
    assert out.shape == (B, H, 0, D)
    for g, t in zip(grads, leaves):
        assert g is not None and g.shape == t.shape


@pytest.mark.parametrize("op", list(OPS))
def test_meta_tensors(op):
    """Meta tensors (shape propagation, e.g. model init on the meta device) go through every op, both ways."""
    leaves = _leaves(op, device=torch.device("meta"))
    out = CALLS[op](*leaves[:3], "auto", leaves[3:])
    assert out.device.type == "meta" and out.shape == (B, H, S, D)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    assert all(g is None or (g.device.type == "meta" and g.shape == t.shape) for g, t in zip(grads, leaves))


class _Capture(TorchDispatchMode):
    """Records the calls of etkd custom ops (forward and backward) as they reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "etkd":
            # keyed by the op's name without its overload (named after the schema: etkd_kernels/ops/_define.py)
            self.calls.setdefault(func._schema.name, (func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op, backend", CLAIMED)
def test_opcheck_forward_and_backward_ops(op, backend):
    """torch.library.opcheck of `etkd::<op>_fwd` and `etkd::<op>_bwd` with the arguments the public op uses."""
    leaves = _leaves(op)
    with _Capture() as cap:
        _run(op, backend, leaves)
    names = {name.split("::")[-1] for name in cap.calls}
    assert names == {f"{op}_fwd", f"{op}_bwd"}, names
    for func, args, kwargs in cap.calls.values():
        if func._schema.name.endswith("_bwd"):  # saved forward outputs arrive attached to the forward's graph
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(func, args, kwargs)  # forward args keep requires_grad: autograd is checked
