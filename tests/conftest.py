"""Markers are defined once here (and in pyproject.toml); every module collects on a CPU-only machine."""

import os

import pytest
import torch


def pytest_runtest_setup(item):
    # Decided when each test runs, not at collection or import: a `cuda` test can only pass on a real GPU,
    # and never in a process where the Triton interpreter was switched on (its kernels would run on numpy).
    if item.get_closest_marker("cuda") is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none on this machine)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: GPU tests run without it, in a process of their own")


def pytest_sessionstart(session):
    # `make test` and .ci/run test the installed wheel from outside the source tree and set ETKD_TEST_INSTALLED=1:
    # then a module imported from anywhere but site-packages (the source tree on sys.path, an editable
    # install) fails the run before any test, so a green suite always means the shipped package passed.
    if os.environ.get("ETKD_TEST_INSTALLED") != "1":
        return
    import sysconfig
    from pathlib import Path

    import etkd
    import etkd.distill
    import etkd_kernels

    site = [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")]
    paths = {
        "etkd": list(etkd.__path__),
        "etkd.distill": [etkd.distill.__file__],
        "etkd_kernels": [etkd_kernels.__file__],
    }
    wrong = [f"{name} from {p}" for name, ps in paths.items() for p in ps
             if not any(Path(p).resolve().is_relative_to(s) for s in site)]  # fmt: skip
    if wrong:
        raise pytest.UsageError(
            f"ETKD_TEST_INSTALLED=1 but not testing the installed package: {'; '.join(wrong)} "
            f"(site-packages: {', '.join(map(str, site))})"
        )


def pytest_addoption(parser):
    parser.addoption(
        "--max-errors", action="store_true", help="print the worst assert_close error per test file"
    )


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--max-errors"):
        return
    from helpers import RECORDED

    worst: dict[str, tuple[float, str, float, int]] = {}
    for test, name, err, atol in RECORDED:
        module = test.split("::")[0]
        n = worst.get(module, (0.0, "", 0.0, 0))[3] + 1
        if module not in worst or err > worst[module][0]:
            worst[module] = (err, f"{test.split('::', 1)[-1]} [{name}]", atol, n)
        else:
            worst[module] = (*worst[module][:3], n)
    terminalreporter.section("max abs error per file (assert_close)")
    for module, (err, where, atol, n) in sorted(worst.items()):
        terminalreporter.write_line(f"{module}: {n} comparisons, worst {err:.2e} (atol {atol:g}) at {where}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the driver tests: on 2 shared cores it avoids oversubscription (10x faster
    steps). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
