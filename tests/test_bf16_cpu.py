"""bf16 on a CPU whose torch bf16 GEMMs are slow (etkd.models.precision): etkd's linear layers run fp32 GEMMs
on bf16-rounded inputs, attention stays bf16, the user is told once; HF models and the drivers say it once.

ETKD_CPU_BF16_LINEAR forces either answer of `etkd_kernels.cpu.bf16_matmul()`, so both paths run on any CPU:
`fp32` = "this CPU's bf16 GEMMs are slow" (the routed path), `bf16` = "they are fast" (torch's bf16 GEMMs, as
autocast runs them). Which GEMMs ran is read from a dispatch mode that records every aten GEMM's operand dtypes.

Tolerances are relative to torch's own bf16 error: the routed model's error against fp32 may be at most
1.5x that of the same model with torch's real bf16 GEMMs (it rounds the inputs as autocast does but keeps the
weights in fp32, so it is expected to be smaller), plus a small floor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import padded_global_batch
from torch.utils._python_dispatch import TorchDispatchMode

import etkd_kernels
from etkd.models import EncoderConfig, EncoderModel, precision
from etkd_kernels._env import EnvironmentValueError
from etkd_kernels.cpu import bf16_matmul

CPU = etkd_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")

SAID = "linear layers run fp32 GEMMs on bf16-rounded inputs"
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_addmm_activation"}


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test sees the warnings as a fresh process would (they are said once per process)."""
    monkeypatch.setattr(precision, "_told", set())


class GemmDtypes(TorchDispatchMode):
    """Records the dtypes of the operands of every aten GEMM that runs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMMS:
            self.seen.append((name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))

    def dtypes(self) -> set[torch.dtype]:
        return {d for _, ds in self.seen for d in ds}


def _model(attention: str = "longformer", head: str | None = "mlm", **over) -> EncoderModel:
    torch.manual_seed(0)
    kw = dict(
        vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=160,
        hidden_dropout=0.0, attention_dropout=0.0, attention=attention, window=16, block_size=8,
        num_random_blocks=1, num_landmarks=8, global_projections=True, head=head,
    )  # fmt: skip
    cfg = EncoderConfig(**{**kw, **over})
    return EncoderModel(cfg)


def _batch(seq: int = 64):
    ids, mask, gmask = padded_global_batch(seq)
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=gmask)


def _said(record) -> list[str]:
    return [str(w.message) for w in record if SAID in str(w.message)]


def _run(model, kw, mode: str, monkeypatch, backward: bool = False):
    """The model under CPU bf16 autocast with ETKD_CPU_BF16_LINEAR=mode: (outputs, grads, GEMM dtypes,
    the bf16 warnings given)."""
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", mode)
    model.zero_grad(set_to_none=True)
    gemms = GemmDtypes()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with gemms, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kw, output_hidden_states=True)
        if backward:
            with gemms:
                (out.logits.float().pow(2).mean() + out.last_hidden_state.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, gemms, _said(record)


def test_bf16_matmul_answers_and_switch(monkeypatch):
    monkeypatch.delenv("ETKD_CPU_BF16_LINEAR", raising=False)
    auto = bf16_matmul()
    # auto is torch's own check (what ATen asks before handing a bf16 GEMM to oneDNN)
    assert auto.fast == (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    assert "_is_mkldnn_bf16_supported" in auto.reason or "oneDNN" in auto.reason
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    assert bf16_matmul() == (False, "ETKD_CPU_BF16_LINEAR=fp32 forces fp32 GEMMs")
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "bf16")
    assert bf16_matmul().fast
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fast")
    with pytest.raises(EnvironmentValueError, match="ETKD_CPU_BF16_LINEAR=fast: expected auto, bf16, fp32"):
        bf16_matmul()


def test_etkd_info_says_how_bf16_linears_run(monkeypatch):
    from etkd_kernels.info import report

    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    assert "bf16 linear layers: fp32 GEMMs on bf16-rounded inputs" in report()
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "bf16")
    assert "bf16 linear layers: torch's bf16 GEMMs (ETKD_CPU_BF16_LINEAR=bf16" in report()


def test_bad_switch_value_is_refused_by_the_cli_before_the_command(monkeypatch, capsys):
    from etkd.distill.cli import main

    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "sometimes")
    assert main(["info"]) == 2
    assert "ETKD_CPU_BF16_LINEAR=sometimes: expected auto, bf16, fp32" in capsys.readouterr().err


@pytest.mark.parametrize("attention,head", [("longformer", "mlm"), ("bigbird", "sequence_classification")])
def test_encoder_routed_fp32_gemms_forward_backward(attention, head, monkeypatch):
    """Forced 'slow bf16 GEMMs': one warning for two calls, every GEMM in fp32 (forward and backward), outputs and
    gradients as close to fp32 as torch's own bf16 (or closer), output dtypes those of torch's bf16 path.
    longformer + mlm: the stacked q/k/v GEMM, the global projections, the tied decoder without bias; bigbird +
    sequence classification: the pooler and the bert-style head."""
    over = {"add_pooler": True, "head_style": "bert"} if head == "sequence_classification" else {}
    model = _model(attention, head, **over).train()
    kw = _batch()
    model(**kw).logits.float().pow(2).mean().backward()  # fp32 oracle
    out32 = model(**kw, output_hidden_states=True)
    model.zero_grad(set_to_none=True)
    (out32.logits.pow(2).mean() + out32.last_hidden_state.pow(2).mean()).backward()
    g32 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, gref, ref_gemms, ref_said = _run(model, kw, "bf16", monkeypatch, backward=True)
    assert ref_said == []  # fast bf16 forced: nothing to say
    assert torch.bfloat16 in ref_gemms.dtypes()  # torch's bf16 GEMMs really ran (the check below can fail)

    got, grads, gemms, said = _run(model, kw, "fp32", monkeypatch, backward=True)
    again = _run(model, kw, "fp32", monkeypatch)[3]
    assert len(said) == 1 and again == [], (said, again)
    assert "ETKD_CPU_BF16_LINEAR=bf16 forces torch's bf16 GEMMs" in said[0]
    assert gemms.seen and gemms.dtypes() == {torch.float32}, gemms.seen

    real = kw["attention_mask"].bool()[..., None]
    pairs = [("last_hidden_state", got.last_hidden_state, ref.last_hidden_state, out32.last_hidden_state),
             ("logits", got.logits, ref.logits, out32.logits)]  # fmt: skip
    pairs += [(f"hidden_states[{i}]", a, b, c)
              for i, (a, b, c) in enumerate(zip(got.hidden_states, ref.hidden_states, out32.hidden_states))]  # fmt: skip
    for name, a, b, want in pairs:
        a, b, want = a.detach(), b.detach(), want.detach()
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)  # downstream sees what autocast gave
        m = real if a.dim() == 3 else 1
        err = float(((a.float() - want) * m).abs().max())
        bf16_err = float(((b.float() - want) * m).abs().max())
        assert err <= 1.5 * bf16_err + 1e-3, (name, err, bf16_err)
    assert grads.keys() == g32.keys() == gref.keys()
    for n in g32:
        scale = float(g32[n].abs().max()) + 1e-6
        err = float((grads[n] - g32[n]).abs().max()) / scale
        bf16_err = float((gref[n] - g32[n]).abs().max()) / scale
        assert grads[n].dtype == gref[n].dtype == torch.float32, n
        assert err <= 1.5 * bf16_err + 2e-3, (n, err, bf16_err)


def test_bf16_weights_without_autocast_are_routed_too(monkeypatch):
    """A model cast to bf16 (no autocast) runs bf16 GEMMs too: routed the same way, outputs bf16."""
    model = _model("longformer", "token_classification", num_labels=3).eval().to(torch.bfloat16)
    kw = _batch()
    for mode, want in (("fp32", {torch.float32}), ("bf16", {torch.bfloat16})):
        monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", mode)
        gemms = GemmDtypes()
        with torch.no_grad(), gemms, warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = model(**kw)
        assert out.logits.dtype == torch.bfloat16 and gemms.dtypes() == want, (mode, gemms.seen)
        assert len(_said(record)) == (mode == "fp32")


def test_fp32_model_is_untouched(monkeypatch):
    """No autocast, fp32 weights: the modules' own calls, no warning, fp32 GEMMs (routing only acts on bf16)."""
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    model = _model().eval()
    calls = []
    model.encoder.layers[0].ffn_in.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**_batch())
    assert calls == [1] and _said(record) == []


def test_hooked_linear_keeps_its_call_and_is_named(monkeypatch):
    """A linear layer with a forward hook (LoRA, quantisation, ... do the same) is called as it is: its hook
    runs, it keeps torch's bf16 GEMM, and the user is told which module did."""
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    model = _model().eval()
    calls = []
    model.encoder.layers[0].ffn_in.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**_batch())
    assert calls == [1]
    assert [str(w.message) for w in record if "is not a plain nn.Linear" in str(w.message)], record


@pytest.mark.slow
def test_routed_encoder_compiles(monkeypatch):
    """torch.compile(fullgraph=True) traces the routed model (the decision is a constant, its warning no graph
    break): same result as eager."""
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    model = _model(num_layers=1).eval()
    kw = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ref = model(**kw).logits
        got = torch.compile(model, fullgraph=True)(**kw).logits
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=0.05, rtol=0.02)


def test_hf_patched_model_warns_once(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from helpers import HF_SMALL

    import etkd.hf

    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(max_position_embeddings=80, pad_token_id=1, attention_window=[4, 8],
                                        **HF_SMALL)  # fmt: skip
    model = etkd.hf.patch(transformers.LongformerModel(cfg).eval())
    ids = torch.randint(3, 99, (1, 24))
    for mode, n in (("bf16", 0), ("fp32", 1)):
        monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", mode)
        with torch.no_grad(), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(ids)
                model(ids)  # fp32: nothing to say
        said = [str(w.message) for w in record if "etkd.hf: an HF model" in str(w.message)]
        assert len(said) == n, (mode, said)
    assert "LongformerSelfAttention" in said[0] and "etkd.models.from_hf" in said[0]


def test_teacher_forward_bf16_warns_once_and_runs_fp32_gemms(monkeypatch):
    """`etkd distill --teacher-precision bf16`'s teacher call: the one warning for many batches."""
    from etkd.distill.distill import teacher_forward

    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    teacher = _model().eval()
    kw = _batch()
    gemms = GemmDtypes()
    with gemms, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            logits, hidden, _ = teacher_forward(teacher, kw["input_ids"], kw["attention_mask"],
                                                kw["attention_mask"].bool(), precision="bf16")  # fmt: skip
    assert len(_said(record)) == 1 and gemms.dtypes() == {torch.float32}
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "bf16")
    ref_logits, ref_hidden, _ = teacher_forward(teacher, kw["input_ids"], kw["attention_mask"],
                                                kw["attention_mask"].bool(), precision="bf16")  # fmt: skip
    assert (logits.dtype, hidden.dtype) == (ref_logits.dtype, ref_hidden.dtype)
    assert torch.isfinite(logits.float()).all() and torch.isfinite(hidden.float()).all()


def test_training_mixed_precision_bf16_warns_once(monkeypatch, tmp_path):
    """`--mixed-precision bf16` (accelerate's CPU bf16 autocast): a few steps run, the loss falls from its start,
    one warning."""
    pytest.importorskip("accelerate")
    from etkd.distill.training import TrainConfig, train

    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    model = _model(head="mlm")
    kw = _batch(32)
    data = [{k: v[i] for k, v in kw.items()} for i in range(2)] * 4

    def loss_fn(m, batch):
        out = m(**batch)
        loss = torch.nn.functional.cross_entropy(
            out.logits.float().flatten(0, 1), batch["input_ids"].flatten()
        )
        return loss, {}

    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=6, per_device_batch_size=2, learning_rate=3e-3,
                      save_every=0, log_every=1, seed=0, progress=False, mixed_precision="bf16")  # fmt: skip
    from accelerate.state import AcceleratorState

    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = train(model, data, loss_fn, cfg)
    finally:  # accelerate keeps one state per process: later tests' Accelerator(mixed_precision="no") needs it gone
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(_said(record)) == 1, _said(record)
    losses = [r["loss"] for r in out["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_evaluate_dtype_bf16_warns_once(monkeypatch, tmp_path, capsys):
    """`etkd evaluate --dtype bf16` on an eval set of several batches: it runs, and the warning is given once."""
    pytest.importorskip("accelerate")
    import json

    from transformers import BertTokenizer

    from etkd.distill.cli import main

    words = ["the", "a", "cat", "dog", "good", "bad", "sat", "mat"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    model_dir = tmp_path / "tiny"
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_positions=64, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    EncoderModel(cfg).save_pretrained(model_dir)
    rows = [{"sentence": " ".join(words[(i + j) % 8] for j in range(5)), "label": i % 2} for i in range(40)]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("ETKD_CPU_BF16_LINEAR", "fp32")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        code = main(["evaluate", "--task", "sst2", "--model", str(model_dir), "--eval-file",
                     str(tmp_path / "dev.jsonl"), "--dtype", "bf16", "--eval-batch-size", "8",
                     "--output", str(tmp_path / "ev.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(_said(record)) == 1, _said(record)
    assert "accuracy" in json.loads((tmp_path / "ev.json").read_text())["metrics"]
