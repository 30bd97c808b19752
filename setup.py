"""Build script: the CPU extension always (unless ETKD_NO_EXT=1), the CUDA one only where it can be built.

The CPU extension `etkd_kernels._C` is compiled from csrc/cpu with OpenMP; on x86-64 its SIMD kernels are compiled
once per ISA target (csrc/cpu/isa/: AVX2 baseline, AVX-512, AVX-512 + BF16) that the compiler accepts, and the
extension picks one at run time (csrc/cpu/isa.h). The CUDA extension
`etkd_kernels._C_cuda` is compiled from csrc/cuda only when torch is a CUDA build and a CUDA toolkit is found,
or when FORCE_CUDA=1. The path taken is printed so a user can see it in the pip log.
"""

import glob
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_namespace_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Each top-level folder is installed under its import name; its subpackages are FOUND (namespace discovery,
# so a folder without __init__.py counts too), never listed, so a new subpackage cannot be left out of the wheel.
# A folder that is a root of its own (models/hf_integration is `etkd.hf`) is not also installed under its
# parent's name. tests/ and benchmarks/suite/ (`make bench`) are not installed.
ROOTS = {
    "etkd_kernels": "etkd_kernels",
    "models": "etkd.models",
    "models/hf_integration": "etkd.hf",  # HF integration: layered with models (imports etkd_kernels only)
    "distill": "etkd.distill",
    "benchmarks": "etkd.benchmarks",
}
NOT_INSTALLED = ("benchmarks/suite",)
# csrc/ ships inside the wheel as etkd_kernels/csrc (data, not a package): `python -m etkd_kernels.build` (JIT)
# compiles the CPU kernels from it for a torch the wheel was not built for.
CSRC_PACKAGE = "etkd_kernels.csrc"
CSRC_FILES = [
    "common/*.h",
    "cpu/*.h",
    "cpu/*.cpp",
    "cpu/isa/*.h",
    "cpu/isa/*.cpp",
    "cuda/*.h",
    "cuda/*.cu",
    "cuda/*.cpp",
]


def discover_packages() -> tuple[list[str], dict[str, str]]:
    """(packages, package_dir) for every package under ROOTS, found by setuptools' namespace discovery."""
    packages, package_dir = [], {}
    for folder, name in ROOTS.items():
        skip = [*NOT_INSTALLED, *(other for other in ROOTS if other.startswith(folder + "/"))]
        packages.append(name)
        package_dir[name] = folder
        for sub in find_namespace_packages(where=os.path.join(HERE, folder), exclude=["*__pycache__*"]):
            path = f"{folder}/{sub.replace('.', '/')}"
            if any(path == s or path.startswith(s + "/") for s in skip):
                continue
            packages.append(f"{name}.{sub}")
    packages.append(CSRC_PACKAGE)
    package_dir[CSRC_PACKAGE] = "csrc"
    return packages, package_dir


def _say(msg: str) -> None:
    print(f"[etkd setup] {msg}", file=sys.stderr)


# x86-64 kernel targets (csrc/cpu/isa/<name>.cpp): GCC target string and an intrinsic the target must compile.
_ISA_PROBES = {
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


def _isa_macros() -> list[tuple[str, str]]:
    """ETKD_HAVE_<ISA>=1 for every x86-64 kernel target the compiler accepts (none elsewhere: generic target)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _say("not x86-64: kernels compiled for the generic target only")
        return []
    macros, built, skipped = [], [], []
    for name, (target, body) in _ISA_PROBES.items():
        if _compiler_accepts(target, body):
            macros.append((f"ETKD_HAVE_{name.upper()}", "1"))
            built.append(name)
        else:
            skipped.append(name)
    if "avx2" not in built:
        raise RuntimeError("the C++ compiler rejects the AVX2 + FMA target the cpu kernels need (set CXX?)")
    _say(
        f"CPU kernel targets: {', '.join(built)}"
        + (f" (compiler rejects: {', '.join(skipped)})" if skipped else "")
    )
    return macros


def _extensions():
    if os.environ.get("ETKD_NO_EXT") == "1":
        _say("ETKD_NO_EXT=1: building no compiled extension (reference and triton backends only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time: no compiled extension (use --no-build-isolation)")
        return [], {}

    exts = []
    cpu_sources = sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
        + glob.glob(os.path.join("csrc", "cpu", "isa", "*.cpp"))
    )
    if cpu_sources:
        if sys.platform == "darwin":
            omp_c, omp_l = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
        else:
            omp_c, omp_l = ["-fopenmp"], ["-fopenmp"]
        exts.append(
            CppExtension(
                "etkd_kernels._C",
                cpu_sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                define_macros=_isa_macros(),
                extra_compile_args={"cxx": ["-O3", "-std=c++17", *omp_c]},
                extra_link_args=omp_l,
            )
        )
        _say(f"building CPU extension etkd_kernels._C from {len(cpu_sources)} sources (OpenMP on)")

    force = os.environ.get("FORCE_CUDA") == "1"
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    binding = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    can_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_sources and (can_cuda or force):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(
            CUDAExtension(
                "etkd_kernels._C_cuda",
                binding + cuda_sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
                },
            )
        )
        _say(
            f"building CUDA extension etkd_kernels._C_cuda for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
    elif cuda_sources:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) found"
        _say(f"skipping CUDA extension: {why} (FORCE_CUDA=1 forces it)")

    if not exts:
        return [], {}
    # Cap parallel compile jobs: every torch-including translation unit needs ~1.5 GB of RAM.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

packages, package_dir = discover_packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={CSRC_PACKAGE: CSRC_FILES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
