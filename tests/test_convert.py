"""Convert (paper §3.1) and student init: exactness when the pattern covers the input, 4096-token runs,
position tiling, global projections, the `etkd convert` CLI, and make_student's layer copies."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import HF_SMALL as SMALL
from helpers import assert_close

from etkd.distill.cli import main
from etkd.models import EncoderConfig, EncoderModel, convert, from_hf, make_student
from etkd.models.convert import tile_positions

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*block_sparse.*")


def roberta_mlm():
    cfg = transformers.RobertaConfig(max_position_embeddings=34, pad_token_id=1, **SMALL)  # 32 tokens + 2
    return transformers.RobertaForMaskedLM(cfg).eval()


def tiny(**kw) -> EncoderModel:
    base = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64,
                hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return EncoderModel(EncoderConfig(**{**base, **kw})).eval()


def batch(seq: int, vocab: int = 99, pad: int = 1):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 6 :] = 0
    ids[1, seq - 6 :] = pad
    return ids, mask


# Settings under which each pattern sees every key of a 24-token input, so it must equal full attention.
# (LSG is not here: LSG RoBERTa prepends learned global embeddings every token attends to; its oracle is
# lsg-converter itself, tests/test_lsg_model.py.)
COVERING = {
    "longformer": dict(window=48),  # one side 24 >= seq
    "bigbird": dict(block_size=8, num_random_blocks=1),  # 3 blocks <= 5 + 2r: full-attention path (as HF)
    "nystrom": dict(num_landmarks=64),  # clipped to seq: exact softmax
}


@pytest.mark.parametrize("to", sorted(COVERING))
def test_covering_pattern_equals_original(to):
    teacher = from_hf(roberta_mlm())
    long = convert(teacher, to, max_positions=128, **COVERING[to]).eval()
    assert long.config.attention == to and long.config.max_tokens == 128
    ids, mask = batch(24)
    kw = {}
    if to == "longformer":  # global tokens too: their projections start as copies of the local ones
        kw["global_attention_mask"] = torch.zeros_like(mask)
        kw["global_attention_mask"][:, 0] = 1
    with torch.no_grad():
        ref = teacher(ids, attention_mask=mask).logits
        got = long(ids, attention_mask=mask, **kw).logits
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-4, name=f"convert to {to}")


@pytest.mark.parametrize("to", ["longformer", "bigbird", "lsg", "nystrom"])
def test_converted_model_runs_on_4096_tokens(to):
    base = tiny(num_layers=1, position_style="padded", pad_token_id=1, max_positions=34)
    settings = dict(window=64, block_size=64, num_random_blocks=1, num_landmarks=32)
    if to == "lsg":
        settings.update(bos_token_id=0, mask_token_id=4)
    long = convert(base, to, max_positions=4096, **settings).set_attention_backend("reference")
    ids = torch.randint(3, 50, (1, 4096))
    with torch.no_grad():
        out = long(ids).last_hidden_state
    assert out.shape == (1, 4096, 32) and torch.isfinite(out).all()


def test_position_tiling_keeps_roberta_offset():
    old = torch.randn(34, 4)  # rows 0, 1 reserved (pad = 1), 32 real positions
    new = tile_positions(old, 4098, first=2)
    assert new.shape == (4098, 4)
    assert torch.equal(new[:2], old[:2])
    assert torch.equal(new[2:34], old[2:]) and torch.equal(new[34:66], old[2:])
    assert torch.equal(new[4098 - 32 :], old[2:])  # 4096 = 128 * 32: the tiling ends on a full copy
    bert = tile_positions(old, 100, first=0)
    assert torch.equal(bert[34:68], old) and torch.equal(bert[68:100], old[:32])


def test_global_projections_start_as_local_copies_and_other_weights_copied():
    teacher = tiny(head="mlm")
    long = convert(teacher, "longformer", max_positions=256, window=8)
    for a, b in zip(teacher.encoder.layers, long.encoder.layers):
        for local, glob in ((b.attn.q, b.attn.qg), (b.attn.k, b.attn.kg), (b.attn.v, b.attn.vg)):
            assert torch.equal(local.weight, glob.weight) and torch.equal(local.bias, glob.bias)
        assert torch.equal(a.attn.q.weight, b.attn.q.weight) and torch.equal(
            a.ffn_out.weight, b.ffn_out.weight
        )
    assert torch.equal(teacher.head.dense.weight, long.head.dense.weight)
    assert long.head.decoder.weight is long.encoder.embeddings.word.weight


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="to:"):
        convert(tiny(), "performer")
    with pytest.raises(ValueError, match="window"):
        convert(tiny(), "longformer", window=7)


def test_cli_convert_hf_dir_to_longformer(tmp_path, capsys):
    hf = roberta_mlm()
    hf.save_pretrained(tmp_path / "roberta")
    out = tmp_path / "long"
    code = main(["convert", "--from", str(tmp_path / "roberta"), "--to", "longformer", "--max-positions", "4096",
                 "--window", "64", "--out", str(out)])  # fmt: skip
    assert code == 0 and "longformer" in capsys.readouterr().out
    long = EncoderModel.from_pretrained(out)
    assert long.config.attention == "longformer" and long.config.max_positions == 4098
    ids, mask = batch(24)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = long(ids, attention_mask=mask).logits
    assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-4, name="CLI-converted (window covers input)")


def test_cli_convert_our_dir_to_hf_longformer(tmp_path):
    teacher = from_hf(roberta_mlm())
    teacher.save_pretrained(tmp_path / "ours")
    code = main(["convert", "--from", str(tmp_path / "ours"), "--to", "longformer", "--max-positions", "256",
                 "--window", "64", "--format", "hf", "--out", str(tmp_path / "hf")])  # fmt: skip
    assert code == 0
    hf_long = transformers.LongformerForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = batch(24)
    with torch.no_grad():
        ref = teacher(ids, attention_mask=mask).logits
        got = hf_long(input_ids=ids, attention_mask=mask).logits
    assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-4, name="HF Longformer from convert")


def test_cli_convert_missing_source_fails_clearly(tmp_path, capsys):
    code = main(["convert", "--from", str(tmp_path), "--to", "longformer", "--out", str(tmp_path / "x")])
    assert code == 2 and "no config.json in this folder" in capsys.readouterr().err


def test_make_student_every_other_and_list():
    teacher = tiny(num_layers=4, head="sequence_classification", head_style="roberta", window=[2, 4, 6, 8],
                   attention="longformer", global_projections=True)  # fmt: skip
    for layers, chosen in (("every_other", [0, 2]), ([3, 1], [3, 1])):
        student = make_student(teacher, layers)
        assert student.config.num_layers == 2
        assert student.config.window == [teacher.config.window[i] for i in chosen]
        ts, ss = teacher.state_dict(), student.state_dict()
        for j, i in enumerate(chosen):
            for name in ("attn.q.weight", "attn.kg.bias", "norm2.weight", "ffn_in.weight"):
                assert torch.equal(ss[f"encoder.layers.{j}.{name}"], ts[f"encoder.layers.{i}.{name}"])
        for key in ss:
            if not key.startswith("encoder.layers."):
                assert torch.equal(ss[key], ts[key]), key  # embeddings, pooler, head
    with pytest.raises(ValueError, match="layers"):
        make_student(teacher, [0, 4])


def test_cli_convert_to_hf_that_no_transformers_class_holds_is_one_line(tmp_path, capsys):
    """The README's convert row: HF Longformer takes RoBERTa-style (fairseq) positions, BigBird BERT-style ones,
    Nystromformer neither (positions from 2), `fixed` has no transformers class at all. A conversion HF cannot
    hold is a user error (exit 2, one line), not a traceback."""
    cfg = transformers.BertConfig(max_position_embeddings=32, **SMALL)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    roberta_mlm().save_pretrained(tmp_path / "roberta")
    capsys.readouterr()
    for source, to, says in (
        ("bert", "longformer", "computes positions fairseq-style"),
        ("bert", "nystrom", "computes positions from 2"),
        ("roberta", "bigbird", "computes positions from 0"),
        ("roberta", "nystrom", "computes positions from 2"),
        ("bert", "fixed", "no model class for 'fixed'"),
    ):
        code = main(["convert", "--from", str(tmp_path / source), "--to", to, "--format", "hf",
                     "--max-positions", "64", "--out", str(tmp_path / to)])  # fmt: skip
        err = capsys.readouterr().err.replace("\r", "\n")  # transformers' loading bar comes first
        ours = [line for line in err.splitlines() if line.startswith("etkd convert:")]
        assert code == 2 and len(ours) == 1 and ours[0].startswith("etkd convert: error: --format hf: "), err
        assert says in ours[0] and "--format etkd writes any model" in ours[0] and "Traceback" not in err
        assert not (tmp_path / to).exists()
