"""The pattern registry (`etkd.models.patterns`): every consumer reads it, and a pattern added with one entry
(the `fixed` block layout, added through ARCHITECTURE.md's recipe) runs in the encoder and equals its
plain-PyTorch meaning."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import etkd_kernels as ek
from etkd.models import PATTERNS, EncoderConfig, EncoderModel, Pattern, patterns, to_hf
from etkd_kernels.dispatch import OPS


def _choices(command: str, flag: str) -> tuple:
    from etkd.distill.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_every_consumer_reads_the_registry():
    from etkd.benchmarks import core
    from etkd.hf.attention_interface import IMPLEMENTATIONS
    from etkd.hf.export import attention_settings

    assert _choices("convert", "--to") == _choices("distill", "--student-attention") == patterns.names()
    for name, p in PATTERNS.items():
        assert p.op in OPS, name
        cfg = EncoderConfig(attention=name, hidden_size=16, num_heads=2)
        assert patterns.get_attention(cfg) is p.adapter
        assert all(hasattr(cfg, f) for f in p.settings + tuple(p.hf_settings.values())), name
        assert core.pattern_label(name), name  # every label formats with the benchmark's sizes
        if p.hf_name is None:
            with pytest.raises(ValueError, match="attn_implementation"):
                attention_settings(cfg)
        else:
            assert p.hf_name in IMPLEMENTATIONS
            assert attention_settings(cfg)[0] == p.hf_name
    with pytest.raises(ValueError, match=r"attention: expected one of \('full'"):
        EncoderConfig(attention="performer")


@pytest.mark.parametrize(
    "attention,extra,match",
    [
        ("lsg", {}, "LSG RoBERTa's global embeddings"),  # prepended global tokens: no BERT/RoBERTa weight
        ("nystrom", {"conv_kernel_size": 3}, "Nystrom conv term"),  # a depthwise conv BERT has no place for
    ],
)
def test_hf_attention_export_refuses_what_the_registry_says(attention, extra, match):
    from etkd.hf import UnsupportedConfigError
    from etkd.hf.export import to_hf_attention

    cfg = EncoderConfig(attention=attention, hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32,
                        vocab_size=50, max_positions=64, **extra)  # fmt: skip
    assert PATTERNS[attention].hf_unsupported(cfg)
    with pytest.raises(UnsupportedConfigError, match=match):
        to_hf_attention(EncoderModel(cfg))
    if extra:  # the same pattern without the setting is written
        plain = cfg.replace(**{k: None for k in extra})
        assert PATTERNS[attention].hf_unsupported(plain) is None
        assert to_hf_attention(EncoderModel(plain)).config._attn_implementation == PATTERNS[attention].hf_name


def _fixed_dense_mask(seq: int, block: int, local: int, summary: int) -> torch.Tensor:
    """(seq, seq) bool: query i sees key j when j's block is in i's segment or is a segment's summary block
    (Sparse Transformer's fixed pattern, written token by token)."""
    bi = torch.arange(seq) // block
    same_segment = (bi[:, None] // local) == (bi[None, :] // local)
    is_summary = (bi % local) >= local - summary
    return same_segment | is_summary[None, :]


@pytest.mark.parametrize(
    "seq,block,local,summary",
    [
        (40, 4, 4, 1),  # 10 blocks: two full segments and a partial one
        (37, 4, 3, 2),  # seq not a multiple of the block (padded inside the op), two summary blocks
        (8, 4, 4, 1),  # shorter than one segment: dense
        (1, 4, 4, 1),  # one token
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fixed_pattern_equals_its_dense_meaning(seq, block, local, summary, backend):
    if backend not in [n for n, i in ek.available_backends().items() if i.available]:
        pytest.skip(f"{backend} backend not built here")
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_positions=64, attention="fixed", block_size=block, num_local_blocks=local,
                        num_global_blocks=summary, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    attn = EncoderModel(cfg).encoder.layers[0].attn
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(2, 2, seq, 8, generator=g, requires_grad=True) for _ in range(3))
    real = torch.ones(2, seq, dtype=torch.bool)
    real[1, max(seq - 5, 1) :] = False  # padding on the second row (never the whole row)
    got = attn.attend(attn, None, q, k, v, real, None, backend)
    allowed = _fixed_dense_mask(seq, block, local, summary) & real[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    want = want * real[:, None, :, None]  # padded query rows are zeros
    assert_close(got, want, atol=1e-5, name=f"fixed fwd {backend}")
    w = torch.randn_like(want)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref):
        assert_close(a, b, atol=1e-5, name=f"fixed d{name} {backend}")


def test_fixed_has_no_hf_class_and_says_so():
    model = EncoderModel(EncoderConfig(hidden_size=16, num_heads=2, num_layers=1, attention="fixed"))
    with pytest.raises(ValueError, match="no model class for 'fixed'"):
        to_hf(model)


def test_one_entry_adds_a_pattern(monkeypatch):
    """The recipe: one `Pattern` entry (here a test-only name over an existing adapter) makes the name a valid
    `EncoderConfig.attention` that a model runs, with no other edit."""
    monkeypatch.setitem(
        PATTERNS, "test-band", Pattern("test-band", "sliding_window", PATTERNS["longformer"].adapter)
    )
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_positions=64, attention="test-band", window=4)  # fmt: skip
    model = EncoderModel(cfg).set_attention_backend("reference").eval()
    ids = torch.randint(1, 50, (1, 12))
    band = EncoderModel(cfg.replace(attention="longformer")).set_attention_backend("reference").eval()
    band.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(model(ids).last_hidden_state, band(ids).last_hidden_state, atol=0.0, name="one entry")


@pytest.mark.parametrize("hooks", [True, False])
def test_global_token_hooks_come_from_the_entry(monkeypatch, hooks):
    """`global_tokens`, `global_projections` and `classification_globals` are read from the entry, not from its
    name: a test-only pattern over the sliding-window adapter that registers them gets separate global q/k/v,
    [CLS] global in sequence classification and finetune's global mask; the same pattern without them gets
    none of it."""
    from etkd.distill.finetune import collate_for, uses_global_tokens

    flags = dict(global_tokens=hooks, global_projections=hooks, classification_globals=int(hooks))
    entry = Pattern("test-band", "sliding_window", PATTERNS["longformer"].adapter, ("window",), **flags)
    monkeypatch.setitem(PATTERNS, "test-band", entry)
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_positions=64, attention="test-band", window=4, global_projections=True,
                        head="sequence_classification", head_style="roberta", num_labels=3)  # fmt: skip
    model = EncoderModel(cfg).set_attention_backend("reference").eval()
    attn = model.encoder.layers[0].attn
    assert all((p is not None) == hooks for p in (attn.qg, attn.kg, attn.vg))

    ids = torch.randint(1, 50, (2, 12))
    cls = torch.zeros(2, 12, dtype=torch.bool)
    cls[:, 0] = True
    with torch.no_grad():
        default = model(ids).logits
        as_global = model(ids, global_attention_mask=cls).logits
        as_local = model(ids, global_attention_mask=torch.zeros_like(cls)).logits
    assert_close(default, as_global if hooks else as_local, atol=0.0, name="default global mask")
    assert not torch.allclose(as_global, as_local)  # the comparison above can tell the two apart

    assert uses_global_tokens(model) is hooks
    tok = type("Tok", (), {"pad_token_id": 0})()
    collate = collate_for(model, tok, {"global_prefix": 1})
    batch = collate([{"input_ids": [2, 5, 6, 3], "attention_mask": [1] * 4}])
    assert ("global_attention_mask" in batch) is hooks
    if hooks:
        assert batch["global_attention_mask"].tolist() == [[1, 1, 0, 0]]
