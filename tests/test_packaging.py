"""What `pip install etkd` puts on disk: every module of the source tree, under its `etkd.*` name, and nothing else.

The file list is read from the installed distribution's RECORD (what pip wrote), so it checks the wheel, not
setup.py's idea of it. Under an editable install there is no such list: the test says so and skips; the gate
(`make test`, `.ci/run`) installs the built wheel, where it runs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import sysconfig
import zipfile
from pathlib import Path, PurePosixPath

import pytest

import etkd_kernels

# Files a wheel holds that are not copies of a source file: the compiled extensions, the recorded build
# environment, the CLI script, byte code pip compiles, and the libraries `auditwheel repair` grafts in.
BUILT = ("etkd_kernels/_C.", "etkd_kernels/_C_cuda.", "etkd_kernels/_build_info.py")


def _source_tree() -> Path:
    tree = Path(os.environ.get("ETKD_SOURCE_TREE", Path(__file__).resolve().parents[1]))
    if not (tree / "setup.py").is_file():
        pytest.skip(f"no source tree to compare with at {tree} (set ETKD_SOURCE_TREE)")
    return tree


def _setup_constants(tree: Path) -> dict:
    """ROOTS, NOT_INSTALLED, CSRC_PACKAGE and CSRC_FILES as setup.py writes them (its data, not its logic)."""
    wanted = {"ROOTS", "NOT_INSTALLED", "CSRC_PACKAGE", "CSRC_FILES"}
    module = ast.parse((tree / "setup.py").read_text())
    return {t.id: ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in wanted}  # fmt: skip


def _expected(tree: Path) -> set[str]:
    """Every .py file under each installed folder, at the path its import name gives it, plus csrc's sources."""
    c = _setup_constants(tree)
    expected = set()
    for folder, name in c["ROOTS"].items():
        nested = [r for r in c["ROOTS"] if r.startswith(folder + "/")]
        for path in (tree / folder).rglob("*.py"):
            rel = path.relative_to(tree).as_posix()
            if "__pycache__" in rel or any(rel.startswith(s + "/") for s in (*c["NOT_INSTALLED"], *nested)):
                continue
            if rel.startswith(BUILT):  # written by a build into the tree (editable install)
                continue
            expected.add(name.replace(".", "/") + "/" + path.relative_to(tree / folder).as_posix())
    prefix = c["CSRC_PACKAGE"].replace(".", "/")
    for pattern in c["CSRC_FILES"]:
        expected |= {
            f"{prefix}/{p.relative_to(tree / 'csrc').as_posix()}" for p in (tree / "csrc").glob(pattern)
        }
    return expected


def _installed() -> tuple[importlib.metadata.Distribution, set[str]]:
    """The installed distribution and its files (RECORD) outside .dist-info, byte code and grafted libraries.

    Skips when the package under test is the source tree itself (an editable install, or the tree on sys.path),
    which has no installed file list; under `make test` (ETKD_TEST_INSTALLED=1) that is a failure instead."""
    tree = Path(__file__).resolve().parents[1]
    dist = importlib.metadata.distribution("etkd")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if Path(etkd_kernels.__file__).resolve().is_relative_to(tree) or direct.get("dir_info", {}).get(
        "editable"
    ):
        assert os.environ.get("ETKD_TEST_INSTALLED") != "1", f"etkd_kernels from {etkd_kernels.__file__}"
        pytest.skip("etkd is the source tree here (editable); `make test` checks the installed wheel")
    assert dist.read_text("RECORD"), f"{dist}: no RECORD (not installed from a wheel)"
    files = set()
    for f in dist.files or ():
        p = PurePosixPath(f)
        if p.suffix == ".pyc" or p.parts[0].endswith((".dist-info", ".libs")) or p.parts[0] == "..":
            continue
        files.add(p.as_posix())
    return dist, files


def test_installed_files_are_the_source_tree():
    """Nothing left out (a subpackage setup.py forgot) and nothing extra (tests, benchmarks/suite, a folder
    installed twice under two names)."""
    tree = _source_tree()
    _, installed = _installed()
    expected = _expected(tree)
    missing = sorted(expected - installed)
    extra = sorted(f for f in installed - expected if not f.startswith(BUILT))
    assert not missing, f"in the source tree but not installed: {missing}"
    assert not extra, f"installed but not a source file of an installed folder: {extra}"
    assert "etkd/distill/tasks/__init__.py" in installed  # the subpackage the hand-written list once missed


def test_installed_package_is_the_one_imported():
    """The modules the suite imports are the installed ones (site-packages), not the source tree's."""
    import etkd.distill

    dist, _ = _installed()
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    for module in (etkd_kernels, etkd.distill):
        path = Path(module.__file__).resolve()
        assert any(path.is_relative_to(s) for s in site), (
            f"{module.__name__} imported from {path}, not {site}"
        )
    assert (
        Path(dist.locate_file("etkd_kernels/__init__.py")).resolve() == Path(etkd_kernels.__file__).resolve()
    )


def _release_wheels(tree: Path) -> tuple[Path, Path]:
    """`make wheel`'s repaired wheel in dist/ and the wheel pip built from its sdist in build/sdist-wheel/."""
    wheels = sorted((tree / "dist").glob("etkd-*-manylinux*.whl"))
    pure = sorted((tree / "build" / "sdist-wheel").glob("etkd-*-py3-none-any.whl"))
    if len(wheels) != 1 or len(pure) != 1:
        assert os.environ.get("ETKD_TEST_INSTALLED") != "1", f"make wheel left {wheels} and {pure}"
        pytest.skip("no release wheels (make wheel) in this source tree")
    return wheels[0], pure[0]


def _metadata(wheel: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return names, meta


def test_release_wheel_requires_its_torch_minor_and_holds_no_torch_library():
    wheel, _ = _release_wheels(_source_tree())
    names, meta = _metadata(wheel)
    tag = re.search(r"-manylinux_2_(\d+)_x86_64\.whl$", wheel.name)  # auditwheel repair's platform tag
    assert tag and int(tag.group(1)) <= 28, wheel.name  # what torch's own wheels need: glibc 2.28
    info = next(n for n in names if n.endswith("etkd_kernels/_build_info.py"))
    with zipfile.ZipFile(wheel) as z:
        recorded = ast.literal_eval(re.search(r"TORCH_VERSION = (.+)", z.read(info).decode()).group(1))
    minor = ".".join(recorded.split("+")[0].split(".")[:2])
    torch_reqs = [line for line in meta.splitlines() if re.match(r"Requires-Dist: torch\b", line)]
    assert torch_reqs == [f"Requires-Dist: torch=={minor}.*"], torch_reqs
    from packaging.requirements import Requirement

    spec = Requirement(torch_reqs[0].removeprefix("Requires-Dist: ")).specifier
    major, mid = (int(x) for x in minor.split("."))
    assert f"{minor}.0" in spec and f"{minor}.7" in spec  # any patch release of the build's minor ...
    assert f"{major}.{mid - 1}.0" not in spec and f"{major}.{mid + 1}.0" not in spec  # ... and no other minor
    assert any(re.search(r"etkd_kernels/_C\.cpython-.*\.so$", n) for n in names)
    grafted = [n for n in names if ".libs/" in n]
    assert not [n for n in grafted if re.search(r"/lib(torch|c10|gomp|shm)", n)], (
        grafted
    )  # torch's stay torch's


def test_make_wheel_leaves_no_metadata_at_the_root_of_the_source_tree():
    """The sdist build writes etkd.egg-info into the tree; `make wheel` removes it. Left there, Python started at
    the tree's root (pytest, `python -m etkd...`) reads it before the venv's metadata, and once setup.py changes
    it is stale: a worktree's copy from the morning said transformers>=4.48 to a setup.py requiring 5.6 (and
    `etkd`'s missing-extra check reads the same requirements)."""
    tree = _source_tree()
    _release_wheels(tree)
    assert not sorted(tree.glob("*.egg-info")), "make wheel left its egg-info metadata in the source tree"


def test_sdist_builds_the_pure_python_wheel_with_the_sources_for_jit():
    """An isolated build (no torch in reach, as `pip install etkd-X.tar.gz` does it) gives a pure-Python wheel
    that accepts any supported torch and ships csrc/ for ETKD_JIT=1."""
    _, pure = _release_wheels(_source_tree())
    names, meta = _metadata(pure)
    assert "Requires-Dist: torch>=2.5" in meta.splitlines()
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_info.py")]
    assert {
        "etkd_kernels/csrc/cpu/binding.cpp",
        "etkd_kernels/csrc/cpu/isa/avx2.cpp",
        "etkd_kernels/build.py",
    } <= set(names)
