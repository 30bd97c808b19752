"""etkd.hf.patch: HF Longformer / BigBird / Nystromformer models (every head class) on etkd's ops.

Oracle: the same HF model unpatched (a deep copy, same weights). Tiny random-weight configs, fp32, padding and
Longformer global tokens; outputs and every parameter gradient must agree within 1e-5 relative to HF's own
scale (max |HF value| of that tensor, at least 1). Run per backend that can run the op here.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import HF_RTOL as RTOL
from helpers import HF_SMALL, SameDropoutMasks, assert_close_to_scale

import etkd.hf
import etkd_kernels as ek

transformers = pytest.importorskip("transformers")
SMALL = {**HF_SMALL, "num_labels": 3}  # the classification heads get 3 labels
warnings.filterwarnings("ignore", message=".*block_sparse.*")
warnings.filterwarnings("ignore", message=".*original_full.*")

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
)
OP = {"Longformer": "sliding_window", "BigBird": "block_sparse", "Nystromformer": "nystrom"}


def backends(op: str) -> list[str]:
    matrix = ek.support_matrix(torch.device("cpu"), torch.float32)[op]
    return [name for name, why in matrix.items() if why == "ok"]


def dropout_backends(op: str) -> list[str]:
    """The backends with a dropout kernel for `op` here (fp32 on the CPU)."""
    from etkd_kernels.dispatch import BACKENDS, Problem, reasons

    p = Problem(torch.device("cpu"), torch.float32, dropout=True)
    return [name for name in BACKENDS if not reasons(name, op, p)]


def config(family: str, **over):
    t = transformers
    if family == "Longformer":
        kw = dict(max_position_embeddings=80, pad_token_id=1, attention_window=[4, 8])
        return t.LongformerConfig(**{**kw, **SMALL, **over})
    if family == "BigBird":
        kw = dict(
            attention_type="block_sparse", block_size=4, num_random_blocks=2, max_position_embeddings=128
        )
        return t.BigBirdConfig(**{**kw, **SMALL, **over})
    # HF's validator requires an int conv_kernel_size: its models always add the depthwise conv term
    kw = dict(max_position_embeddings=64, segment_means_seq_len=32, num_landmarks=8, conv_kernel_size=3)
    return t.NystromformerConfig(**{**kw, **SMALL, **over})


def inputs(family: str, head: str, seq: int, padding: bool = True) -> dict:
    g = torch.Generator().manual_seed(1)
    b = 2
    ids = torch.randint(3, 99, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.long)
    if padding:
        mask[1, seq - 7 :] = 0
        ids[1, seq - 7 :] = 1 if family == "Longformer" else 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "Longformer":
        gm = torch.zeros_like(mask)
        gm[:, 0] = 1
        gm[0, 9] = 1  # a global token in the middle of one row only
        kw["global_attention_mask"] = gm
    if head == "ForMaskedLM":
        kw["labels"] = torch.where(mask.bool(), ids, -100)
    elif head == "ForSequenceClassification":
        kw["labels"] = torch.tensor([0, 2])
    elif head == "ForTokenClassification":
        kw["labels"] = torch.where(mask.bool(), ids % 3, -100)
    elif head == "ForQuestionAnswering":
        kw["start_positions"], kw["end_positions"] = torch.tensor([2, 5]), torch.tensor([6, 9])
    elif head == "ForMultipleChoice":  # (batch, choices, seq): two choices per example
        kw = {k: torch.stack([v, v.roll(1, 0)], 1) if k != "labels" else v for k, v in kw.items()}
        kw["labels"] = torch.tensor([1, 0])
    return kw


def tensors(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def grad_target(out) -> torch.Tensor:
    """The loss when the head has one, else a fixed random projection of every output."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    g = torch.Generator().manual_seed(2)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors(out).values())


def check_same(
    hf_model, ours, kw, name: str, train: bool = False, masks: SameDropoutMasks | None = None
) -> float:
    """Outputs and parameter gradients of `ours` (patched) against `hf_model` (unpatched), same weights.
    masks: HF Longformer's attention dropout gets the keep-masks our op used (ours runs first)."""
    worst = 0.0
    for m in (hf_model, ours):
        m.train(train)
        m.zero_grad()
    if masks is None:
        np.random.seed(0)
        ref = hf_model(**kw)
        np.random.seed(0)
        got = ours(**kw)
    else:
        with masks.ours():
            got = ours(**kw)
        with masks.hf("longformer", SMALL["num_attention_heads"], kw.get("global_attention_mask")):
            ref = hf_model(**kw)
    ref_t, got_t = tensors(ref), tensors(got)
    assert ref_t.keys() == got_t.keys()
    for key in ref_t:
        worst = max(worst, assert_close_to_scale(got_t[key], ref_t[key], f"{name} {key}"))
    grad_target(ref).backward()
    grad_target(got).backward()
    ref_p = dict(hf_model.named_parameters())
    got_p = {k.removeprefix("_orig_mod."): p for k, p in ours.named_parameters()}  # torch.compile's wrapper
    assert ref_p.keys() == got_p.keys()
    for key, p in ref_p.items():
        if p.grad is None:
            assert got_p[key].grad is None, f"{name}: {key} has a gradient only when patched"
            continue
        assert_close_to_scale(got_p[key].grad, p.grad, f"{name} grad {key}")
    return worst


def build(family: str, head: str, **over):
    if head == "ForQuestionAnswering":
        over.setdefault("num_labels", 2)
    torch.manual_seed(0)
    hf_model = getattr(transformers, family + head)(config(family, **over))
    return hf_model, copy.deepcopy(hf_model)


# --- exactness: every family x head ------------------------------------------------------------------------

SEQ = {
    "Longformer": 21,
    "BigBird": 50,
    "Nystromformer": 32,
}  # 21: not a multiple of the window; 50: padded to 52
CASES = [
    (family, head, backend)
    for family in OP
    for head in HEADS
    for backend in backends(OP[family])
    if backend == "reference" or head in ("Model", "ForTokenClassification")  # heads never touch the kernels
] + [("BigBird", "ForPreTraining", "reference")]


@pytest.mark.parametrize("family,head,backend", CASES)
def test_patched_equals_hf(family, head, backend):
    hf_model, ours = build(family, head)
    etkd.hf.patch(ours, backend=backend)
    assert etkd.hf.is_patched(ours) and not etkd.hf.is_patched(hf_model)
    padding = family != "Nystromformer"  # HF's landmark path cannot take a mask (tested below: it raises)
    kw = inputs(family, head, SEQ[family], padding=padding)
    check_same(hf_model, ours, kw, f"{family}{head}[{backend}]")
    if family == "BigBird":  # training mode: HF's seeded random blocks instead of eval's all-zero ones
        check_same(hf_model, ours, kw, f"{family}{head}[{backend}] train", train=True)


@pytest.mark.parametrize("backend", backends("block_sparse"))
def test_bigbird_legacy_plan_length_1024(backend):
    # seq 1024 takes HF's "old plan" generator (random blocks may repeat window blocks: folded counts)
    hf_model, ours = build(
        "BigBird", "Model", block_size=16, max_position_embeddings=1024, num_hidden_layers=1
    )
    etkd.hf.patch(ours, backend=backend)
    kw = inputs("BigBird", "Model", 1024)
    for train in (False, True):
        check_same(hf_model, ours, kw, f"bigbird-1024 train={train}", train=train)


@pytest.mark.parametrize("backend", backends("nystrom"))
def test_nystromformer_wide_conv_and_exact_pinv_init(backend):
    hf_model, ours = build("Nystromformer", "Model", conv_kernel_size=65)  # HF's default: wider than seq
    for m in (hf_model, ours):
        for mod in m.modules():
            if hasattr(mod, "init_option"):
                mod.init_option = "exact"  # HF's per-(batch, head) initialisation
    etkd.hf.patch(ours, backend=backend)
    check_same(hf_model, ours, inputs("Nystromformer", "Model", 32, padding=False), "nystrom conv65 exact")


@pytest.mark.parametrize("backend", backends("full"))
def test_nystromformer_full_branch_with_padding(backend):
    # num_landmarks == segment_means_seq_len: HF computes exact softmax attention, padded query rows included
    hf_model, ours = build("Nystromformer", "ForTokenClassification", num_landmarks=32)
    etkd.hf.patch(ours, backend=backend)
    check_same(hf_model, ours, inputs("Nystromformer", "ForTokenClassification", 32), "nystrom full+padding")


def test_longformer_all_global_and_no_global():
    hf_model, ours = build("Longformer", "Model")
    etkd.hf.patch(ours)
    kw = inputs("Longformer", "Model", 16)
    kw["global_attention_mask"] = kw["attention_mask"].clone()  # every real token global
    check_same(hf_model, ours, kw, "all global")
    kw.pop("global_attention_mask")
    check_same(hf_model, ours, kw, "no global")


# --- what stays the same -----------------------------------------------------------------------------------


def test_state_dict_names_and_tensors_untouched(tmp_path):
    hf_model, ours = build("Longformer", "ForMaskedLM")
    before = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    etkd.hf.patch(ours)
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()} == before
    ours.save_pretrained(tmp_path)
    loaded = transformers.LongformerForMaskedLM.from_pretrained(tmp_path)
    assert not etkd.hf.is_patched(loaded)
    for k, v in hf_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    etkd.hf.unpatch(ours)
    assert not etkd.hf.is_patched(ours)
    assert type(ours.longformer.encoder.layer[0].attention.self) is (
        transformers.models.longformer.modeling_longformer.LongformerSelfAttention
    )


def test_gradient_checkpointing():
    hf_model, ours = build("Longformer", "ForTokenClassification")
    etkd.hf.patch(ours)
    for m in (hf_model, ours):
        m.gradient_checkpointing_enable()
    check_same(
        hf_model, ours, inputs("Longformer", "ForTokenClassification", 21), "checkpointing", train=True
    )


def test_torch_compile():
    hf_model, ours = build("Longformer", "ForTokenClassification")
    etkd.hf.patch(ours)
    compiled = torch.compile(ours, backend="aot_eager")
    check_same(hf_model, compiled, inputs("Longformer", "ForTokenClassification", 21), "compiled", train=True)


def test_deepcopy_of_patched_model_stays_patched():
    _, ours = build("BigBird", "Model")
    etkd.hf.patch(ours, backend="reference")
    twin = copy.deepcopy(ours)
    assert etkd.hf.is_patched(twin)
    attn = twin.encoder.layer[0].attention.self
    assert attn._etkd_options.backend == "reference"


def test_class_level_patch_applies_to_models_built_afterwards():
    before = build("Longformer", "Model")[0]
    etkd.hf.patch_longformer(backend="reference")
    try:
        torch.manual_seed(0)
        after = transformers.LongformerModel(config("Longformer"))
        assert etkd.hf.is_patched(after) and not etkd.hf.is_patched(before)
        check_same(before, after, inputs("Longformer", "Model", 21), "class-level")
    finally:
        etkd.hf.unpatch_longformer()
    assert not etkd.hf.is_patched(transformers.LongformerModel(config("Longformer")))


def test_class_level_patch_big_bird_and_nystromformer():
    etkd.hf.patch_big_bird()
    etkd.hf.patch_nystromformer()
    try:
        assert etkd.hf.is_patched(transformers.BigBirdModel(config("BigBird")))
        assert etkd.hf.is_patched(transformers.NystromformerModel(config("Nystromformer")))
        with pytest.raises(etkd.hf.UnsupportedConfigError, match="segment_means_seq_len"):
            transformers.NystromformerModel(config("Nystromformer", num_landmarks=5))
    finally:
        etkd.hf.unpatch_big_bird()
        etkd.hf.unpatch_nystromformer()
    assert not etkd.hf.is_patched(transformers.BigBirdModel(config("BigBird")))


# --- attention dropout: trained as HF trains (issue 27) -----------------------------------------------------


@pytest.mark.parametrize("head", ["Model", "ForTokenClassification"])
@pytest.mark.parametrize("globals_", ["some", "none", "all"])
@pytest.mark.parametrize("backend", dropout_backends("sliding_window"))
def test_longformer_attention_dropout_equals_hf_with_the_same_masks(monkeypatch, head, globals_, backend):
    """attention_probs_dropout_prob 0.2 in training mode: HF drops the local probabilities (global key columns
    included) and the global rows' probabilities; given the keep-masks our op used, HF's outputs and every
    parameter gradient equal the patched model's."""
    hf_model, ours = build("Longformer", head, attention_probs_dropout_prob=0.2)
    etkd.hf.patch(ours, backend=backend)
    kw = inputs("Longformer", head, 21)
    if globals_ == "none":
        kw.pop("global_attention_mask")
    elif globals_ == "all":
        kw["global_attention_mask"] = kw["attention_mask"].clone()
    masks = SameDropoutMasks(monkeypatch)
    check_same(hf_model, ours, kw, f"dropout {head} globals={globals_} [{backend}]", train=True, masks=masks)
    assert [c[:2] for c in masks.calls] == [("sliding_window_attention", 0.2)] * 2  # one per layer


@pytest.mark.parametrize("family", ["BigBird", "Nystromformer"])
def test_families_whose_hf_attention_applies_no_dropout_train_exactly_like_hf(family):
    # HF's BigBird block-sparse and Nystromformer modules never apply attention_probs_dropout_prob: neither do we
    hf_model, ours = build(family, "ForTokenClassification", attention_probs_dropout_prob=0.1)
    etkd.hf.patch(ours)
    kw = inputs(family, "ForTokenClassification", SEQ[family], padding=family != "Nystromformer")
    check_same(hf_model, ours, kw, f"{family} dropout 0.1 train", train=True)


def test_ignore_attention_dropout_is_a_deprecated_no_op():
    _, ours = build("Longformer", "Model", attention_probs_dropout_prob=0.1)
    kw = inputs("Longformer", "Model", 21)
    with pytest.warns(DeprecationWarning, match="ignore_attention_dropout is deprecated and has no effect"):
        etkd.hf.patch(ours, ignore_attention_dropout=True)
    ours.train()
    torch.manual_seed(3)
    flagged = ours(**kw)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        etkd.hf.patch(ours)  # without the flag: no warning
    torch.manual_seed(3)
    assert torch.equal(ours(**kw)[0], flagged)  # the flag changed nothing: dropout still applied
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(**kw)[0], flagged)
    with pytest.warns(DeprecationWarning, match="ignore_attention_dropout"):
        etkd.hf.patch_longformer(ignore_attention_dropout=False)
    etkd.hf.unpatch_longformer()


# --- what is refused, clearly ------------------------------------------------------------------------------


def test_output_attentions_is_refused():
    for family in OP:
        _, ours = build(family, "Model")
        etkd.hf.patch(ours)
        kw = inputs(family, "Model", SEQ[family], padding=family != "Nystromformer")
        with pytest.raises(etkd.hf.UnsupportedConfigError, match="output_attentions"):
            ours(**kw, output_attentions=True)


def test_bigbird_original_full_is_refused():
    _, ours = build("BigBird", "Model", attention_type="original_full")
    with pytest.raises(etkd.hf.UnsupportedConfigError, match="original_full"):
        etkd.hf.patch(ours)
    assert not etkd.hf.is_patched(ours)  # nothing half-patched


def test_bigbird_short_input_switch_warns_and_stays_exact():
    hf_model, ours = build("BigBird", "Model")
    etkd.hf.patch(ours)
    kw = inputs("BigBird", "Model", 20)  # <= (5 + 2r) * block_size: HF switches to original_full
    with pytest.warns(UserWarning, match="original_full"):
        check_same(hf_model, ours, kw, "bigbird short")


@pytest.mark.skipif("cpu" not in backends("block_sparse"), reason="cpu backend unavailable")
def test_bigbird_eval_fold_warning_names_the_models_head_dim(monkeypatch):
    """HF eval mode repeats random blocks; the fold adds 2 head-dim columns (32 -> 34), which keeps the cpu
    kernel off its own micro-kernels: the one-time warning must name the model's head_dim 32, not only 34."""
    from etkd_kernels import _C, cpu

    if _C.own_tile_width() == 0 or 34 % _C.own_tile_width() == 0:
        pytest.skip("this cpu target has no head-dim-multiple tile path to warn about")
    monkeypatch.setattr(cpu, "_told", set())  # the warning is once per process: other tests may have had it
    hf_model, ours = build("BigBird", "Model", hidden_size=64, num_attention_heads=2, intermediate_size=64)
    etkd.hf.patch(ours, backend="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_same(hf_model, ours, inputs("BigBird", "Model", 50), "bigbird eval head_dim 32")
    told = [str(w.message) for w in caught if "micro-kernels" in str(w.message)]
    assert len(told) == 1 and "this BigBird's head_dim 32 + 2 columns" in told[0], told


def test_nystromformer_inputs_hf_cannot_take_are_refused():
    _, ours = build("Nystromformer", "Model")
    etkd.hf.patch(ours)
    with pytest.raises(etkd.hf.UnsupportedConfigError, match="segment_means_seq_len=32"):
        ours(**inputs("Nystromformer", "Model", 24, padding=False))
    with pytest.raises(etkd.hf.UnsupportedConfigError, match="padded input"):
        ours(**inputs("Nystromformer", "Model", 32, padding=True))


def test_patch_refuses_models_without_supported_attention():
    bert = transformers.BertModel(transformers.BertConfig(**SMALL))
    with pytest.raises(etkd.hf.UnsupportedConfigError, match="attn_implementation"):
        etkd.hf.patch(bert)


def test_unknown_backend_is_refused_at_patch_time():
    _, ours = build("Longformer", "Model")
    with pytest.raises(ValueError, match="backend"):
        etkd.hf.patch(ours, backend="nope")


def test_benchmark_script_runs_both_models_and_agrees(tmp_path):
    """`python -m etkd.benchmarks.hf_patch` on a tiny model: a row per mode, the harness timer's medians,
    patched and unpatched outputs equal."""
    import json

    from etkd.benchmarks import hf_patch

    out = tmp_path / "rows.json"
    args = "--layers 1 --hidden 32 --heads 2 --window 4 --seq 32 --repeats 2".split()
    assert hf_patch.main([*args, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["max_rel_err"] < RTOL and [r["mode"] for r in res["rows"]] == ["fwd", "fwd+bwd"]
    for row in res["rows"]:
        assert len(row["times"]["hf"]) == len(row["times"]["etkd"]) == 2
        for name in ("hf", "etkd"):
            assert 0 < min(row["times"][name]) <= row[f"{name}_s"] <= max(row["times"][name])
        assert row["ratio"] == row["hf_s"] / row["etkd_s"]
