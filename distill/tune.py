"""`etkd tune`: Population-Based Training (Jaderberg et al. 2017; paper §4.3) on Ray Tune over `etkd finetune`.

    etkd tune --population 8 --max-steps 4000 --perturbation-interval 500 --out tune_sst2 \\
        -- --task sst2 --model student --batch-size 32

Everything after `--` is an ordinary `etkd finetune` command line. Each trial is that command run in
segments of `--perturbation-interval` steps (`--max-steps M --stop-at-step k*interval --resume`): an
ordinary accelerate run that checkpoints, evaluates and reports its score to Ray Tune at the end of every
segment. Ray's `PopulationBasedTraining` scheduler then lets the worst trials *exploit* the best (the
trial restarts from a copy of the better trial's accelerate checkpoint: weights, optimizer moments, data
position) and *explore* (learning rate, warm-up ratio, weight decay, batch size perturbed by x0.8 / x1.2 or
resampled); the resumed run takes the new values (`--new-hparams-on-resume`).

Local by default: Ray starts on this machine and trials share it (`--cpus-per-trial`). A cluster:
`ray start --head` on one node, `ray start --address HEAD:6379` on the others, then `etkd tune --address
HEAD:6379 --storage DIR_OR_URI` with storage every node can reach (NFS path or s3://...).

Output (`--out`): `tune_results.json` (every trial's curve: step, score, hyper-parameters, exploits),
`curves.png`, `best_config.json`, and `best/result.json` in `etkd finetune`'s result format, so that
`etkd report OUT/best` reads it. Trials' runs live in `OUT/trials/<trial id>/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

HPARAMS = ("learning_rate", "warmup_ratio", "weight_decay", "per_device_batch_size")
STATE = "tune_state.json"
SETTINGS = "settings.json"  # the run folder's settings (distill/rundir.py), carried with the checkpoint


def _file_digest(directory: str) -> str:
    """sha256 over every file of a checkpoint directory (names and bytes), to show what was copied."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if name in (STATE, SETTINGS):
                continue
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _score_key(metrics: dict[str, float], wanted: str) -> str:
    if wanted in metrics:
        return wanted
    suffixed = sorted(
        k for k in metrics if k.startswith(wanted + "_") and k.count("_") == wanted.count("_") + 1
    )
    if suffixed:
        return suffixed[0]
    raise ValueError(f"--metric: {wanted!r} is not among the evaluation metrics {sorted(metrics)}")


def default_metric(finetune_args: list[str]) -> str:
    """The task's main metric: F1 for NER and QA, the first GLUE metric (MCC, accuracy, Pearson) otherwise."""
    from .metrics import GLUE_METRICS
    from .tasks import task_family

    task = finetune_args[finetune_args.index("--task") + 1] if "--task" in finetune_args else None
    if task is None or task_family(task) != "glue":
        return "f1"
    return GLUE_METRICS[task][0]


def trial(config: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """One PBT trial: `etkd finetune` in segments, reporting score + checkpoint to Ray Tune after each."""
    from ray import tune

    from .cli import main
    from .training import latest_checkpoint

    trial_id = tune.get_context().get_trial_id()
    trial_dir = os.path.join(spec["out"], "trials", trial_id)
    run_dir = os.path.join(trial_dir, "run")
    events = os.path.join(trial_dir, "events.jsonl")
    os.makedirs(trial_dir, exist_ok=True)

    def log(event: dict[str, Any]) -> None:
        with open(events, "a") as f:
            f.write(json.dumps(event) + "\n")

    step = 0
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
            step = state["step"]
            # The restored checkpoint (ours after a pause, or a better trial's after an exploit) replaces
            # whatever this trial's run holds; the next segment resumes from it.
            shutil.rmtree(run_dir, ignore_errors=True)
            target = os.path.join(run_dir, "checkpoints", os.path.basename(state["checkpoint"]))
            shutil.copytree(os.path.join(d, "checkpoint"), target)
            shutil.copy(os.path.join(d, SETTINGS), os.path.join(run_dir, SETTINGS))  # the run it continues
        log({"event": "restore", "step": step, "from_trial": state["trial"], "own": state["trial"] == trial_id,
             "digest": _file_digest(target), "source_digest": state["digest"], "config": config})  # fmt: skip

    total, interval = spec["max_steps"], spec["interval"]
    while step < total:
        stop = min(step + interval, total)
        result_path = os.path.join(trial_dir, "eval", f"step_{stop:08d}.json")
        argv = ["finetune", *spec["finetune_args"], "--output-dir", run_dir, "--max-steps", str(total),
                "--stop-at-step", str(stop), "--save-every", str(interval), "--resume",
                "--new-hparams-on-resume", "--output", result_path, "--no-progress",
                "--learning-rate", repr(float(config["learning_rate"])),
                "--warmup-ratio", repr(float(config["warmup_ratio"])),
                "--weight-decay", repr(float(config["weight_decay"])),
                "--batch-size", str(int(config["per_device_batch_size"]))]  # fmt: skip
        code = main(argv)
        if code:
            raise RuntimeError(f"etkd tune: trial {trial_id}: `etkd {' '.join(argv)}` exited with {code}")
        with open(result_path) as f:
            metrics = json.load(f)["metrics"]
        key = _score_key(metrics, spec["metric"])
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None or not ckpt.endswith(f"step_{stop:08d}"):
            raise RuntimeError(f"etkd tune: trial {trial_id}: no checkpoint for step {stop} in {run_dir}")
        digest = _file_digest(ckpt)
        log({"event": "segment", "step": stop, "score": metrics[key], "config": config, "digest": digest})
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(ckpt, os.path.join(tmp, "checkpoint"))
            shutil.copy(os.path.join(run_dir, SETTINGS), os.path.join(tmp, SETTINGS))
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump({"step": stop, "trial": trial_id, "checkpoint": ckpt, "digest": digest}, f)
            report = {
                "step": stop,
                "score": metrics[key],
                "metric": key,
                **{f"eval/{k}": v for k, v in metrics.items()},
            }
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))  # fmt: skip
        step = stop


def _curves(out: str, trial_ids: list[str]) -> list[dict[str, Any]]:
    """Every trial's events (segments with step, score, config; restores) from its events.jsonl."""
    curves = []
    for tid in trial_ids:
        path = os.path.join(out, "trials", tid, "events.jsonl")
        rows = []
        if os.path.isfile(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        exploits = [
            {"step": r["step"], "from_trial": r["from_trial"], "config": r["config"]}
            for r in rows
            if r["event"] == "restore" and not r["own"]
        ]
        points = [{"step": r["step"], "score": r["score"], **{h: r["config"][h] for h in HPARAMS}}
                  for r in rows if r["event"] == "segment"]  # fmt: skip
        curves.append({"trial": tid, "curve": points, "exploits": exploits})
    return curves


def plot(curves: list[dict[str, Any]], path: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        steps = [p["step"] for p in c["curve"]]
        line = axes[0].plot(steps, [p["score"] for p in c["curve"]], marker="o", label=c["trial"])[0]
        axes[1].plot(steps, [p["learning_rate"] for p in c["curve"]], marker="o", color=line.get_color())
        for e in c["exploits"]:
            axes[0].axvline(e["step"], color=line.get_color(), alpha=0.3, linestyle=":")
    axes[0].set(xlabel="step", ylabel=metric, title="score per trial (dotted: exploit)")
    axes[1].set(xlabel="step", ylabel="learning rate", yscale="log", title="learning rate per trial")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _range(values: list[float], name: str, log: bool = False):
    from ray import tune

    if len(values) == 1:
        return [values[0]]
    lo, hi = values
    if not lo <= hi or (log and lo <= 0):
        raise ValueError(
            f"--{name}: expected LOW HIGH with 0 {'<' if log else '<='} LOW <= HIGH, got {values}"
        )
    return tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)


def _absolute_paths(argv: list[str]) -> list[str]:
    """Paths that exist here made absolute: Ray runs trials in their own working directories."""
    out = []
    for a in argv:
        name, sep, value = a.partition("=")
        if sep and not a.startswith("-") and os.path.exists(value):
            out.append(f"{name}={os.path.abspath(value)}")
        elif not a.startswith("-") and os.path.exists(a):
            out.append(os.path.abspath(a))
        else:
            out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    finetune_args = list(args.finetune_args or [])
    if finetune_args[:1] == ["--"]:
        finetune_args = finetune_args[1:]
    finetune_args = _absolute_paths(finetune_args)
    if "--task" not in finetune_args and "--config" not in finetune_args:
        raise ValueError("etkd tune: give the finetune command after `--` (at least --task and --model)")
    for flag in ("--output-dir", "--max-steps", "--learning-rate", "--warmup-ratio", "--weight-decay",
                 "--batch-size", "--resume", "--output", "--stop-at-step", "--save-every"):  # fmt: skip
        if flag in finetune_args:
            raise ValueError(
                f"etkd tune: {flag} after `--` is set by tune (per trial); give it to tune or drop it"
            )
    if args.perturbation_interval < 1 or args.max_steps < args.perturbation_interval:
        raise ValueError("--perturbation-interval: expected 1 <= interval <= --max-steps")
    if args.population < 2:
        raise ValueError("--population: PBT needs at least 2 trials")

    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "tune_results.json")) and not args.overwrite:
        raise FileExistsError(f"--out: {out} holds an earlier tune run; give --overwrite or another folder")
    os.makedirs(out, exist_ok=True)
    metric = args.metric or default_metric(finetune_args)
    spaces = {
        "learning_rate": _range(args.learning_rate, "learning-rate", log=True),
        "warmup_ratio": _range(args.warmup_ratio, "warmup-ratio"),
        "weight_decay": _range(args.weight_decay, "weight-decay"),
        "per_device_batch_size": list(args.per_device_batch_size),
    }
    mutations = {k: v for k, v in spaces.items() if not isinstance(v, list) or len(v) > 1}
    if not mutations:
        raise ValueError("etkd tune: every hyper-parameter is fixed; give a range or choices for one")
    param_space = {k: (v if not isinstance(v, list) else tune.choice(v)) for k, v in spaces.items()}
    scheduler = PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=args.perturbation_interval,
        hyperparam_mutations=mutations,
        quantile_fraction=args.quantile_fraction,
        resample_probability=args.resample_probability,
        synch=args.synch,
    )
    spec = {"out": out, "finetune_args": finetune_args, "max_steps": args.max_steps,
            "interval": args.perturbation_interval, "metric": metric}  # fmt: skip
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    if args.address:
        ray.init(address=args.address)
    elif not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, spec=spec), resources),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                metric="score",
                mode="max",
                num_samples=args.population,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="pbt",
                storage_path=args.storage or os.path.join(out, "ray"),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                verbose=1 if args.verbose else 0,
                stop={"step": args.max_steps},
            ),
        )
        grid = tuner.fit()
    finally:
        if not args.address:
            ray.shutdown()
    errors = [str(r.error) for r in grid if r.error]
    if errors:
        raise RuntimeError("etkd tune: trials failed:\n" + "\n".join(errors))
    best = grid.get_best_result(metric="score", mode="max", scope="last")
    best_id = best.metrics["trial_id"]
    trial_ids = sorted(r.metrics["trial_id"] for r in grid)
    curves = _curves(out, trial_ids)
    best_config = {k: best.config[k] for k in HPARAMS}
    summary = {
        "metric": best.metrics["metric"],
        "max_steps": args.max_steps,
        "perturbation_interval": args.perturbation_interval,
        "population": args.population,
        "finetune_args": finetune_args,
        "best": {"trial": best_id, "score": best.metrics["score"], "config": best_config},
        "trials": curves,
    }
    with open(os.path.join(out, "tune_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "best_config.json"), "w") as f:
        json.dump(best_config, f, indent=2)
    last = os.path.join(out, "trials", best_id, "eval", f"step_{args.max_steps:08d}.json")
    with open(last) as f:
        result = json.load(f)
    result["model"] = args.name or "pbt-best"
    result["tune"] = {"trial": best_id, "config": best_config}
    os.makedirs(os.path.join(out, "best"), exist_ok=True)
    with open(os.path.join(out, "best", "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(curves, os.path.join(out, "curves.png"), summary["metric"])
    n_exploits = sum(len(c["exploits"]) for c in curves)
    print(f"[etkd tune] best trial {best_id}: {summary['metric']} {best.metrics['score']:.2f} with "
          f"{json.dumps(best_config)}; {n_exploits} exploits; results in {out}")  # fmt: skip
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="population-based training (Ray Tune) over `etkd finetune`",
        description="etkd tune [options] -- <etkd finetune options>",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/tune", help="folder for trials, curves and the best config")
    p.add_argument("--overwrite", action="store_true", help="allow an --out that holds an earlier tune run")
    p.add_argument("--population", type=int, default=4, help="number of trials")
    p.add_argument("--max-steps", type=int, default=1000, help="training steps of every trial")
    p.add_argument("--perturbation-interval", type=int, default=200, help="steps between exploit/explore")
    p.add_argument("--metric", help="evaluation metric to maximise (default: the task's main one)")
    p.add_argument("--learning-rate", type=float, nargs="+", default=[1e-5, 1e-4], metavar="LR",
                   help="LOW HIGH (log-uniform), or one fixed value")  # fmt: skip
    p.add_argument("--warmup-ratio", type=float, nargs="+", default=[0.0, 0.1], help="LOW HIGH, or one value")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[0.0, 0.1], help="LOW HIGH, or one value")
    p.add_argument(
        "--batch-size", dest="per_device_batch_size", type=int, nargs="+", default=[16, 32], help="choices"
    )
    p.add_argument("--quantile-fraction", type=float, default=0.25, help="PBT: share of trials that exploit")
    p.add_argument(
        "--resample-probability", type=float, default=0.25, help="PBT: resample instead of x0.8/1.2"
    )
    p.add_argument("--synch", action="store_true", help="PBT: perturb all trials at once at each interval")
    p.add_argument("--address", help="Ray cluster address (HEAD:6379); default: a local Ray on this machine")
    p.add_argument("--storage", help="Ray storage (every node must reach it on a cluster); default OUT/ray")
    p.add_argument("--num-cpus", type=int, help="local Ray: CPUs to use (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--name", help="model name of the best trial in best/result.json (for `etkd report`)")
    p.add_argument("--verbose", action="store_true", help="Ray's progress tables and worker logs")
    p.add_argument("finetune_args", nargs=argparse.REMAINDER, help="-- then `etkd finetune` options")
    p.set_defaults(func=run)
