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
import sysconfig
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
