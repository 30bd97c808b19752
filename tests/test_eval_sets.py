"""Evaluation sets named on the command line (`--eval-file [NAME=]FILE`, repeatable): one parser
(`distill.core.named_values`) for `finetune`/`evaluate` and `kd-task`, the same names in their results."""

from __future__ import annotations

import json

import pytest
import torch
from test_data import WORDS, generated_text, make_tokenizer_dir

from etkd.distill.cli import main
from etkd.distill.core import named_values
from etkd.distill.errors import UserError
from etkd.models import EncoderConfig, EncoderModel

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_named_values():
    assert named_values(["dev.jsonl"], "--eval-file") == [("", "dev.jsonl")]
    assert named_values(["a.jsonl", "b.jsonl"], "--eval-file") == [("0", "a.jsonl"), ("1", "b.jsonl")]
    assert named_values(["dev=d.jsonl", "test=t.jsonl"], "--eval-file") == [
        ("dev", "d.jsonl"),
        ("test", "t.jsonl"),
    ]
    assert named_values(["runs/a=b.jsonl"], "--eval-file") == [("", "runs/a=b.jsonl")]  # a path, not a name
    with pytest.raises(UserError, match="--eval-file dev=b: the name 'dev' is already given to a"):
        named_values(["dev=a", "dev=b"], "--eval-file")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_kd_task_takes_named_eval_files(tmp_path):
    """`kd-task --eval-file dev=... --eval-file test=...` scores each set (accuracy_dev, accuracy_test) and picks
    "best" on the first; an unnamed single file keeps the plain `accuracy` key."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    cfg = EncoderConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, max_positions=64, head="mlm")  # fmt: skip
    EncoderModel(cfg).save_pretrained(str(teacher))
    make_tokenizer_dir(teacher)
    texts = generated_text(40, seed=5)
    rows = [{"text": t, "label": "animal" if ("cat" in t or "dog" in t) else "other"} for t in texts]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    dev, test = (
        write_jsonl(tmp_path / "dev.jsonl", rows[24:32]),
        write_jsonl(tmp_path / "test.jsonl", rows[32:]),
    )
    base = ["kd-task", "--teacher", str(teacher), "--train-file", train, "--batch-size",
            "8", "--max-length", "24", "--max-steps", "2", "--no-progress", "--save-every", "0"]  # fmt: skip
    out = tmp_path / "named"
    assert (
        main([*base, "--eval-file", f"dev={dev}", "--eval-file", f"test={test}", "--output-dir", str(out)])
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert {"accuracy_dev", "accuracy_test"} <= set(run) and "accuracy" not in run, run
    assert res["metric"] == "accuracy_dev" and res["best"] == run
    out = tmp_path / "plain"
    assert main([*base, "--eval-file", dev, "--output-dir", str(out)]) == 0
    assert "accuracy" in json.loads((out / "results.json").read_text())["runs"][0]
