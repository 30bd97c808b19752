"""`etkd finetune` / `etkd evaluate` end to end on a tiny model: a learnable GLUE-style task beats chance
clearly; NER and QA run through training, windowing and evaluation; results JSONs are written."""

import json
import random

import pytest

pytest.importorskip("accelerate")
from etkd.distill.cli import main  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "good", "bad", "big", "red", "tree", "house",
         "paris", "london", "john", "mary", "?", "where", "who"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import BertTokenizer

    from etkd.models import EncoderConfig, EncoderModel

    torch.manual_seed(0)  # module-scoped: do not depend on which tests ran before
    d = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    cfg = EncoderConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_positions=64, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    EncoderModel(cfg).save_pretrained(d)
    return str(d)


def _keyword_rows(n, rng):
    rows = []
    for _ in range(n):
        ws = [rng.choice([w for w in WORDS[:14] if w != "good"]) for _ in range(rng.randint(3, 10))]
        label = int(rng.random() < 0.5)
        if label:
            ws[rng.randrange(len(ws))] = "good"
        rows.append({"sentence": " ".join(ws), "label": label})
    return rows


def _common(**kw):
    """Tiny-model training options; keyword arguments add or override (argparse keeps the last value)."""
    args = ["--batch-size", "16", "--learning-rate", "1e-3", "--log-every", "10", "--no-progress",
            "--save-every", "0", "--warmup-ratio", "0"]  # fmt: skip
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_glue_keyword_task_beats_chance_and_evaluate_agrees(model_dir, tmp_path, capsys):
    rng = random.Random(0)
    for name, n in (("train", 256), ("dev", 96)):
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in _keyword_rows(n, rng)) + "\n"
        )
    out = tmp_path / "run"
    args = ["finetune", "--task", "sst2", "--model", model_dir, "--train-file", str(tmp_path / "train.jsonl"),
            "--eval-file", str(tmp_path / "dev.jsonl"), "--name", "tiny"]  # fmt: skip
    assert main(args + _common(output_dir=out, max_steps=100, learning_rate="2e-3")) == 0
    res = json.loads((out / "eval_results.json").read_text())
    assert res["task"] == "sst2" and res["model"] == "tiny"
    assert res["metrics"]["accuracy"] > 80.0, res  # chance is ~50
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints").is_dir()
    # evaluate the saved model: same numbers
    ev = tmp_path / "ev.json"
    assert main(["evaluate", "--task", "sst2", "--model", str(out / "model"), "--eval-file",
                 str(tmp_path / "dev.jsonl"), "--output", str(ev)]) == 0  # fmt: skip
    assert json.loads(ev.read_text())["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])


def test_ner_and_qa_pipelines_run(model_dir, tmp_path):
    rng = random.Random(1)
    tag = {"john": "B-PER", "mary": "B-PER", "paris": "B-LOC", "london": "B-LOC"}
    lines = []
    for _ in range(40):
        ws = [rng.choice(WORDS[:18]) for _ in range(rng.randint(3, 30))]  # some longer than max_length
        lines += [f"{w} {tag.get(w, 'O')}" for w in ws] + [""]
    (tmp_path / "ner.txt").write_text("\n".join(lines))
    out = tmp_path / "ner_run"
    assert main(["finetune", "--task", "conll2003", "--model", model_dir, "--train-file", str(tmp_path / "ner.txt"),
                 "--eval-file", str(tmp_path / "ner.txt"), "--max-length", "16", "--ner-stride", "4"]
                + _common(output_dir=out, max_steps=10)) == 0  # fmt: skip
    m = json.loads((out / "eval_results.json").read_text())["metrics"]
    assert {"f1", "precision", "recall", "f1_PER", "f1_LOC", "accuracy"} <= set(m), m

    ctx = "john sat on the mat . " * 8 + "mary ran to paris . " + "the dog sat . " * 8
    data = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": f"q{i}", "question": "where ?", "answers": [{"text": "paris", "answer_start": ctx.index("paris")}]}
        for i in range(16)]}]}]}  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps(data))
    out = tmp_path / "qa_run"
    assert main(["finetune", "--task", "squad", "--model", model_dir, "--train-file", str(tmp_path / "squad.json"),
                 "--eval-file", str(tmp_path / "squad.json"), "--max-length", "32", "--doc-stride", "8"]
                + _common(output_dir=out, max_steps=5)) == 0  # fmt: skip
    res = json.loads((out / "eval_results.json").read_text())
    assert set(res["metrics"]) == {"exact_match", "f1"} and res["eval_sets"]["eval"]["num_examples"] == 16


def test_config_file_and_bad_data(model_dir, tmp_path):
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\ngood\t1\nbroken line\n")
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"task: sst2\nmodel: {model_dir}\nmax_steps: 2\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:3"):
        main(["finetune", "--config", str(cfg), "--train-file", str(tmp_path / "bad.tsv"), "--no-progress"])
    cfg.write_text("task: sst2\nmax_stepz: 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        main(["finetune", "--config", str(cfg)])
