"""`etkd finetune` / `etkd evaluate` end to end on a tiny model: a learnable GLUE-style task beats chance
clearly; NER and QA run through training, windowing and evaluation; results JSONs are written."""

import json
import os
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


def _write_keyword_sets(tmp_path, **sizes: int) -> None:
    """tmp_path/<name>.jsonl of `_keyword_rows` per name=size, from one seeded generator (in the order given)."""
    rng = random.Random(0)
    for name, n in sizes.items():
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in _keyword_rows(n, rng)) + "\n"
        )


def test_glue_keyword_task_beats_chance_and_evaluate_agrees(model_dir, tmp_path, capsys):
    _write_keyword_sets(tmp_path, train=256, dev=96)
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


def test_config_file_and_bad_data(model_dir, tmp_path, capsys):
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\ngood\t1\nbroken line\n")
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"task: sst2\nmodel: {model_dir}\nmax_steps: 2\n")
    args = ["finetune", "--config", str(cfg), "--train-file", str(tmp_path / "bad.tsv"), "--no-progress"]
    assert main(args) == 2
    assert "bad.tsv:3" in capsys.readouterr().err
    cfg.write_text("task: sst2\nmax_stepz: 2\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    assert "unknown settings ['max_stepz']" in capsys.readouterr().err


def _ner_lines(rng, n, docstart_every=0):
    tag = {"john": "B-PER", "mary": "B-PER", "paris": "B-LOC", "london": "B-LOC"}
    lines = []
    for i in range(n):
        if docstart_every and i % docstart_every == 0:
            lines += ["-DOCSTART- O", ""]
        ws = [rng.choice(WORDS[:18]) for _ in range(rng.randint(3, 12))]
        lines += [f"{w} {tag.get(w, 'O')}" for w in ws] + [""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, model_dir):
    """The tiny model with dropout on and no task head, so a run draws a fresh head and dropout masks."""
    import shutil

    from etkd.models import EncoderModel

    d = tmp_path_factory.mktemp("tiny_dropout")
    m = EncoderModel.from_pretrained(model_dir)
    new = EncoderModel(m.config.replace(hidden_dropout=0.1, attention_dropout=0.1))
    new.load_state_dict(m.state_dict())
    new.save_pretrained(d)
    for f in os.listdir(model_dir):
        if f not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(model_dir, f), d / f)
    return str(d)


def test_named_splits_reach_the_report_and_same_seed_gives_same_bits(dropout_model_dir, tmp_path):
    """Issue 20: two identical runs give identical weights, losses and metrics; `etkd report` shows the
    split-suffixed metrics of a real run (per split, with retention)."""
    rng = random.Random(5)
    for name, n in (("train", 48), ("dev", 16), ("test", 16)):
        (tmp_path / f"{name}.txt").write_text(_ner_lines(rng, n))
    results = {}
    for name, teacher in (("student", "teacher"), ("teacher", None)):
        out = tmp_path / name
        args = ["finetune", "--task", "conll2003", "--model", dropout_model_dir, "--train-file",
                str(tmp_path / "train.txt"), "--eval-file", f"dev={tmp_path / 'dev.txt'}",
                "--eval-file", f"test={tmp_path / 'test.txt'}", "--name", name]  # fmt: skip
        args += ["--teacher", teacher] if teacher else []
        assert main(args + _common(output_dir=out, max_steps=12, seed=7, log_every=1)) == 0
        results[name] = json.loads((out / "eval_results.json").read_text())
    a, b = tmp_path / "student", tmp_path / "teacher"
    assert (a / "model" / "model.safetensors").read_bytes() == (
        b / "model" / "model.safetensors"
    ).read_bytes()
    assert (a / "log.jsonl").read_text().count("loss") == 12
    losses = [[json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == losses[1]
    assert results["student"]["metrics"] == results["teacher"]["metrics"]
    m = results["student"]["metrics"]
    assert {"f1_dev", "f1_test", "f1_PER_test"} <= set(m)
    assert results["student"]["splits"]["test"]["f1"] == m["f1_test"]

    rep = tmp_path / "rep"
    assert (
        main(["report", str(a / "eval_results.json"), str(b / "eval_results.json"), "--out-dir", str(rep)])
        == 0
    )
    md = (rep / "report.md").read_text()
    row = f"| student | {m['f1_PER_test']:.1f} | - | {m['f1_LOC_test']:.1f} | - | {m['f1_test']:.1f} |"
    assert "(test split)" in md and row in md, md
    assert "| student / teacher | 100.0% |" in md
    assert main(["report", str(a / "eval_results.json"), "--split", "dev", "--out-dir", str(rep)]) == 0
    assert f"| {m['f1_dev']:.1f} |" in (rep / "report.md").read_text()


def test_ner_document_unit_needs_docstart_or_grouping(model_dir, tmp_path, capsys):
    rng = random.Random(2)
    (tmp_path / "ner.txt").write_text(_ner_lines(rng, 24))
    args = ["finetune", "--task", "conll2003", "--model", model_dir, "--train-file", str(tmp_path / "ner.txt"),
            "--eval-file", str(tmp_path / "ner.txt"), "--max-length", "32", "--ner-unit", "document"]  # fmt: skip
    assert main(args + _common(output_dir=tmp_path / "r1", max_steps=2)) == 2
    err = capsys.readouterr().err
    assert (
        "ner.txt: --ner-unit document: the file has no -DOCSTART- line" in err
        and "--ner-group-sentences" in err
    )
    assert main(args + ["--ner-group-sentences", "4"] + _common(output_dir=tmp_path / "r2", max_steps=2)) == 0
    res = json.loads((tmp_path / "r2" / "eval_results.json").read_text())
    assert res["eval_sets"]["eval"]["num_examples"] == 6  # 24 sentences in documents of 4


def test_windowed_documents_do_not_warn_about_length(model_dir, tmp_path, capfd):
    """We window long documents on purpose: transformers' "Token indices sequence length is longer than
    the specified maximum" warning must not appear (finetune and data-stats)."""
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 16
    tok.save_pretrained(tok_dir)
    rng = random.Random(4)
    (tmp_path / "ner.txt").write_text(_ner_lines(rng, 24, docstart_every=6))
    args = ["finetune", "--task", "conll2003", "--model", model_dir, "--tokenizer", str(tok_dir),
            "--train-file", str(tmp_path / "ner.txt"), "--eval-file", str(tmp_path / "ner.txt"),
            "--ner-unit", "document", "--max-length", "16"]  # fmt: skip
    assert main(args + _common(output_dir=tmp_path / "r", max_steps=2)) == 0
    assert main(["data-stats", str(tmp_path / "ner.txt"), "--tokenizer", str(tok_dir), "--ner-unit", "document",
                 "--out-dir", str(tmp_path / "stats")]) == 0  # fmt: skip
    captured = capfd.readouterr()
    assert "Token indices sequence length" not in captured.err + captured.out


def test_ner_labels_come_from_a_token_classification_checkpoint_only(tmp_path):
    """A classifier checkpoint's labels ("0", "1") are not tags: NER on top of it takes its tags from the data;
    an NER checkpoint keeps its own tag list (and order) so its head is reused."""
    from etkd.distill.finetune import labels_for

    examples = [[{"tokens": ["a", "b"], "tags": ["B-PER", "O"]}]]
    from_data = labels_for("conll2003", None, examples)
    assert "B-PER" in from_data and "0" not in from_data
    for head, saved, want in (
        ("sequence_classification", ["0", "1"], from_data),
        ("token_classification", ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], None),
    ):
        folder = tmp_path / head
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"head": head, "extra": {"labels": saved}}))
        got = labels_for("conll2003", str(folder), examples)
        assert got == (want or saved), (head, got)


def test_global_prefix_marks_cls_and_the_first_tokens_but_never_padding():
    import torch

    from etkd.distill.finetune import make_collate

    feats = [
        {"input_ids": [2, 7, 8, 9, 3], "attention_mask": [1] * 5},
        {"input_ids": [2, 7, 3], "attention_mask": [1] * 3},
    ]
    g = make_collate(0, True, global_prefix=3)(feats)["global_attention_mask"]
    assert g.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert make_collate(0, True)(feats)["global_attention_mask"][:, 1:].sum() == 0  # [CLS] only by default
    assert "global_attention_mask" not in make_collate(0, False, global_prefix=3)(
        feats
    )  # no global attention
    assert torch.equal(make_collate(0, True, 0)(feats)["input_ids"][1], torch.tensor([2, 7, 3, 0, 0]))


def test_global_prefix_on_a_model_without_global_tokens_is_reported(model_dir, caplog):
    """No silent no-op: a full-attention model cannot take --global-prefix, and the run says so."""
    import logging

    from etkd.distill.finetune import collate_for
    from etkd.models import EncoderModel

    model = EncoderModel.from_pretrained(model_dir)
    tok = type("Tok", (), {"pad_token_id": 0})()
    with caplog.at_level(logging.WARNING, logger="etkd"):
        collate = collate_for(model, tok, {"global_prefix": 4})
    assert "--global-prefix 4: ignored" in caplog.text
    assert "global_attention_mask" not in collate([{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="etkd"):
        collate_for(model, tok, {"global_prefix": 0})
    assert "global-prefix" not in caplog.text


def test_eval_file_names_must_differ_and_a_directory_is_not_a_file(model_dir, tmp_path, capsys):
    rng = random.Random(0)
    for name in ("train", "a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in _keyword_rows(8, rng)) + "\n"
        )
    base = ["finetune", "--task", "sst2", "--model", model_dir, "--train-file", str(tmp_path / "train.jsonl")]
    common = _common(output_dir=tmp_path / "run", max_steps=1)
    dup = ["--eval-file", f"dev={tmp_path / 'a.jsonl'}", "--eval-file", f"dev={tmp_path / 'b.jsonl'}"]
    assert main(base + dup + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-file dev=" in err[0] and "'dev' is already given" in err[0], err
    assert main(base + ["--eval-file", str(tmp_path)] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}: is a directory; expected a data file" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_limit_cuts_finetunes_training_set_only_and_evaluates_sets(model_dir, tmp_path):
    """`finetune --limit N` trains on N examples and still scores the whole evaluation sets (a fast run must
    not report another test score); `evaluate --limit N` is the quick check on N examples of every set."""
    _write_keyword_sets(tmp_path, train=40, dev=24)
    out = tmp_path / "run"
    args = ["finetune", "--task", "sst2", "--model", model_dir, "--train-file", str(tmp_path / "train.jsonl"),
            "--eval-file", str(tmp_path / "dev.jsonl"), "--limit", "8"]  # fmt: skip
    assert main(args + _common(output_dir=out, max_steps=2, batch_size=4)) == 0
    res = json.loads((out / "eval_results.json").read_text())
    assert res["eval_sets"]["eval"]["num_examples"] == 24, res["eval_sets"]
    state = json.loads((out / "settings.json").read_text())
    assert state["limit"] == 8
    ev = tmp_path / "ev.json"
    assert main(["evaluate", "--task", "sst2", "--model", str(out / "model"), "--eval-file",
                 str(tmp_path / "dev.jsonl"), "--limit", "5", "--output", str(ev)]) == 0  # fmt: skip
    assert json.loads(ev.read_text())["eval_sets"]["eval"]["num_examples"] == 5


def test_qa_doc_stride_that_leaves_no_window_is_a_user_error_before_training(model_dir, tmp_path, capsys):
    """--doc-stride must be less than a window's context tokens (--max-length - the longest question - special
    tokens): said in one line naming the flags before training, not as the tokenizer's traceback."""
    ctx = "john sat on the mat . " * 4 + "mary ran to paris ."
    data = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": f"q{i}", "question": "where ?", "answers": [{"text": "paris", "answer_start": ctx.index("paris")}]}
        for i in range(4)]}]}]}  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps(data))
    base = ["finetune", "--task", "squad", "--model", model_dir, "--train-file", str(tmp_path / "squad.json"),
            "--max-length", "32"]  # fmt: skip
    out = tmp_path / "run"
    assert (
        main(base + ["--doc-stride", "27"] + _common(output_dir=out, max_steps=1, batch_size=4)) == 2
    )  # 32-2-3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--doc-stride 27: expected less than a window's context tokens" in err[0], err
    assert "= 27" in err[0] and not (out / "checkpoints").exists()
    assert (
        main(
            base + ["--doc-stride", "26", "--overwrite"] + _common(output_dir=out, max_steps=1, batch_size=4)
        )
        == 0
    )
