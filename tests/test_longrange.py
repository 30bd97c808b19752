"""The built-in long-range tasks: deterministic by seed, evidence out of a 512-token window's reach (and in
reach of a 4096-token one), labels consistent with the evidence, the control variant in reach."""

from __future__ import annotations

import json
import os
import random

import pytest

from etkd.distill.demo import data as demo_data
from etkd.distill.demo import longrange
from etkd.distill.tasks import glue, ner


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    paths = longrange.write_all(str(d / "far"), seed=3, n_train=12, n_dev=4)
    near = longrange.write_all(str(d / "near"), seed=3, n_train=12, n_dev=4, near=True)
    return paths, near, demo_data.tokenizer()


def _fast(tok):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(demo_data.vocabulary())}, do_lower_case=True)


def test_deterministic_by_seed(tmp_path):
    a = longrange.write_ner(str(tmp_path / "a"), 3, seed=5)
    b = longrange.write_ner(str(tmp_path / "b"), 3, seed=5)
    c = longrange.write_ner(str(tmp_path / "c"), 3, seed=6)
    text = [open(p).read() for p in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]
    a = longrange.write_cls(str(tmp_path / "a.jsonl"), 3, seed=5)
    b = longrange.write_cls(str(tmp_path / "b.jsonl"), 3, seed=5)
    assert open(a).read() == open(b).read()


def test_ner_documents(files):
    paths, _, _ = files
    docs = ner.read_conll(paths["long_ner_train"], "document")
    assert len(docs) == 12
    kinds = set()
    for d in docs:
        words, tags = d["tokens"], d["tags"]
        lo, hi = longrange.LENGTH
        assert lo <= len(words) <= hi + 40
        code, kind = words[0], words[3]
        assert code in longrange.CODENAMES and words[1:3] == ["is", "a"]
        assert words[:40] == words[:5] * 8  # the opening paragraph: the declaration, 8 times
        tag = "B-" + longrange.KINDS[kind]
        kinds.add(kind)
        mentions = [i for i, w in enumerate(words) if w in longrange.CODENAMES and i >= 40]
        assert len(mentions) > 5
        assert all(words[i] == code and tags[i] == tag for i in mentions)  # one codename, one type
        assert all(
            i >= longrange.MIN_GAP for i in mentions
        )  # every later mention is far from the declaration
        assert "is" not in words[40:] and not set(longrange.KINDS) & set(words[40:])  # said only there
    assert len(kinds) > 1  # the type changes between documents


def test_evidence_out_of_reach_of_512_windows(files):
    """With finetune's NER windows (512 tokens, stride 128) no window holds the declaration and a later
    mention; a 4096-token window holds the whole document."""
    paths, _, tok = files
    tok = _fast(tok)
    docs = ner.read_conll(paths["long_ner_dev"], "document")
    labels = ner.label_list(docs)
    feats = ner.encode(docs, tok, {t: i for i, t in enumerate(labels)}, 512, 128)
    unk = tok.unk_token_id
    assert all(unk not in f["input_ids"] for f in feats)  # every word is one known token
    for f in feats:
        words = [w for w in f["word_index"] if w >= 0]
        has_decl = any(w < 40 for w in words)  # the opening paragraph
        mentions = [
            w for w in words if docs[f["example_index"]]["tokens"][w] in longrange.CODENAMES and w >= 40
        ]
        assert not (has_decl and mentions)
    long_feats = ner.encode(docs, tok, {t: i for i, t in enumerate(labels)}, 4096, 128)
    assert len(long_feats) == len(docs)


def test_classification_documents(files):
    paths, near, tok = files
    tok = _fast(tok)
    for path, far in ((paths["long_cls_train"], True), (near["long_cls_train"], False)):
        examples = glue.read_glue_file(path, "sst2")
        assert {e["label"] for e in examples} == {0, 1}
        for e in examples:
            words = e["text_a"].split()
            at = [i for i, w in enumerate(words) if w == "film"]
            opinions = {words[i + 2] for i in at}
            assert len(at) == longrange.OPINIONS and all(words[i + 3] == "." for i in at)
            assert opinions <= set(demo_data.GOOD if e["label"] == 1 else demo_data.BAD)
            assert sum(w in demo_data.GOOD + demo_data.BAD for w in words) == longrange.OPINIONS
            assert all(i > longrange.MIN_GAP for i in at) if far else all(i < 300 for i in at)
        film = tok.convert_tokens_to_ids("film")
        cut = glue.encode(examples, tok, 512)
        # Truncation to 512 tokens drops the only evidence of the far variant and keeps the near one's.
        assert all((film in f["input_ids"]) != far for f in cut)


def test_classification_short_documents(files):
    """The curriculum's short documents: the same task (24 opinions of the label's polarity) at SHORT tokens."""
    paths, _, _ = files
    examples = glue.read_glue_file(paths["long_cls_short_train"], "sst2")
    assert len(examples) == 12 and {e["label"] for e in examples} == {0, 1}
    for e in examples:
        words = e["text_a"].split()
        assert longrange.SHORT[0] <= len(words) <= longrange.SHORT[1]
        opinions = [w for w in words if w in demo_data.GOOD + demo_data.BAD]
        assert len(opinions) == longrange.OPINIONS
        assert set(opinions) <= set(demo_data.GOOD if e["label"] == 1 else demo_data.BAD)


def test_near_variant_restates_declaration(files):
    _, near, _ = files
    for d in ner.read_conll(near["long_ner_train"], "document"):
        decl = [i for i, w in enumerate(d["tokens"]) if w == "is"]
        gaps = [b - a for a, b in zip(decl, decl[1:])]
        assert decl[0] == 1 and max(gaps) < 512 - 100


def test_breakdown_separates_codename_and_ordinary(files):
    paths, _, _ = files
    docs = ner.read_conll(paths["long_ner_dev"], "document")
    gold = [list(d["tags"]) for d in docs]
    assert longrange.breakdown(docs, gold) == {"f1_codename": 100.0, "f1_ordinary": 100.0}
    rng = random.Random(0)
    wrong = []
    for (
        d
    ) in docs:  # every later codename mention gets another type: what a model without the declaration does
        tags = list(d["tags"])
        for i, w in enumerate(d["tokens"]):
            if i >= 40 and w in longrange.CODENAMES:
                tags[i] = rng.choice([t for t in ("B-PER", "B-ORG", "B-LOC", "B-MISC") if t != tags[i]])
        wrong.append(tags)
    b = longrange.breakdown(docs, wrong)
    assert b["f1_codename"] == 0.0 and b["f1_ordinary"] == 100.0


def test_cli_writes_files_and_tokenizer(tmp_path):
    assert longrange.main(["--out", str(tmp_path), "--train", "2", "--dev", "1"]) == 0
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    with open(tmp_path / "long_cls_dev.jsonl") as f:
        assert len([json.loads(x) for x in f]) == 1


def test_context_ceiling_512_vs_4096(files):
    """The best 512-token model cannot resolve the later codename mentions (a quarter right by guessing);
    a 4096-token one can resolve all. The gap is in the data, before any training."""
    paths, near, _ = files
    docs = ner.read_conll(paths["long_ner_train"], "document")  # 12 documents (40 dev ones: 65.0 vs 100)
    short, full = longrange.context_ceiling(docs, 512), longrange.context_ceiling(docs, 4096)
    assert full["f1"] == 100.0 and short["f1_ordinary"] == 100.0
    # PER documents keep their codename F1 by the guess, the others lose it
    per = sum(d["tags"][0] == "B-PER" for d in docs) / len(docs)
    assert abs(short["f1_codename"] - 100 * per) < 10 and full["f1"] - short["f1"] > 10
    # the control variant: the evidence is within reach of every 512-token window
    assert longrange.context_ceiling(ner.read_conll(near["long_ner_dev"], "document"), 512)["f1"] > 99


def test_short_ner_set_needs_context_for_codenames(tmp_path):
    """The demo's short NER set mixes in sentences that type a codename by its declaration: the same codename
    carries different types across sentences, always the declared one."""
    path = demo_data.write_conll(str(tmp_path / "ner.conll"), n_docs=30, seed=3)
    sents = ner.read_conll(path, "sentence")
    types = {}
    for s in sents:
        w, t = s["tokens"], s["tags"]
        if w[0] in longrange.CODENAMES:
            assert w[1:3] == ["is", "a"]
            tag = "B-" + longrange.KINDS[w[3]]
            assert all(t[i] == tag for i, x in enumerate(w) if x == w[0])  # every mention: the declared type
            types.setdefault(w[0], set()).add(tag)
    assert len(types) > 3 and any(len(v) > 1 for v in types.values())  # a codename's type varies
    assert 0.3 < sum(s["tokens"][0] in longrange.CODENAMES for s in sents) / len(sents) < 0.7


def test_seeds_table_means_gaps_and_retention():
    """`etkd demo --seeds`: each score as mean ± sample std over the seeds with each seed's value, the gaps over
    the 512-token teacher and the student's retention computed per seed."""
    from etkd.distill import demo

    def row(name, context, f1, cls):
        return {"name": name, "context": context, "f1": f1, "f1_codename": f1, "f1_ordinary": 100.0,
                "cls_f1": cls, "accuracy": cls}  # fmt: skip

    runs = {
        s: {
            "models": [
                row("roberta-full", 512, 60.0 + s, 50.0),
                row("longformer", 4096, 90.0, 100.0 - 2 * s),
                row("longformer-student", 4096, 81.0 + 9 * s, 100.0 - 2 * s),
            ]
        }  # fmt: skip
        for s in (0, 1)
    }
    text = demo.seeds_table(runs)
    assert "| roberta-full | 512 | 60.5 ± 0.7 (60.0 / 61.0) |" in text
    assert "| NER F1 gap, longformer − roberta-full | 29.5 ± 0.7 (30.0 / 29.0) |" in text
    assert "| cls F1 gap, longformer-student − roberta-full | 49.0 ± 1.4 (50.0 / 48.0) |" in text
    assert "| NER F1 retention (%), longformer-student / longformer | 95.0 ± 7.1 (90.0 / 100.0) |" in text


def test_cls_attention_reads_the_global_cls_row(tmp_path):
    """`cls_attention` (python -m etkd.distill.demo.longrange --cls-attention): with zero global query/key
    projections the [CLS] row attends uniformly, so its share on the opinion tokens is their token share;
    a key that singles the opinion words out moves the share onto them."""
    import torch

    from etkd.models import EncoderConfig, EncoderModel

    vocab = demo_data.vocabulary()
    cfg = EncoderConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=32,
                        max_positions=2050, position_style="padded", attention="longformer", window=16,
                        global_projections=True, head="sequence_classification", head_style="roberta")  # fmt: skip
    torch.manual_seed(0)
    model = EncoderModel(cfg)
    layer0 = model.encoder.layers[0].attn
    for proj in (layer0.qg, layer0.kg):
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    model.save_pretrained(str(tmp_path / "uniform"))
    path = longrange.write_cls(str(tmp_path / "cls.jsonl"), 3, seed=1)
    r = longrange.cls_attention(str(tmp_path / "uniform"), path)
    assert r["documents"] == 3 and 0 <= r["accuracy"] <= 100 and len(r["layers"]) == 2
    a = r["layers"][0]
    assert abs(a["opinion_words"] - a["uniform_words"]) < 1e-6
    assert abs(a["opinion_sentences"] - a["uniform_sentences"]) < 1e-6
    assert 0 < a["uniform_words"] < a["uniform_sentences"] < 1
    # The opinion words' embeddings stand out on coordinate 0, the keys read it, the [CLS] query (bias only)
    # prefers large keys: the share moves onto the opinion words.
    with torch.no_grad():
        ids = [vocab.index(w) for w in demo_data.GOOD + demo_data.BAD]
        model.encoder.embeddings.word.weight[ids, 0] = 10.0
        layer0.kg.weight.zero_()
        layer0.kg.weight[:, 0] = 5.0
        layer0.qg.bias.fill_(1.0)
    model.save_pretrained(str(tmp_path / "peaked"))
    b = longrange.cls_attention(str(tmp_path / "peaked"), path)["layers"][0]
    assert b["opinion_words"] > 5 * b["uniform_words"]


def test_demo_seeds_runs_the_pipeline_per_seed(tmp_path, monkeypatch):
    """`etkd demo --seeds 3 4`: one pipeline per seed in OUT/seed<S> with that seed, then the table over them
    (the pipeline itself is tests/test_bench_demo.py's tiny end-to-end run)."""
    import argparse

    from etkd.distill import demo

    seen = []

    def pipeline(args):
        seen.append((args.seed, args.out))
        os.makedirs(args.out, exist_ok=True)
        rows = [{"name": n, "context": c, "f1": 50.0 + args.seed, "f1_codename": 0.0, "f1_ordinary": 100.0,
                 "cls_f1": 60.0, "accuracy": 60.0}
                for n, c in (("roberta-full", 512), ("longformer", 4096), ("longformer-student", 4096))]  # fmt: skip
        with open(os.path.join(args.out, "long_range.json"), "w") as f:
            json.dump({"models": rows}, f)

    monkeypatch.setattr(demo, "pipeline", pipeline)
    demo.run_seeds(argparse.Namespace(seeds=[3, 4], seed=0, out=str(tmp_path)))
    assert seen == [(3, str(tmp_path / "seed3")), (4, str(tmp_path / "seed4"))]
    assert set(json.loads((tmp_path / "long_range_seeds.json").read_text())) == {"3", "4"}
    assert (
        "| longformer | 4096 | 53.5 ± 0.7 (53.0 / 54.0) |" in (tmp_path / "long_range_seeds.md").read_text()
    )
