"""`make bench` (pytest-benchmark) options. This folder is not part of the installed package."""


def pytest_addoption(parser):
    parser.addoption("--paper-sizes", action="store_true", help="seq 512..8192 (default: a quick 1024)")
    parser.addoption("--seq-lens", type=int, nargs="+", default=None, help="these sequence lengths")
    parser.addoption("--memory", action="store_true", help="also peak memory (a fresh process per row)")
    parser.addoption("--dtype", default="fp32", help="fp32, bf16 or fp16")


def pytest_generate_tests(metafunc):
    if "seq" in metafunc.fixturenames:
        chosen, paper = metafunc.config.getoption("--seq-lens"), metafunc.config.getoption("--paper-sizes")
        metafunc.parametrize("seq", chosen or ([512, 1024, 2048, 4096, 8192] if paper else [1024]))
