"""The installed extension tied to its torch, and the JIT build for any other.

Each case runs in a child process that pretends the installed `etkd_kernels._C` was compiled against another
torch (its recorded version, `etkd_kernels._build_info.TORCH_VERSION`, replaced before anything loads it), with
an empty JIT cache of its own (ETKD_CACHE_DIR):
* without ETKD_JIT the `cpu` backend is unavailable with a reason naming both torch versions and the fixes,
  `etkd info` prints it, the mismatched extension is never imported, and `auto` warns once that it falls back;
* with ETKD_JIT=1 (slow: it compiles csrc/cpu) the kernels are compiled for the running torch with progress,
  loaded from the cache, and agree with `reference` (forward and gradients, every op); a later process loads
  the cached build without ETKD_JIT and without compiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from etkd_kernels import build

OTHER = "2.12.0+cpu" if build.torch_minor(torch.__version__) != "2.12" else "2.11.0+cpu"

PRETEND = f"""
import sys, types, warnings
import etkd_kernels
info = types.ModuleType("etkd_kernels._build_info")
info.TORCH_VERSION, info.ISAS = {OTHER!r}, ("avx2",)
sys.modules["etkd_kernels._build_info"] = info
"""

MISMATCH = (
    PRETEND
    + """
import json, io, contextlib
import torch
import etkd_kernels as ek
from etkd.distill.cli import main

out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["info"])
q = torch.randn(1, 2, 32, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        ek.sliding_window_attention(q, q, q, 8)
print(json.dumps({"rc": rc, "info": out.getvalue(), "warnings": [str(w.message) for w in caught],
                  "loaded": "etkd_kernels._C" in sys.modules,
                  "backend": ek.dispatch.selected_backend_name("sliding_window", torch.device("cpu"), torch.float32)}))
"""
)

PARITY = (
    PRETEND
    + """
import json
import torch
import etkd_kernels as ek
from etkd_kernels import cpu

assert cpu.unavailable_reason() is None, cpu.unavailable_reason()
from etkd_kernels import _C

torch.manual_seed(0)
b, h, s, d = 2, 2, 96, 16
q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
real = torch.ones(b, s, dtype=torch.bool)
real[1, 70:] = False
glob = torch.zeros(b, s, dtype=torch.bool)
glob[:, 0] = True
layout = ek.bigbird_layout(s, block_size=16, num_random_blocks=1, seed=0)
calls = {
    "sliding_window": lambda be: ek.sliding_window_attention(q, k, v, 16, global_mask=glob, key_padding_mask=real, backend=be),
    "block_sparse": lambda be: ek.block_sparse_attention(q, k, v, layout, key_padding_mask=real, backend=be),
    "lsg": lambda be: ek.lsg_attention(q, k, v, block_size=16, sparsity_factor=2, key_padding_mask=real, backend=be),
    "nystrom": lambda be: ek.nystrom_attention(q, k, v, num_landmarks=8, key_padding_mask=real, backend=be),
    "full": lambda be: ek.full_attention(q, k, v, key_padding_mask=real, backend=be),
}
errors = {}
for op, call in calls.items():
    res = {}
    for be in ("cpu", "reference"):
        out = call(be)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        res[be] = (out, *grads)
    errors[op] = max(float((a - e).abs().max()) for a, e in zip(res["cpu"], res["reference"]))
print(json.dumps({"file": _C.__file__, "isa": _C.isa(), "errors": errors}))
"""
)


def _child(code: str, cache, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "ETKD_CACHE_DIR": str(cache), **env}
    for name in ("ETKD_JIT", "ETKD_BACKEND", "ETKD_CPU_ISA"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=1800
    )


def _result(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_recorded_torch_mismatch_is_reported_with_the_fix_and_auto_warns_once(tmp_path):
    got = _result(_child(MISMATCH, tmp_path / "cache"))
    assert got["rc"] == 0 and not got["loaded"] and got["backend"] == "reference"
    cpu_line = next(line for line in got["info"].splitlines() if line.strip().startswith("cpu:"))
    running = torch.__version__
    for needed in (OTHER, running, "ETKD_JIT=1", "python -m etkd_kernels.build", "--no-build-isolation",
                   f"torch=={build.torch_minor(OTHER)}.*"):  # fmt: skip
        assert needed in cpu_line, (needed, cpu_line)
    assert "unavailable" in cpu_line
    fallback = [w for w in got["warnings"] if "reference" in w]
    assert len(fallback) == 1, got["warnings"]  # once, for three calls
    assert OTHER in fallback[0] and running in fallback[0] and "ETKD_JIT=1" in fallback[0]


def test_bad_jit_value_is_an_error_naming_the_variable(tmp_path):
    res = _child(PRETEND + "from etkd_kernels import cpu\ncpu.unavailable_reason()", tmp_path, ETKD_JIT="yes")
    assert res.returncode != 0 and "ETKD_JIT=yes: expected 0 or 1" in res.stderr


@pytest.mark.slow
def test_jit_build_compiles_loads_and_matches_reference(tmp_path):
    cache = tmp_path / "cache"
    res = _child(PARITY, cache, ETKD_JIT="1")
    got = _result(res)
    assert str(cache) in got["file"], got["file"]  # the JIT build, not the installed extension
    assert "compiled" in res.stderr and f"for torch {torch.__version__}" in res.stderr  # progress was shown
    print(f"JIT build ({got['isa']}): max abs error vs reference per op (fwd and grads): {got['errors']}")
    for op, err in got["errors"].items():
        assert err < 1e-5, (op, err)
    # A later process finds the build in the cache: no ETKD_JIT, no compiler run.
    again = _child(PARITY, cache)
    assert _result(again)["file"] == got["file"] and "compiling" not in again.stderr
