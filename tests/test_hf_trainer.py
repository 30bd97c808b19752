"""A patched LongformerForTokenClassification fine-tuned with transformers' Trainer, end to end: its loss curve
equals the unpatched model's step for step (same seed, same data, hidden dropout on), and the saved
checkpoint loads back into plain HF with the same weights (pipeline: tests/test_hf_minilm.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import etkd.hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 6


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seq: int = 40):
        g = torch.Generator().manual_seed(5)
        self.rows = []
        for i in range(n):
            length = seq - (i % 3) * 7  # three lengths: the collator pads, with global <s>
            ids = torch.randint(5, 99, (length,), generator=g)
            ids[0] = 0
            self.rows.append({"input_ids": ids.tolist(), "labels": (ids % 4).tolist()})

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


def train(model, out_dir) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=7, data_seed=7,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_loss_curve_matches_unpatched(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
        max_position_embeddings=64, pad_token_id=1, attention_window=8, num_labels=4,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    hf_model = transformers.LongformerForTokenClassification(cfg)
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
