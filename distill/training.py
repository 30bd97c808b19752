"""The one training loop every driver uses: `train(model, data, loss_fn, TrainConfig(...))` on `accelerate`.

The same call runs on one CPU, one GPU, or N processes (`accelerate launch` / `torchrun`): AdamW with
linear warmup + linear decay, gradient accumulation, mixed precision, a tqdm bar with loss and tokens/s,
periodic checkpoints and exact resume.

Exact resume: batches come from our own deterministic, rank-sharded loader (not a prefetching DataLoader),
so the global RNG is consumed in a fixed order: collate (masking) -> forward (dropout) -> step. A checkpoint
(`accelerator.save_state`: model, optimizer, scheduler, every RNG per rank) plus `trainer_state.json`
(step, data position) taken after step N therefore lets `resume=True` replay steps N+1... bit for bit, as
if the run had never stopped. `trainer_state.json` is written last, so a checkpoint cut short by a kill is
never picked up. At most `save_every` steps are lost by a kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError

MIXED_PRECISION = ("no", "bf16", "fp16")
CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for `train`. Steps are optimizer steps (each `grad_accum_steps`
    micro-batches of `per_device_batch_size` examples per process)."""

    output_dir: str = "runs/etkd"
    max_steps: int = 1000
    per_device_batch_size: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 42
    save_every: int = 500  # checkpoint every N steps (and at the end); 0 = only at the end
    log_every: int = 10
    max_grad_norm: float | None = 1.0  # None or 0 = no clipping
    resume: bool = False  # continue from the latest complete checkpoint in output_dir (fresh start if none)
    keep_checkpoints: int = 2  # newest N kept; 0 = keep all
    shuffle: bool = True  # map-style data: a new seeded permutation every epoch
    find_unused_parameters: bool = False  # DDP option for models with parameters a loss does not reach
    cpu: bool = False  # force the CPU even when a GPU is present
    progress: bool = True  # tqdm bar on the main process
    stop_at_step: int | None = None  # return right after this step, as if killed there (tests, time boxes)
    # Population-based training: on resume, this config's learning rate, weight decay and warm-up replace
    # the checkpoint's (weights, optimizer moments, data position and RNG still come from the checkpoint).
    new_hparams_on_resume: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "per_device_batch_size": self.per_device_batch_size >= 1,
            "grad_accum_steps": self.grad_accum_steps >= 1,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio <= 1,
            "save_every": self.save_every >= 0,
            "log_every": self.log_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}: invalid value {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"TrainConfig.mixed_precision: expected one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring keys that are not TrainConfig fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------------
# Data: deterministic, resumable, sharded by rank.


def _is_map_style(data: Any) -> bool:
    return (
        hasattr(data, "__len__")
        and hasattr(data, "__getitem__")
        and not isinstance(data, torch.utils.data.IterableDataset)
    )


class ShardedBatches:
    """Yields this rank's micro-batches forever (epoch after epoch) and can say where it is.

    Map-style data (len + getitem): epoch e is `randperm(n)` from a generator seeded with seed + e (or
    0..n-1 without shuffle), cut into global micro-batches of `batch_size * world` examples (the last
    partial one dropped); rank r takes its contiguous `batch_size` slice. Iterable data (streaming): every
    rank reads the stream and keeps its slice of each global micro-batch; `set_epoch(e)` is called on the
    data when it has one. The global RNG is never touched here, so collate functions may use it.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.map_style = _is_map_style(data)
        self.global_batch = batch_size * world
        self.epoch, self.position = 0, 0  # position: micro-batches consumed in this epoch
        self._order: torch.Tensor | None = None
        self._stream = None
        if self.map_style:
            self.batches_per_epoch = len(data) // self.global_batch
            if self.batches_per_epoch == 0:
                raise UserError(
                    f"train_data: {len(data)} examples is less than one global batch "
                    f"(per_device_batch_size {batch_size} x {world} processes)"
                )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order, self._stream = None, None

    def _epoch_order(self) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g)

    def _open_stream(self):
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)
        it = iter(self.data)
        skip = self.position * self.global_batch
        return itertools.islice(it, skip, None) if skip else it

    def next(self) -> Any:
        if self.map_style:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = self._epoch_order()
            start = self.position * self.global_batch + self.rank * self.batch_size
            examples = [self.data[int(i)] for i in self._order[start : start + self.batch_size]]
        else:
            examples = self._next_from_stream()
        self.position += 1
        return self.collate_fn(examples)

    def _next_from_stream(self) -> list[Any]:
        if self._stream is None:
            self._stream = self._open_stream()
        chunk = list(itertools.islice(self._stream, self.global_batch))
        if len(chunk) < self.global_batch:  # end of the epoch: start the next one
            self.epoch, self.position = self.epoch + 1, 0
            self._stream = self._open_stream()
            chunk = list(itertools.islice(self._stream, self.global_batch))
            if len(chunk) < self.global_batch:
                raise ValueError(
                    f"train_data: the stream holds fewer than one global batch ({self.global_batch} examples)"
                )
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


# ----------------------------------------------------------------------------------------------------------
# Helpers.


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def count_tokens(batch: Any) -> int:
    """Real tokens in a batch: sum of `attention_mask` if present, else numel of `input_ids`, else 0."""
    if isinstance(batch, dict):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
    return 0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings' padding-free 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' linear warm-up to the peak lr, then linear decay to 0 at `max_steps`, counted from update 1:
    update n (1-based) runs at n / (warmup + 1) of the peak during warm-up, so the first update is not the
    no-op that transformers' lr 0 at update 1 would be."""
    from transformers import get_linear_schedule_with_warmup

    for group in optimizer.param_groups:  # what LambdaLR sets itself when it starts at last_epoch -1
        group.setdefault("initial_lr", group["lr"])
    return get_linear_schedule_with_warmup(optimizer, warmup_steps + 1, max_steps + 1, last_epoch=0)


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints (with trainer_state.json) under output_dir, oldest first."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(name[5:]), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"train: loss is {value} at step {step}; lower learning_rate, check the data, or use bf16 "
            "instead of fp16 (the last checkpoint is untouched)"
        )


# ----------------------------------------------------------------------------------------------------------
# The loop.


def train(
    model: nn.Module,
    train_data: Any,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    extra_modules: Sequence[nn.Module] | Iterable[nn.Module] = (),
) -> dict[str, Any]:
    """Train `model` for `cfg.max_steps` optimizer steps on `train_data` with `loss_fn(model, batch)`.

    train_data: a map-style dataset (len + getitem, e.g. a list or an HF Dataset) or an iterable (streamed).
    loss_fn(model, batch) -> (loss, logs): logs maps names to floats / 0-d tensors, averaged per log window.
    extra_modules: frozen helpers the loss uses (e.g. the teacher): moved to the device, set to eval with
    requires_grad False, never optimised nor checkpointed. Anything trainable must live in `model`.
    Returns {"step", "loss", "history", "checkpoint", "tokens", "seconds", "model" (unwrapped),
    "is_main_process", "num_processes"}. Only the main process should write the final model.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    kwargs = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.find_unused_parameters else []
    )
    # accelerate only takes the multi-process CPU path (gloo) when told `cpu`; a torchrun / `accelerate
    # launch --multi_gpu` job on a machine without a GPU means exactly that.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one AcceleratorState per process and refuses an Accelerator whose mixed precision differs
    # from the first one's ("already been initialized"): a second run in one process (a notebook, `etkd tune`'s
    # trials, a test session) may ask another. The run's settings are this run's: drop the earlier run's state
    # (its PartialState, the process group of a distributed launch, stays).
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.cpu or multi_cpu, kwargs_handlers=kwargs
    )
    set_seed(cfg.seed)
    device = accelerator.device
    for m in extra_modules:
        m.requires_grad_(False)
        m.eval()
        m.to(device)

    model.to(device)
    # torch's fused AdamW kernel: the same update as the per-parameter loop to rounding, ~10x faster on a CPU
    # (benchmarks/train_step.py's 2-layer base step: 0.5 s instead of 4.8 s); transformers' Trainer default with
    # torch >= 2.8.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=fused or None
    )
    warmup = int(round(cfg.warmup_ratio * cfg.max_steps))
    # Not prepared: accelerate would step a prepared scheduler once per process per step.
    scheduler = linear_schedule(optimizer, cfg.max_steps, warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    batches = ShardedBatches(
        train_data,
        cfg.per_device_batch_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        collate_fn=collate_fn,
    )

    step, total_tokens, history, resumed_loss = 0, 0, [], float("nan")
    last_ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if last_ckpt is not None:
        accelerator.load_state(last_ckpt)
        with open(os.path.join(last_ckpt, STATE_NAME)) as f:
            state = json.load(f)
        step, total_tokens = state["step"], state.get("tokens", 0)
        resumed_loss = float(state.get("loss", float("nan")))  # a run resumed at its end reports this loss
        batches.load_state_dict(state["data"])
        if cfg.new_hparams_on_resume:
            _apply_hparams(optimizer, scheduler, cfg)
        accelerator.print(f"[etkd train] resumed from {last_ckpt} at step {step}")
    elif cfg.resume:
        accelerator.print(f"[etkd train] resume: no checkpoint in {cfg.output_dir}, starting fresh")

    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        _drop_log_after(log_path, step)
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        disable=not (cfg.progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    accum = cfg.grad_accum_steps
    window_loss = torch.zeros((), device=device)
    window_logs: dict[str, torch.Tensor] = {}
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    last_loss, start = resumed_loss, time.perf_counter()
    model.train()

    while step < cfg.max_steps:
        for micro in range(accum):
            batch = _to_device(batches.next(), device)
            window_tokens += count_tokens(batch)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss, logs = loss_fn(model, batch)
                accelerator.backward(loss / accum)
            window_loss += loss.detach().float() / accum
            for k, v in logs.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                window_logs[k] = window_logs.get(k, torch.zeros((), device=device)) + v.to(device) / accum
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        bar.update(1)

        at_save = step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0)
        if step % cfg.log_every == 0 or at_save or step == cfg.stop_at_step:
            # One sync per log window: average over steps here and over processes.
            mean_loss = accelerator.reduce(window_loss / window_steps, reduction="mean").item()
            _check_finite(mean_loss, step)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens = window_tokens * accelerator.num_processes
            total_tokens += tokens
            record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
            for k, v in window_logs.items():
                record[k] = accelerator.reduce(v / window_steps, reduction="mean").item()
            record["tokens_per_s"] = tokens / elapsed
            history.append(record)
            last_loss = mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window_loss = torch.zeros((), device=device)
            window_logs, window_steps, window_tokens = {}, 0, 0
            window_start = time.perf_counter()
        if at_save:
            last_ckpt = _save_checkpoint(accelerator, cfg, step, batches, total_tokens, last_loss)
        if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
            break
    bar.close()
    accelerator.wait_for_everyone()
    return {
        "step": step,
        "loss": last_loss,
        "history": history,
        "checkpoint": last_ckpt,
        "tokens": total_tokens,
        "seconds": time.perf_counter() - start,
        "model": accelerator.unwrap_model(model),
        "is_main_process": accelerator.is_main_process,
        "num_processes": accelerator.num_processes,
    }


def _drop_log_after(log_path: str, step: int) -> None:
    """Keep only the log records up to `step`, the step this run starts from: the steps an interrupted run
    logged after its last checkpoint are replayed now and logged again, so their old records go."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a record cut off by the kill
    if keep != lines:
        tmp = log_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, log_path)


def _apply_hparams(optimizer, scheduler, cfg: TrainConfig) -> None:
    """Replace a restored optimizer's and schedule's peak learning rate and weight decay by cfg's; warm-up
    follows cfg already (the schedule's lambdas are built from cfg, a checkpoint does not hold them)."""
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * scheduler.lr_lambdas[i](scheduler.last_epoch)
        if i == 0:  # parameter_groups: [decayed, not decayed (biases, norms)]
            group["weight_decay"] = cfg.weight_decay


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor ..." note: our MLM decoder is tied to the word embeddings on
    purpose, and `load_state` ties it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def _save_checkpoint(
    accelerator, cfg: TrainConfig, step: int, batches: ShardedBatches, tokens: int, loss: float
) -> str:
    from etkd.models.encoder import apply_umask

    path = os.path.join(cfg.output_dir, CHECKPOINT_DIR, f"step_{step:08d}")
    accelerator.wait_for_everyone()
    note, quiet = logging.getLogger("accelerate.utils.other"), _TiedWeightsNote()
    note.addFilter(quiet)
    try:
        accelerator.save_state(path)
        if accelerator.is_main_process:
            apply_umask(path)
    finally:
        note.removeFilter(quiet)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "data": batches.state_dict(),
            "tokens": tokens,
            "loss": loss,
            "config": dataclasses.asdict(cfg),
        }
        tmp = os.path.join(path, STATE_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, os.path.join(path, STATE_NAME))  # the completeness marker, written last
        if cfg.keep_checkpoints:
            for old in checkpoint_dirs(cfg.output_dir)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
