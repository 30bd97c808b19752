"""CoNLL reading, sub-word label alignment (round trip), windows over long documents merged back."""

import pytest

from etkd.distill.tasks import DataError, ner

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
"""


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    words = ["eu", "rejects", "german", "peter", "black", "##burn", "brussels", "cat", "##s"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_read_conll_sentences_and_documents(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text(CONLL)
    sents = ner.read_conll(f)
    assert [s["tokens"] for s in sents] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert sents[1]["tags"] == ["B-PER", "I-PER"] and sents[1]["line"] == 7
    docs = ner.read_conll(f, unit="document")
    assert [len(d["tokens"]) for d in docs] == [5, 1]
    assert ner.label_list(sents) == list(ner.CONLL_LABELS)


def test_malformed_conll_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: expected a token and a tag"):
        ner.read_conll(f)
    f.write_text("EU B-ORG\n\nrejects X-FOO\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: tag"):
        ner.read_conll(f)


def test_alignment_first_subtoken_round_trip(tokenizer):
    ex = [{"tokens": ["Peter", "Blackburn", "rejects", "cats"], "tags": ["B-PER", "I-PER", "O", "B-MISC"]}]
    l2i = {t: i for i, t in enumerate(ner.CONLL_LABELS)}
    (f,) = ner.encode(ex, tokenizer, l2i, max_length=32)
    toks = tokenizer.convert_ids_to_tokens(f["input_ids"])
    assert toks == ["[CLS]", "peter", "black", "##burn", "rejects", "cat", "##s", "[SEP]"]
    assert f["labels"] == [-100, l2i["B-PER"], l2i["I-PER"], -100, l2i["O"], l2i["B-MISC"], -100, -100]
    # Back to words: the labels at first sub-tokens give the original tags.
    back = ner.merge_predictions([f], [[max(x, 0) for x in f["labels"]]], ex, list(ner.CONLL_LABELS))
    assert back == [ex[0]["tags"]]


def test_windows_cover_and_overlap():
    assert ner.windows(5, 8, 2) == [(0, 5)]
    assert ner.windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    with pytest.raises(ValueError, match="stride"):
        ner.windows(10, 4, 4)


def test_long_document_split_and_merged_back(tokenizer):
    words = ["Peter", "Blackburn", "rejects", "German", "cats", "EU", "BRUSSELS"] * 6
    tags = ["B-PER", "I-PER", "O", "B-MISC", "O", "B-ORG", "B-LOC"] * 6
    ex = [{"tokens": words, "tags": tags}, {"tokens": ["EU"], "tags": ["B-ORG"]}]
    l2i = {t: i for i, t in enumerate(ner.CONLL_LABELS)}
    feats = ner.encode(ex, tokenizer, l2i, max_length=12, stride=4)
    assert len(feats) > 5 and all(len(f["input_ids"]) <= 12 for f in feats)
    assert [f["example_index"] for f in feats].count(1) == 1
    # Predictions = gold labels where labelled, garbage (label 0 = O) elsewhere: merge gives the gold tags.
    preds = [[max(x, 0) for x in f["labels"]] for f in feats]
    assert ner.merge_predictions(feats, preds, ex, list(ner.CONLL_LABELS)) == [tags, ["B-ORG"]]
    # The overlap is real: a word in two windows takes the more central window's prediction.
    seen = [w for f in feats if f["example_index"] == 0 for w in f["word_index"] if w >= 0]
    assert len(seen) > len(words)


def test_document_unit_needs_docstart_or_a_group_size(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a O\nb B-PER\n\nc O\n\nd O\n\ne B-LOC\n\nf O\n")  # 5 sentences, no -DOCSTART-
    with pytest.raises(DataError, match=r"plain\.txt: --ner-unit document: the file has no -DOCSTART- line"):
        ner.read_conll(plain, "document")
    docs = ner.read_conll(plain, "document", group_sentences=2)
    assert [d["tokens"] for d in docs] == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert [d["line"] for d in docs] == [1, 6, 10]
    f = tmp_path / "docs.txt"
    f.write_text(CONLL)
    docs = ner.read_conll(f, "document", group_sentences=1)  # groups never cross -DOCSTART-
    assert [d["tokens"] for d in docs] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert len(ner.read_conll(f, "document")) == 2
    with pytest.raises(ValueError, match="--ner-group-sentences"):
        ner.read_conll(f, "sentence", group_sentences=2)
