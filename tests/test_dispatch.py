"""Backend selection: argument > use_backend context > ETKD_BACKEND > auto; clear errors with reasons."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import etkd_kernels
from etkd_kernels import available_backends, sliding_window_attention, use_backend
from etkd_kernels.dispatch import BACKENDS, NAMES, check_name, requested_backend, resolve


def test_import_does_not_touch_gpu_or_triton():
    code = (
        "import sys, etkd_kernels; "
        "assert 'triton' not in sys.modules, 'triton imported at import time'; "
        "print(sorted(etkd_kernels.available_backends()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "reference" in out.stdout


def test_available_backends_reports_every_backend_with_a_reason():
    info = available_backends()
    assert set(info) == set(BACKENDS)
    assert info["reference"].available
    for item in info.values():
        assert item.reason  # either what it is or why it cannot run
    if torch.version.cuda is None:
        assert not info["cuda"].available and "CPU build" in info["cuda"].reason


def test_precedence(monkeypatch):
    monkeypatch.setenv("ETKD_BACKEND", "reference")
    assert requested_backend() == "reference"
    with use_backend("cpu"):
        assert requested_backend() == "cpu"
        with use_backend("triton"):
            assert requested_backend() == "triton"
        assert requested_backend("reference") == "reference"
    monkeypatch.delenv("ETKD_BACKEND")
    assert requested_backend() == "auto"


def test_auto_on_cpu_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = resolve("sliding_window", torch.device("cpu"), torch.float32).__name__
    assert name.split(".")[1] in ("cpu", "reference")


def test_unknown_backend_names_the_argument(monkeypatch):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="backend"):
        sliding_window_attention(q, q, q, 2, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        with use_backend("nope"):
            pass
    monkeypatch.setenv("ETKD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ETKD_BACKEND"):
        sliding_window_attention(q, q, q, 2)


def test_explicit_unusable_backend_raises_with_reasons():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="cuda.*cannot run.*CUDA tensors|cuda.*cannot run.*CPU build"):
        sliding_window_attention(q, q, q, 2, backend="cuda")


def test_use_backend_context_reaches_the_op(monkeypatch):
    calls = []
    import etkd_kernels.reference.full as ref_full

    real = ref_full.forward
    monkeypatch.setattr(ref_full, "forward", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 1, 4, 4)
    with use_backend("reference"):
        etkd_kernels.full_attention(q, q, q)
    assert calls == [1]


def test_info_command_prints_the_matrix():
    from etkd.distill.cli import main

    assert main(["info"]) == 0


def test_capabilities_are_the_one_statement_of_limits():
    """Limits come from the declared capabilities: the cuda kernels' head_dim list and grid limit, triton's
    largest head_dim; every reason names the limit."""
    from etkd_kernels.dispatch import Problem, capabilities

    cuda = torch.device("cuda")
    why = capabilities("cuda", "sliding_window").reasons(Problem(cuda, torch.float16, 48, 70_000, 128))
    assert any("head_dim must be one of (32, 64, 128)" in w for w in why)
    assert any("batch * heads must be <= 65535" in w for w in why)
    assert capabilities("cuda", "sliding_window").reasons(Problem(cuda, torch.float16, 64, 48, 128)) == []
    why = capabilities("triton", "block_sparse").reasons(Problem(cuda, torch.float16, 256))
    assert why == ["head_dim must be <= 128, got 256"]
    assert capabilities("cuda", "lsg") is None


def test_auto_on_cuda_tensors_never_takes_reference_for_full():
    """`full` on CUDA tensors resolves to torch's SDPA (the cuda backend's full needs no compiled extension)."""
    from etkd_kernels.dispatch import Problem, selected_backend_name

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert selected_backend_name("full", Problem(torch.device("cuda"), dtype, 64, 8, 512)) == "cuda"


def test_auto_moves_past_a_kernel_limit(monkeypatch):
    """With the cuda extension (pretended) built, `auto` takes it within its limits and triton (which splits
    its launches over the batch) beyond its grid limit or head_dim list."""
    pytest.importorskip("triton")
    import etkd_kernels.cuda as cuda_backend
    from etkd_kernels.dispatch import Problem, selected_backend_name

    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    dev = torch.device("cuda")
    assert selected_backend_name("sliding_window", Problem(dev, torch.float16, 64, 48, 256)) == "cuda"
    assert selected_backend_name("sliding_window", Problem(dev, torch.float16, 64, 70_000, 256)) == "triton"
    assert selected_backend_name("block_sparse", Problem(dev, torch.float16, 80, 48, 256)) == "triton"


def test_backward_runs_the_backend_the_forward_chose(monkeypatch):
    """The forward resolves the backend once and its backward runs that backend: forward inside
    use_backend("reference"), backward outside any context (with ETKD_BACKEND naming another backend) and on
    another thread (where the forward's thread-local context does not exist, as on a GPU's autograd thread)."""
    import threading

    import etkd_kernels.reference.sliding_window as ref_sw

    ran = []
    fwd, bwd = ref_sw.forward, ref_sw.backward
    monkeypatch.setattr(ref_sw, "forward", lambda *a: ran.append("fwd") or fwd(*a))
    monkeypatch.setattr(ref_sw, "backward", lambda *a: ran.append("bwd") or bwd(*a))
    monkeypatch.setenv("ETKD_BACKEND", "cpu" if "cpu" in _usable_backends() else "reference")
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    for where in ("same thread", "other thread"):
        ran.clear()
        with use_backend("reference"):
            out = sliding_window_attention(q, k, v, 4)
        assert ran == ["fwd"]
        if where == "same thread":
            out.sum().backward()
        else:
            errors = []
            t = threading.Thread(target=lambda: _backward_or_record(out, errors))
            t.start()
            t.join()
            assert not errors, errors
        assert ran == ["fwd", "bwd"], where
    # the same call outside the context takes ETKD_BACKEND for both directions
    ran.clear()
    sliding_window_attention(q, k, v, 4).sum().backward()
    assert ran == ([] if "cpu" in _usable_backends() else ["fwd", "bwd"])


def _usable_backends() -> list[str]:
    return [n for n, info in available_backends().items() if info.available]


def _backward_or_record(out, errors):
    try:
        out.sum().backward()
    except Exception as exc:  # surfaced by the main thread's assert
        errors.append(repr(exc))


def test_backend_names_are_checked_in_one_place():
    assert NAMES == ("auto", *BACKENDS)
    assert check_name("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"--backend: unknown backend 'fast'; expected 'auto' or one of"):
        check_name("fast", "--backend")
