"""Whole-model bf16 on the CPU: the encoder under torch.autocast("cpu", bfloat16) and with bf16 weights runs
its attention through the fused `cpu` kernels in bf16 (no fallback to `reference`), forward and backward, with
outputs within bf16 tolerance of the same model in fp32.

Tolerance: final hidden states (LayerNorm scale ~1) after 2 layers of bf16 matmuls: max abs error 0.15
(bf16 keeps 8 mantissa bits: ~4e-3 relative per rounding, compounded over ~10 roundings per layer).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, padded_global_batch

import etkd_kernels
from etkd.models import EncoderConfig, EncoderModel

CPU = etkd_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")

# attention -> the cpu module whose forward the encoder must reach in bf16
KERNEL = {
    "full": "etkd_kernels.cpu.full",
    "longformer": "etkd_kernels.cpu.sliding_window",
    "bigbird": "etkd_kernels.cpu.block_sparse",
    "nystrom": "etkd_kernels.cpu.nystrom",
}


def _model(attention: str) -> EncoderModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=160,
        hidden_dropout=0.0, attention_dropout=0.0, attention=attention, window=16, block_size=8,
        num_random_blocks=1, num_landmarks=8, global_projections=True,
    )  # fmt: skip
    return EncoderModel(cfg).eval()


def _batch(seq: int = 128):
    return padded_global_batch(seq)


def _spy(monkeypatch, module_name: str) -> list[torch.dtype]:
    """Record the dtype of every call into the cpu kernel module's forward."""
    import importlib

    mod = importlib.import_module(module_name)
    seen: list[torch.dtype] = []
    real = mod.forward

    def forward(q, *args):
        seen.append(q.dtype)
        return real(q, *args)

    monkeypatch.setattr(mod, "forward", forward)
    return seen


@pytest.mark.parametrize("attention", list(KERNEL))
@pytest.mark.parametrize("how", ["autocast", "bf16_weights"])
def test_encoder_bf16_runs_cpu_kernels(attention, how, monkeypatch):
    model = _model(attention)
    ids, mask, gmask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
    seen = _spy(monkeypatch, KERNEL[attention])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to `reference` would warn
        # ... but the float32-only kernels (Nystrom) say once that they convert: that one is expected here
        warnings.filterwarnings("ignore", "etkd .*: the cpu kernel computes in float32 only", RuntimeWarning)
        if how == "autocast":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                got = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
        else:
            with torch.no_grad():
                got = model.to(torch.bfloat16)(
                    ids, attention_mask=mask, global_attention_mask=gmask
                ).last_hidden_state
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    real = mask.bool()[..., None]
    assert_close(got.float() * real, want * real, 0.15, name=f"{attention} {how} hidden")


@pytest.mark.parametrize("attention", ["longformer", "bigbird"])
def test_encoder_autocast_backward(attention):
    """A bf16-autocast training step reaches every parameter with finite gradients close to fp32's."""
    model = _model(attention).train()
    ids, mask, gmask = _batch()
    model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state.pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (
            model(ids, attention_mask=mask, global_attention_mask=gmask)
            .last_hidden_state.float()
            .pow(2)
            .mean()
        )
    loss.backward()
    for n, p in model.named_parameters():
        if n in want:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            scale = float(want[n].abs().max()) + 1e-6
            assert_close(p.grad / scale, want[n] / scale, 0.1, name=f"{attention} grad {n}")


def test_bench_bf16_script_runs_and_reports_each_row(capsys):
    from etkd.benchmarks import bench_bf16

    assert bench_bf16.main(["--seq", "256", "--layers", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("HF LongformerModel fp32", "etkd fp32", "etkd bf16 autocast"):
        assert row in out
    fp32_diff = float(out.split("etkd fp32")[1].split("max|diff|")[1].split()[0])
    assert fp32_diff < 1e-4  # same weights, same precision: only summation order differs
