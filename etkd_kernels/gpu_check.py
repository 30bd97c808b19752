"""`python -m etkd_kernels.gpu_check --out report.json`: the one-shot acceptance run for a machine with a GPU.

What it does, for the device present (CUDA when there is one):
  * parity: every op x every backend that declares support x fp32/fp16/bf16 x head_dim 32/64/128 (x every
    shipped autotune config for triton) against the `reference` backend in fp32, forward and gradients;
    again with attention dropout (DROPOUT: the same seed and offset give the reference the same keep-mask)
    wherever the backend declares a dropout kernel.
    The tolerance is relative to PyTorch's own error in that dtype (flash-attention's rule): dense SDPA run
    in the dtype vs in fp32 on the same inputs gives the error scale e; a case passes when its error is at
    most TOL_FACTOR * e + a small floor;
  * large shapes (GPU): batch x heads > 65,535 and a tensor of more than 2^31 elements (the last head is
    checked against the same op on that head alone), when the GPU has the memory;
  * timings: forward and forward+backward of every (op, backend) at seq 4096 (and with DROPOUT's p where the
    backend takes dropout) next to dense SDPA,
    FlexAttention with the same pattern, and flash-attn (sliding window) when installed;
  * the Triton-vs-CUDA choice: which of the two is faster per op, next to what `auto` picks.
It writes everything to a JSON report and exits 1 when any parity case fails (2 on bad arguments).

`--smoke` runs small shapes on the CPU (the triton backend under TRITON_INTERPRET=1, which this module sets
for itself when there is no GPU) so the script is exercised by the test suite and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

DTYPE_NAMES = ("float32", "float16", "bfloat16")
TOL_FACTOR = 4.0
FLOOR = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
DROPOUT = {"dropout_p": 0.1, "dropout_seed": 2**33 + 1234, "dropout_offset": 7}


@dataclass
class Case:
    op: str
    backend: str
    dtype: str
    head_dim: int
    shape: tuple[int, int, int, int]
    config: str = "autotuned"
    dropout_p: float = 0.0
    passed: bool = False
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _torch():
    import torch

    return torch


def _reference(op: str):
    import importlib

    return importlib.import_module(f"etkd_kernels.reference.{op}")


def _inputs(op, shape, dtype, device, seed=0):
    """The op's tensor inputs (q, k, v and any others that take gradients) and keyword arguments for `shape`:
    the case its reference module gives (`check_case`), with a padded tail."""
    torch = _torch()
    b, h, s, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, kwargs = _reference(op).check_case(b, s, 16 if s < 256 else 64, device)
    leaves = [torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(n)]
    real = torch.ones(b, s, dtype=torch.bool, device=device)
    real[-1, s - max(s // 10, 1) :] = False  # a padded tail
    return leaves, {"key_padding_mask": real, **kwargs}


def _call(op: str) -> Callable:
    return _reference(op).check_call


def _fwd_bwd(fn, leaves, grad_seed=1):
    """(out, grads) of fn over fresh leaves, for a fixed random output gradient."""
    torch = _torch()
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), [None if x is None else x.detach() for x in grads]


def _max_err(a, e) -> float:
    torch = _torch()
    if a is None or e is None:
        return 0.0 if a is None and e is None else float("inf")
    if a.numel() == 0:
        return 0.0
    err = (a.double() - e.double()).abs()
    return float(err.max()) if bool(torch.isfinite(err).all()) else float("inf")


def torch_error_scale(shape, dtype, device) -> dict[str, float]:
    """PyTorch's own error in `dtype`: dense SDPA in dtype vs in fp32 on the same inputs (out, dq, dk, dv)."""
    torch = _torch()
    import torch.nn.functional as F

    leaves, kw = _inputs("full", shape, dtype, device)
    bias = torch.zeros(kw["key_padding_mask"].shape, dtype=torch.float32, device=device)
    bias = bias.masked_fill(~kw["key_padding_mask"], float("-inf"))[:, None, None, :]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    low = _fwd_bwd(sdpa, leaves)
    high = _fwd_bwd(sdpa, [t.float() for t in leaves])
    names = ["out", "grad0", "grad1", "grad2"]
    vals = [low[0], *low[1]]
    refs = [high[0], *high[1]]
    return {n: _max_err(a.float(), e) for n, a, e in zip(names, vals, refs)}


def parity_case(op, backend, dtype_name, shape, device, scale_of, dropout: dict | None = None) -> Case:
    """One case; `dropout` (DROPOUT) runs backend and reference with the same attention dropout."""
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    case = Case(
        op, backend, dtype_name, shape[-1], tuple(shape), dropout_p=(dropout or {}).get("dropout_p", 0.0)
    )
    leaves, kw = _inputs(op, shape, dtype, device)
    kw.update(dropout or {})
    fn = _call(op)
    try:
        out, grads = _fwd_bwd(lambda *t: fn(*t, backend=backend, **kw), leaves)
    except Exception as exc:  # a declared-supported case that raises is a failure, reported with its reason
        case.note = f"{type(exc).__name__}: {exc}"[:500]
        return case
    ref_out, ref_grads = _fwd_bwd(lambda *t: fn(*t, backend="reference", **kw), [t.float() for t in leaves])
    scale = scale_of(dtype_name, shape)
    case.passed = True
    for i, (name, a, e) in enumerate(
        [("out", out, ref_out), *((f"grad{j}", g, r) for j, (g, r) in enumerate(zip(grads, ref_grads)))]
    ):
        err = _max_err(None if a is None else a.float(), e)
        unit = scale["out"] if i == 0 else max(scale["grad0"], scale["grad1"], scale["grad2"])
        tol = TOL_FACTOR * unit + FLOOR[dtype_name]
        case.errors[name], case.tolerances[name] = err, tol
        case.passed &= err <= tol
    return case


def _claims(op, backend, device, dtype_name, head_dim, dropout: bool = False) -> bool:
    from etkd_kernels.dispatch import Problem, reasons

    problem = Problem(device, getattr(_torch(), dtype_name), head_dim, dropout=dropout)
    return not reasons(backend, op, problem)


def _configs(backend: str, smoke: bool) -> list[int | None]:
    """Autotune configs to force one by one (None = let the autotuner choose)."""
    if backend != "triton" or smoke:
        return [None]
    from etkd_kernels.triton._common import SHIPPED

    # Config i of each kernel's shipped list for the case's tile class (modulo its length): every one is run.
    return list(range(max(len(table) for tables in SHIPPED.values() for table in tables.values())))


def run_parity(device, smoke: bool, backends, ops) -> list[Case]:
    from etkd_kernels.dispatch import BACKENDS, OPS

    head_dims = (32,) if smoke else (32, 64, 128)
    b, h, s = (2, 2, 24) if smoke else (2, 4, 1000)  # 1000 / 24: no tile or block multiple
    scales: dict = {}

    def scale_of(dtype_name, shape):
        if (dtype_name, shape) not in scales:
            scales[(dtype_name, shape)] = torch_error_scale(shape, getattr(_torch(), dtype_name), device)
        return scales[(dtype_name, shape)]

    cases = []
    for op in ops or OPS:
        for backend in backends or BACKENDS:
            if backend == "reference":
                continue
            for dtype_name in DTYPE_NAMES:
                for d in head_dims:
                    if not _claims(op, backend, device, dtype_name, d):
                        continue
                    drops = [None] + ([DROPOUT] if _claims(op, backend, device, dtype_name, d, True) else [])
                    for cfg in _configs(backend, smoke) if op != "full" else [None]:
                        for drop in drops:
                            with _forced(cfg):
                                case = parity_case(
                                    op, backend, dtype_name, (b, h, s, d), device, scale_of, drop
                                )
                            case.config = "autotuned" if cfg is None else f"config {cfg}"
                            cases.append(case)
                            print(_line(case), flush=True)
    return cases


def _forced(cfg):
    import contextlib

    if cfg is None:
        return contextlib.nullcontext()
    from etkd_kernels.triton._common import forced_config

    return forced_config(cfg)


def _line(c: Case) -> str:
    worst = max(c.errors.values(), default=float("nan"))
    status = "ok  " if c.passed else "FAIL"
    drop = f"p={c.dropout_p:g}"
    return f"{status} {c.op:15s} {c.backend:9s} {c.dtype:9s} d={c.head_dim:<4d} {c.config:10s} {drop:6s} max err {worst:.2e} {c.note}"


# ---- large shapes ------------------------------------------------------------------------------------------


def run_large(device) -> list[dict]:
    """Launch-limit cases on a GPU: batch x heads > 65,535; a tensor > 2^31 elements (memory permitting)."""
    torch = _torch()
    rows = []
    if device.type != "cuda":
        return [{"case": "large shapes", "skipped": "needs a CUDA GPU"}]
    free, _ = torch.cuda.mem_get_info(device)
    for backend in ("triton", "cuda"):
        for op in ("sliding_window", "block_sparse"):
            if not _claims(op, backend, device, "float16", 32):
                rows.append({"case": f"{op}/{backend}", "skipped": "backend unavailable"})
                continue
            # batch x heads = 65,600 > 65,535 (grid axis y); each (batch, head) checked against the reference.
            shape = (1025, 64, 64, 32)
            leaves, kw = _inputs(op, shape, torch.float16, device)
            kw.pop("global_mask", None)
            fn = _call(op)
            try:
                out = fn(*leaves, backend=backend, **kw)
                ref = fn(*[t.float() for t in leaves], backend="reference", **kw)
                err = _max_err(out.float(), ref)
                rows.append(
                    {"case": f"{op}/{backend} batch*heads=65600", "max_err": err, "passed": err < 1e-2}
                )
            except Exception as exc:
                rows.append(
                    {
                        "case": f"{op}/{backend} batch*heads=65600",
                        "error": f"{type(exc).__name__}: {exc}",
                        "passed": backend == "cuda" and "65535" in str(exc),
                    }
                )
            # > 2^31 elements: 1 x 16 x 2^21 x 64 fp16 = 4 GiB per tensor, ~20 GiB in all.
            need = 5 * (1 << 31) * 2
            if free < need:
                rows.append(
                    {
                        "case": f"{op}/{backend} >2^31 elements",
                        "skipped": f"needs {need / 2**30:.0f} GiB free",
                    }
                )
                continue
            shape = (1, 16, 1 << 21, 64)
            leaves, kw = _inputs(op, shape, torch.float16, device)
            kw.pop("global_mask", None)
            with torch.no_grad():
                out = fn(*leaves, backend=backend, **kw)[:, -1:, -4096:]
                last = [t[:, -1:].contiguous() for t in leaves]
                ref = fn(*last, backend=backend, **kw)[:, :, -4096:]
            err = _max_err(out.float(), ref.float())
            rows.append(
                {
                    "case": f"{op}/{backend} >2^31 elements (last head vs alone)",
                    "max_err": err,
                    "passed": err == 0.0,
                }
            )
            del leaves, out, last, ref
            torch.cuda.empty_cache()
    return rows


# ---- timings -----------------------------------------------------------------------------------------------


def _bench(fn, device, reps: int) -> float:
    """Median milliseconds of fn(), by the project's one timer (CUDA events on a GPU)."""
    from etkd_kernels.timing import time_call

    return 1e3 * time_call(fn, repeats=reps, warmup=1 if reps > 1 else 0, device=device).median


def run_timings(device, smoke: bool) -> list[dict]:
    torch = _torch()
    import torch.nn.functional as F

    from etkd_kernels.dispatch import BACKENDS, OPS, selected_backend_name

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shape = (1, 2, 32, 32) if smoke else (1, 12, 4096, 64)
    reps = 1 if smoke else 20
    rows = []

    def timed(label, op, backend, fn, leaves):
        def fwd():
            with torch.no_grad():
                fn(*leaves)

        def full():
            ls = [t.detach().requires_grad_(True) for t in leaves]
            fn(*ls).sum().backward()

        try:
            rows.append({"op": op, "provider": label, "backend": backend,
                         "fwd_ms": _bench(fwd, device, reps), "fwd_bwd_ms": _bench(full, device, reps)})  # fmt: skip
        except Exception as exc:
            rows.append(
                {
                    "op": op,
                    "provider": label,
                    "backend": backend,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )

    for op in OPS:
        leaves, kw = _inputs(op, shape, dtype, device)
        leaves = leaves[:3]
        kw.pop("global_mask", None)
        call = _call(op)
        if op == "sliding_window":
            call = lambda q, k, v, backend, window, **kw_: __import__(
                "etkd_kernels"
            ).sliding_window_attention(q, k, v, window, backend=backend, **kw_)
        for backend in BACKENDS:
            if not _claims(op, backend, device, str(dtype).split(".")[-1], shape[-1]):
                continue
            if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
                rows.append(
                    {
                        "op": op,
                        "provider": "etkd triton",
                        "backend": backend,
                        "error": "interpreted: not timed",
                    }
                )
                continue
            timed(f"etkd {backend}", op, backend, lambda *t, b=backend: call(*t, backend=b, **kw), leaves)
            if _claims(op, backend, device, str(dtype).split(".")[-1], shape[-1], dropout=True):
                timed(f"etkd {backend} dropout {DROPOUT['dropout_p']}", op, backend,
                      lambda *t, b=backend: call(*t, backend=b, **kw, **DROPOUT), leaves)  # fmt: skip
        rows.append({"op": op, "provider": "auto", "picks": selected_backend_name(op, device, dtype)})
        timed("dense SDPA", op, "torch", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), leaves)
        rows.extend(_flex_and_flash(op, kw, leaves, device, timed))
    return rows


def _flex_and_flash(op, kw, leaves, device, timed) -> list[dict]:
    """FlexAttention with the same pattern (sliding window, block sparse) and flash-attn's window_size."""
    torch = _torch()
    out = []
    s = leaves[0].shape[2]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return [{"op": op, "provider": "flex", "error": "torch has no flex_attention"}]
    if device.type == "cuda" and op in ("sliding_window", "block_sparse"):
        if op == "sliding_window":
            w = kw["window"] // 2
            mod = lambda b, h, i, j: (i - j).abs() <= w
            bm = create_block_mask(mod, None, None, s, s, device=device)
        else:
            lm = kw["layout"].mask[0]
            bs = kw["layout"].block_size
            mod = lambda b, h, i, j: lm[i // bs, j // bs]
            bm = create_block_mask(mod, None, None, s, s, device=device, BLOCK_SIZE=bs)
        flex = torch.compile(flex_attention)
        timed(
            "FlexAttention (same pattern)", op, "torch", lambda q, k, v: flex(q, k, v, block_mask=bm), leaves
        )
    if device.type == "cuda" and op == "sliding_window":
        try:
            from flash_attn import flash_attn_func

            w = kw["window"] // 2
            timed("flash-attn window_size", op, "flash_attn",
                  lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  window_size=(w, w)),
                  leaves)  # fmt: skip
        except ImportError:
            out.append({"op": op, "provider": "flash-attn", "error": "not installed"})
    return out


def triton_vs_cuda(timings: list[dict]) -> list[dict]:
    """Per op timed with both, which is faster fwd+bwd, and what `auto` picks."""
    res = []
    by = {(r["op"], r.get("backend")): r for r in timings if "fwd_bwd_ms" in r}
    picks = {r["op"]: r["picks"] for r in timings if r.get("provider") == "auto"}
    for op in sorted({r["op"] for r in timings}):
        t, c = by.get((op, "triton")), by.get((op, "cuda"))
        if t and c:
            faster = "triton" if t["fwd_bwd_ms"] < c["fwd_bwd_ms"] else "cuda"
            res.append({"op": op, "triton_ms": t["fwd_bwd_ms"], "cuda_ms": c["fwd_bwd_ms"], "faster": faster,
                        "auto_picks": picks.get(op), "auto_is_fastest": picks.get(op) == faster})  # fmt: skip
    return res


# ---- main --------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    torch = _torch()
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu": platform.processor() or platform.machine(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}  # fmt: skip
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m etkd_kernels.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="gpu_check_report.json", help="JSON report path")
    parser.add_argument("--smoke", action="store_true", help="small shapes; on a CPU-only machine runs triton "
                        "under TRITON_INTERPRET=1")  # fmt: skip
    parser.add_argument("--backends", nargs="*", help="only these backends (default: every one)")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: every one)")
    parser.add_argument("--no-timings", action="store_true")
    args = parser.parse_args(argv)

    # Before torch/triton kernels are imported: on a CPU-only machine the smoke run uses the interpreter.
    gpu = _has_gpu()
    if args.smoke and not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not gpu:
        print("gpu_check: no CUDA GPU here; run with --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    torch = _torch()
    device = torch.device("cuda" if gpu else "cpu")
    t0 = time.time()
    report: dict = {"environment": environment(device), "smoke": args.smoke}
    cases = run_parity(device, args.smoke, args.backends, args.ops)
    report["parity"] = [asdict(c) for c in cases]
    report["large_shapes"] = [] if args.smoke else run_large(device)
    if not args.no_timings:
        report["timings"] = run_timings(device, args.smoke)
        report["triton_vs_cuda"] = triton_vs_cuda(report["timings"])
    failed = [c for c in cases if not c.passed] + [
        r for r in report["large_shapes"] if r.get("passed") is False
    ]
    report["summary"] = {
        "parity_cases": len(cases),
        "failed": len(failed),
        "seconds": round(time.time() - t0, 1),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"gpu_check: {len(cases)} parity cases, {len(failed)} failed; report in {args.out}")
    return 1 if failed else 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
