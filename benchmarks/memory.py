"""Peak extra memory of one call, measured honestly in a fresh subprocess.

`python -m etkd.benchmarks.memory CASE PROVIDER SEQ MODE` builds the case, records the process's resident
set, runs the call once, and prints the growth of the kernel-reported high-water mark (ru_maxrss) in MiB:
everything the call allocated at its peak, whatever allocator it used. The inputs and HF's module are
allocated before the baseline, so only the call's own working memory is counted.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_here(case_name: str, provider: str, seq: int, backward: bool, **case_kw) -> float:
    import gc

    from .cases import CASES

    case = CASES[case_name](seq, **case_kw)
    fn = case.run(provider, backward)
    gc.collect()
    base = max(_rss_mib(), _maxrss_mib())
    fn()
    return max(0.0, _maxrss_mib() - base)


def measure(case_name: str, provider: str, seq: int, backward: bool, **case_kw) -> float | None:
    """Peak extra MiB of one call, in a fresh interpreter (None if the subprocess failed)."""
    cmd = [
        sys.executable,
        "-m",
        "etkd.benchmarks.memory",
        case_name,
        provider,
        str(seq),
        "fwd_bwd" if backward else "fwd",
        json.dumps(case_kw),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return float(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    name, prov, seq, mode = sys.argv[1:5]
    kw = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    print(f"{measure_here(name, prov, int(seq), mode == 'fwd_bwd', **kw):.1f}")
