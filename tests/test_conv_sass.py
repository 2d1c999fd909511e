"""Static checks of the compiled CUDA convolution (csrc/conv2d.cu) in the installed _C, without
a GPU: for sm_80 and sm_90 the fat binary holds every kernel variant, the tensor-core variants
really use tensor cores (HMMA, fed by LDSM = ldmatrix; the 16-byte path uses LDGSTS = cp.async),
and nothing spills to local memory (no LDL/STL, LOCAL:0 and STACK:0 in the resource usage)."""

import re
import subprocess
from pathlib import Path

import pytest
# the cuobjdump lookup and the _C rule of test_sass (fail, not skip, when nvcc exists but _C is missing)
from test_sass import _cuobjdump as cuobjdump_or_fail
from test_sass import require_C_or_fail

ARCHS = ("sm_80", "sm_90")

# mangled-name fragment of each conv2d_igemm_kernel<T, MATH, VEC_A, BN, PRO, BKB, ST> variant ->
# required HMMA flavour (MATH 0 = mma.m16n8k16 bf16/fp16, 1 = TF32 m16n8k8, 2 = 3xTF32 m16n8k8;
# BN 64 = the 128 x 64 tile, 128 = the 128 x 128 tile of the 16-bit vector path; PRO 1 = the BN +
# ReLU operand prologue, 128 x 64 tile, both A paths; BKB / ST = K-tile bytes / pipeline stages:
# 64 / 3 (static shared memory), or 128 / 3 and 128 / 4 (dynamic) for the 16-bit 128 x 128 tile)
_BASE = {
    "conv2d_igemm_kernelI13__nv_bfloat16Li0ELb0ELi64E": "HMMA.16816.F32.BF16",
    "conv2d_igemm_kernelI13__nv_bfloat16Li0ELb1ELi64E": "HMMA.16816.F32.BF16",
    "conv2d_igemm_kernelI13__nv_bfloat16Li0ELb1ELi128E": "HMMA.16816.F32.BF16",
    "conv2d_igemm_kernelI6__halfLi0ELb0ELi64E": "HMMA.16816.F32",
    "conv2d_igemm_kernelI6__halfLi0ELb1ELi64E": "HMMA.16816.F32",
    "conv2d_igemm_kernelI6__halfLi0ELb1ELi128E": "HMMA.16816.F32",
    "conv2d_igemm_kernelIfLi1ELb0ELi64E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi1ELb1ELi64E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi2ELb0ELi64E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi2ELb1ELi64E": "HMMA.1688.F32.TF32",
}
_K64 = "Li64ELi3E"  # BKB 64, 3 stages
VARIANTS = {f + "Lb0E" + _K64: h for f, h in _BASE.items()}
VARIANTS.update({f + "Lb1E" + _K64: h for f, h in _BASE.items() if "Li64E" in f})
VARIANTS.update({f + "Lb0ELi128E" + st: h for f, h in _BASE.items() if "Li128E" in f for st in ("Li3E", "Li4E")})
# the statistics merge in the convolution's launch (csrc/conv2d.cu stats_arrive_merge, not inlined):
# every variant arrives on its counters with a gpu-scope atomic add (ATOM: through a generic pointer,
# the counters reach the function in a struct), fenced at gpu scope (MEMBAR ... GPU)
MERGE_OPS = {"atomic add": r"\bATOMG?\.E\.ADD\S*\.GPU\b", "gpu-scope fence": r"\bMEMBAR\S*\.GPU\b"}


@pytest.fixture(scope="module")
def so_path():
    return require_C_or_fail().__file__


@pytest.fixture(scope="module")
def tool():
    return cuobjdump_or_fail()  # FAILS when there is none (test_sass's rule)


def _run(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, timeout=300).stdout


def _functions(sass: str) -> dict:
    parts = re.split(r"\n\s*Function : (\S+)\s*\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def cubins(so_path, tool, tmp_path_factory):
    """arch -> path of csrc/conv2d.cu's cubin for that arch, extracted from the fat binary
    (much faster to disassemble than the whole module)."""
    listing = _run(tool, "-lelf", so_path)
    out = {}
    for arch in ARCHS:
        name = f"conv2d.{arch}.cubin"
        assert re.search(rf"\b{re.escape(name)}\b", listing), f"{so_path} has no {name}:\n{listing}"
        d = tmp_path_factory.mktemp(arch)
        subprocess.run([tool, "-xelf", f"conv2d.{arch}", so_path], cwd=d, capture_output=True, check=True, timeout=300)
        out[arch] = str(d / name)
        assert Path(out[arch]).is_file(), f"cuobjdump did not extract {name}"
    return out


_SASS_CACHE: dict = {}


def _conv_functions(tool, cubin):
    """SASS of the conv kernels (namespace rk::conv) of one cubin (disassembled once)."""
    if cubin not in _SASS_CACHE:
        funcs = _functions(_run(tool, "-sass", cubin))
        _SASS_CACHE[cubin] = {name: body for name, body in funcs.items() if "rk4conv" in name}
    return _SASS_CACHE[cubin]


@pytest.mark.parametrize("arch", ARCHS)
def test_conv_kernels_present_and_use_tensor_cores(cubins, tool, arch):
    convs = _conv_functions(tool, cubins[arch])
    assert convs, f"no conv2d kernels in the {arch} SASS"
    for frag, hmma in VARIANTS.items():
        hits = [n for n in convs if frag in n]
        assert len(hits) == 1, f"{arch}: expected one kernel matching {frag}, found {hits}"
        body = convs[hits[0]]
        flavours = set(re.findall(r"HMMA\.[0-9A-Z.]+", body))
        assert hmma in flavours, f"{arch} {frag}: no {hmma} in its SASS (found {sorted(flavours)})"
        assert "LDSM" in body, f"{arch} {frag}: tensor-core operands not loaded with ldmatrix (LDSM)"
        assert "LDGSTS" in body, f"{arch} {frag}: no cp.async (LDGSTS) in the shared-memory pipeline"
        if "Lb1ELi" in frag:  # the 16-byte path zero-fills padding with cp.async src-size 0:
            # LDGSTS ...ZFILL (src-size in a register) or the ignore-src predicate operand form
            # LDGSTS [dst], [src], Px that ptxas emits when src-size is 16 or 0 (sm_90: desc[URx][src])
            zfill = "ZFILL" in body or re.search(r"LDGSTS\S*\s+\[[^\]]*\],\s*(?:desc\[\w+\])?\[[^\]]*\],\s*!?P\d", body)
            assert zfill, f"{arch} {frag}: vectorised A loads without zero-fill"
        for what, pattern in MERGE_OPS.items():
            assert re.search(pattern, body), f"{arch} {frag}: no {what} (the statistics merge's arrival) in its SASS"
    # no second kernel: the statistics are merged in the convolution's launch
    assert len(convs) == len(VARIANTS), f"{arch}: {len(convs)} conv kernels, expected {len(VARIANTS)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_conv_kernels_do_not_spill(cubins, tool, arch):
    convs = _conv_functions(tool, cubins[arch])
    assert len(convs) == len(VARIANTS)
    for name, body in convs.items():
        local = re.findall(r"\b(LDL|STL)(?:\.[0-9A-Z.]+)?\b", body)
        assert not local, f"{arch} {name}: local-memory traffic (spills) {sorted(set(local))}"
    usage = _run(tool, "-res-usage", cubins[arch])
    found = 0
    for name, stats in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        if "rk4conv" not in name:
            continue
        found += 1
        local = int(re.search(r"LOCAL:(\d+)", stats).group(1))
        stack = int(re.search(r"STACK:(\d+)", stats).group(1))
        regs = int(re.search(r"REG:(\d+)", stats).group(1))
        assert local == 0 and stack == 0, f"{arch} {name}: {stats.strip()}"
        assert regs <= 255, f"{arch} {name}: {regs} registers"
    assert found == len(VARIANTS), f"{arch}: resource usage found for {found} conv kernels"


# ---- the main loop (csrc/conv2d.cu): no integer division, a stated instruction budget per k-step.
# The main loop is the largest loop of the kernel (a backward branch) whose body holds the HMMAs;
# its static instruction count (inner loops, e.g. the filter-tap wrap, counted once) is divided by
# the k-steps it computes (2 per K tile: one m16n8k16 / m16n8k8 column of the 64 x 32 warp tile,
# 16 HMMA, 48 for 3xTF32), per warp. Integer division or modulo shows in SASS as the reciprocal
# sequence of a runtime divisor (I2F.U32.RP, MUFU.RCP, F2I.FTZ.U32.TRUNC, IMAD.HI) or, for a constant divisor,
# a multiply-high (IMAD.HI / IMUL.HI): none may appear in the loop.
# Budgets (counted from nvcc 13.0 SASS, sm_80 / sm_90, plus ~5% slack for other compilers):
# before the filter-tap iterators (2026-12-02 review) the loop was 180 / 785 / 228 / 484 / 384 / 634
# instructions per k-step for 16-bit vector / 16-bit gather / TF32 vector / TF32 gather / 3xTF32
# vector / 3xTF32 gather (sm_90); now 113 / 277 / 170 / 234 / 322 / 376, and 109 for the 128 x 128
# tile (16-bit vector; per warp: every warp tile is 64 x 32).
# The BN + ReLU operand prologue (PRO; register-staged A with the per-element transform, 8 elements
# per 16-bit chunk) counted 242 / 254 (bf16 vector, sm_80 / sm_90), 234 / 246 (fp16 vector), 474 / 414
# (bf16 gather), 466 / 406 (fp16 gather), 226 / 236 (TF32 vector), 302 / 311 (TF32 gather), 380 / 390
# (3xTF32 vector), 426 / 436 (3xTF32 gather).
# The 128 x 128 tile with 128-byte K tiles (4 k-steps = 64 HMMA per loop iteration, one barrier and
# one stage bookkeeping per 4 k-steps instead of 2): 71 / 76 (sm_80 / sm_90, 3 and 4 stages alike)
# against the 64-byte-K tile's 100 / 109.
MAIN_LOOP_BUDGET = {  # (MATH, VEC_A, BN, PRO, BKB, ST) fragment -> max instructions per k-step
    "Li0ELb1ELi64ELb0E": 120, "Li0ELb0ELi64ELb0E": 292, "Li0ELb1ELi128ELb0E": 116,
    "Li1ELb1ELi64ELb0E": 180, "Li1ELb0ELi64ELb0E": 248,
    "Li2ELb1ELi64ELb0E": 340, "Li2ELb0ELi64ELb0E": 400,
    "Li0ELb1ELi64ELb1E": 267, "Li0ELb0ELi64ELb1E": 498,
    "Li1ELb1ELi64ELb1E": 248, "Li1ELb0ELi64ELb1E": 327,
    "Li2ELb1ELi64ELb1E": 410, "Li2ELb0ELi64ELb1E": 458,
}
MAIN_LOOP_BUDGET = {k + _K64: v for k, v in MAIN_LOOP_BUDGET.items()}
MAIN_LOOP_BUDGET.update({"Li0ELb1ELi128ELb0ELi128ELi3E": 80, "Li0ELb1ELi128ELb0ELi128ELi4E": 80})
HMMA_PER_KSTEP = {"Li0E": 16, "Li1E": 16, "Li2E": 48}
DIVISION_OPS = ("I2F", "F2I", "MUFU.RCP", "IMAD.HI", "IMUL.HI")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(body: str) -> list[tuple[int, str]]:
    """(address, opcode with modifiers) of the instructions of the largest loop holding HMMA."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSTR.finditer(body)]
    best: list = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            seg = [(a, o) for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            if any(o.startswith("HMMA") for _, o in seg) and len(seg) > len(best):
                best = seg
    return best


def test_main_loop_finder_sees_division():
    """The finder and the division check on a hand-made listing (a loop with a reciprocal)."""
    body = "\n".join(f"        /*{a:04x}*/  {t} ;" for a, t in [
        (0x10, "MOV R1, R2"), (0x20, "I2F.U32.RP R3, R4"), (0x30, "MUFU.RCP R3, R3"),
        (0x40, "HMMA.16816.F32 R8, R4, R6, R8"), (0x50, "@P0 BRA 0x20"), (0x60, "EXIT")])
    loop = main_loop(body)
    assert [a for a, _ in loop] == [0x20, 0x30, 0x40, 0x50]
    assert [o for _, o in loop if o.startswith(DIVISION_OPS)] == ["I2F.U32.RP", "MUFU.RCP"]


@pytest.mark.parametrize("arch", ARCHS)
def test_main_loop_has_no_division_and_fits_budget(cubins, tool, arch):
    convs = _conv_functions(tool, cubins[arch])
    report = []
    for frag in VARIANTS:
        (name,) = [n for n in convs if frag in n]
        loop = main_loop(convs[name])
        assert loop, f"{arch} {frag}: no loop with HMMA found"
        div = [o for _, o in loop if o.startswith(DIVISION_OPS)]
        assert not div, f"{arch} {frag}: integer division in the main loop: {div}"
        math = re.search(r"Li\dE", frag).group(0)
        hmma = sum(1 for _, o in loop if o.startswith("HMMA"))
        ksteps, rem = divmod(hmma, HMMA_PER_KSTEP[math])
        assert rem == 0 and ksteps >= 1, f"{arch} {frag}: {hmma} HMMA in the main loop"
        per_kstep = len(loop) / ksteps
        budget = MAIN_LOOP_BUDGET[frag[frag.index("Li"):]]
        report.append(f"{frag}: {per_kstep:.0f}/{budget} ({hmma} HMMA of {len(loop)})")
        assert per_kstep <= budget, f"{arch} {frag}: {per_kstep:.0f} instructions per k-step > budget {budget}"
    print(arch, "instructions per k-step (count/budget):", ", ".join(report))
