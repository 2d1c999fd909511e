"""Static checks of the compiled backward convolutions (csrc/conv2d_dgrad.cu, csrc/conv2d_wgrad.cu) in
the installed _C, without a GPU: for sm_80 and sm_90 every kernel variant is present, uses tensor
cores (HMMA fed by LDSM), does not spill (no LDL/STL, LOCAL:0, STACK:0) and has no integer division
in its main loop (the rules and the loop finder of tests/test_conv_sass.py). The register counts are
printed (-s shows them)."""

import re
import subprocess
from pathlib import Path

import pytest
from test_conv_sass import DIVISION_OPS, _functions, _run, main_loop
from test_sass import _cuobjdump as cuobjdump_or_fail
from test_sass import require_C_or_fail

ARCHS = ("sm_80", "sm_90")
# per source file: (namespace in the mangled names, {kernel variant -> required HMMA flavour}, the
# other kernels): conv2d_dgrad_kernel<T, UP>, conv2d_wgrad_kernel<T>
FILES = {
    "conv2d_dgrad": ("rk5dgrad", {
        "conv2d_dgrad_kernelI13__nv_bfloat16Lb0E": "HMMA.16816.F32.BF16",
        "conv2d_dgrad_kernelI13__nv_bfloat16Lb1E": "HMMA.16816.F32.BF16",
        "conv2d_dgrad_kernelI6__halfLb0E": "HMMA.16816.F32",
        "conv2d_dgrad_kernelI6__halfLb1E": "HMMA.16816.F32",
    }, ()),  # the upstream finalize runs in the dgrad's own launch (upstream_arrive_finalize)
    "conv2d_wgrad": ("rk5wgrad", {
        "conv2d_wgrad_kernelI13__nv_bfloat16E": "HMMA.16816.F32.BF16",
        "conv2d_wgrad_kernelI6__halfE": "HMMA.16816.F32",
    }, ()),  # split-K summed in the wgrad's own launch (split_arrive_reduce): no reduce kernel
}
# kernel variants whose CTAs meet on arrival counters (a gpu-scope atomic add and fence in the SASS;
# ATOM through a generic pointer: the counters reach the not-inlined function in a struct): every
# wgrad (split-K), the dgrads with the upstream reductions (UP: Lb1E); the others have no atomic
_ARRIVE = {"atomic add": r"\bATOMG?\.E\.ADD\S*\.GPU\b", "gpu-scope fence": r"\bMEMBAR\S*\.GPU\b"}
ARRIVALS = {"conv2d_wgrad": lambda frag: True, "conv2d_dgrad": lambda frag: frag.endswith("Lb1E")}
# instructions of the main loop per k-step (16 HMMA per warp), nvcc 13.0: dgrad 458-482 (sm_80) /
# 478-502 (sm_90), wgrad 460-488 / 472-500, plus ~5%. The operand prologue (32 elements per thread
# per K tile: unpack, mask, BN-backward FMA, round) dominates; the forward's vectorised loop
# (cp.async, no prologue) is ~113
MAIN_LOOP_BUDGET = 520


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """(cuobjdump, {(file, arch): path of that file's cubin extracted from _C})."""
    so_path = require_C_or_fail().__file__
    tool = cuobjdump_or_fail()
    listing = _run(tool, "-lelf", so_path)
    out = {}
    for stem in FILES:
        for arch in ARCHS:
            name = f"{stem}.{arch}.cubin"
            assert re.search(rf"\b{re.escape(name)}\b", listing), f"{so_path} has no {name}:\n{listing}"
            d = tmp_path_factory.mktemp(f"{stem}_{arch}")
            subprocess.run([tool, "-xelf", f"{stem}.{arch}", so_path], cwd=d, capture_output=True, check=True,
                           timeout=300)
            out[stem, arch] = str(d / name)
            assert Path(out[stem, arch]).is_file(), f"cuobjdump did not extract {name}"
    return tool, out


@pytest.mark.parametrize("stem", list(FILES))
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_use_tensor_cores_do_not_spill_and_do_not_divide(cubins, arch, stem):
    tool, paths = cubins
    ns, variants, others = FILES[stem]
    funcs = {n: b for n, b in _functions(_run(tool, "-sass", paths[stem, arch])).items() if ns in n}
    report = []
    for frag, hmma in variants.items():
        hits = [n for n in funcs if frag in n]
        assert len(hits) == 1, f"{arch}: expected one kernel matching {frag}, found {hits}"
        body = funcs[hits[0]]
        assert hmma in set(re.findall(r"HMMA\.[0-9A-Z.]+", body)), f"{arch} {frag}: no {hmma}"
        assert "LDSM" in body, f"{arch} {frag}: tensor-core operands not loaded with ldmatrix (LDSM)"
        arrives = ARRIVALS[stem](frag)
        for what, pattern in _ARRIVE.items():
            assert bool(re.search(pattern, body)) == arrives, f"{arch} {frag}: {what} present: {not arrives}"
        loop = main_loop(body)
        assert loop, f"{arch} {frag}: no loop with HMMA found"
        div = [o for _, o in loop if o.startswith(DIVISION_OPS)]
        assert not div, f"{arch} {frag}: integer division in the main loop: {div}"
        hm = sum(1 for _, o in loop if o.startswith("HMMA"))
        ksteps, rem = divmod(hm, 16)
        assert rem == 0 and ksteps >= 1, f"{arch} {frag}: {hm} HMMA in the main loop"
        per = len(loop) / ksteps
        report.append(f"{frag}: {per:.0f}/{MAIN_LOOP_BUDGET}")
        assert per <= MAIN_LOOP_BUDGET, f"{arch} {frag}: {per:.0f} instructions per k-step"
    for other in others:
        assert any(other in n for n in funcs), f"{arch}: {other} missing"
    for name, body in funcs.items():
        local = re.findall(r"\b(LDL|STL)(?:\.[0-9A-Z.]+)?\b", body)
        assert not local, f"{arch} {name}: local-memory traffic (spills) {sorted(set(local))}"
    usage = _run(tool, "-res-usage", paths[stem, arch])
    found = 0
    for name, stats in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        if ns not in name:
            continue
        found += 1
        regs = int(re.search(r"REG:(\d+)", stats).group(1))
        assert int(re.search(r"LOCAL:(\d+)", stats).group(1)) == 0, f"{arch} {name}: {stats.strip()}"
        assert int(re.search(r"STACK:(\d+)", stats).group(1)) == 0, f"{arch} {name}: {stats.strip()}"
        assert regs <= 255, f"{arch} {name}: {regs} registers"
        report.append(f"{name[-40:]}: {regs} registers")
    assert found == len(variants) + len(others), f"{arch}: resource usage found for {found} {stem} kernels"
    print(stem, arch, "; ".join(report))
