"""SQuAD-format QA: reading, HotpotQA / TriviaQA converters, windows with doc stride, answer extraction."""

import json

import pytest

from etkd.distill.tasks import DataError, qa

CONTEXT = (
    "the cat sat on the mat . " * 6 + "the dog ran to the red house . " + "the cat sat on the mat . " * 6
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    words = [
        "the",
        "cat",
        "sat",
        "on",
        "mat",
        ".",
        "dog",
        "ran",
        "to",
        "red",
        "house",
        "where",
        "did",
        "?",
        "who",
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def _squad(tmp_path, answer_start=None):
    start = CONTEXT.index("red house") if answer_start is None else answer_start
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "where did the dog ran to ?", "answers": [{"text": "red house", "answer_start": start}]},
        {"id": "q2", "question": "who sat ?", "answers": [{"text": "cat", "answer_start": 4}]},
    ]}]}]}  # fmt: skip
    f = tmp_path / "dev.json"
    f.write_text(json.dumps(data))
    return f


def test_read_squad_and_round_trip(tmp_path):
    ex = qa.read_qa_file(_squad(tmp_path))
    assert [e["id"] for e in ex] == ["q1", "q2"] and ex[0]["answers"]["text"] == ["red house"]
    again = qa.squad_examples(qa.to_squad(ex), "x")
    assert again == ex
    flat = tmp_path / "dev.jsonl"
    flat.write_text("\n".join(json.dumps(e) for e in ex) + "\n")
    assert qa.read_qa_file(flat) == ex


def test_malformed_squad_names_file_and_place(tmp_path):
    with pytest.raises(
        DataError, match=r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\].*not at answer_start"
    ):
        qa.read_qa_file(_squad(tmp_path, answer_start=3))
    f = tmp_path / "broken.json"
    f.write_text('{"data": [\n{"title": }\n]}')
    with pytest.raises(DataError, match=r"broken\.json:2: invalid JSON"):
        qa.read_qa_file(f)
    f = tmp_path / "broken.jsonl"
    f.write_text(
        json.dumps(
            {"id": 1, "question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": [0]}}
        )
    )
    with pytest.raises(DataError, match=r"broken\.jsonl:1: question '1'"):
        qa.read_qa_file(f)


def test_windows_label_the_answer_and_postprocess_recovers_it(tokenizer, tmp_path):
    ex = qa.read_qa_file(_squad(tmp_path))
    train = qa.encode(ex, tokenizer, max_length=40, doc_stride=16, train=True)
    assert len(train) > 4 and all(len(f["input_ids"]) <= 40 for f in train)
    hits = [f for f in train if f["start_positions"] > 0]
    assert hits, "some window must contain each answer"
    for f in hits:
        span = tokenizer.decode(f["input_ids"][f["start_positions"] : f["end_positions"] + 1])
        assert span in ("red house", "cat")
    assert any(f["start_positions"] == 0 for f in train)  # windows without the answer point at CLS
    assert all(f["global_attention_mask"][0] == 1 for f in train)
    # Logits that peak on the gold span of one window: postprocessing returns the answer text.
    feats = qa.encode(ex, tokenizer, max_length=40, doc_stride=16, train=False)
    starts, ends = [], []
    for f, t in zip(feats, train):
        s, e = [0.0] * len(f["input_ids"]), [0.0] * len(f["input_ids"])
        if t["start_positions"] > 0:
            s[t["start_positions"]] += 5.0
            e[t["end_positions"]] += 5.0
        starts.append(s)
        ends.append(e)
    preds = qa.postprocess(ex, feats, starts, ends, n_best=5, max_answer_length=10)
    assert preds == {"q1": "red house", "q2": "cat"}
    assert qa.compute_metrics(ex, preds) == {"exact_match": 100.0, "f1": 100.0}
    short = qa.postprocess(ex, feats, starts, ends, n_best=5, max_answer_length=1)
    assert short["q1"] != "red house"  # two tokens exceed max_answer_length


def test_hotpotqa_and_triviaqa_converters():
    hotpot = [
        {"_id": "h1", "question": "which city?", "answer": "Paris",
         "context": [["France", ["France is a country. ", "Its capital is Paris."]], ["X", ["Nothing."]]]},
        {"id": "h2", "question": "same?", "answer": "yes",
         "context": {"title": ["A"], "sentences": [["A is B."]]}},
        {"_id": "h3", "question": "lost?", "answer": "Rome", "context": [["A", ["No city."]]]},
    ]  # fmt: skip
    ex, skipped = qa.convert_hotpotqa(hotpot)
    assert skipped == 1 and [e["id"] for e in ex] == ["h1", "h2"]
    for e in ex:
        s, t = e["answers"]["answer_start"][0], e["answers"]["text"][0]
        assert e["context"][s : s + len(t)] == t
    trivia = [{"question_id": "t1", "question": "q?", "answer": {"value": "Big Apple", "aliases": ["NYC", "New York"]},
               "entity_pages": {"wiki_context": ["New York is large. NYC again."]},
               "search_results": {"search_context": []}}]  # fmt: skip
    ex, skipped = qa.convert_triviaqa(trivia)
    assert skipped == 0 and ex[0]["answers"]["text"] == ["NYC", "New York"]
    assert ex[0]["aliases"] == ["Big Apple", "NYC", "New York"]
    assert qa.compute_metrics(ex, {"t1": "big apple"})["exact_match"] == 100.0  # any alias counts


def test_triviaqa_original_format_reads_its_evidence_or_names_the_flag(tmp_path):
    """TriviaQA's own JSON (`Data`, `EntityPages` naming files): read through --evidence-dir; without it, or
    with a file missing there, a user error naming --evidence-dir and the question (was a bare ValueError /
    FileNotFoundError traceback from `etkd finetune --task triviaqa`)."""
    data = {"Data": [{"QuestionId": "t1", "Question": "Who was chancellor?",
                      "Answer": {"Value": "Angela Merkel", "Aliases": ["Merkel"]},
                      "EntityPages": [{"Filename": "Merkel.txt"}], "SearchResults": []}]}  # fmt: skip
    f = tmp_path / "tqa.json"
    f.write_text(json.dumps(data))
    (tmp_path / "ev" / "wikipedia").mkdir(parents=True)
    (tmp_path / "ev" / "wikipedia" / "Merkel.txt").write_text("Angela Merkel was chancellor of Germany.")
    ex = qa.read_qa_file(f, "triviaqa", tmp_path / "ev")
    assert ex[0]["answers"] == {"text": ["Angela Merkel", "Merkel"], "answer_start": [0, 7]}
    with pytest.raises(DataError, match="tqa.json: triviaqa question 't1': .*give --evidence-dir"):
        qa.read_qa_file(f, "triviaqa")
    (tmp_path / "ev" / "wikipedia" / "Merkel.txt").unlink()
    with pytest.raises(DataError, match="evidence file .*Merkel.txt not found .*--evidence-dir"):
        qa.read_qa_file(f, "triviaqa", tmp_path / "ev")
