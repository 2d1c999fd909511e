"""Machine-code checks of the CUTLASS sm_90a convolution backward (csrc/sm90/conv2d_sm90_bwd.cu) in the
installed _C, without a GPU: its sm_90a cubin holds the four kernels (bf16/fp16 x dgrad/wgrad); each
issues wgmma of its dtype (HGMMA.64x128x16, BF16 for bfloat16) fed by TMA: the dgrad loads dy by TMA
im2col (UTMALDG.*.IM2COL, the residual too) and the KRSC filter tiled (UTMALDG.4D) and stores grad_x
by TMA (UTMASTG); the wgrad loads dy tiled (UTMALDG.2D) and x by TMA im2col and stores the weight
gradient directly (STG, the direct-store epilogue); no local memory (spills / stack); no global
atomics (ATOM/ATOMG/RED: the wgrad has no split-K, its sums are deterministic); built with -DNDEBUG
(no __assertfail); the register counts are printed (-s shows the table of tools/sm90_resources.py).

These kernels are compile-verified only: nothing here runs them (no GPU in CI). The fixture is
test_sm90_sass.py's: the tests skip with _C's reason when the build had no CUTLASS, and fail when
CUTLASS was available but _C lacks the kernels.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_sass import opcodes_in, resource_usage, sass_of
from test_sm90_sass import ARCH, _cutlass_kernels, so  # noqa: F401 (so: the fixture)

REPO = Path(__file__).resolve().parents[1]
KINDS = {"dgrad": "1", "wgrad": "2"}


def _kernels(so, kind):  # noqa: F811
    return _cutlass_kernels(so, KINDS[kind])


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_kernel_per_dtype(so, kind):  # noqa: F811
    ks = _kernels(so, kind)
    assert len(ks) == 2, ks
    assert sum("bfloat16_t" in f and "BF16" in f for f in ks) == 1, "one bf16 kernel (bf16 wgmma atom)"


@pytest.mark.parametrize("kind", list(KINDS))
def test_wgmma_fed_by_tma_without_atomics_or_asserts(so, kind):  # noqa: F811
    for f in _kernels(so, kind):
        sass = sass_of(so, ARCH, f)
        ops = opcodes_in(sass)
        assert "HGMMA" in ops and "UTMALDG" in ops, f"{f[:120]}: no HGMMA / UTMALDG"
        flavour = "HGMMA.64x128x16.F32.BF16" if "BF16" in f else "HGMMA.64x128x16.F32 "
        assert flavour in sass, f"{f[:120]}: no {flavour.strip()} (128x128 tile of the kernel's dtype)"
        assert "UTMALDG.4D.IM2COL" in sass, f"{f[:120]}: no TMA im2col load"
        assert not ops & {"ATOM", "ATOMG", "RED"}, f"{f[:120]}: global atomics {sorted(ops & {'ATOM', 'ATOMG', 'RED'})}"
        assert "__assertfail" not in sass, f"{f[:120]}: calls __assertfail (built without -DNDEBUG)"
        if kind == "dgrad":
            assert "UTMASTG" in ops and "UTMALDG.4D " in sass, f"{f[:120]}: no TMA store / tiled filter load"
        else:
            assert "UTMALDG.2D" in sass and " STG." in sass, f"{f[:120]}: no tiled dy load / direct stores"


def test_no_local_memory_and_registers_reported(so):  # noqa: F811
    usage = resource_usage(so)[ARCH]
    for kind in KINDS:
        for f in _kernels(so, kind):
            u = usage[f]
            assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, f"{kind} {f[:100]}: local memory {u}"
            assert 0 < u["REG"] <= 255, u
            ops = opcodes_in(sass_of(so, ARCH, f))
            assert not ops & {"LDL", "STL"}, f"{f[:120]}: local loads/stores"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "sm90_resources.py"), "--so", so, "--check"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for label in ("cutlass dgrad bf16", "cutlass dgrad fp16", "cutlass wgrad bf16", "cutlass wgrad fp16"):
        assert label in res.stdout, res.stdout
    print(res.stdout)
