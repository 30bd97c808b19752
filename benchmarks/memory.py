"""Peak extra memory of one call, measured honestly in a fresh subprocess.

`python -m etkd.benchmarks.memory CASE PROVIDER SEQ MODE` builds the case, records the process's resident
set, runs the call once, and prints its peak resident memory above that level in MiB (`PeakRSS`):
everything the call allocated at its peak, whatever allocator it used. The inputs and HF's module are
allocated before the baseline, so only the call's own working memory is counted.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of a stretch of code, in MiB above the resident memory at its start.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) to the current RSS, so the
    peak of the measured code alone is VmHWM - VmRSS(start). Elsewhere: ru_maxrss growth (a lower bound
    when an earlier peak was higher).
    """

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        try:  # hand freed heap pages back to the OS, so the start level holds only live memory
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_mib("VmHWM") is not None
        except OSError:
            pass
        self.start = (
            _status_mib("VmRSS") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        return self

    def __exit__(self, *exc) -> None:
        end = (
            _status_mib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        self.peak_mib = max(0.0, end - self.start)


def measure_here(case_name: str, provider: str, seq: int, backward: bool, **case_kw) -> float:
    from .cases import CASES

    case = CASES[case_name](seq, **case_kw)
    fn = case.run(provider, backward)
    with PeakRSS() as peak:
        fn()
    return peak.peak_mib


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
