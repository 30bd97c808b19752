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
