"""`etkd bench`, the attention-core comparison and `etkd demo` at tiny sizes: they run, write what they
promise, and their numbers are real measurements (present, positive, consistent with each other); the
harness's FLOP counts against brute-force counts of each pattern's scores."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close

import etkd_kernels as ek
from etkd.benchmarks import core
from etkd.benchmarks import patterns as bench_patterns
from etkd.benchmarks import providers as P
from etkd.benchmarks.harness import Timing, run_fresh, time_call
from etkd.distill.cli import main as cli
from etkd.distill.demo import longrange


def test_bench_tiny_writes_table_json_plot(tmp_path, capfd):
    out = tmp_path / "bench"
    # One fresh subprocess per row (honest peak memory): 6 rows here, ~8 s each on 2 cores.
    argv = ["bench", "--models", "longformer", "--seq-lens", "64", "--batch", "1", "--size", "tiny",
            "--repeats", "1", "--window", "16", "--backends", "reference,cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli(argv) == 0
    assert (
        "etkd bench:  " not in capfd.readouterr().err
    )  # --no-progress: no progress bar (the demo passes it)
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    impls = {(r["family"], r["student"], r["impl"], r["seq"]) for r in rows}
    assert impls == {
        ("longformer", st, impl, 64) for st in (False, True) for impl in ("hf", "etkd-reference", "etkd-cpu")
    }
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["time_s"] > 0 and r["peak_mib"] is not None and r["peak_mib"] >= 0 for r in ok)
    # Students are half depth: fewer parameters than their teachers.
    params = {(r["family"], r["student"]): r["params_m"] for r in ok}
    assert params[("longformer", True)] < params[("longformer", False)]
    table = (out / "bench.md").read_text()
    assert "longformer" in table
    assert (out / "bench.png").stat().st_size > 1000


def test_bench_rejects_unknown_model(tmp_path, capsys):
    """A user error like every command's: one line naming the flag, exit 2 (it was a SystemExit, status 1)."""
    assert cli(["bench", "--models", "longformer,perceiver", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--models: unknown ['perceiver']; expected some of" in err and "Traceback" not in err


def test_bench_train_step_bf16(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--models", "longformer", "--seq-lens", "64", "--batch", "1", "--size", "tiny",
            "--repeats", "2", "--window", "16", "--backends", "reference", "--no-students", "--mode", "train",
            "--dtype", "bf16", "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"hf", "etkd-reference"}
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["mode"], r["dtype"]) == ("train", "bf16")
        assert 0 < r["time_p20"] <= r["time_s"] <= r["time_p80"] and r["peak_mib"] >= 0
        assert r["environment"]["threads"] >= 1 and r["environment"]["torch"] == torch.__version__


def test_train_step_side_by_side_tiny(capsys):
    from etkd.benchmarks import train_step

    argv = ["--size", "tiny", "--seq", "64", "--layers", "1", "--repeats", "2", "--threads", "1"]
    assert train_step.main(argv) == 0
    out = capsys.readouterr().out
    for side in ("etkd-cpu", "hf"):
        for opt in ("adamw", "fused"):
            line = next(ln for ln in out.splitlines() if ln.split()[:2] == [side, opt])
            times = [float(t) for t in line.split("steps:")[1].split(",")]
            assert len(times) == 2 and all(t > 0 for t in times), line
    assert "HF / etkd with adamw:" in out and "HF / etkd with fused:" in out


def test_whole_model_comparisons_take_their_pattern_from_the_registry():
    """`--attention` of bench_bf16 / hf_patch / train_step / dropout_placement: every pattern with a benchmark
    module and a transformers family of its own, default the one `Bench` record that says so."""
    import argparse

    from etkd.benchmarks.bench import add_attention_arg, model_attentions
    from etkd.models.patterns import PATTERNS

    want = tuple(n for n in bench_patterns.BENCHES if PATTERNS[n].hf_model_type)
    assert model_attentions() == want and "bigbird" in want
    defaults = [n for n, b in bench_patterns.BENCHES.items() if b.model_default]
    ap = argparse.ArgumentParser()
    add_attention_arg(ap)
    assert len(defaults) == 1 and ap.parse_args([]).attention == defaults[0]
    with pytest.raises(SystemExit):
        ap.parse_args(["--attention", "fixed"])  # no HF model of its own


def test_whole_model_comparisons_run_for_bigbird(capsys, tmp_path):
    """The HF-vs-etkd whole-model scripts on a BigBird model (HF's BigBirdModel through `to_hf`): each runs and
    prints its rows; patched HF equals HF."""
    from etkd.benchmarks import bench_bf16, hf_patch, train_step

    assert bench_bf16.main(["--attention", "bigbird", "--seq", "256", "--layers", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "HF BigBirdModel fp32" in out and "etkd bf16 autocast" in out
    # 256 tokens <= (5 + 2 * 3) blocks of 64: both sides take their full-attention path, so they agree
    assert float(out.split("etkd fp32")[1].split("max|diff|")[1].split()[0]) < 1e-4

    rows = tmp_path / "rows.json"
    argv = "--attention bigbird --layers 1 --hidden 32 --heads 2 --seq 64 --repeats 1 --modes fwd".split()
    assert hf_patch.main([*argv, "--json", str(rows)]) == 0
    res = json.loads(rows.read_text())
    assert res["max_rel_err"] < 1e-5 and capsys.readouterr().out.startswith("BigBirdModel 1x32")
    with pytest.raises(SystemExit):
        hf_patch.main([*argv, "--window", "8"])  # BigBird has no window setting: refused, not ignored

    argv = ["--attention", "bigbird", "--size", "tiny", "--seq", "64", "--layers", "1", "--repeats", "1",
            "--threads", "1", "--optimizers", "fused"]  # fmt: skip
    assert train_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "1-layer BigBird-tiny" in out and "HF / etkd with fused:" in out


def test_nystrom_switches_run_each_set_in_its_own_process(capsys):
    from etkd.benchmarks import nystrom_switches

    argv = ["--seq", "256", "--repeats", "1", "--threads", "1", "--switches", "default", "avx2-epyc"]
    assert nystrom_switches.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "avx2-epyc: ETKD_CPU_ISA=avx2" in out and "etkd target avx2," in out
    )  # the switch reached the worker
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("fwd ", "fwd_bwd "))]
    assert [r[0] for r in rows] == ["fwd", "fwd_bwd"] * 2
    assert all(float(r[3]) > 0 and float(r[6]) > 0 for r in rows), rows


def test_model_step_fused_adamw_is_the_same_update():
    """The benchmarks' fused AdamW (`model_step(..., fused_adamw=True)`) takes the per-parameter loop's steps."""
    from etkd.benchmarks.bench import build_model
    from etkd_kernels.timing import model_step

    models = [
        build_model("longformer", "tiny", 64, False).set_attention_backend("reference") for _ in range(2)
    ]
    ids = torch.randint(5, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = [p.detach().clone() for p in models[0].parameters()]
    for model, fused in zip(models, (False, True)):
        step = model_step(model, kwargs, "train", fused_adamw=fused)
        for _ in range(3):
            step()
    moved = max(float((p - b).abs().max()) for p, b in zip(models[0].parameters(), before))
    assert moved > 1e-6  # the steps changed the weights
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_close(b, a, atol=1e-7, name="fused vs loop AdamW")


def test_core_comparison_rows_and_memory():
    setup = P.build("nystrom", 256, 2, 16, backends=["reference", "cpu"])
    rows = core.measure(setup, ["fwd", "fwd_bwd"], repeats=2)
    assert [r["mode"] for r in rows] == ["fwd", "fwd_bwd"]
    for r in rows:
        for name in ("hf", "hf-core", "etkd-reference", "etkd-cpu", "sdpa"):
            assert 0 < r[f"{name}_p20_ms"] <= r[f"{name}_ms"] <= r[f"{name}_p80_ms"]
        assert r["hf-core_over_etkd-cpu"] == pytest.approx(r["hf-core_ms"] / r["etkd-cpu_ms"])
        assert r["etkd-cpu_useful_gflops"] > 0
        assert r["environment"]["cpu"] and r["environment"]["isa"]
    # Peak memory of one call, in a fresh process: (2 heads x 256 x 16) fp32 tensors are 32 KiB each, so
    # a forward+backward stays far below 64 MiB of growth.
    spec = {**setup.build_args, "provider": "etkd-cpu", "mode": "fwd_bwd"}
    mib = run_fresh("etkd.benchmarks.providers:peak_memory", spec)["peak_mib"]
    assert 0 <= mib < 64


def test_every_pattern_has_its_providers():
    for pattern in P.PATTERNS:
        setup = P.build(pattern, 256, 2, 16, backends=["reference"])
        assert {"etkd-reference", "sdpa"} <= set(setup.providers), pattern
        assert set(setup.providers).isdisjoint(setup.skipped), pattern
        out = setup.providers["etkd-reference"][0](*setup.providers["etkd-reference"][1])
        assert out.shape == (1, 2, 256, 16)
        setup.call("etkd-reference", "fwd_bwd")()
    assert "flash-attn" in P.build("longformer", 256, 2, 16, backends=["reference"]).skipped  # no GPU here


def test_flop_counts_match_brute_force():
    seq, window, g = 200, 32, 3
    i = torch.arange(seq)
    glob = i < g
    dense = ((i[:, None] - i[None, :]).abs() <= window // 2) | glob[None, :] | glob[:, None]
    assert bench_patterns.longformer.band_pairs(seq, window, g) == int(dense.sum())
    layout = ek.bigbird_layout(512, block_size=32, num_random_blocks=2, seed=0)
    assert bench_patterns.bigbird.block_pairs(layout, heads=3) == 3 * int(layout.to_dense().sum())
    setup = P.build("nystrom", 256, 2, 16, backends=["reference"])
    assert setup.flops == 4 * 2 * 16 * (
        2 * 256 * bench_patterns.nystrom.LANDMARKS + bench_patterns.nystrom.LANDMARKS**2
    )
    assert setup.flops_of("fwd_bwd") == 3.5 * setup.flops


def test_lsg_flop_count_matches_its_local_and_global_keys():
    """With no sparse keys, LSG is local blocks (own + one each side) plus global rows and columns."""
    seq, block, g = 300, 32, 2
    i = torch.arange(seq)
    near = ((i[:, None] // block) - (i[None, :] // block)).abs() <= 1
    glob = i < g
    dense = (near & ~glob[None, :]) | glob[None, :] | glob[:, None]
    assert bench_patterns.lsg.lsg_pairs(seq, block, 0, 2, g) == int(dense.sum())


def test_timer_quantiles_and_bad_repeats():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.p20, t.p80, t.repeats) == (3.0, 1.8, 4.2, 5)
    calls = []
    t = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and t.repeats == 3 and 0 <= t.p20 <= t.median <= t.p80
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_run_fresh_reports_a_failing_row():
    spec = {"pattern": "performer", "seq": 8, "provider": "sdpa", "mode": "fwd"}
    res = run_fresh("etkd.benchmarks.providers:peak_memory", spec)
    assert res["status"].startswith("error:") and "pattern" in res["status"]


def test_core_rejects_unknown_pattern():
    with pytest.raises(ValueError, match="pattern"):
        P.build("performer", 256, 2, 16, ["reference"])


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "4", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--max-positions", "1024", "--window", "32", "--seq", "128", "--repeats", "1", "--skip-bench",
            "--ner-steps", "4", "--long-steps", "2", "--long-cls-steps", "3", "--long-cls-short-steps", "2",
            "--long-train", "4", "--long-dev", "2", "--no-progress"]  # fmt: skip
    assert cli(argv) == 0
    kernels = json.loads((out / "kernels.json").read_text())
    ok = [r for r in kernels if r["status"] == "ok"]
    assert {r["op"].split("(")[0] for r in ok} == {"full", "sliding_window", "block_sparse", "lsg", "nystrom"}
    # The error column compares a fused backend with `reference` (a reference row is 0 by construction):
    # every op that has a cpu kernel must have been compared, and agree.
    fused = [r for r in ok if r["backend"] != "reference"]
    assert {"full", "sliding_window", "block_sparse", "nystrom"} <= {r["op"].split("(")[0] for r in fused}
    assert all(r["max_abs_err_vs_reference"] < 1e-4 for r in fused)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["environment"]["threads"] >= 1 for r in ok)
    for d in ("teacher/final", "longformer", "longformer_pt/final", "student/student"):
        assert (out / d / "config.json").exists(), d
    results = sorted(p.name for p in (out / "results").iterdir())
    scores = [p for p in results if not p.endswith("_predictions.json")]
    assert len(scores) == 6, results  # 3 models x 2 tasks
    long = json.loads((out / "long_range.json").read_text())
    assert long["ceiling"]["1024"]["f1"] > long["ceiling"]["512"]["f1"]  # the data's own 512 vs long gap
    rows = long["models"]  # 3 models x the 2 long-range tasks
    assert [r["name"] for r in rows] == ["roberta-full", "longformer", "longformer-student"]
    assert [r["context"] for r in rows] == [512, 1024, 1024]
    assert all(
        0 <= r[k] <= 100 for r in rows for k in ("f1", "f1_codename", "f1_ordinary", "accuracy", "cls_f1")
    )

    # Each long fine-tune continues from that model's step-5 checkpoint of the same task; classification
    # through the curriculum: the task's short documents first (--long-cls-short-steps), then the long ones.
    def settings(name: str, run: str) -> dict:
        return json.loads((out / "finetune" / f"{name}-{run}" / "settings.json").read_text())

    for name in ("roberta-full", "longformer", "longformer-student"):
        ner_long, short, cls_long = (settings(name, r) for r in ("conll2003-results_long", "sst2-results_long_short",
                                                                 "sst2-results_long"))  # fmt: skip
        assert ner_long["model"] == str(out / "finetune" / f"{name}-conll2003-results" / "model")
        assert short["model"] == str(out / "finetune" / f"{name}-sst2-results" / "model")
        assert short["train_file"] == str(out / "data" / "long_cls_short_train.jsonl")
        assert cls_long["model"] == str(out / "finetune" / f"{name}-sst2-results_long_short" / "model")
        # the NER documents' opening paragraph is global for the Longformers; the full-attention model, which
        # has no global tokens, is not given --global-prefix (finetune would warn that it ignores it)
        prefix = 0 if name == "roberta-full" else longrange.OPENING
        assert (ner_long["global_prefix"], cls_long["global_prefix"]) == (prefix, 0)
        # --long-steps for NER, --long-cls-short-steps then --long-cls-steps for classification
        assert (ner_long["max_steps"], short["max_steps"], cls_long["max_steps"]) == (2, 2, 3)
    assert all(r["seconds_ner"] > 0 and r["peak_mib_cls"] >= 0 for r in rows)
    assert any((out / "report").iterdir())

    # --long-only: steps 6-7 again from the same step-5 checkpoints (left as they were), with new settings
    step5 = out / "finetune" / "longformer-sst2-results" / "model" / "model.safetensors"
    before = step5.stat().st_mtime_ns
    assert cli([*argv, "--long-only", "--long-cls-short-steps", "0", "--long-cls-steps", "1"]) == 0
    assert step5.stat().st_mtime_ns == before
    cls_long = settings("longformer", "sst2-results_long")
    assert cls_long["max_steps"] == 1 and cls_long["model"] == str(step5.parent)
    assert [r["name"] for r in json.loads((out / "long_range.json").read_text())["models"]] == [
        "roberta-full", "longformer", "longformer-student"]  # fmt: skip


def test_demo_long_only_needs_an_earlier_run(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path), "--long-only", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "--long-only" in err and "roberta-full-conll2003-results" in err


@pytest.mark.parametrize("pattern", ["longformer", "bigbird", "lsg", "nystrom"])
def test_dropout_benchmark_times_the_provider_call_with_dropout(pattern):
    """benchmarks/dropout.py times providers.build's own etkd call (the pattern's benchmark settings, one place)
    with dropout_p added: with a seed it equals the reference backend's call and differs from p = 0."""
    from etkd.benchmarks import dropout as D

    setup = P.build(pattern, 512, heads=2, backends=["cpu"])
    args = setup.providers["etkd-cpu"][1]
    drop = dict(dropout_p=0.5, dropout_seed=3, dropout_offset=1)
    ours = setup.etkd_op("cpu", **drop)(*args)
    assert torch.allclose(ours, setup.etkd_op("reference", **drop)(*args), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, setup.etkd_op("cpu")(*args), atol=1e-3)
    torch.manual_seed(0)
    a = D._with_dropout(pattern, setup, "cpu", 0.5)(*args)
    torch.manual_seed(0)
    assert torch.equal(a, setup.etkd_op("cpu", dropout_p=0.5)(*args))  # unseeded: torch's generator draws
