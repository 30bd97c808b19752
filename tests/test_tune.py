"""`etkd tune`: population-based training on Ray Tune over `etkd finetune`, 2 trials x 4 steps on a tiny model.

Checks that PBT really exploited (a trial resumed from a byte-identical copy of the other trial's accelerate
checkpoint) and explored (the resumed trial's hyper-parameters differ from the donor's), and that the
outputs exist and `etkd report` reads the best result.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from etkd.distill.cli import main
from etkd.distill.demo import data as demo_data
from etkd.distill.report import load_results
from etkd.distill.training import TrainConfig, train
from etkd.distill.tune import HPARAMS
from etkd.models import EncoderConfig, EncoderModel


@pytest.mark.parametrize("new_hparams", [True, False])
def test_resume_with_new_hparams(tmp_path, new_hparams):
    """What PBT's explore relies on: a resumed run takes the new learning rate and weight decay (and only
    when asked; a plain --resume keeps the checkpoint's)."""
    data = [torch.randn(4) for _ in range(8)]

    def loss_fn(model, batch):
        return model(batch).pow(2).mean(), {}

    def run(lr, wd, **kw):
        torch.manual_seed(0)
        cfg = TrainConfig(output_dir=str(tmp_path), max_steps=4, per_device_batch_size=2, learning_rate=lr,
                          weight_decay=wd, save_every=2, log_every=1, progress=False, **kw)  # fmt: skip
        return train(torch.nn.Linear(4, 1), data, loss_fn, cfg)

    run(1e-3, 0.0, stop_at_step=2)
    out = run(1e-2, 0.05, resume=True, new_hparams_on_resume=new_hparams)
    lrs = {r["step"]: r["lr"] for r in out["history"]}
    # linear decay to 0 at step 4, no warm-up: lr after step 3 = peak * (4 - 3) / 4
    assert lrs[3] == pytest.approx((1e-2 if new_hparams else 1e-3) * 0.25)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    tok = str(d / "tok")
    demo_data.tokenizer(tok)
    train_file = demo_data.write_classification(str(d / "train.jsonl"), n=32, seed=1)
    dev = demo_data.write_classification(str(d / "dev.jsonl"), n=16, seed=2)
    cfg = EncoderConfig(vocab_size=len(demo_data.vocabulary()), hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_positions=66, position_style="padded", pad_token_id=0,
                        attention="full", head="mlm")  # fmt: skip
    torch.manual_seed(0)
    model = str(d / "model")
    EncoderModel(cfg).save_pretrained(model)
    return d, tok, model, train_file, dev


def test_pbt_exploits_and_explores(setup):
    pytest.importorskip("ray.tune")
    d, tok, model, train_file, dev = setup
    out = str(d / "out")
    argv = ["tune", "--out", out, "--population", "2", "--max-steps", "4", "--perturbation-interval", "2",
            "--synch", "--quantile-fraction", "0.5", "--resample-probability", "0", "--num-cpus", "2",
            "--learning-rate", "1e-4", "1e-2", "--batch-size", "4", "8",
            "--", "--task", "sst2", "--model", model, "--tokenizer", tok, "--train-file", train_file,
            "--eval-file", dev, "--seed", "0", "--log-every", "1"]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(out, "tune_results.json")) as f:
        summary = json.load(f)
    assert summary["metric"] == "accuracy" and len(summary["trials"]) == 2
    for t in summary["trials"]:  # every trial reached the end, with a score at every interval
        assert [p["step"] for p in t["curve"]][-1] == 4
    exploits = [(t["trial"], e) for t in summary["trials"] for e in t["exploits"]]
    assert exploits, "PBT never exploited"

    def events(trial):
        with open(os.path.join(out, "trials", trial, "events.jsonl")) as f:
            return [json.loads(line) for line in f]

    checked = 0
    for trial, e in exploits:
        restore = next(
            r for r in events(trial) if r["event"] == "restore" and not r["own"] and r["step"] == e["step"]
        )
        donor = next(r for r in events(e["from_trial"]) if r["event"] == "segment" and r["step"] == e["step"])
        # exploit: the checkpoint the trial resumed from is a byte copy of the donor's at that step
        assert restore["digest"] == restore["source_digest"] == donor["digest"]
        # explore: at least one hyper-parameter was perturbed away from the donor's value
        assert any(restore["config"][h] != donor["config"][h] for h in HPARAMS)
        # and the resumed run trained with it: its next segment reports the new values
        after = next(r for r in events(trial) if r["event"] == "segment" and r["step"] > e["step"])
        assert after["config"] == restore["config"]
        checked += 1
    assert checked >= 1

    with open(os.path.join(out, "best_config.json")) as f:
        assert set(json.load(f)) == set(HPARAMS)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    results = load_results([os.path.join(out, "best")])
    assert [(r.model, r.task) for r in results] == [("pbt-best", "sst2")]
    assert any("accuracy" in m for m in results[0].splits.values())
    assert main(["report", os.path.join(out, "best"), "--out-dir", str(d / "report")]) == 0


def test_bad_arguments(setup):
    d, tok, model, _, _ = setup
    with pytest.raises(ValueError, match="--learning-rate"):
        main(
            [
                "tune",
                "--out",
                str(d / "x"),
                "--",
                "--task",
                "sst2",
                "--model",
                model,
                "--learning-rate",
                "1e-3",
            ]
        )
    with pytest.raises(ValueError, match="population"):
        main(["tune", "--out", str(d / "x"), "--population", "1", "--", "--task", "sst2", "--model", model])
