"""Model parity with HF on remapped weights: every supported HF class, every backend that can run the op.

Tiny random models (hidden 32, 2 layers, 4 heads), eval mode, fp32; outputs compared on real (non-padded)
positions at atol 1e-4, with padding everywhere HF supports it and Longformer global tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import HF_SMALL as SMALL
from helpers import SameDropoutMasks, assert_close

import etkd_kernels as ek
from etkd.models import EncoderModel, convert, from_hf, load, to_hf

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*block_sparse.*")

ATOL = 1e-4
OP_OF = {"Bert": "full", "Roberta": "full", "Longformer": "sliding_window", "BigBird": "full",
         "Nystromformer": "nystrom"}  # fmt: skip
SUFFIXES = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)


def hf_config(family: str):
    t = transformers
    if family == "Bert":
        return t.BertConfig(max_position_embeddings=64, **SMALL)
    if family == "Roberta":
        return t.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **SMALL)
    if family == "Longformer":
        return t.LongformerConfig(
            max_position_embeddings=66, pad_token_id=1, attention_window=[4, 8], **SMALL
        )
    if family == "BigBird":
        return t.BigBirdConfig(max_position_embeddings=64, attention_type="original_full", **SMALL)
    # seq must equal segment_means_seq_len for HF's landmark path; conv term on.
    return t.NystromformerConfig(
        max_position_embeddings=64, segment_means_seq_len=16, num_landmarks=4, conv_kernel_size=3, **SMALL
    )


def backends_for(op: str) -> list[str]:
    matrix = ek.support_matrix(torch.device("cpu"), torch.float32)[op]
    return [name for name, why in matrix.items() if why == "ok"]


def inputs(family: str, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    pad = 1 if family in ("Roberta", "Longformer") else 0
    ids = torch.randint(3, 99, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    if family != "Nystromformer":  # HF Nystromformer (transformers 5.x) fails on any attention_mask
        mask[1, seq - 5 :] = 0
        ids[1, seq - 5 :] = pad
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=(torch.arange(seq) >= seq // 2).long().expand(2, -1),
    )
    if family in ("Roberta", "Longformer"):
        kw.pop("token_type_ids")  # type_vocab_size 1
    if family == "Longformer":
        gm = torch.zeros_like(mask)
        gm[:, 0] = 1
        gm[0, 7] = 1  # a global token in the middle of one row only
        kw["global_attention_mask"] = gm
    return kw


def outputs(out, suffix: str) -> torch.Tensor:
    if suffix == "Model":
        return out.last_hidden_state
    if suffix == "ForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits


def compare(got, ref, mask, name):
    if ref.dim() == 3:  # per-token outputs: padded rows are zeros in etkd, junk in HF
        got, ref = got[mask.bool()], ref[mask.bool()]
    return assert_close(got, ref, atol=ATOL, name=name)


CASES = [
    (family, suffix, backend)
    for family in OP_OF
    for suffix in SUFFIXES
    if not (family == "BigBird" and suffix == "ForQuestionAnswering")
    for backend in backends_for(OP_OF[family])
    # Heads do not touch the kernels: other backends are checked on the bare model's hidden states.
    if backend == "reference" or suffix == "Model"
]


@pytest.mark.parametrize("family,suffix,backend", CASES)
def test_hf_parity_and_round_trip(family, suffix, backend):
    hf = getattr(transformers, family + suffix)(hf_config(family)).eval()
    model = from_hf(hf).set_attention_backend(backend)
    kw = inputs(family)
    with torch.no_grad():
        ref = outputs(hf(**kw), suffix)
        got = outputs(model(**kw), suffix)
        compare(got, ref, kw["attention_mask"], f"{family}{suffix}/{backend}")
        back = to_hf(model)
        assert type(back) is type(hf)
        compare(outputs(back(**kw), suffix), ref, kw["attention_mask"], "to_hf round trip")


def test_backend_swap_keeps_weights_and_context_manager_applies():
    hf = transformers.BertModel(hf_config("Bert")).eval()
    model = from_hf(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_attention_backend("reference")
    assert model.attention_backend == model.encoder.backend == "reference"  # one attribute for every layer
    model.set_attention_backend("auto")
    with ek.use_backend("reference"), torch.no_grad():
        out = model(**inputs("Bert")).last_hidden_state
    assert torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("nope")


def test_save_load_round_trip_ours_and_hf_dirs(tmp_path):
    hf = transformers.RobertaForSequenceClassification(hf_config("Roberta")).eval()
    hf.save_pretrained(tmp_path / "hf")
    kw = inputs("Roberta")
    with torch.no_grad():
        ref = hf(**kw).logits
        loaded = load(tmp_path / "hf")  # real transformers from_pretrained, local dir
        assert_close(loaded(**kw).logits, ref, atol=ATOL, name="from HF dir")
        loaded.save_pretrained(tmp_path / "ours")
        again = EncoderModel.from_pretrained(tmp_path / "ours")
        assert again.config == loaded.config == load(tmp_path / "ours").config
        assert_close(again(**kw).logits, loaded(**kw).logits, atol=0.0, name="our format")
    assert (tmp_path / "ours" / "model.safetensors").is_file()


def test_mlm_tied_weights_survive_save_load(tmp_path):
    model = from_hf(transformers.BertForMaskedLM(hf_config("Bert")).eval())
    model.save_pretrained(tmp_path)
    again = EncoderModel.from_pretrained(tmp_path)
    assert again.head.decoder.weight is again.encoder.embeddings.word.weight
    assert torch.equal(again.head.decoder.weight, model.head.decoder.weight)


def test_from_pretrained_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        EncoderModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    transformers.BertModel(hf_config("Bert")).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"not an etkd checkpoint.*etkd\.models\.load"):
        EncoderModel.from_pretrained(tmp_path / "hf")  # our format only: HF dirs go through load


def _record_hf_rand_attn(hf_model):
    """Wrap each BigBird block-sparse layer to remember the random blocks HF draws: (heads, nb-2, r)."""
    seen = {}
    for i, layer in enumerate(hf_model.encoder.layer):
        sa = layer.attention.self
        orig = sa._bigbird_block_rand_mask_with_head

        def wrapped(*a, _orig=orig, _i=i, **k):
            out = _orig(*a, **k)
            seen[_i] = torch.as_tensor(__import__("numpy").stack(out, 0), dtype=torch.long)
            return out

        sa._bigbird_block_rand_mask_with_head = wrapped
    return seen


@pytest.mark.parametrize("backend", backends_for("block_sparse"))
def test_bigbird_block_sparse_parity(backend):
    # HF draws random blocks only in training mode (eval repeats block 0, which no bool layout can express),
    # so run it in train mode with every dropout 0 and hand its random blocks to our layers.
    cfg = transformers.BigBirdConfig(max_position_embeddings=128, attention_type="block_sparse", block_size=8,
                                     num_random_blocks=1, **SMALL)  # fmt: skip
    hf = transformers.BigBirdModel(cfg).train()
    seen = _record_hf_rand_attn(hf)
    kw = inputs("BigBird", seq=80)  # 10 blocks > (5 + 2r) blocks: block-sparse path
    with torch.no_grad():
        ref = hf(**kw).last_hidden_state
        model = from_hf(hf).set_attention_backend(backend)
        assert model.config.attention == "bigbird"
        for i, layer in enumerate(model.encoder.layers):
            layer.attn.rand_attn = seen[i]
        got = model(**kw).last_hidden_state
    compare(got, ref, kw["attention_mask"], f"bigbird block_sparse/{backend}")


def test_to_hf_refuses_models_hf_cannot_express():
    bert = from_hf(transformers.BertForMaskedLM(hf_config("Bert")).eval())
    with pytest.raises(ValueError, match="positions"):
        to_hf(convert(bert, "longformer", max_positions=128, window=8))  # HF Longformer: fairseq positions
    with pytest.raises(ValueError, match="no model class for .lsg."):
        to_hf(convert(bert, "lsg", max_positions=128, bos_token_id=0, mask_token_id=4))
    with pytest.raises(ValueError, match="mlm_act"):
        to_hf(EncoderModel(bert.config.replace(mlm_act="relu")))


def test_longformer_sequence_classification_default_global_cls():
    hf = transformers.LongformerForSequenceClassification(hf_config("Longformer")).eval()
    model = from_hf(hf)
    kw = inputs("Longformer")
    kw.pop("global_attention_mask")  # HF then makes token 0 global; so must we
    with torch.no_grad():
        assert_close(model(**kw).logits, hf(**kw).logits, atol=ATOL, name="default global CLS")


@pytest.mark.parametrize("family", ["Bert", "Longformer", "BigBird"])  # BigBird: original_full
def test_train_mode_attention_dropout_equals_hf_with_the_same_masks(monkeypatch, family):
    """Attention dropout on the probabilities, where HF applies it (Longformer: local and global rows): our
    model in training mode equals HF's when HF's dropout is handed the keep-masks our ops used; outputs on
    real rows and the gradient of the word embeddings. attention_probs_dropout_prob 0.3, hidden dropout 0."""
    cfg = hf_config(family)
    cfg.attention_probs_dropout_prob = 0.3
    hf = getattr(transformers, family + "Model")(cfg).train()
    if family == "Bert":
        hf.set_attn_implementation("eager")  # sdpa would drop inside its fused kernel, out of reach
    model = from_hf(hf).set_attention_backend("reference").train()
    assert model.config.attention_dropout == 0.3
    kw = inputs(family)
    real = kw["attention_mask"].bool()
    masks = SameDropoutMasks(monkeypatch)
    with masks.ours():
        got = model(**kw).last_hidden_state
    assert [c[:2] for c in masks.calls] == [(f"{OP_OF[family]}_attention", 0.3)] * 2
    layout = "longformer" if family == "Longformer" else "dense"
    with masks.hf(layout, cfg.num_attention_heads, kw.get("global_attention_mask")):
        ref = hf(**kw).last_hidden_state
    compare(got, ref, kw["attention_mask"], f"{family} train-mode dropout")
    w = torch.randn(
        got[real].shape, generator=torch.Generator().manual_seed(4)
    )  # (LayerNorm: not a square sum)
    (got[real] * w).sum().backward()
    (ref[real] * w).sum().backward()
    word = hf.embeddings.word_embeddings.weight.grad
    assert_close(
        model.encoder.embeddings.word.weight.grad, word, atol=ATOL * float(word.abs().max()), name="d word"
    )


def test_from_hf_refuses_a_head_class_it_cannot_carry():
    """A family's `unsupported` head classes are a clear NotImplementedError naming the class and the way out,
    never a model with its head silently dropped (models/patterns/bigbird.py: BigBirdForQuestionAnswering)."""
    import transformers

    cfg = transformers.BigBirdConfig(max_position_embeddings=64, attention_type="original_full", **SMALL)
    with pytest.raises(NotImplementedError, match=r"BigBirdForQuestionAnswering .*load BigBirdModel instead"):
        from_hf(transformers.BigBirdForQuestionAnswering(cfg))
