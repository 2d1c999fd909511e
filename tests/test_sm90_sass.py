"""Machine-code checks of the CUTLASS sm_90a convolution (csrc/sm90/) in the installed _C, without
a GPU: the sm_90a cubin holds the six CUTLASS kernels (bf16/fp16/float32-as-TF32 x fused inference
epilogue / training statistics epilogue, csrc/sm90/col_stats_epilogue.hpp; the combine of the latter's partials,
csrc/nhwc_stats.cu, is plain sm_80/sm_90 code checked by test_sass.py); every CUTLASS kernel issues
wgmma (HGMMA, with the BF16 / TF32 flavour for bfloat16 / float32) fed by TMA (UTMALDG) and stores through TMA
(UTMASTG); no kernel uses local memory (LOCAL/STACK in the resource table, LDL/STL in the SASS);
the statistics epilogue issues its butterfly shuffles, one store per partial and no global atomic
(its partials are deterministic); tools/sm90_resources.py --check agrees and prints the table.

When are the kernels required? Whenever the build could find CUTLASS: RESNET_KERNELS_CUTLASS_DIR is
set (CI sets it: .ci/run) or the cutlass_library package is importable here. Otherwise (a build
without CUTLASS, whose _C says why in sm90_note) the tests skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sass import _cuobjdump, elf_archs, opcodes_in, require_C_or_fail, resource_usage, sass_of

REPO = Path(__file__).resolve().parents[1]
ARCH = "sm_90a"


def _cutlass_expected() -> bool:
    return bool(os.environ.get("RESNET_KERNELS_CUTLASS_DIR")) or importlib.util.find_spec("cutlass_library") is not None


@pytest.fixture(scope="module")
def so():
    C = require_C_or_fail()
    if not getattr(C, "sm90_kernels", False):
        note = getattr(C, "sm90_note", "an older build without the attribute")
        if _cutlass_expected():
            pytest.fail(f"CUTLASS is available here but _C was built without the sm_90a kernels: {note}",
                        pytrace=False)
        pytest.skip(f"_C was built without the CUTLASS sm_90a kernels: {note}")
    _cuobjdump()  # fails (not skips) without cuobjdump, as test_sass does
    return C.__file__


def _cutlass_kernels(so, kind="0"):
    """The CUTLASS conv kernels of one cutlass::conv::Operator (0 fprop, 1 dgrad, 2 wgrad; the backward's
    are tests/test_sm90_bwd_sass.py's)."""
    return sorted(f for f in resource_usage(so).get(ARCH, {})
                  if "ConvUniversal" in f and f"ConvProblemShapeILNS1_8OperatorE{kind}E" in f)


def test_sm90a_cubin_holds_every_kernel(so):
    assert ARCH in elf_archs(so), f"{so} has cubins for {sorted(elf_archs(so))}, no {ARCH}"
    kernels = _cutlass_kernels(so)
    bf16 = [f for f in kernels if "bfloat16_t" in f]
    tf32 = [f for f in kernels if "TF32TF32" in f]  # float32 operands: the TF32 wgmma atom
    fused = [f for f in kernels if "PerColLinComb" in f]  # the fused-epilogue fusion op
    stats = [f for f in kernels if "Sm90ColStatsPartials" in f]  # the training forward's statistics node
    assert len(kernels) == 6, kernels
    assert len(bf16) == 2 and len(tf32) == 2 and len(fused) == 3 and len(stats) == 3, kernels
    for dt in (bf16, tf32):
        assert len(set(dt) & set(fused)) == 1, "one fused-epilogue kernel per dtype"
        assert len(set(dt) & set(stats)) == 1, "one statistics-epilogue kernel per dtype"


def test_cutlass_kernels_use_wgmma_and_tma(so):
    for f in _cutlass_kernels(so):
        sass = sass_of(so, ARCH, f)
        ops = opcodes_in(sass)
        missing = {"HGMMA", "UTMALDG", "UTMASTG"} - ops
        assert not missing, f"{f[:120]}...: no {sorted(missing)} in its {ARCH} SASS"
        if "bfloat16_t" in f:
            assert "HGMMA.64x128x16.F32.BF16" in sass, f"{f[:120]}: the bf16 kernel must issue bf16 wgmma"
        if "TF32TF32" in f:
            assert "HGMMA.64x128x8.F32.TF32" in sass, f"{f[:120]}: the float32 kernel must issue tf32 wgmma"
        # CUTLASS asserts compiled in (no -DNDEBUG) make ptxas serialise the wgmma pipeline
        assert "__assertfail" not in sass, f"{f[:120]}: calls __assertfail (built without -DNDEBUG)"


def test_statistics_epilogue_shuffles_and_stores_without_atomics(so):
    """Per 64 x 32 subtile (8 per 128 x 128 tile) two butterfly steps of (n, mean, M2): 48 SHFL.BFLY;
    per 32 columns one (mean, M2) store pair: 8 STG; no global atomics (ATOM/ATOMG/RED; the
    mbarrier arrives are SYNCS.*.RED, another opcode)."""
    stats = [f for f in _cutlass_kernels(so) if "Sm90ColStatsPartials" in f]
    assert stats
    for f in stats:
        sass = sass_of(so, ARCH, f)
        ops = opcodes_in(sass)
        assert not ops & {"ATOM", "ATOMG", "RED"}, f"{f[:120]}: global atomics {sorted(ops & {'ATOM', 'ATOMG', 'RED'})}"
        n_bfly = sass.count("SHFL.BFLY")
        assert n_bfly >= 48, f"{f[:120]}: {n_bfly} SHFL.BFLY, expected the 2 x 3 per subtile x 8 subtiles"
        n_stg = sum(1 for line in sass.splitlines() if " STG." in line)
        assert n_stg >= 8, f"{f[:120]}: {n_stg} STG, expected a (mean, M2) pair per 32 columns (8)"


def test_no_local_memory(so):
    usage = resource_usage(so)[ARCH]
    bad = {f[:100]: u for f, u in usage.items() if u.get("LOCAL", 0) or u.get("STACK", 0)}
    assert not bad, f"{ARCH} kernels with local memory (spills / stack): {bad}"
    for f in usage:
        ops = opcodes_in(sass_of(so, ARCH, f))
        assert not ops & {"LDL", "STL"}, f"{f[:120]}: local loads/stores {sorted(ops & {'LDL', 'STL'})}"


def test_resources_tool_reports_and_checks(so):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "sm90_resources.py"), "--so", so, "--check"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for label in ("bf16 fused-epilogue", "fp16 fused-epilogue", "tf32 fused-epilogue", "bf16 stats-epilogue",
                  "fp16 stats-epilogue", "tf32 stats-epilogue"):
        assert f"cutlass fprop {label}" in res.stdout, res.stdout
    assert "PROBLEM" not in res.stdout
    print(res.stdout)  # the register / shared-memory / stages / instruction table (pytest -s shows it)
