def pytest_addoption(parser):
    parser.addoption("--paper-sizes", action="store_true", help="seq 512..8192 (default: a quick 1024)")
    parser.addoption(
        "--memory", action="store_true", help="also measure peak memory (one subprocess per row)"
    )


def pytest_generate_tests(metafunc):
    if "seq" in metafunc.fixturenames:
        paper = metafunc.config.getoption("--paper-sizes")
        metafunc.parametrize("seq", [512, 1024, 2048, 4096, 8192] if paper else [1024])


def pytest_configure(config):
    config.addinivalue_line("markers", "memory: measures peak memory in a subprocess")
