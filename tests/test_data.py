"""Text sources, packing, MLM masking rates, classification records, config files — all local, no network."""

from __future__ import annotations

import json
import random

import pytest
import torch

from etkd.distill.config import load_config_file, resolve
from etkd.distill.core import load_tokenizer
from etkd.distill.data import (
    ClassificationCollator,
    DataError,
    MLMCollator,
    PackedStream,
    TextSource,
    build_mlm_dataset,
    load_classification,
    pack_sequences,
)

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "a",
    "ran",
    "to",
    "big",
    "red",
    "house",
    "and",
    "saw",
    "bird",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer_dir(path) -> str:
    """A tiny WordPiece tokenizer saved like a real one (vocab = 5 specials + WORDS), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    core.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return str(path)


def generated_text(n: int, seed: int = 0) -> list[str]:
    """Sentences with learnable structure: a word is usually followed by the next word of WORDS."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(WORDS))
        out.append(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(rng.randint(5, 20))))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_local_sources_txt_jsonl_parquet_and_dirs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one doc\n\nsecond doc\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "json doc"}\n\n{"text": "another", "x": 1}\n')
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), tmp_path / "d" / "c.parquet")
    src = TextSource(str(tmp_path / "d"))
    assert list(src) == ["one doc", "second doc", "json doc", "another", "pq one", "pq two"]
    assert list(src) == list(src)  # re-iterable
    assert list(TextSource([str(tmp_path / "d" / "b.jsonl"), str(tmp_path / "d" / "a.txt")]))[:2] == [
        "json doc",
        "another",
    ]


def test_corrupt_line_and_missing_field_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n{"other": 1}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(TextSource(str(f)))
    g = tmp_path / "missing.jsonl"
    g.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing field 'text'"):
        list(TextSource(str(g)))
    src = TextSource(str(f), on_error="skip")
    assert list(src) == ["ok", "fine"] and src.skipped == 2
    with pytest.raises(DataError, match="nope.txt: no such file"):
        TextSource(str(tmp_path / "nope.txt"))


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return [{"text": "hub doc"}, {"content": "no text"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("huggingface_hub.repo_exists", lambda name, repo_type: repo_type == "dataset")
    src = TextSource(
        "wikimedia/wikipedia", config="20231101.en", split="train", streaming=True, on_error="skip"
    )
    assert list(src) == ["hub doc"] and src.skipped == 1
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", True)]


def test_packing_mix_of_short_and_long(tok):
    texts = generated_text(300)
    blocks = list(pack_sequences(texts, tok, short_length=16, long_length=48, long_fraction=0.3, seed=1))
    lengths = [len(b) for b in blocks]
    assert tok("the cat sat", add_special_tokens=False)["input_ids"] == [5, 6, 8]
    assert set(lengths) == {16, 48}
    frac = lengths.count(48) / len(lengths)
    assert 0.15 < frac < 0.45, frac
    assert all(b[0] == tok.cls_token_id and b[-1] == tok.sep_token_id for b in blocks)
    # Every document token survives in order (the final partial block aside).
    body = [t for b in blocks for t in b[1:-1]]
    stream = [
        t for txt in texts for t in tok(txt, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    ]
    assert body == stream[: len(body)]
    assert blocks == list(
        pack_sequences(texts, tok, short_length=16, long_length=48, long_fraction=0.3, seed=1)
    )
    stream_ds = PackedStream(texts, tok, seed=1, short_length=16, long_length=48, long_fraction=0.3)
    assert list(stream_ds) == blocks
    assert (
        build_mlm_dataset(texts, tok, seed=1, max_blocks=5, short_length=16)
        == list(pack_sequences(texts, tok, seed=1, short_length=16))[:5]
    )


def test_mlm_masking_rates(tok):
    collate = MLMCollator.from_tokenizer(tok, generator=torch.Generator().manual_seed(0))
    n, seq = 400, 64
    ids = torch.randint(5, len(tok), (n, seq))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    examples = [row[: seq - (i % 7)].tolist() for i, row in enumerate(ids)]  # ragged: padding too
    batch = collate(examples)
    real = batch["attention_mask"]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    special = torch.cat([special, torch.zeros(0, seq, dtype=torch.bool)])
    selected = batch["labels"] != -100
    candidates = real & ~torch.isin(batch["labels"].where(selected, ids), torch.tensor(tok.all_special_ids))
    # Never a special or padding token.
    orig = torch.full_like(ids, tok.pad_token_id)
    for i, e in enumerate(examples):
        orig[i, : len(e)] = torch.tensor(e)
    assert not (selected & ~real).any()
    assert not (selected & torch.isin(orig, torch.tensor(tok.all_special_ids))).any()
    eligible = real & ~torch.isin(orig, torch.tensor(tok.all_special_ids))
    k = int(selected.sum())
    rate = k / int(eligible.sum())
    # 15% of ~23k eligible tokens: binomial sd ~0.0024, 4 sd bounds.
    assert abs(rate - 0.15) < 0.01, rate
    masked = selected & (batch["input_ids"] == tok.mask_token_id)
    kept = selected & (batch["input_ids"] == orig)
    randomised = selected & ~masked & ~kept
    assert abs(masked.sum() / k - 0.8) < 0.03
    assert abs((kept.sum() + randomised.sum()) / k - 0.2) < 0.03
    assert abs(randomised.sum() / k - 0.1 * (1 - 1 / (len(tok) - 5))) < 0.025
    assert not torch.isin(batch["input_ids"][randomised], torch.tensor(tok.all_special_ids)).any()
    assert torch.equal(batch["labels"][selected], orig[selected])
    assert candidates.shape == real.shape
    # Unselected real tokens are untouched, padding is [PAD].
    assert torch.equal(batch["input_ids"][~selected], orig[~selected])


def test_classification_records_and_collate(tmp_path, tok):
    f = tmp_path / "train.jsonl"
    rows = [{"text": "the cat sat", "label": "pos"}, {"text": "a dog ran", "label": "neg"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, info = load_classification(str(f))
    assert info["label_names"] == ["neg", "pos"] and info["num_labels"] == 2 and not info["regression"]
    assert [r["label"] for r in records] == [1, 0]
    batch = ClassificationCollator(tok, max_length=8)(records)
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].dtype == torch.long
    g = tmp_path / "sts.jsonl"
    g.write_text(
        '{"s1": "the cat", "s2": "a cat", "score": 4.2}\n{"s1": "the dog", "s2": "red house", "score": 0.5}\n'
    )
    records, info = load_classification(str(g), text_field="s1", text_pair_field="s2", label_field="score")
    assert info["regression"] and records[0]["text_pair"] == "a cat"
    batch = ClassificationCollator(tok)(records)
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"][0].tolist() == [2, 5, 6, 3, 11, 6, 3]
    h = tmp_path / "bad.jsonl"
    h.write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'label'"):
        load_classification(str(h))


def test_config_file_then_cli_overrides(tmp_path):
    import argparse

    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 0.001\nmax-steps: 7\n")
    assert load_config_file(yml) == (
        {"learning_rate": 0.001, "max-steps": 7},
        {"learning_rate": 1, "max-steps": 2},
    )
    args = argparse.Namespace(config=str(yml), learning_rate=None, max_steps=9, seed=None)
    ns = resolve(args, {"learning_rate": 1.0, "max_steps": 1, "seed": 3})
    assert (ns.learning_rate, ns.max_steps, ns.seed) == (0.001, 9, 3)
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rat": 1}')
    with pytest.raises(ValueError, match="unknown settings \\['learning_rat'\\]"):
        resolve(argparse.Namespace(config=str(bad)), {"learning_rate": 1.0})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="cannot parse"):
        load_config_file(broken)
