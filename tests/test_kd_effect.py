"""`python -m etkd.distill.kd_effect` (make kd-effect): its English NER set and its table."""

from __future__ import annotations

import pytest

from etkd.distill import kd_effect
from etkd.distill.tasks.ner import read_conll


def test_english_ner_set_reads_as_conll_and_holds_out_templates(tmp_path):
    pytest.importorskip(
        "faker", reason="kd_effect builds the English NER set with Faker (make kd-effect installs it)"
    )
    paths = kd_effect.english_ner(str(tmp_path), n_train=60, n_test=30, n_corpus=10)
    train, test = read_conll(paths["train"]), read_conll(paths["test"])
    assert len(train) == 60 and len(test) == 30
    tags = {t for s in train + test for t in s["tags"]}
    assert {"B-PER", "B-ORG", "B-LOC", "B-MISC", "O"} <= tags and tags <= {"O"} | {
        f"{p}-{k}" for p in "BI" for k in ("PER", "ORG", "LOC", "MISC")
    }
    # The test sentences come from templates the training set never uses: their context words differ.
    train_frames = {" ".join(w for w, t in zip(s["tokens"], s["tags"]) if t == "O") for s in train}
    test_frames = {" ".join(w for w, t in zip(s["tokens"], s["tags"]) if t == "O") for s in test}
    assert not train_frames & test_frames
    assert len(open(paths["corpus"]).read().splitlines()) == 10
    assert kd_effect.english_ner(str(tmp_path)) == paths  # written once, reused


def test_spread_and_table():
    s = kd_effect.spread([60.0, 62.0, 64.0])
    assert s == {"mean": 62.0, "std": 2.0, "min": 60.0, "max": 64.0, "n": 3}
    text = kd_effect.table({"teacher": [80.0, 80.0], "student (KD)": [76.0, 72.0]})
    assert "92.5%" in text and "74.0 ±  2.8" in text


def test_spread_layers_keep_the_first_and_the_last():
    from etkd.distill.distill import spread_layers, student_layers

    assert spread_layers(12) == [0, 2, 4, 7, 9, 11]  # DistilBERT's extraction of bert-base
    assert spread_layers(6) == [0, 2, 5] and spread_layers(4) == [0, 3] and spread_layers(1) == [0]
    assert student_layers("spread", 6) == [0, 2, 5] and student_layers("every_other", 6) == "every_other"
    assert student_layers("1,3", 6) == [1, 3]


def test_plain_student_and_its_closeness_to_the_teacher(tmp_path):
    """save_student writes make_student(teacher, layers); closeness is the mean cosine of last hidden states
    on held-out sentences: 1 for the teacher itself, below 1 for its half-depth copy."""
    import torch
    from test_data import WORDS, make_tokenizer_dir

    from etkd.distill.core import load_tokenizer
    from etkd.models import EncoderConfig, EncoderModel, load

    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_layers=4, num_heads=2,
                        intermediate_size=64, max_positions=64, head=None, initializer_range=0.5)  # fmt: skip
    EncoderModel(cfg).save_pretrained(str(tmp_path / "teacher"))
    make_tokenizer_dir(tmp_path / "teacher")
    tok = load_tokenizer(str(tmp_path / "teacher"))
    plain = kd_effect.save_student(str(tmp_path / "teacher"), str(tmp_path / "plain"), tok, "spread")
    teacher, student = load(str(tmp_path / "teacher")), load(plain)
    assert student.config.num_layers == 2
    assert torch.equal(student.encoder.layers[1].ffn_in.weight, teacher.encoder.layers[3].ffn_in.weight)
    conll = tmp_path / "test.conll"
    conll.write_text("-DOCSTART- O\n\nthe O\ncat B-PER\n\nthe O\ndog B-PER\nsat O\n")
    sentences = kd_effect.conll_sentences(str(conll))
    assert sentences == [["the", "cat"], ["the", "dog", "sat"]]
    near = kd_effect.closeness(str(tmp_path / "teacher"), {"self": str(tmp_path / "teacher"), "plain": plain},
                               tok, sentences)  # fmt: skip
    assert near["self"] == pytest.approx(1.0, abs=1e-6) and near["plain"] < 0.9, near


def test_first_sentences_and_per_seed_differences(tmp_path):
    """--ner-train N fine-tunes on the first N sentences of the training file (its -DOCSTART- header kept,
    N > the file's sentences refused); the per-seed line pairs KD with no KD of the same seed."""
    from etkd.distill.tasks.ner import read_conll

    src = tmp_path / "train.conll"
    src.write_text("-DOCSTART- O\n\n" + "".join(f"w{i} O\nx{i} B-PER\n\n" for i in range(5)))
    out = kd_effect.first_sentences(str(src), 2, str(tmp_path / "two.conll"))
    sents = read_conll(out)
    assert [s["tokens"] for s in sents] == [["w0", "x0"], ["w1", "x1"]] and sents[0]["tags"] == ["O", "B-PER"]
    with pytest.raises(SystemExit, match="--ner-train 9: .* has only 5 sentences"):
        kd_effect.first_sentences(str(src), 9, str(tmp_path / "nine.conll"))
    line = kd_effect.differences({"student (KD)": [80.0, 81.0, 79.0], "student (no KD)": [78.0, 82.0, 77.0]})
    assert line.startswith("KD - no KD per seed: +2.0 -1.0 +2.0 F1; mean +1.0 ± 1.7; KD ahead on 2 of 3")


def test_finetune_seeds_and_their_pooled_noise():
    """--ft-seeds K: distillation seed s is scored by the mean F1 of fine-tuning seeds s, s + 10, ...; the
    fine-tuning's own noise is the root mean square of the per-(model, seed) sample variances."""
    assert kd_effect.finetune_seeds(3, 1) == [3] and kd_effect.finetune_seeds(2, 3) == [2, 12, 22]
    # variances: [80, 82] -> 2, [70, 76] -> 18, [90, 90, 93] -> 3; one-run groups do not count
    runs = {"teacher": [[80.0, 82.0], [90.0, 90.0, 93.0]], "student (KD)": [[70.0, 76.0], [75.0]]}
    assert kd_effect.finetune_noise(runs) == pytest.approx(((2 + 18 + 3) / 3) ** 0.5, rel=1e-12)
    assert kd_effect.finetune_noise({"teacher": [[80.0], [81.0]]}) is None


def test_unlabelled_text_is_the_sentences_without_labels(tmp_path):
    """--kd-text ner distils on the NER training sentences' words, one sentence a line, no tags, no -DOCSTART-."""
    src = tmp_path / "train.conll"
    src.write_text("-DOCSTART- O\n\nthe O\ncat B-PER\n\nthe O\ndog B-PER\nsat O\n")
    out = kd_effect.unlabelled_text(str(src), str(tmp_path / "text.txt"))
    assert open(out).read() == "the cat\nthe dog sat\n"


def test_demo_files_mix_codename_declarations_into_the_corpus_only_when_asked(tmp_path):
    """--demo-declared P: the demo teacher is pretrained and distilled on the demo corpus with a share P of
    its sentences declaring a codename's type ("kor is a firm ... kor ."); 0 keeps the demo's own corpus,
    which has none. The NER files are the demo's in both cases."""
    import json

    def declarations(path):
        text = " ".join(json.loads(line)["text"] for line in open(path))
        sentences = [s.split() for s in text.split(" . ")]
        return sum(len(s) > 3 and s[1:3] == ["is", "a"] for s in sentences), len(sentences)

    plain = kd_effect.demo_files(str(tmp_path / "plain"))
    mixed = kd_effect.demo_files(str(tmp_path / "mixed"), 0.5)
    assert plain["corpus"].endswith("corpus.jsonl") and mixed["corpus"].endswith("corpus_declared0.5.jsonl")
    assert declarations(plain["corpus"])[0] == 0
    n_declared, n = declarations(mixed["corpus"])
    assert 0.4 < n_declared / n < 0.6
    for k in ("ner_train", "ner_dev"):
        assert open(plain[k]).read() == open(mixed[k]).read()
    assert kd_effect.demo_files(str(tmp_path / "mixed"), 0.5) == mixed  # written once, reused
    all_declared = kd_effect.demo_files(str(tmp_path / "all"), 1.0)
    n_declared, n = declarations(all_declared["corpus"])
    assert n_declared == n


def test_declared_f1_splits_a_demo_run_by_sentence_kind(tmp_path):
    """The demo's NER score mixes ordinary entities (a word's type) and codenames typed by their declaration;
    kd_effect reports the two apart from a run's predictions."""
    import json

    test = tmp_path / "test.conll"
    test.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "kor NN O B-ORG\nis NN O O\na NN O O\nfirm NN O O\nmet NN O O\nkor NN O B-ORG\n. NN O O\n\n"
        "anna NN O B-PER\nmet NN O O\nparis NN O B-LOC\n. NN O O\n"
    )
    pred = tmp_path / "run_predictions.json"
    # declared: 1 of 2 entities right (P = R = 1/2); ordinary: both right
    pred.write_text(
        json.dumps({"test": [["B-ORG", "O", "O", "O", "O", "B-PER", "O"], ["B-PER", "O", "B-LOC", "O"]]})
    )
    assert kd_effect.declared_f1(str(test), str(pred)) == {"declared": 50.0, "ordinary": 100.0}
    pred.write_text(json.dumps({"test": [["B-PER", "O", "O", "O"]]}))
    with pytest.raises(ValueError, match="1 predicted sentences, but .*test.conll has 2"):
        kd_effect.declared_f1(str(test), str(pred))
