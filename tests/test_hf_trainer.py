"""A patched LongformerForTokenClassification fine-tuned with transformers' Trainer, end to end: its loss curve
equals the unpatched model's step for step (same seed, same data, hidden dropout on), and the saved
checkpoint loads back into plain HF with the same weights (pipeline: tests/test_hf_minilm.py). With attention
dropout 0.1 (HF's default) it trains without refusal, and (slow) its loss curve matches the unpatched run's
statistically: the masks come from different RNGs, so the curves can only agree in distribution."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import etkd.hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 6


class TokenData(torch.utils.data.Dataset):
    """Token labels id % 4 (learnable token by token), or with context=True 2 * (parity of the token two
    places back) + own parity: learnable only through attention, so attention dropout shows in the loss."""

    def __init__(self, n: int = 24, seq: int = 40, context: bool = False):
        g = torch.Generator().manual_seed(5)
        self.rows = []
        for i in range(n):
            length = seq - (i % 3) * 7  # three lengths: the collator pads, with global <s>
            ids = torch.randint(5, 99, (length,), generator=g)
            ids[0] = 0
            labels = ids % 4
            if context:
                labels = 2 * (ids.roll(2) % 2) + ids % 2
                labels[:2] = -100
            self.rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    seq = max(len(r["input_ids"]) for r in rows)
    ids = torch.ones(len(rows), seq, dtype=torch.long)  # pad id 1
    labels = torch.full((len(rows), seq), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
    mask = (ids != 1).long()
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob, "labels": labels}


def train(model, out_dir, steps: int = STEPS, seed: int = 7, data: TokenData | None = None) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    data = TokenData() if data is None else data
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def longformer_config(attention_dropout: float):
    return transformers.LongformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
        max_position_embeddings=64, pad_token_id=1, attention_window=8, num_labels=4,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=attention_dropout,
    )  # fmt: skip


def test_trainer_loss_curve_matches_unpatched(tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.LongformerForTokenClassification(longformer_config(0.0))
    ours = etkd.hf.patch(copy.deepcopy(hf_model))
    ref = train(hf_model, tmp_path / "hf")
    got = train(ours, tmp_path / "etkd")
    assert len(ref) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step + 1}: patched loss {a} vs HF {b}"
    assert ref[-1] < ref[0]  # it trains
    assert etkd.hf.is_patched(ours)
    ours.save_pretrained(tmp_path / "saved")
    back = transformers.LongformerForTokenClassification.from_pretrained(tmp_path / "saved")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_trainer_with_attention_dropout_trains_without_refusal(tmp_path):
    torch.manual_seed(0)
    model = etkd.hf.patch(transformers.LongformerForTokenClassification(longformer_config(0.1)))
    losses = train(model, tmp_path)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


# Slow: the statistical comparison. Per seed s (model init, data order, Trainer seed): LONG_STEPS steps of the
# HF model and of the patched copy, attention dropout 0.1 and hidden dropout 0.1, on labels that need attention
# (TokenData(context=True)); the figure of a run is its mean training loss over the last LAST steps. Runs of
# one seed share init and data order, so the comparison is paired: the patched-minus-HF difference, averaged
# over seeds, must lie within 3 standard errors of 0. A control (patched, attention dropout 0: what
# `ignore_attention_dropout=True` used to train) is printed beside it, to show how large a missing attention
# dropout is in the same figure.
SEEDS = (0, 1, 2, 3, 4)
LONG_STEPS, LAST = 120, 40


def _tail_mean(model, out_dir, seed: int) -> float:
    losses = train(model, out_dir, steps=LONG_STEPS, seed=seed, data=TokenData(n=96, context=True))
    assert len(losses) == LONG_STEPS
    return statistics.fmean(losses[-LAST:])


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5


@pytest.mark.slow
def test_trainer_with_attention_dropout_matches_unpatched_statistically(tmp_path):
    runs: dict[str, list[float]] = {"hf": [], "etkd": [], "control": []}
    for seed in SEEDS:
        torch.manual_seed(seed)
        hf_model = transformers.LongformerForTokenClassification(longformer_config(0.1))
        control = transformers.LongformerForTokenClassification(longformer_config(0.0))
        control.load_state_dict(hf_model.state_dict())
        ours = etkd.hf.patch(copy.deepcopy(hf_model))
        runs["hf"].append(_tail_mean(hf_model, tmp_path / f"hf{seed}", seed))
        runs["etkd"].append(_tail_mean(ours, tmp_path / f"etkd{seed}", seed))
        runs["control"].append(_tail_mean(etkd.hf.patch(control), tmp_path / f"control{seed}", seed))
    diff, se = _paired(runs["etkd"], runs["hf"])
    c_diff, c_se = _paired(runs["control"], runs["hf"])
    report = (
        f"mean training loss over steps {LONG_STEPS - LAST + 1}-{LONG_STEPS}, seeds {SEEDS}: "
        + "; ".join(
            f"{k} {statistics.fmean(v):.4f} +- {statistics.stdev(v):.4f} ({', '.join(f'{x:.4f}' for x in v)})"
            for k, v in runs.items()
        )
        + f"; paired etkd - hf {diff:+.4f} +- {se:.4f} (SE); control - hf {c_diff:+.4f} +- {c_se:.4f}"
    )
    print("\n" + report)
    assert abs(diff) <= 3 * se, f"patched vs HF: {report}"
