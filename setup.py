"""Build script: pure Python plus the CPU extension when torch is importable here; the CUDA one only where it can be built.

The CPU extension `etkd_kernels._C` is compiled from csrc/cpu with OpenMP; on x86-64 its SIMD kernels are compiled
once per ISA target (csrc/cpu/isa/: AVX2 baseline, AVX-512, AVX-512 + BF16) that the compiler accepts, and the
extension picks one at run time (csrc/cpu/isa.h). How that build goes (sources, targets, flags) is written once, in
etkd_kernels/build.py, which also compiles the same kernels just in time for another torch (ETKD_JIT=1).

A compiled extension is tied to the torch it was built against: the build writes that version to
etkd_kernels/_build_info.py, and the wheel requires the same torch minor (`torch==2.13.*` for a 2.13 build).
torch is deliberately NOT a build requirement (pyproject.toml): in pip's isolated build it would pull the
multi-GB CUDA torch onto a CPU machine. So an isolated build (`pip install .` from source) makes a pure-Python
package whose `cpu` backend says how to get kernels (`ETKD_JIT=1`), and `pip install --no-build-isolation .`
compiles against the torch the user has (CPU or CUDA). The CUDA extension `etkd_kernels._C_cuda` is compiled
from csrc/cuda only when torch is a CUDA build and a CUDA toolkit is found, or when FORCE_CUDA=1. The path taken
is printed so a user can see it in the pip log.
"""

import glob
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

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


# Runtime dependencies besides torch (whose requirement the build decides, below). Floors are the releases that
# have every API we call (a resolver that lands below one fails at install, not in a test). The drivers'
# dependencies are the `train` extra (pyproject.toml); a driver run without them says which extra to install.
DEPENDENCIES = [
    "numpy>=1.24",
    # 5.6: the first release the HF suite passes on (tests/test_hf_*, test_models_hf, test_convert, ...; swept
    # 2026-12-06): 4.57 runs BERT/RoBERTa without AttentionInterface, 5.0 has another mask-interface call,
    # 5.5 re-saves LayerNorm weights as beta/gamma. etkd.hf says the same at import (MIN_TRANSFORMERS).
    "transformers>=5.6",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",
]
TORCH_FLOOR = "torch>=2.5"  # a package with no compiled extension runs on any torch the code supports


def _say(msg: str) -> None:
    print(f"[etkd setup] {msg}", file=sys.stderr)


def _kernel_build():
    """etkd_kernels/build.py, loaded by path (the package itself cannot be imported before it is built)."""
    spec = importlib.util.spec_from_file_location(
        "_etkd_build", os.path.join(HERE, "etkd_kernels", "build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """(ext_modules, cmdclass, torch requirement)."""
    if os.environ.get("ETKD_NO_EXT") == "1":
        _say(
            "ETKD_NO_EXT=1: building no compiled extension (reference and triton backends; ETKD_JIT=1 for cpu)"
        )
        return [], {}, TORCH_FLOOR
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable in this build environment (pip's build isolation keeps your torch out): "
            "building the pure-Python package, whose cpu backend compiles its kernels on first use with ETKD_JIT=1. "
            "To compile them now against your torch: pip install --no-build-isolation ."
        )
        return [], {}, TORCH_FLOOR

    kb = _kernel_build()
    exts = []
    csrc = os.path.join(HERE, "csrc")
    cpu_sources = [os.path.relpath(p, HERE) for p in kb.cpu_sources(Path(csrc))]
    isas = []
    if cpu_sources:
        macros = kb.isa_macros(_say)
        isas = [name.removeprefix("ETKD_HAVE_").lower() for name, _ in macros]
        exts.append(
            CppExtension(
                "etkd_kernels._C",
                cpu_sources,
                include_dirs=[csrc],
                define_macros=macros,
                extra_compile_args={"cxx": kb.compile_flags()},
                extra_link_args=kb.openmp_flags()[1],
            )
        )
        _say(
            f"building CPU extension etkd_kernels._C from {len(cpu_sources)} sources (OpenMP on) for torch {torch.__version__}"
        )

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
                include_dirs=[csrc],
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
        return [], {}, TORCH_FLOOR
    info = kb.build_info_source(torch.__version__, isas)

    class BuildWithInfo(BuildExtension.with_options(use_ninja=True)):
        """Writes etkd_kernels/_build_info.py (the torch compiled against) beside the extension it builds."""

        def run(self):
            super().run()
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("etkd_kernels._C")), "_build_info.py")
            with open(path, "w") as f:
                f.write(info)

    # Cap parallel compile jobs: every torch-including translation unit needs ~1.5 GB of RAM.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    minor = kb.torch_minor(torch.__version__)
    _say(
        f"the wheel requires torch=={minor}.* (a compiled extension loads only on the torch minor it was built for)"
    )
    return exts, {"build_ext": BuildWithInfo}, f"torch=={minor}.*"


class BuildPy(build_py):
    """Never copies etkd_kernels/_build_info.py from the tree (an editable build writes it there): only the
    build that compiles the extension writes it, beside the extension; a pure-Python package has none."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("etkd_kernels", "_build_info")]


ext_modules, cmdclass, torch_requirement = _extensions()
cmdclass = {"build_py": BuildPy, **cmdclass}
packages, package_dir = discover_packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={CSRC_PACKAGE: CSRC_FILES},
    install_requires=[torch_requirement, *DEPENDENCIES],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
