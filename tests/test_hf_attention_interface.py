"""etkd's patterns as transformers `attn_implementation` names (BERT / RoBERTa via AttentionInterface).

Oracles: HF's own eager attention (etkd_full everywhere; sliding window with a window covering the whole
sequence, and Nystrom with landmarks == seq, on real tokens), HF's LongformerModel on the same RoBERTa weights
(etkd_sliding_window with global tokens and padding), and eager attention under the layout's dense mask
(etkd_block_sparse). fp32, 1e-5 relative to HF's scale, outputs and parameter gradients.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from helpers import HF_SMALL, SameDropoutMasks
from helpers import assert_close_to_scale as close

import etkd.hf
from etkd.models import convert, from_hf, to_hf

transformers = pytest.importorskip("transformers")
SMALL = {**HF_SMALL, "num_labels": 3}  # the classification heads get 3 labels


def with_impl(model, name: str, **settings):
    """A deep copy of `model` running attn_implementation `name` with config.etkd_attention = settings."""
    twin = copy.deepcopy(model)
    twin.config.etkd_attention = settings
    twin.set_attn_implementation(name)
    return twin


def eager(model):
    model.set_attn_implementation("eager")
    return model


def batch(seq: int, pad_id: int = 0, padding: bool = True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    if padding:
        mask[1, seq - 6 :] = 0
        ids[1, seq - 6 :] = pad_id
    return ids, mask


def reference_grads(ref_model, model) -> dict[str, torch.Tensor | None]:
    """The reference gradient of each of `model`'s parameters. Against HF Longformer (whose `longformer.*`
    global projections are copies of the local ones) a local q/k/v weight's gradient is the sum of both."""
    ref = {k: p.grad for k, p in ref_model.named_parameters()}
    if not isinstance(ref_model, transformers.LongformerPreTrainedModel):
        return ref
    out = {}
    for key, _ in model.named_parameters():
        lf = key.replace("roberta.", "longformer.", 1)
        g = ref[lf]
        for local in ("query", "key", "value"):
            if f".self.{local}." in lf:
                g = g + ref[lf.replace(f".self.{local}.", f".self.{local}_global.")]
        out[key] = g
    return out


def grads_close(ref_model, model, name):
    ref = reference_grads(ref_model, model)
    for key, q in model.named_parameters():
        if ref[key] is None:
            assert q.grad is None, key
            continue
        close(q.grad, ref[key], f"{name} grad {key}")


def run_pair(ref_model, model, ids, mask, compare_padded: bool, name: str, masks=None, layout="dense", **kw):
    """Token-classification loss on real tokens; logits compared (padded rows too when compare_padded).
    masks: a SameDropoutMasks: `model` runs first, then HF's attention dropout (tensor `layout`) gets its masks."""
    labels = torch.where(mask.bool(), ids % 3, -100)
    outs = {}
    heads = SMALL["num_attention_heads"]
    for who, m in (
        (("ref", ref_model), ("ours", model)) if masks is None else (("ours", model), ("ref", ref_model))
    ):
        m.train()
        m.zero_grad()
        if masks is None:
            ctx = contextlib.nullcontext()
        else:
            ctx = masks.ours() if who == "ours" else masks.hf(layout, heads, kw.get("global_attention_mask"))
        with ctx:
            out = m(input_ids=ids, attention_mask=mask, labels=labels, **kw)
            out.loss.backward()
        outs[who] = out
    ref, got = outs["ref"], outs["ours"]
    rows = slice(None) if compare_padded else mask.bool()
    close(got.logits[rows], ref.logits[rows], f"{name} logits")
    close(got.loss, ref.loss, f"{name} loss")
    grads_close(ref_model, model, name)


def test_names_are_registered():
    from transformers import AttentionInterface

    for name in ("etkd_sliding_window", "etkd_block_sparse", "etkd_nystrom", "etkd_lsg", "etkd_full"):
        assert name in AttentionInterface().valid_keys()


@pytest.mark.parametrize("family", ["Bert", "Roberta"])
def test_etkd_full_equals_eager_everywhere(family):
    torch.manual_seed(0)
    cfg = getattr(transformers, family + "Config")(max_position_embeddings=64, **SMALL)
    ref = eager(getattr(transformers, family + "ForTokenClassification")(cfg))
    ids, mask = batch(20, pad_id=cfg.pad_token_id)
    run_pair(ref, with_impl(ref, "etkd_full"), ids, mask, compare_padded=True, name=f"{family} full")


@pytest.mark.parametrize(
    "impl,settings",
    [("etkd_sliding_window", {"window": 40}),  # a window covering the sequence
     ("etkd_nystrom", {"num_landmarks": 20})],  # as many landmarks as tokens
    ids=["window>=seq", "nystrom l=seq"],
)  # fmt: skip
def test_exact_settings_equal_eager_on_real_tokens(impl, settings):
    torch.manual_seed(0)
    ref = eager(
        transformers.BertForTokenClassification(transformers.BertConfig(max_position_embeddings=64, **SMALL))
    )
    ids, mask = batch(20)
    # padded query rows: zeros in etkd's sparse patterns (as HF Longformer), so compare real rows
    run_pair(ref, with_impl(ref, impl, **settings), ids, mask, False, impl)


def roberta_and_longformer(window: int, **over):
    """A RoBERTa token classifier on etkd_sliding_window and HF's LongformerForTokenClassification with the
    same weights (global projections = the local ones, as `convert` makes them); `over`: config fields."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **{**SMALL, **over})
    roberta = transformers.RobertaForTokenClassification(cfg)
    ours = convert(from_hf(roberta), "longformer", max_positions=64, window=window)
    longformer = to_hf(ours)
    return with_impl(roberta, "etkd_sliding_window", window=window), longformer


def test_sliding_window_equals_hf_longformer_with_globals_and_padding():
    model, longformer = roberta_and_longformer(window=6)
    ids, mask = batch(23, pad_id=1)
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1
    glob[0, 11] = 1
    run_pair(longformer, model, ids, mask, True, "vs longformer", global_attention_mask=glob)


# --- attention dropout: HF's `dropout` argument, applied on the probabilities inside the op (issue 27) -------


@pytest.mark.parametrize(
    "impl,settings",
    [("etkd_full", {}), ("etkd_sliding_window", {"window": 40})],  # window 40: covers the sequence
)  # fmt: skip
def test_attention_dropout_equals_eager_with_the_same_masks(monkeypatch, impl, settings):
    """attention_probs_dropout_prob 0.2, training mode: eager attention given the keep-masks our op used
    equals the etkd name on real tokens, logits and every parameter gradient (padded query rows: etkd_full
    drops them with torch's own RNG, as they never reach a real token)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        max_position_embeddings=64, **{**SMALL, "attention_probs_dropout_prob": 0.2}
    )
    ref = eager(transformers.BertForTokenClassification(cfg))
    ids, mask = batch(20)
    masks = SameDropoutMasks(monkeypatch)
    run_pair(ref, with_impl(ref, impl, **settings), ids, mask, False, f"{impl} dropout", masks=masks)
    op = "full_attention" if impl == "etkd_full" else "sliding_window_attention"
    assert [c[:2] for c in masks.calls] == [(op, 0.2)] * 2


def test_sliding_window_attention_dropout_equals_hf_longformer_with_the_same_masks(monkeypatch):
    model, longformer = roberta_and_longformer(window=6, attention_probs_dropout_prob=0.2)
    assert longformer.config.attention_probs_dropout_prob == 0.2
    ids, mask = batch(23, pad_id=1)
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1
    glob[0, 11] = 1
    masks = SameDropoutMasks(monkeypatch)
    run_pair(longformer, model, ids, mask, False, "dropout vs longformer", masks=masks, layout="longformer",
             global_attention_mask=glob)  # fmt: skip
    assert [c[:2] for c in masks.calls] == [("sliding_window_attention", 0.2)] * 2


def test_block_sparse_equals_eager_under_the_dense_layout_mask():
    import etkd_kernels as ek

    torch.manual_seed(0)
    cfg = transformers.BertConfig(max_position_embeddings=128, **{**SMALL, "num_hidden_layers": 1})
    ref = eager(transformers.BertForTokenClassification(cfg))
    settings = dict(block_size=8, num_random_blocks=1, seed=3)
    model = with_impl(ref, "etkd_block_sparse", **settings)
    seq = 96  # > (3 + 2 + 2r) * block_size: a real sparse layout
    layout = ek.bigbird_layout(seq, 8, num_random_blocks=1, seed=3, num_heads=4)
    allowed = layout.to_dense()[:, :seq, :seq]  # (heads, seq, seq)
    assert not bool(allowed.all())
    ids, mask = batch(seq)
    real = mask.bool()
    # the same pattern for eager: a 4D additive mask (batch, heads, seq, seq), padded keys removed
    keep = allowed[None] & real[:, None, None, :]
    bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    labels = torch.where(real, ids % 3, -100)
    ref.zero_grad()
    ref_out = ref(input_ids=ids, attention_mask=bias, labels=labels)
    ref_out.loss.backward()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    close(out.logits[real], ref_out.logits[real], "block_sparse logits")
    grads_close(ref, model, "block_sparse")


def test_lsg_runs_and_differs_from_full():
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(max_position_embeddings=128, **SMALL))
    model = with_impl(ref, "etkd_lsg", block_size=8, sparsity_factor=2)
    ids, mask = batch(96)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all() and not torch.allclose(out, ref(input_ids=ids, attention_mask=mask)[0])


def test_errors_are_clear():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        max_position_embeddings=64, **{**SMALL, "attention_probs_dropout_prob": 0.1}
    )
    base = transformers.BertModel(cfg)
    ids, mask = batch(20)
    missing = with_impl(base, "etkd_sliding_window")
    with pytest.raises(etkd.hf.UnsupportedConfigError, match=r"etkd_attention\['window'\]"):
        missing(input_ids=ids, attention_mask=mask)
    model = with_impl(base, "etkd_sliding_window", window=8)
    model.eval()
    with pytest.raises(etkd.hf.UnsupportedConfigError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.train()  # attention dropout 0.1 in training mode: applied inside the op (issue 27)
    model(input_ids=ids, attention_mask=mask)
    model.config.etkd_attention["ignore_attention_dropout"] = True  # deprecated, no effect
    with pytest.warns(DeprecationWarning, match="ignore_attention_dropout is deprecated and has no effect"):
        model(input_ids=ids, attention_mask=mask)


def test_from_pretrained_with_attn_implementation(tmp_path):
    model, longformer = roberta_and_longformer(window=6)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForTokenClassification.from_pretrained(
        tmp_path, attn_implementation="etkd_sliding_window"
    )
    assert loaded.config._attn_implementation == "etkd_sliding_window"
    assert loaded.config.etkd_attention == {"window": 6}
    ids, mask = batch(23, pad_id=1)
    loaded.eval(), longformer.eval()
    close(
        loaded(input_ids=ids, attention_mask=mask).logits,
        longformer(input_ids=ids, attention_mask=mask).logits,
        "loaded",
    )


def convert_both_ways(tmp_path) -> None:
    """`etkd convert` of a small RoBERTa to a window-8 Longformer, written as `tmp_path/attn` (--format
    hf-attention) and as HF's LongformerForMaskedLM `tmp_path/lf` (the oracle)."""
    from etkd.distill.cli import main

    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(max_position_embeddings=34, pad_token_id=1, **SMALL)
    transformers.RobertaForMaskedLM(cfg).save_pretrained(tmp_path / "src")
    common = ["convert", "--from", str(tmp_path / "src"), "--to", "longformer", "--max-positions", "64"]
    common += ["--window", "8"]
    assert main([*common, "--format", "hf-attention", "--out", str(tmp_path / "attn")]) == 0
    assert main([*common, "--format", "hf", "--out", str(tmp_path / "lf")]) == 0


def test_etkd_convert_format_hf_attention(tmp_path):
    convert_both_ways(tmp_path)
    saved = json.loads((tmp_path / "attn" / "config.json").read_text())
    assert saved["model_type"] == "roberta" and saved["attn_implementation"] == "etkd_sliding_window"
    assert saved["etkd_attention"] == {"attn_implementation": "etkd_sliding_window", "window": 8}
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "attn")  # name from config.json
    assert model.config._attn_implementation == "etkd_sliding_window"
    longformer = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "lf")
    ids, mask = batch(50, pad_id=1)
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1
    model.eval(), longformer.eval()
    got = model(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
    ref = longformer(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
    close(got, ref, "converted")


def test_checkpoint_resaved_by_transformers_keeps_its_etkd_attention(tmp_path):
    """transformers' save_pretrained drops the top-level `attn_implementation` of a `--format hf-attention`
    checkpoint (config.etkd_attention survives). Every way etkd loads the re-saved checkpoint runs its sliding
    window again (oracle: HF LongformerForMaskedLM of the same conversion): `from_pretrained` after `import
    etkd.hf`, and etkd's own loader (which also reads the fresh checkpoint, whose etkd name transformers alone
    refuses). An explicit attn_implementation= still wins; from_hf of such an instance says it runs full attention."""
    from etkd.models import load

    convert_both_ways(tmp_path)
    transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "attn").save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "attn_implementation" not in saved and saved["etkd_attention"]["window"] == 8

    ids, mask = batch(50, pad_id=1)
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1
    longformer = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "lf").eval()
    ref = longformer(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "resaved").eval()
    assert model.config._attn_implementation == "etkd_sliding_window"
    close(model(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits, ref, "re-saved")
    for folder in ("attn", "resaved"):
        ours = load(tmp_path / folder)
        assert (ours.config.attention, ours.config.window) == ("longformer", 8), folder
        got = ours(input_ids=ids, attention_mask=mask, global_attention_mask=glob.bool()).logits
        close(got, ref, f"etkd.models.load {folder}")

    dense = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "resaved", attn_implementation="sdpa"
    )
    assert dense.config._attn_implementation == "sdpa"
    with pytest.warns(
        UserWarning, match=r"asks for attn_implementation 'etkd_sliding_window', but .* runs 'sdpa'"
    ):
        assert from_hf(dense).config.attention == "longformer"


def test_checkpoint_asking_for_an_unknown_etkd_name_is_said(tmp_path):
    """A config.etkd_attention naming an attention this etkd does not register: transformers runs its default
    (full) attention, said once; etkd's loader refuses it rather than load it as full attention."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(max_position_embeddings=34, pad_token_id=1, **SMALL)
    cfg.etkd_attention = {"attn_implementation": "etkd_from_the_future", "window": 8}
    with pytest.warns(
        UserWarning, match="etkd_from_the_future.*runs transformers' default full attention"
    ) as told:
        transformers.RobertaModel(cfg).save_pretrained(tmp_path)
        model = transformers.AutoModel.from_pretrained(tmp_path)
    assert model.config._attn_implementation == "sdpa"
    assert len([w for w in told if "etkd_from_the_future" in str(w.message)]) == 1  # once
    with pytest.raises(ValueError, match="names attn_implementation 'etkd_from_the_future'"):
        from_hf(tmp_path)


def test_etkd_hf_refuses_a_transformers_below_its_floor_and_the_install_asks_for_it():
    """Below 5.6 the hooks fail inside a forward (swept: 4.57 BERT has no AttentionInterface, 5.0 another mask
    call, 5.5 re-saves LayerNorm as beta/gamma); the import says so instead, and the package's requirement is
    the same floor, so a resolver never lands below it."""
    from importlib.metadata import requires

    from etkd.hf import MIN_TRANSFORMERS, require_transformers

    with pytest.raises(ImportError, match=r"needs transformers >= 5\.6, found 5\.5\.4: pip install -U"):
        require_transformers("5.5.4")
    with pytest.raises(ImportError, match="found 4.57.6"):
        require_transformers("4.57.6")
    require_transformers(MIN_TRANSFORMERS)
    require_transformers("5.6.0rc1")
    require_transformers("6.0")
    floors = [r.replace(" ", "") for r in requires("etkd") if r.replace(" ", "").startswith("transformers")]
    assert floors == [f"transformers>={MIN_TRANSFORMERS}"], floors


def test_registration_survives_a_transformers_without_its_default_choice_hook(monkeypatch):
    """A transformers that renamed `get_correct_attn_implementation`: `import etkd.hf` still registers the names and
    says what is lost (a re-saved checkpoint's etkd attention needs an explicit attn_implementation=)."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from etkd.hf.attention_interface import register_attention_implementations

    monkeypatch.delattr(PreTrainedModel, "get_correct_attn_implementation")
    with pytest.warns(UserWarning, match="no PreTrainedModel.get_correct_attn_implementation"):
        register_attention_implementations()
    assert "etkd_sliding_window" in ALL_ATTENTION_FUNCTIONS.valid_keys()
