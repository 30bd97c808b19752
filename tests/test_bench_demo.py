"""`etkd bench`, the attention-core comparison and `etkd demo` at tiny sizes: they run, write what they
promise, and their numbers are real measurements (present, positive, consistent with each other)."""

from __future__ import annotations

import json

import pytest

from etkd.benchmarks import core
from etkd.distill.cli import main as cli


def test_bench_tiny_writes_table_json_plot(tmp_path):
    out = tmp_path / "bench"
    # One fresh subprocess per row (honest peak memory): 6 rows here, ~8 s each on 2 cores.
    argv = ["bench", "--models", "longformer", "--seq-lens", "64", "--batch", "1", "--size", "tiny",
            "--repeats", "1", "--window", "16", "--backends", "reference,cpu", "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
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


def test_bench_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        cli(["bench", "--models", "longformer,perceiver", "--out", str(tmp_path)])


def test_core_comparison_rows_and_memory():
    setup = core.build("nystrom", 256, 2, 16, ["reference", "cpu"])
    rows = core.measure(setup, ["fwd", "fwd_bwd"], repeats=1)
    assert [r["mode"] for r in rows] == ["fwd", "fwd_bwd"]
    for r in rows:
        for name in ("hf_module", "hf_core", "etkd_reference", "etkd_cpu", "sdpa_dense"):
            assert r[f"{name}_ms"] > 0
        assert r["hf_core_over_etkd_cpu"] == pytest.approx(r["hf_core_ms"] / r["etkd_cpu_ms"])
        assert r["etkd_cpu_useful_gflops"] > 0
    # Peak memory of one call, in a fresh process: (2 heads x 256 x 16) fp32 tensors are 32 KiB each, so
    # a forward+backward through HF's module stays far below 64 MiB of growth.
    argv = ["--patterns", "nystrom", "--seq", "256", "--heads", "2", "--head-dim", "16", "--backends", "cpu"]
    mib = core._memory_in_child([*argv, "--child", "etkd_cpu:fwd_bwd"])
    assert mib is not None and 0 <= mib < 64


def test_core_rejects_unknown_pattern():
    with pytest.raises(ValueError, match="pattern"):
        core.build("performer", 256, 2, 16, ["reference"])


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "4", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--max-positions", "1024", "--window", "32", "--seq", "128", "--repeats", "1", "--skip-bench",
            "--long-steps", "2", "--long-train", "4", "--long-dev", "2", "--no-progress"]  # fmt: skip
    assert cli(argv) == 0
    kernels = json.loads((out / "kernels.json").read_text())
    ok = [r for r in kernels if r["status"] == "ok"]
    assert {r["op"].split("(")[0] for r in ok} == {"full", "sliding_window", "block_sparse", "lsg", "nystrom"}
    assert all(r["max_abs_err_vs_reference"] < 1e-4 and r["fwd_ms"] > 0 for r in ok)
    for d in ("teacher/final", "longformer", "longformer_pt/final", "student/student"):
        assert (out / d / "config.json").exists(), d
    results = sorted(p.name for p in (out / "results").iterdir())
    scores = [p for p in results if not p.endswith("_predictions.json")]
    assert len(scores) == 6, results  # 3 models x 2 tasks
    rows = json.loads((out / "long_range.json").read_text())  # 3 models x the 2 long-range tasks
    assert [r["name"] for r in rows] == ["roberta-full", "longformer", "longformer-student"]
    assert [r["context"] for r in rows] == [512, 1024, 1024]
    assert all(0 <= r[k] <= 100 for r in rows for k in ("f1", "f1_codename", "f1_ordinary", "accuracy"))
    assert all(r["seconds_ner"] > 0 and r["peak_mib_cls"] >= 0 for r in rows)
    assert any((out / "report").iterdir())
