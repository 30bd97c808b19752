"""No host synchronisation on the GPU op path.

Here (no GPU) the op path of the GPU backends runs with its device decisions patched to "not the host"
(`etkd_kernels._checks.on_host`, the one place they are made) and every way Python reads a tensor value
(`item`, `tolist`, `nonzero`, `bool`/`int`/`float`, `torch.nonzero`) raising; the kernel launches are
recorded instead of run. On a GPU, the `cuda`-marked test runs the real kernels under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any synchronising call.
"""

from __future__ import annotations

import pytest
import torch

import etkd_kernels as ek
from etkd_kernels import _checks

B, H, S, D = 2, 2, 40, 16


class HostRead(AssertionError):
    pass


def _forbid(name):
    def raiser(*args, **kwargs):
        raise HostRead(f"the op path read a device value with {name}")

    return raiser


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Device decisions say "not the host"; Python reads of tensor values raise; launches are recorded."""
    pytest.importorskip("triton")
    import triton.runtime.jit as jit

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the triton backend accept CPU tensors (run time)
    monkeypatch.delenv("ETKD_CHECK_FINITE", raising=False)
    monkeypatch.setattr(_checks, "on_host", lambda device: False)
    launches = []
    monkeypatch.setattr(
        jit.KernelInterface, "__getitem__", lambda self, grid: lambda *a, **k: launches.append(self)
    )
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _forbid(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "nonzero", _forbid("torch.nonzero"))
    return launches


def _inputs(n=3):
    return [torch.randn(B, H, S, D, requires_grad=True) for _ in range(n)]


def _masks():
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, -7:] = False
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, [0, 9]] = True
    return real, glob


def _fwd_bwd(fn, leaves):
    out = fn(*leaves)
    torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)


def test_guards_are_active(pretend_gpu):
    """The patches bite: a value read raises, the finite check is off, a launch is recorded."""
    with pytest.raises(HostRead):
        torch.ones(1).item()
    assert not _checks.finite_check_on(torch.device("cpu"))


def test_sliding_window_triton_path_has_no_host_read(pretend_gpu):
    real, glob = _masks()
    leaves = _inputs(6)

    def call(q, k, v, qg, kg, vg):
        return ek.sliding_window_attention(
            q, k, v, 8, global_mask=glob, global_qkv=(qg, kg, vg), key_padding_mask=real, backend="triton"
        )

    _fwd_bwd(call, leaves)
    assert len(pretend_gpu) >= 6  # 2 forward launches, delta, 4 backward launches


def test_block_sparse_triton_path_has_no_host_read(pretend_gpu):
    real, _ = _masks()
    layout = ek.bigbird_layout(S, 8, num_random_blocks=1, seed=0)
    _fwd_bwd(
        lambda q, k, v: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend="triton"),
        _inputs(),
    )
    assert len(pretend_gpu) >= 4


def test_nystrom_triton_path_has_no_host_read(pretend_gpu):
    real, _ = _masks()
    _fwd_bwd(
        lambda q, k, v: ek.nystrom_attention(q, k, v, 8, key_padding_mask=real, backend="triton"), _inputs()
    )
    assert len(pretend_gpu) >= 4


def test_finite_check_is_opt_in_off_the_host(pretend_gpu, monkeypatch):
    """Off the host the finite check reads a value, so it only runs with ETKD_CHECK_FINITE=1."""
    monkeypatch.setenv("ETKD_CHECK_FINITE", "1")
    assert _checks.finite_check_on(torch.device("cuda"))
    with pytest.raises(HostRead):
        _checks.check_finite(q=torch.randn(2))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_no_sync_on_a_gpu(backend):
    """The real thing: kernels on a GPU under set_sync_debug_mode("error") (after one warm-up call, which
    compiles and autotunes the kernels)."""
    dev = torch.device("cuda")  # skipped without a GPU by the `cuda` marker (tests/conftest.py)
    q, k, v = (
        torch.randn(B, H, 256, 64, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3)
    )
    real = torch.ones(B, 256, dtype=torch.bool, device=dev)
    real[1, -30:] = False
    glob = torch.zeros(B, 256, dtype=torch.bool, device=dev)
    glob[:, :2] = True
    layout = ek.bigbird_layout(256, 64, num_random_blocks=1, seed=0).to(dev)
    calls = [
        lambda: ek.sliding_window_attention(
            q, k, v, 32, global_mask=glob, key_padding_mask=real, backend=backend
        ),
        lambda: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=backend),
        lambda: ek.nystrom_attention(q, k, v, 16, key_padding_mask=real, backend=backend),
        lambda: ek.full_attention(q, k, v, key_padding_mask=real, backend="auto"),
    ]
    for call in calls:
        call().sum().backward()  # warm-up: compile, autotune, build and cache the LUT
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
