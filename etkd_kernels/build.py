"""The build of the CPU kernels (csrc/cpu), written once: setup.py compiles the wheel's `etkd_kernels._C` with it,
and it compiles the same kernels just in time for a torch the installed extension was not built for.

    python -m etkd_kernels.build            # compile for the running torch into the cache (or find it there)
    python -m etkd_kernels.build --force    # compile again
    ETKD_JIT=1                              # the `cpu` backend does the same on first use when the installed
                                            # extension is missing or was compiled against another torch

The JIT build is `torch.utils.cpp_extension.load` (ninja) of the sources the wheel ships in `etkd_kernels/csrc`,
with the wheel's ISA targets (each one the compiler accepts) and flags, into a folder keyed by the torch version,
Python, the CPU and the sources: `$ETKD_CACHE_DIR` (default `$XDG_CACHE_HOME/etkd`, i.e. `~/.cache/etkd`)
`/kernels/torch-<version>-py<XY>-<machine>-<cpu>-<sources>`. A finished build there is loaded on later runs
without ETKD_JIT (no compiler needed then).

setup.py loads this file by its path, before etkd_kernels is importable: it imports nothing of etkd_kernels at
module level and torch only inside functions.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# x86-64 kernel targets (csrc/cpu/isa/<name>.cpp): GCC target string and an intrinsic the target must compile.
ISA_PROBES = {
    "avx2": (
        "avx2,fma,f16c",
        "__m256 x = _mm256_fmadd_ps(_mm256_set1_ps(1.f), _mm256_set1_ps(2.f), _mm256_setzero_ps());",
    ),
    "avx512": (
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq",
        "__m512 x = _mm512_fmadd_ps(_mm512_set1_ps(1.f), _mm512_set1_ps(2.f), _mm512_setzero_ps());",
    ),
    "avx512_bf16": (
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16",
        "__m256bh x = _mm512_cvtneps_pbh(_mm512_set1_ps(1.f));",
    ),
}
EXTENSION = "_C"  # the module name the binding's PyInit__C defines (etkd_kernels._C)


def _say(msg: str) -> None:
    print(f"[etkd build] {msg}", file=sys.stderr, flush=True)


def csrc_dir() -> Path:
    """The C++ sources: `etkd_kernels/csrc` in an installed wheel, the repository's `csrc/` in a source tree."""
    here = Path(__file__).resolve().parent
    shipped = here / "csrc"
    return shipped if (shipped / "cpu").is_dir() else here.parent / "csrc"


def cpu_sources(csrc: Path) -> list[str]:
    return sorted(str(p) for p in [*csrc.glob("cpu/*.cpp"), *csrc.glob("cpu/isa/*.cpp")])


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP."""
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def compile_flags() -> list[str]:
    return ["-O3", "-std=c++17", *openmp_flags()[0]]


def _compiler_accepts(target: str, body: str) -> bool:
    """Compile probe: does the C++ compiler build `body` under `#pragma GCC target(target)`?"""
    cxx = os.environ.get("CXX", "c++")
    src = f'#include <immintrin.h>\n#pragma GCC target("{target}")\nvoid probe() {{ {body} (void)x; }}\n'
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            res = subprocess.run(
                [cxx, "-std=c++17", "-c", path, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return res.returncode == 0


def isa_macros(say: Callable[[str], None] = _say) -> list[tuple[str, str]]:
    """ETKD_HAVE_<ISA>=1 for every x86-64 kernel target the compiler accepts (none elsewhere: generic target)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        say("not x86-64: kernels compiled for the generic target only")
        return []
    macros, built, skipped = [], [], []
    for name, (target, body) in ISA_PROBES.items():
        if _compiler_accepts(target, body):
            macros.append((f"ETKD_HAVE_{name.upper()}", "1"))
            built.append(name)
        else:
            skipped.append(name)
    if "avx2" not in built:
        raise RuntimeError("the C++ compiler rejects the AVX2 + FMA target the cpu kernels need (set CXX?)")
    say(
        f"CPU kernel targets: {', '.join(built)}"
        + (f" (compiler rejects: {', '.join(skipped)})" if skipped else "")
    )
    return macros


def build_info_source(torch_version: str, isas: list[str]) -> str:
    """The text of `etkd_kernels/_build_info.py`, written beside the compiled extension."""
    return (
        '"""Written by the build (setup.py): the torch the compiled extension etkd_kernels._C was built against."""\n\n'
        f"TORCH_VERSION = {torch_version!r}\n"
        f"ISAS = {tuple(isas)!r}\n"
    )


def torch_minor(version: str) -> str:
    """'2.13' for '2.13.0+cpu' (the part of the version a compiled extension's ABI is tied to)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _cpu_id() -> str:
    """A short hash of the CPU model and its flags (a build is kept per CPU, as its target probes were)."""
    text = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        text = "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _sources_id(csrc: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([*csrc.rglob("*.h"), *csrc.rglob("*.cpp")]):
        h.update(p.relative_to(csrc).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def cache_dir() -> Path:
    """Where the JIT build for the running torch, Python, CPU and sources lives."""
    import torch

    root = os.environ.get("ETKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "etkd"
    )
    key = (
        f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"
        f"{platform.machine()}-{_cpu_id()}-{_sources_id(csrc_dir())}"
    )
    return Path(root) / "kernels" / key


def _library(folder: Path) -> Path:
    import torch.utils.cpp_extension as ce

    return folder / f"{EXTENSION}{ce.LIB_EXT}"


def _register(module) -> None:
    """Make the module `etkd_kernels._C` for every `from etkd_kernels import _C`."""
    sys.modules["etkd_kernels._C"] = module
    if "etkd_kernels" in sys.modules:  # the package is imported whenever its cpu backend loads kernels
        sys.modules["etkd_kernels"]._C = module


def load_cached():
    """The JIT-built extension for this torch and CPU if the cache holds one (imported and registered), else None."""
    lib = _library(cache_dir())
    if not lib.is_file():
        return None
    spec = importlib.util.spec_from_file_location(EXTENSION, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _register(module)
    return module


class _Progress:
    """Prints `compiled k/n` as ninja's object files appear (torch's quiet build prints nothing for minutes)."""

    def __init__(self, folder: Path, sources: list[str]):
        self.folder, self.n, self._stop = folder, len(sources), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seen, t0 = -1, time.monotonic()
        while not self._stop.wait(2.0):
            done = len(list(self.folder.glob("*.o")))
            if done != seen:
                seen = done
                _say(f"compiled {done}/{self.n} sources ({time.monotonic() - t0:.0f} s)")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def jit_build(force: bool = False, verbose: bool = False):
    """Compile csrc/cpu for the running torch into `cache_dir()` (unless there already), load it as
    `etkd_kernels._C` and return it. Raises RuntimeError naming what is missing (ninja, a compiler) or the
    compiler's output."""
    import torch
    import torch.utils.cpp_extension as ce

    folder = cache_dir()
    if force and folder.exists():
        for p in folder.iterdir():
            if p.is_file():
                p.unlink()
    if not force and (module := load_cached()) is not None:
        _say(f"using the kernels built for torch {torch.__version__} in {folder}")
        return module
    try:
        ce.verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError("the JIT build needs ninja: pip install ninja") from exc
    csrc = csrc_dir()
    sources = cpu_sources(csrc)
    if not sources:
        raise RuntimeError(f"no C++ sources under {csrc / 'cpu'} (an etkd install without etkd_kernels/csrc)")
    folder.mkdir(parents=True, exist_ok=True)
    macros = [f"-D{k}={v}" for k, v in isa_macros()]
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    _say(
        f"compiling {len(sources)} sources of the CPU kernels for torch {torch.__version__} into {folder} "
        f"({os.environ['MAX_JOBS']} jobs; once per torch and CPU, minutes)"
    )
    t0 = time.monotonic()
    with _Progress(folder, sources):
        module = ce.load(
            name=EXTENSION,
            sources=sources,
            extra_cflags=[*compile_flags(), *macros],
            extra_ldflags=openmp_flags()[1],
            extra_include_paths=[str(csrc)],
            build_directory=str(folder),
            verbose=verbose,
            is_python_module=True,
        )
    _say(f"built {_library(folder)} in {time.monotonic() - t0:.0f} s")
    _register(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m etkd_kernels.build",
        description="compile etkd's CPU kernels for the running torch (JIT cache; see ETKD_JIT)",
    )
    parser.add_argument("--force", action="store_true", help="compile again even if the cache has a build")
    parser.add_argument("--verbose", action="store_true", help="show ninja's compiler command lines")
    args = parser.parse_args(argv)
    try:
        module = jit_build(force=args.force, verbose=args.verbose)
    except RuntimeError as exc:
        print(f"python -m etkd_kernels.build: error: {exc}", file=sys.stderr)
        return 1
    _say(f"ok: etkd_kernels._C = {module.__file__} (ISA {module.isa()}); the cpu backend uses it from now on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
