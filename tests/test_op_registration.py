"""Every op is a torch.library custom op: gradcheck in float64, torch.compile(fullgraph=True) with aot_eager (the
op calls of tests/test_support_matrix.py, which also opchecks every forward and backward op), and one inductor
compile of a small model."""

from __future__ import annotations

import pytest
import torch
from test_support_matrix import CALLS, N_EXTRA

import etkd_kernels as ek


def _inputs(op: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    n = 3 + N_EXTRA.get(op, 0)
    return [torch.randn(2, 2, 12, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(n)]


def _op(op: str):
    """The public op on (q, k, v, *extra) with padding (and global tokens), as test_support_matrix calls it."""
    return lambda q, k, v, *extra: CALLS[op](q, k, v, "auto", extra)


@pytest.mark.parametrize("op", list(CALLS))
def test_gradcheck_float64(op):
    assert torch.autograd.gradcheck(_op(op), tuple(_inputs(op)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", list(CALLS))
def test_compile_fullgraph(op):
    torch._dynamo.reset()
    leaves = [t.detach().float().requires_grad_(True) for t in _inputs(op)]
    fn = _op(op)
    compiled = torch.compile(lambda *t: fn(*t) * 2.0, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    torch.testing.assert_close(out, fn(*leaves) * 2.0, atol=1e-6, rtol=0)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


class _TinyEncoderLayer(torch.nn.Module):
    """Projections -> sliding-window attention -> output projection: the smallest model around an etkd op."""

    def __init__(self, d_model: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = ek.sliding_window_attention(q, k, v, 4, key_padding_mask=real)
        return self.out(att.transpose(1, 2).reshape(b, s, d)) + x


def test_inductor_compiles_a_small_model():
    """torch.compile with the default (inductor) backend, in the default run: same forward and gradients as
    eager, with the etkd op kept as one opaque node of the generated graph."""
    torch._dynamo.reset()
    model = _TinyEncoderLayer()
    x = torch.randn(2, 12, 16, requires_grad=True)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[-1, -3:] = False
    eager = model(x, real)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, real)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-5, rtol=1e-5)


# The keywords every public op takes besides its own, with their defaults (written out here, not read from
# ops/_common.py, so the generated signatures are checked against what the API promises).
COMMON_KEYWORDS = {
    "key_padding_mask": None,
    "scale": None,
    "dropout_p": 0.0,
    "dropout_seed": None,
    "dropout_offset": None,
    "backend": "auto",
}
OWN_KEYWORDS = {
    "full_attention": {},
    "sliding_window_attention": {"global_mask": None, "global_qkv": None},
    "block_sparse_attention": {},
    "nystrom_attention": {"pinv_iterations": 6, "pinv_init": "per_head"},
    "lsg_attention": {
        "block_size": 128,
        "sparse_block_size": 128,
        "sparsity_factor": 2,
        "sparsity_type": "pooling",
        "num_global_tokens": 1,
        "variant": "layer",
    },
}


@pytest.mark.parametrize("name", list(OWN_KEYWORDS))
def test_public_signature_lists_every_keyword(name):
    """help() / inspect.signature show each keyword of a public op with its default and annotation (the common
    ones are generated from ops/_common.OpOptions), and a misspelled keyword is a TypeError naming it."""
    import inspect

    fn = getattr(ek, name)
    params = inspect.signature(fn).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {**OWN_KEYWORDS[name], **COMMON_KEYWORDS}
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values())
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "{dropout}" not in fn.__doc__ and "Philox4x32-10" in fn.__doc__
    q = torch.randn(1, 1, 8, 4)
    positional = {
        "sliding_window_attention": [2],
        "nystrom_attention": [2],
        "block_sparse_attention": [torch.ones(1, 2, 2, dtype=torch.bool)],
    }
    fn(q, q, q, *positional.get(name, []), dropout_p=0.1)  # the arguments are right but for the misspelling
    with pytest.raises(TypeError, match="dropout_prob"):
        fn(q, q, q, *positional.get(name, []), dropout_prob=0.1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", list(CALLS))
def test_a_call_resolves_its_backend_once(op, backend, monkeypatch):
    """One `resolve` per public-op call (issue 26): `run` resolves, decides the inputs' layout from that choice and
    hands it to the op (`_define.call`), whose implementation does not resolve again; the backward resolves the
    forward's backend by its name, once. The handed choice is what runs, and does not outlive the call."""
    from etkd_kernels import dispatch
    from etkd_kernels.ops import _common, _define

    if ek.support_matrix(torch.device("cpu"), torch.float32, 4)[op][backend] != "ok":
        pytest.skip(f"{backend} cannot run {op} here")
    calls = []
    real = dispatch.resolve

    def counting(*args, **kwargs):
        impl = real(*args, **kwargs)
        calls.append(dispatch.name_of(impl))
        return impl

    monkeypatch.setattr(_common, "resolve", counting)
    monkeypatch.setattr(_define, "resolve", counting)
    ran = []
    impl = real(op, torch.device("cpu"), torch.float32, backend=backend)
    fwd = impl.forward
    monkeypatch.setattr(impl, "forward", lambda *a: ran.append(dispatch.name_of(impl)) or fwd(*a))
    leaves = [t.detach().float().requires_grad_(True) for t in _inputs(op)]
    # q, k, v as a model's head-split views: the layout decision reads the one choice too
    q, k, v, *extra = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves)
    out = CALLS[op](q, k, v, backend, extra)
    assert calls == [backend] and ran == [backend]
    assert getattr(_define._handed, "choice", None) is None
    out.sum().backward()
    assert calls == [backend, backend]
    assert _define.op_name(_define.defined(f"{op}_fwd")) == op
