"""The benchmark harness: one timer, one peak-memory meter, one fresh-process runner, one environment record.

Everything that measures (`etkd bench`, `python -m etkd.benchmarks.core`, `make bench`, the demo's kernel
table) goes through these; the timer, meter and environment are `etkd_kernels.timing` (re-exported here),
so the GPU acceptance run in the kernel package uses the same ones.

`run_fresh("package.module:function", spec)` calls `function(spec)` in a new interpreter and returns its
dict: peak memory is only honest in a process that has run nothing else (allocator pools, compiled graphs
and freed-but-kept heap of earlier rows would hide or inflate it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

from etkd_kernels.timing import Environment, PeakMemory, Timing, environment, time_call

__all__ = [
    "Environment",
    "PeakMemory",
    "Timing",
    "environment",
    "parser",
    "run_fresh",
    "run_json",
    "time_call",
]


# The flags every measurement script spells the same way (one name per concept): their help texts.
_SIZE_FLAGS = {
    "layers": "encoder layers",
    "seq": "sequence length",
    "batch": "batch size",
    "repeats": "timed calls (median)",
    "threads": "torch threads",
}


def parser(description: str, helps: dict[str, str] | None = None, **defaults: int) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared size/measurement flags a script uses (`--layers`, `--seq`, `--batch`,
    `--repeats`, `--threads`), each added when the script gives its default here (`helps`: a script's own
    wording of a flag's help)."""
    unknown = set(defaults) - set(_SIZE_FLAGS)
    if unknown:
        raise TypeError(f"parser: no shared flag {sorted(unknown)}; expected some of {list(_SIZE_FLAGS)}")
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=description, formatter_class=fmt)
    for name, default in defaults.items():
        text = (helps or {}).get(name, _SIZE_FLAGS[name])
        ap.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    return ap


def run_fresh(target: str, spec: dict, timeout: float | None = None) -> dict:
    """`target(spec)` ("package.module:function", returning a JSON-able dict) in a fresh interpreter.

    A failure comes back as {"status": "error: <last line of stderr>"} or {"status": "timeout after Ns"}, so a
    table can show the row as failed and go on."""
    return run_json([sys.executable, "-m", "etkd.benchmarks.harness", target, json.dumps(spec)], timeout)


def run_json(cmd: list[str], timeout: float | None = None) -> dict:
    """Run `cmd` and return the JSON dict its last stdout line holds, or a failed row's {"status": ...}."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f}s"}
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return {"status": f"error: {last[:160]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[0]:
        raise SystemExit("usage: python -m etkd.benchmarks.harness package.module:function '<json spec>'")
    module, func = argv[0].split(":")
    result = getattr(importlib.import_module(module), func)(json.loads(argv[1]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
