"""Throughput of one `etkd distill` training step (student forward + backward + AdamW, teacher forward) at
MiniLM-L6 size: a 6-layer H384 BERT teacher (vocab 30,522) and its 3-layer every-other-layer student.

    python -m etkd.benchmarks.distill_step                        # 128 tokens, batch 16, 2 threads, --beta 0
    python -m etkd.benchmarks.distill_step --beta 5 --kd-masked-only --teacher-precision bf16

Random weights and token ids (the cost does not depend on them); 15% of the real tokens are masked as
`etkd distill`'s collator does. The step is the driver's own loss (`distill.make_loss`), so the figure is what
`etkd distill` spends per optimizer step, without data loading. Prints tokens/s (median wall time of the timed
steps) and tokens per CPU-second (process time over every step, all threads: on a machine shared with other
work, the wall time measures the other work too, the CPU time much less so) with the environment.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import harness


def minilm_teacher(layers: int = 6, vocab: int = 30522):
    from etkd.models import EncoderConfig, EncoderModel

    cfg = EncoderConfig(vocab_size=vocab, hidden_size=384, num_layers=layers, num_heads=12, intermediate_size=1536,
                        max_positions=512, type_vocab_size=2, attention="full", head="mlm")  # fmt: skip
    return EncoderModel(cfg)


def masked_batch(batch: int, seq: int, vocab: int, p: float = 0.15, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    chosen = torch.rand(batch, seq, generator=g) < p
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {
        "input_ids": torch.where(chosen, torch.full_like(ids, 4), ids),
        "attention_mask": mask,
        "labels": labels,
    }


def measure(spec: dict) -> dict:
    from etkd.benchmarks.harness import environment, time_call
    from etkd.distill.distill import make_loss
    from etkd.models import make_student

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    teacher = minilm_teacher(spec["layers"]).eval().requires_grad_(False)
    student = make_student(teacher).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ns = argparse.Namespace(alpha=2.0, beta=spec["beta"], gamma=1.0, temperature=2.0,
                            kd_masked_only=spec["kd_masked_only"], teacher_precision=spec["teacher_precision"])  # fmt: skip
    step_loss = make_loss(teacher, ns)
    batch = masked_batch(spec["batch"], spec["seq"], teacher.config.vocab_size)

    def step():
        loss, _ = step_loss(student, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cpu0 = time.process_time()
    t = time_call(step, repeats=spec["repeats"], warmup=2)
    cpu = (time.process_time() - cpu0) / (spec["repeats"] + 2)  # CPU seconds per step, every thread
    tokens = spec["batch"] * spec["seq"]
    return {**spec, "median_s": t.median, "tokens_per_s": tokens / t.median, "cpu_s_per_step": cpu,
            "tokens_per_cpu_s": tokens / cpu, "environment": environment().line()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    helps = {"layers": "teacher layers (the student keeps every other)"}
    p = harness.parser(__doc__, helps, layers=6, seq=128, batch=16, threads=2, repeats=10)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--kd-masked-only", action="store_true")
    p.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args(argv)
    print(json.dumps(measure(vars(a))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
