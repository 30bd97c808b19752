"""The encoder itself: every attention pattern trains (forward + backward), padding isolation, gradient
checkpointing, pre-norm, inputs_embeds / token_type_ids, config JSON, backend selection, torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from etkd.models import PATTERNS, EncoderConfig, EncoderModel

PATTERNS = sorted(PATTERNS)
# Settings small enough for a 40-token input to exercise each pattern's sparse path (bigbird: 10 blocks).
SETTINGS = dict(window=8, block_size=4, num_random_blocks=1, sparse_block_size=2, num_landmarks=8)


def tiny(attention: str = "full", **kw) -> EncoderModel:
    base = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64,
                hidden_dropout=0.0, attention_dropout=0.0, attention=attention, **SETTINGS)  # fmt: skip
    return EncoderModel(EncoderConfig(**{**base, **kw})).set_attention_backend("reference")


def batch(seq: int = 40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 9 :] = 0
    return ids, mask


HEAD_SHAPES = {"mlm": (2, 40, 50), "sequence_classification": (2, 3), "token_classification": (2, 40, 3),
               "question_answering": (2, 40, 2)}  # fmt: skip
CASES = [("full", head) for head in HEAD_SHAPES] + [(p, "mlm") for p in PATTERNS if p != "full"]


@pytest.mark.parametrize("attention,head", CASES)
def test_forward_backward(attention, head):
    ids, mask = batch()
    model = tiny(attention, head=head, num_labels=3, hidden_dropout=0.1, attention_dropout=0.1,
                 global_projections=True, head_style="roberta").train()  # fmt: skip
    gmask = torch.zeros_like(mask)
    gmask[:, 0] = 1
    out = model(ids, attention_mask=mask, global_attention_mask=gmask)
    assert out.logits.shape == HEAD_SHAPES[head]
    out.logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), attention


@pytest.mark.parametrize("attention", [p for p in PATTERNS if p != "nystrom"])
def test_real_positions_ignore_padded_tokens(attention):
    # Nystrom is left out on purpose: its landmarks average over padded positions too (as HF's do).
    model = tiny(attention).eval()
    ids, mask = batch()
    other = ids.clone()
    other[1, -9:] = 7
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = model(other, attention_mask=mask).last_hidden_state
    assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, name=attention)


@pytest.mark.parametrize("attention", ["full", "longformer"])
def test_gradient_checkpointing_gives_same_gradients(attention):
    ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tiny(attention, head="mlm").train().set_gradient_checkpointing(ckpt)
        model(ids, attention_mask=mask).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert_close(g1, g0, atol=1e-5, name="checkpointed grad")


def test_pre_norm_has_final_norm_and_runs():
    model = tiny(pre_norm=True).eval()
    assert model.encoder.final_norm is not None
    ids, mask = batch()
    out = model(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()


def test_inputs_embeds_token_types_and_hidden_states():
    model = tiny().eval()
    ids, mask = batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, output_hidden_states=True)
        b = model(inputs_embeds=model.encoder.embeddings.word(ids), attention_mask=mask)
        c = model(ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))
    assert_close(b.last_hidden_state, a.last_hidden_state, atol=0, name="inputs_embeds")
    assert not torch.allclose(c.last_hidden_state, a.last_hidden_state)
    assert len(a.hidden_states) == 3 and a.hidden_states[-1] is a.last_hidden_state
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.encoder.embeddings.word(ids))


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = EncoderConfig(hidden_size=64, num_heads=4, attention="longformer", window=[4, 8], num_layers=2)
    cfg.save(tmp_path)
    assert EncoderConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="attention"):
        EncoderConfig(attention="performer")
    with pytest.raises(ValueError, match="window"):
        EncoderConfig(window=5)
    with pytest.raises(ValueError, match="hidden_size"):
        EncoderConfig(hidden_size=30, num_heads=4)


def test_unavailable_backend_raises_with_reason(monkeypatch):
    model = tiny().eval()
    ids, mask = batch()
    model.set_attention_backend("cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        model(ids, attention_mask=mask)
    model.set_attention_backend("auto")
    monkeypatch.setenv("ETKD_BACKEND", "reference")
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).last_hidden_state).all()


@pytest.mark.slow
@pytest.mark.parametrize("attention", PATTERNS)
def test_torch_compile_fullgraph_matches_eager(attention):
    model = tiny(attention, head="mlm", num_layers=1).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits  # also fills bigbird's per-length block-mask cache
        got = torch.compile(model, fullgraph=True)(ids, attention_mask=mask).logits
    assert_close(got, ref, atol=1e-4, name=f"compiled {attention}")
