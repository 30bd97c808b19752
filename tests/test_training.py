"""The shared training loop: loss falls, exact resume after a kill, gradient accumulation, 2-process runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from etkd.distill.training import ShardedBatches, TrainConfig, latest_checkpoint, linear_schedule, train
from etkd.models.config import EncoderConfig
from etkd.models.encoder import EncoderModel

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlm(seed: int = 0, layers: int = 2) -> EncoderModel:
    torch.manual_seed(seed)
    cfg = EncoderConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64,
        max_positions=64, head="mlm",
    )  # fmt: skip
    return EncoderModel(cfg)


def make_data(n: int = 64, seq: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Sequences with structure (token i+1 follows token i) so an MLM can learn them."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(5, VOCAB - seq, (n,), generator=g)
    return [{"input_ids": torch.arange(int(s), int(s) + seq)} for s in starts]


def collate(examples):
    """Pads nothing (equal lengths); masks 15% with the global RNG, as the real MLM collator does."""
    ids = torch.stack([e["input_ids"] for e in examples])
    pick = torch.rand(ids.shape) < 0.15
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(pick, torch.full_like(ids, 4), ids), "labels": labels,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip


def mlm_loss(model, batch):
    out = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten())
    return loss, {"mlm": loss.detach()}


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path), max_steps=8, per_device_batch_size=4, learning_rate=3e-3,
                warmup_ratio=0.25, save_every=3, log_every=2, seed=7, progress=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_loss_falls_and_log_written(tmp_path):
    model = tiny_mlm()
    # BERT's 0.02 init starts at ln(64) nats; the neighbour-copy task needs a few hundred tiny steps (~4 s).
    out = train(model, make_data(), mlm_loss, cfg_for(tmp_path, max_steps=300, log_every=50, save_every=0),
                collate_fn=collate)  # fmt: skip
    losses = [r["loss"] for r in out["history"]]
    assert out["step"] == 300 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert all("tokens_per_s" in r and "mlm" in r for r in out["history"])
    with open(tmp_path / "log.jsonl") as f:
        assert len(f.readlines()) == 6
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000300")


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_after_kill_equals_uninterrupted(tmp_path, accum):
    # Uninterrupted reference run.
    ref = tiny_mlm()
    train(ref, make_data(), mlm_loss, cfg_for(tmp_path / "ref", grad_accum_steps=accum), collate_fn=collate)

    # "Killed" after step 5: the last checkpoint is step 3, so steps 4-5 are lost and replayed on resume.
    run = tmp_path / "run"
    first = tiny_mlm()
    out = train(first, make_data(), mlm_loss, cfg_for(run, grad_accum_steps=accum, stop_at_step=5),
                collate_fn=collate)  # fmt: skip
    assert out["step"] == 5 and latest_checkpoint(str(run)).endswith("step_00000003")
    resumed = tiny_mlm(seed=123)  # different init: everything must come from the checkpoint
    out = train(resumed, make_data(), mlm_loss, cfg_for(run, grad_accum_steps=accum, resume=True),
                collate_fn=collate)  # fmt: skip
    assert out["step"] == 8
    torch.testing.assert_close(flat_params(resumed), flat_params(ref), rtol=0, atol=0)


def test_resume_when_finished_is_a_no_op(tmp_path):
    model = tiny_mlm()
    train(model, make_data(), mlm_loss, cfg_for(tmp_path, max_steps=3), collate_fn=collate)
    before = flat_params(model).clone()
    out = train(model, make_data(), mlm_loss, cfg_for(tmp_path, max_steps=3, resume=True), collate_fn=collate)
    assert out["step"] == 3
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)


def test_checkpoints_pruned_and_incomplete_ignored(tmp_path):
    model = tiny_mlm()
    train(
        model, make_data(), mlm_loss, cfg_for(tmp_path, max_steps=9, keep_checkpoints=2), collate_fn=collate
    )
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_00000006", "step_00000009"]
    os.remove(tmp_path / "checkpoints" / "step_00000009" / "trainer_state.json")  # as if killed mid-save
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000006")


def test_sharded_batches_cover_epoch_and_resume():
    data = list(range(10))
    collate_list = lambda xs: xs
    ranks = [ShardedBatches(data, 2, rank=r, world=2, seed=3, collate_fn=collate_list) for r in range(2)]
    epoch0 = [ranks[r].next() for _ in range(2) for r in range(2)]
    seen = sorted(x for b in epoch0 for x in b)
    assert len(set(seen)) == 8  # 2 global batches of 4 distinct examples; the partial tail is dropped
    a = ShardedBatches(data, 2, seed=3, collate_fn=collate_list)
    seq = [a.next() for _ in range(12)]  # crosses epochs
    b = ShardedBatches(data, 2, seed=3, collate_fn=collate_list)
    for _ in range(7):
        b.next()
    c = ShardedBatches(data, 2, seed=3, collate_fn=collate_list)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(5)] == seq[7:]
    # Streams: same contract.
    s = ShardedBatches(iter_dataset(), 3, collate_fn=collate_list)
    got = [s.next() for _ in range(5)]
    assert got[:3] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and got[3] == [0, 1, 2]
    t = ShardedBatches(iter_dataset(), 3, collate_fn=collate_list)
    t.load_state_dict({"epoch": 0, "position": 2})
    assert t.next() == [6, 7, 8]


class iter_dataset(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10))


def test_linear_schedule_and_bad_config():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched, lrs = linear_schedule(opt, 10, 4), []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # lr multiplier per update: n / 5 over 4 warm-up updates, then (10 - step) / 6 down to 0 after update 10
    assert lrs == pytest.approx([2.0 * f for f in (0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6, 4 / 6, 0.5, 2 / 6, 1 / 6)])
    assert opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="less than one global batch"):
        train(tiny_mlm(), make_data(n=2), mlm_loss, TrainConfig(per_device_batch_size=4, progress=False))


def test_runs_with_other_mixed_precision_in_one_process(tmp_path):
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision; `train` starts each run with its own (a notebook, `etkd tune`'s trials, a test session), and a
    finished run's setting does not leak into the next (checked by what each run's autocast gives)."""
    seen = []

    def loss_recording_dtype(model, batch):
        loss, parts = mlm_loss(model, batch)
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss, parts

    for run, precision in enumerate(("no", "bf16", "no")):
        seen.clear()
        out = train(tiny_mlm(), make_data(8), loss_recording_dtype,
                    cfg_for(tmp_path / str(run), max_steps=2, save_every=0, mixed_precision=precision),
                    collate_fn=collate)  # fmt: skip
        assert out["step"] == 2 and seen and set(seen) == {precision == "bf16"}, (precision, seen)


def test_nan_loss_is_a_clear_error(tmp_path):
    def bad_loss(model, batch):
        loss, logs = mlm_loss(model, batch)
        return loss * float("nan"), logs

    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train(tiny_mlm(), make_data(), bad_loss, cfg_for(tmp_path, log_every=1), collate_fn=collate)


TWO_PROC_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_training import tiny_mlm, make_data, collate, mlm_loss, flat_params
    from etkd.distill.training import TrainConfig, train
    model = tiny_mlm()
    out = train(model, make_data(), mlm_loss, TrainConfig(output_dir={out!r}, max_steps=3,
                per_device_batch_size=4, learning_rate=3e-3, save_every=2, progress=False, seed=7),
                collate_fn=collate)
    p = flat_params(model)
    with open({out!r} + f"/rank{{torch.distributed.get_rank()}}.json", "w") as f:
        json.dump({{"sum": p.double().sum().item(), "abs": p.double().abs().sum().item(),
                   "n": out["num_processes"], "step": out["step"]}}, f)
    """
)


def test_two_process_cpu_run_ranks_agree(tmp_path):
    script = tmp_path / "run2.py"
    script.write_text(TWO_PROC_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    # torchrun with gloo; `accelerate launch --multi_gpu --num_processes 2` on a GPU-less machine is the same.
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1 and r0["n"] == 2 and r0["step"] == 3
