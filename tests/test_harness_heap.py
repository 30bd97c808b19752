"""The benchmark harness's heaps (`etkd.benchmarks.harness.HEAPS`): the environment a fresh process gets for each,
that it reaches the child (its `heap()` record), that a large per-call temporary stops page-faulting on the warm
heap, that a preloaded allocator which is not installed is a skip with how to get it, and `--heap` through the
scripts (one child per heap). No timing is asserted."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from etkd.benchmarks import harness
from etkd_kernels.timing import HEAP_VAR, environment, heap

PROBE = "etkd.benchmarks.harness:fault_probe"


def test_heap_env_sets_the_heap_and_clears_what_would_change_it(monkeypatch, tmp_path):
    base = {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TRIM_THRESHOLD_": "2", "MALLOC_CONF": "x:1",
            "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.cpu.hwcaps=-AVX512F",
            "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /opt/libother.so"}  # fmt: skip
    keep = harness.heap_env("glibc-keep", base)
    assert keep["GLIBC_TUNABLES"] == ":".join(("glibc.cpu.hwcaps=-AVX512F", *harness.KEEP_TUNABLES))
    assert not {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_CONF"} & set(keep)
    assert (
        keep["LD_PRELOAD"] == "/opt/libother.so" and keep[HEAP_VAR] == "glibc-keep" and keep["PATH"] == "/bin"
    )
    default = harness.heap_env("default", base)
    assert default["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F" and default[HEAP_VAR] == "default"
    assert base["MALLOC_MMAP_THRESHOLD_"] == "1"  # the given environment is not changed
    monkeypatch.setattr(harness, "_LIB_DIRS", (str(tmp_path),))
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert (
        harness.heap_env("warm", base)["LD_PRELOAD"]
        == f"{tmp_path}/libtcmalloc_minimal.so.4 /opt/libother.so"
    )
    with pytest.raises(ValueError, match="heap: unknown 'hot'"):
        harness.heap_env("hot", base)
    assert harness.heaps_of("both") == ["default", "warm"] and harness.heaps_of(None) == []
    with pytest.raises(ValueError, match=r"--heap: unknown \['hot'\]; expected both or a comma list of"):
        harness.heaps_of("default,hot")


def test_a_missing_allocator_is_a_skip_saying_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "_LIB_DIRS", (str(tmp_path),))
    for name, (lib, how) in harness.PRELOADS.items():
        with pytest.raises(
            harness.HeapUnavailable, match=re.escape(f"heap {name}: {lib} not found in {tmp_path}; {how}")
        ):
            harness.heap_env(name, {})
        res = harness.run_fresh(PROBE, {"mib": 1, "calls": 1}, heap=name)
        assert res == {"status": f"skipped: heap {name}: {lib} not found in {tmp_path}; {how}"}


def _probe(heap: str) -> dict:
    """Page faults per call of a 64 MiB temporary (above glibc's largest dynamic mmap threshold, 32 MiB, as HF's
    score tensors at 4096 tokens are), 4 calls in a fresh process on `heap`; skipped where it is not installed."""
    try:
        harness.heap_env(heap)
    except harness.HeapUnavailable as exc:
        pytest.skip(str(exc))
    got = harness.run_fresh(PROBE, {"mib": 64, "calls": 4}, heap=heap)
    assert "minflt" in got, got
    return got


def test_the_heap_reaches_the_child_and_the_default_faults_every_call():
    got = _probe("default")
    assert got["heap"] == "default: glibc malloc, defaults", got
    assert min(got["minflt"][1:]) >= 64 * 256 // 8, (
        got
    )  # 4 KiB pages (or 2 MiB ones: never below 1/8 of that)


def test_the_warm_heap_stops_the_page_faults():
    got, default = _probe("warm"), _probe("default")
    assert got["heap"].startswith("warm: tcmalloc (/") and "libtcmalloc_minimal.so.4" in got["heap"], got
    assert max(got["minflt"][1:]) * 10 <= min(default["minflt"][1:]), (got, default)  # reused, not faulted in


def test_jemalloc_and_glibc_keep_run_on_their_allocator():
    """What they are, not how warm: jemalloc's defaults hand blocks above 8 MiB back at once, glibc-keep fragments
    on torch's aligned blocks (harness's docstring); both may fault per call."""
    assert _probe("glibc-keep")["heap"] == "glibc-keep: glibc malloc, " + ":".join(harness.KEEP_TUNABLES)
    assert _probe("jemalloc")["heap"].startswith("jemalloc: jemalloc (/")


def test_the_environment_record_names_the_heap(monkeypatch):
    monkeypatch.delenv(HEAP_VAR, raising=False)
    env = environment()
    assert env.heap == heap() and f"heap {env.heap}" in env.line()
    if "GLIBC_TUNABLES" not in os.environ and not os.environ.get("LD_PRELOAD"):
        assert env.heap == "glibc malloc, defaults"


def test_heap_flag_reruns_a_script_once_per_heap(capfd):
    ap = harness.parser("probe", heap=True)
    args = ap.parse_args(["--heap", "default,glibc-keep"])  # both glibc: here whatever is installed
    argv = [PROBE, '{"mib": 1, "calls": 1}']  # the harness's own main as the script
    got = harness.per_heap(args, "etkd.benchmarks.harness", argv)
    assert got == {"default": {"exit": 0}, "glibc-keep": {"exit": 0}}
    out = capfd.readouterr().out
    assert (
        out.index("## heap default:")
        < out.index('"heap": "default: glibc')
        < out.index("## heap glibc-keep:")
    )
    assert '"heap": "glibc-keep: glibc malloc, glibc.malloc.mmap_threshold=' in out
    assert harness.rerun_per_heap(argparse.Namespace(heap=None), "etkd.benchmarks.harness") is None


def test_heap_table_puts_each_heap_side_by_side():
    by_heap = {"default": {"rows": [{"mode": "fwd", "hf_s": 2.0, "etkd_s": 0.5}, {"mode": "fwd+bwd", "hf_s": 3.0,
                                                                                   "etkd_s": 1.0}]},
               "warm": {"status": "skipped: heap warm: libtcmalloc_minimal.so.4 not found"}}  # fmt: skip
    lines = harness.heap_table(by_heap, "mode", "hf", "etkd").splitlines()
    assert (
        lines[0]
        == "| mode | default: hf / etkd s | default: hf / etkd | warm: hf / etkd s | warm: hf / etkd |"
    )
    assert (
        lines[2]
        == "| fwd | 2.000 / 0.500 | **4.00×** | skipped: heap warm: libtcmalloc_minimal.so.4 not found | — |"
    )
    assert lines[3].startswith("| fwd+bwd | 3.000 / 1.000 | **3.00×** |")
