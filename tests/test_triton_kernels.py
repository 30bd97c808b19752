"""Triton kernels under TRITON_INTERPRET=1 on the CPU: forward and gradients equal the `reference` backend.

The interpreter runs every program in numpy, so shapes stay tiny; tiles are 16 x 16 there (see
`etkd_kernels/triton/_common.py`), and each case comment says which branch of the kernels it covers.
bf16 products are widened to fp32 under the interpreter (its bf16 arithmetic is wrong), so the bf16 cases
check loads, stores and accumulation, not bf16 tensor-core products; those are checked on a GPU only.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from helpers import assert_close, backend_parity, sliding_window_call  # noqa: E402

from etkd_kernels import (  # noqa: E402
    BlockLayout,
    bigbird_layout,
    block_sparse_attention,
    longformer_layout,
    nystrom_attention,
    sliding_window_attention,
)
from etkd_kernels.ops.sliding_window import SlidingWindowParams  # noqa: E402

# The interpreter switch is the caller's, set before the process starts (`make test` runs this file alone with
# TRITON_INTERPRET=1): setting it here, at import, would also turn kernels of other test modules collected in
# the same session (tests/test_triton_gpu.py) into interpreter runs, so a "GPU" test could pass without a GPU.
pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") != "1",
        reason="needs TRITON_INTERPRET=1 set before pytest starts: TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py",
    ),
]

# (atol, rtol) per dtype, forward and gradients; both backends round their fp32 result to the input dtype,
# so low-precision differences are about one ulp (fp16's kernel also rounds P to fp16 before P @ V).
TOL = {
    torch.float32: ((1e-4, 0.0), (1e-4, 0.0)),
    torch.float16: ((2e-3, 5e-3), (4e-3, 1e-2)),
    torch.bfloat16: ((1.6e-2, 2e-2), (3e-2, 4e-2)),
}


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _parity(call, tensors, dtype, name):
    return backend_parity(call, tensors, TOL[dtype], name)


def _sw_inputs(b, h, s, d, globals_at, padded_tail, separate, dtype):
    q, k, v = (_randn(b, h, s, d, dtype=dtype) for _ in range(3))
    gm = None
    if globals_at is not None:
        gm = torch.zeros(b, s, dtype=torch.bool)
        for row, cols in enumerate(globals_at):
            gm[row, cols] = True
    kpm = None
    if padded_tail:
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[-1, s - padded_tail :] = False
    extra = [_randn(b, h, s, d, dtype=dtype) for _ in range(3)] if separate else []
    return [q, k, v, *extra], gm, kpm


SW_CASES = [
    # (b, h, s, d, window, globals per batch row, padded tail, separate global projections, dtype)
    pytest.param(1, 2, 32, 16, 8, None, 0, False, torch.float32, id="band-only-tile-multiple"),
    pytest.param(2, 1, 37, 16, 6, None, 9, False, torch.float32, id="band-padding-ragged-tail"),
    # row 0: globals in the first and a middle tile; row 1: a global inside the padding (counts as padding)
    # and one at the last real token; exercises the global-key list loop and gathered global rows.
    pytest.param(
        2, 1, 37, 24, 8, [[0, 20], [3, 27, 35]], 7, False, torch.float32, id="globals-shared-qkv-d24"
    ),
    pytest.param(2, 1, 37, 16, 8, [[0, 20], [5]], 7, True, torch.float32, id="globals-separate-qkv"),
    pytest.param(1, 1, 21, 16, 40, [[2]], 0, False, torch.float32, id="window-wider-than-seq"),
    pytest.param(2, 1, 37, 16, 8, [[0, 20], [5]], 7, True, torch.float16, id="fp16-globals-separate"),
    pytest.param(2, 1, 37, 16, 8, [[0, 20], [5]], 7, True, torch.bfloat16, id="bf16-globals-separate"),
]


@pytest.mark.parametrize("b,h,s,d,window,globals_at,padded_tail,separate,dtype", SW_CASES)
def test_sliding_window_matches_reference(b, h, s, d, window, globals_at, padded_tail, separate, dtype):
    tensors, gm, kpm = _sw_inputs(b, h, s, d, globals_at, padded_tail, separate, dtype)

    _parity(sliding_window_call(window, gm, kpm), tensors, dtype, "sliding_window")


def test_sliding_window_lse_matches_reference():
    """The saved log-sum-exp (what the backward recomputes from) equals the reference's, +inf on padding."""
    from etkd_kernels.reference import sliding_window as ref
    from etkd_kernels.triton import sliding_window as tri

    (q, k, v), gm, kpm = _sw_inputs(2, 1, 37, 16, [[0, 20], [5]], 7, False, torch.float32)
    p = SlidingWindowParams(8, gm, None, None, None, key_padding_mask=kpm, scale=0.25)
    _, lse_t = tri.forward(q, k, v, p)
    _, lse_r = ref.forward(q, k, v, p)
    assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_r)) and torch.isinf(lse_t[1, :, -7:]).all()
    assert_close(torch.nan_to_num(lse_t, posinf=0), torch.nan_to_num(lse_r, posinf=0), 1e-5, name="lse")


def _random_layout(heads, nb, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nb, nb, generator=g) < density
    mask[0, 1] = False  # a query block that sees nothing: out 0, lse +inf
    return mask


BS_CASES = [
    # (b, h, s, layout builder, padded tail, dtype)
    # seq 50 with block 16: the op pads to 64; per-head BigBird layout with globals and random blocks.
    pytest.param(
        2,
        2,
        50,
        lambda: bigbird_layout(64, 16, num_random_blocks=1, num_heads=2),
        5,
        torch.float32,
        id="bigbird-per-head-ragged-seq",
    ),  # fmt: skip
    # block 20 is cut into a 16-row tile and a 4-row masked tile; one layout for all heads; an empty row.
    pytest.param(
        1,
        2,
        60,
        lambda: BlockLayout(_random_layout(1, 3, 0.6, 0), 20),
        0,
        torch.float32,
        id="random-block20-empty-row",
    ),  # fmt: skip
    pytest.param(2, 1, 64, lambda: longformer_layout(64, 16), 9, torch.float16, id="longformer-fp16"),
    pytest.param(2, 1, 64, lambda: longformer_layout(64, 16), 9, torch.bfloat16, id="longformer-bf16"),
]


@pytest.mark.parametrize("b,h,s,make_layout,padded_tail,dtype", BS_CASES)
def test_block_sparse_matches_reference(b, h, s, make_layout, padded_tail, dtype):
    layout = make_layout()
    q, k, v = (_randn(b, h, s, 16, dtype=dtype) for _ in range(3))
    kpm = None
    if padded_tail:
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[-1, s - padded_tail :] = False

    def call(q, k, v, backend):
        return block_sparse_attention(q, k, v, layout, key_padding_mask=kpm, backend=backend)

    _parity(call, [q, k, v], dtype, "block_sparse")


def test_block_sparse_matches_dense_masked_softmax():
    """Independent of the reference backend: the plain-PyTorch meaning from the op's docstring."""
    layout = BlockLayout(_random_layout(1, 3, 0.5, 3), 16)
    q, k, v = (_randn(1, 2, 48, 16) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout, backend="triton")
    scores = (q @ k.transpose(-1, -2)) * 16**-0.5
    scores = scores.masked_fill(~layout.to_dense()[None], float("-inf"))
    expected = torch.nan_to_num(scores.softmax(-1)) @ v
    assert_close(out, expected, 1e-5, name="block_sparse vs dense")


NY_CASES = [
    # (b, s, landmarks, pinv_init, padded tail, dtype)
    pytest.param(1, 32, 8, "per_head", 0, torch.float32, id="landmarks-divide-seq"),
    # 30 tokens, 7 landmarks: ragged last segment; K3's key padding; HF's batch-global pinv init.
    pytest.param(2, 30, 7, "hf_global", 5, torch.float32, id="ragged-segments-padding-hf-global"),
    pytest.param(2, 20, 20, "per_head", 5, torch.float32, id="exact-softmax-landmarks-eq-seq"),
    pytest.param(2, 30, 6, "per_head", 5, torch.float16, id="fp16"),
]


@pytest.mark.parametrize("b,s,landmarks,pinv_init,padded_tail,dtype", NY_CASES)
def test_nystrom_matches_reference(b, s, landmarks, pinv_init, padded_tail, dtype):
    q, k, v = (_randn(b, 1, s, 16, dtype=dtype) for _ in range(3))
    kpm = None
    if padded_tail:
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[-1, s - padded_tail :] = False

    def call(q, k, v, backend):
        return nystrom_attention(
            q, k, v, landmarks, pinv_init=pinv_init, key_padding_mask=kpm, backend=backend
        )

    _parity(call, [q, k, v], dtype, "nystrom")


def test_head_dim_too_large_is_rejected():
    from etkd_kernels.triton import sliding_window as tri

    q = torch.randn(1, 1, 16, 160)
    with pytest.raises(ValueError, match="head_dim"):
        tri.forward(q, q, q, SlidingWindowParams(4, None, None, None, None, key_padding_mask=None, scale=0.1))


def test_torch_compile_fullgraph_traces_the_triton_op():
    """The custom op is opaque to dynamo: a small model calling it compiles without graph breaks."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)

        def forward(self, x, gm):
            b, s, _ = x.shape
            q, k, v = self.proj(x).view(b, s, 3, 1, 16).permute(2, 0, 3, 1, 4)
            return sliding_window_attention(q, k, v, 4, global_mask=gm, backend="triton").sum()

    model = Block()
    x = torch.randn(1, 20, 16)
    gm = torch.zeros(1, 20, dtype=torch.bool)
    gm[0, 0] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, gm)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, gm)
    eager.backward()
    assert_close(loss, eager, 1e-5, name="compiled loss")
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad, 1e-5, name="compiled grad")


# ---- attention dropout: the keep-mask, outputs and gradients of `reference` (issue 27) ------------------------
# The kernels regenerate the contract's Philox4x32-10 mask (etkd_kernels/_shared/) from absolute positions;
# under the interpreter the tiles are 16 x 16, so seq 40 crosses tile edges.
DROP = dict(dropout_p=0.3, dropout_seed=2**40 + 77, dropout_offset=5)


def _drop_call(op: str, s: int, backend: str, q, k, v, *extra, kpm=None, landmarks=None, **drop):
    """One call of `op` with dropout; sliding window with two global tokens per batch row (and the global
    projections `extra` when given), block sparse on a random layout of 8-token blocks with an empty row."""
    kw = dict(key_padding_mask=kpm, backend=backend, **{**DROP, **drop})
    if op == "sliding_window":
        gm = torch.zeros(q.shape[0], s, dtype=torch.bool)
        gm[:, [1, s // 2]] = True
        return sliding_window_attention(q, k, v, 8, global_mask=gm, global_qkv=tuple(extra) or None, **kw)
    if op == "block_sparse":
        nb = -(-s // 8)
        layout = _random_layout(1, nb, 0.4, 5) | torch.eye(nb, dtype=torch.bool)[None]
        layout[0, 1] = False  # a query block that sees nothing
        return block_sparse_attention(q, k, v, BlockLayout(layout, 8), **kw)
    return nystrom_attention(q, k, v, landmarks or s, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["sliding_window", "block_sparse", "nystrom"])
def test_dropout_keep_mask_is_the_reference_mask(op, dtype):
    """q = k = 0 (uniform probabilities over a row's keys), v = the identity (head_dim = seq): row i of the output
    is row i of the dropped probabilities, so its non-zero pattern is the keep-mask (Nystrom: the exact case)."""
    b, h, s = 2, 2, 40
    q = torch.zeros(b, h, s, s, dtype=dtype)
    v = torch.eye(s, dtype=dtype).expand(b, h, s, s).contiguous()
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, s - 7 :] = False
    got = _drop_call(op, s, "triton", q, q, v, kpm=kpm)
    want = _drop_call(op, s, "reference", q, q, v, kpm=kpm)
    assert want.ne(0).any() and (want[0] == 0).any()
    assert torch.equal(got != 0, want != 0), f"{(got != 0).ne(want != 0).sum().item()} keep bits differ"


DROP_CASES = [
    # (op, seq, dtype, separate global projections, landmarks)
    pytest.param("sliding_window", 37, torch.float32, False, None, id="sw-globals-padding-ragged"),
    pytest.param("sliding_window", 37, torch.float32, True, None, id="sw-global-projections"),
    pytest.param("block_sparse", 45, torch.float32, False, None, id="bs-blocks-padded-inside"),
    pytest.param("nystrom", 30, torch.float32, False, 6, id="nystrom-landmarks-K1"),
    pytest.param("nystrom", 20, torch.float32, False, 20, id="nystrom-exact"),
    pytest.param("sliding_window", 37, torch.float16, True, None, id="sw-fp16"),
    pytest.param("block_sparse", 45, torch.bfloat16, False, None, id="bs-bf16"),
]


@pytest.mark.parametrize("op,s,dtype,separate,landmarks", DROP_CASES)
def test_dropout_outputs_and_gradients_match_reference(op, s, dtype, separate, landmarks):
    n = 6 if separate else 3
    tensors = [_randn(2, 2, s, 16, dtype=dtype) for _ in range(n)]
    kpm = torch.ones(2, s, dtype=torch.bool)
    kpm[1, s - 6 :] = False

    def call(*leaves, backend):
        return _drop_call(op, s, backend, *leaves, kpm=kpm, landmarks=landmarks)

    _parity(call, tensors, dtype, f"{op} dropout")


def test_dropout_mask_is_absolute_across_split_launches(monkeypatch):
    """A launch split over the batch (grid axis y past CUDA's 65,535) keeps the counter's b * H + h absolute:
    with the limit lowered to 2 rows, 3 batch rows go in two launches and the mask equals the reference's."""
    from etkd_kernels.triton import _common

    monkeypatch.setattr(_common, "MAX_GRID_Y", 2)
    b, h, s = 3, 1, 24
    q = torch.zeros(b, h, s, s)
    v = torch.eye(s).expand(b, h, s, s).contiguous()
    got = _drop_call("block_sparse", s, "triton", q, q, v)
    want = _drop_call("block_sparse", s, "reference", q, q, v)
    assert torch.equal(got != 0, want != 0)


def test_dropout_zero_is_the_kernel_without_dropout():
    """dropout_p = 0 launches the dropout-free kernels: the output is the no-dropout call's, bit for bit."""
    q, k, v = (_randn(1, 2, 37, 16) for _ in range(3))
    a = _drop_call("sliding_window", 37, "triton", q, k, v, dropout_p=0.0)
    b = sliding_window_attention(q, k, v, 8, global_mask=torch.zeros(1, 37, dtype=torch.bool).index_fill_(
        1, torch.tensor([1, 18]), True), backend="triton")  # fmt: skip
    assert torch.equal(a, b)
