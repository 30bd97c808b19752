"""The GPU acceptance run (`python -m etkd_kernels.gpu_check`) in its smoke mode, so it cannot rot: small
shapes on the CPU, the triton backend under TRITON_INTERPRET=1 (set by the script for itself)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from etkd_kernels import gpu_check


def test_smoke_run_writes_a_passing_report(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "etkd_kernels.gpu_check", "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = report["parity"]
    assert cases and all(c["passed"] for c in cases)
    seen = {(c["op"], c["backend"]) for c in cases}
    if not torch.cuda.is_available():
        assert report["environment"]["TRITON_INTERPRET"] == "1"
        assert {("sliding_window", "triton"), ("block_sparse", "triton"), ("nystrom", "triton")} <= seen
        assert {c["dtype"] for c in cases if c["backend"] == "triton"} == {"float32", "float16", "bfloat16"}
        dropped = {c["op"] for c in cases if c["backend"] == "triton" and c["dropout_p"] > 0}
        assert dropped == {"sliding_window", "block_sparse", "lsg", "nystrom"}  # dropout parity too
    assert ("full", "cpu") in seen or torch.cuda.is_available()
    assert report["timings"] and report["summary"]["failed"] == 0


def test_parity_failure_exits_nonzero(tmp_path, monkeypatch):
    """A backend that returns a wrong answer makes the run fail (exit 1), with the case in the report."""
    import etkd_kernels.cpu.full as cpu_full

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() sets it for itself; restored after the test
    real = cpu_full.forward
    # 50% off: beyond the tolerance of every dtype the cpu backend claims (bf16's is near 2%).
    monkeypatch.setattr(cpu_full, "forward", lambda *a: tuple([real(*a)[0] * 1.5, real(*a)[1]]))
    out = tmp_path / "report.json"
    code = gpu_check.main(
        ["--smoke", "--backends", "cpu", "--ops", "full", "--no-timings", "--out", str(out)]
    )
    assert code == 1
    report = json.loads(out.read_text())
    cases = report["parity"]
    assert cases and not any(c["passed"] for c in cases)
    assert "float32" in {str(c.get("dtype", "")).replace("torch.", "") for c in cases}


def test_without_a_gpu_the_full_run_refuses(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run would start")
    assert gpu_check.main(["--out", "/dev/null"]) == 2
    assert "--smoke" in capsys.readouterr().err
