"""Compile-for-GPU tier: the Triton kernels compiled for sm_80 and sm_90 on this GPU-less machine.

For each compiled case: it compiles; 16-bit variants use tensor-core instructions (`mma.sync` on sm_80,
`wgmma` on sm_90; fp32 is exact FMA by design); no register spill (no stack frame in the cubin); dynamic
shared memory within the target's per-block limit. The default run compiles every kernel's largest
shipped config of each tile class (see `triton_targets.DEFAULT_TARGETS`); `-m slow` compiles the whole cross
product. Results are cached per machine (`ETKD_COMPILE_CACHE`), so only changed kernels recompile.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import triton_targets as tt  # noqa: E402


def _check(case: tt.Case) -> None:
    fn, _ = tt._kernel_fn(case)
    if not hasattr(fn, "cache_key"):  # decided per test: an interpreted kernel cannot be compiled
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, not compiled")
    res = tt.compile_case(case)
    problems = []
    if case.dtype != "float32" and case.kernel != "_common._delta_kernel":
        used = res.wgmma + res.mma if case.arch == 90 else res.mma
        if not used:
            problems.append("no tensor-core instruction (mma/wgmma) in the PTX of a 16-bit variant")
    if res.spills:
        problems.append(
            f"register spill: {res.stack} bytes of stack, {res.local} local ({res.regs} registers)"
        )
    if res.shared > tt.SMEM_LIMIT[case.arch]:
        problems.append(
            f"shared memory {res.shared} B over the sm_{case.arch} limit {tt.SMEM_LIMIT[case.arch]} B"
        )
    assert not problems, f"{case}: " + "; ".join(problems)


@pytest.mark.parametrize("case", tt.default_cases(), ids=str)
def test_kernel_compiles_for_gpu(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", tt.all_cases(), ids=str)
def test_every_config_dtype_head_dim_arch(case):
    _check(case)


def test_every_autotuned_kernel_is_in_the_tier():
    """A new @triton.autotune kernel in etkd_kernels/triton must be added to triton_targets.KERNELS."""
    found = set()
    for path in sorted(tt.TRITON_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "autotune"
                for d in node.decorator_list
            ):
                found.add((Path(path).stem, node.name))
    covered = {(mod, attr) for mod, attr, _ in tt.KERNELS.values()}
    assert found == covered, f"not compiled by the tier: {sorted(found - covered)}"


def test_every_shipped_class_has_a_default_target():
    from etkd_kernels.triton._common import SHIPPED

    classes = {"d64" if d <= 64 else "d128" for dt, d, _ in tt.DEFAULT_TARGETS if dt != "float32"}
    classes |= {"fp32" for dt, _, _ in tt.DEFAULT_TARGETS if dt == "float32"}
    assert all(classes == set(tables) for tables in SHIPPED.values())
    assert {arch for _, _, arch in tt.DEFAULT_TARGETS} == set(tt.ARCHS)


@pytest.mark.parametrize(
    "case",
    [c for c in tt.default_cases() if c.kernel == "block_sparse._fwd" and c.dtype != "float32"],
    ids=str,
)
def test_block_sparse_forward_is_software_pipelined(case):
    """The K/V loads of the block-sparse forward are prefetched num_stages - 1 loop iterations ahead (the
    TTGIR's async copies stay that many groups in flight), as in a dense loop: the LUT row is held in
    registers, so no load inside the loop feeds their addresses (a scalar LUT load there made them
    indirect and halved the distance). 16-bit only: the fp32 (FMA) loops of every kernel load into registers,
    with no async copies to pipeline."""
    fn, _ = tt._kernel_fn(case)
    if not hasattr(fn, "cache_key"):
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, not compiled")
    assert tt.compile_case(case).prefetch >= case.num_stages - 1
