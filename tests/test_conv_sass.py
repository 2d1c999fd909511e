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

# mangled-name fragment of each conv2d_igemm_kernel<T, MATH, VEC_A> variant -> required HMMA flavour
# (MATH 0 = mma.m16n8k16 bf16/fp16, 1 = TF32 m16n8k8, 2 = 3xTF32 m16n8k8)
VARIANTS = {
    "conv2d_igemm_kernelI13__nv_bfloat16Li0ELb0E": "HMMA.16816.F32.BF16",
    "conv2d_igemm_kernelI13__nv_bfloat16Li0ELb1E": "HMMA.16816.F32.BF16",
    "conv2d_igemm_kernelI6__halfLi0ELb0E": "HMMA.16816.F32",
    "conv2d_igemm_kernelI6__halfLi0ELb1E": "HMMA.16816.F32",
    "conv2d_igemm_kernelIfLi1ELb0E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi1ELb1E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi2ELb0E": "HMMA.1688.F32.TF32",
    "conv2d_igemm_kernelIfLi2ELb1E": "HMMA.1688.F32.TF32",
}
FINALIZE = "conv2d_stats_finalize_kernel"


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
        if frag.endswith("Lb1E"):  # the 16-byte path zero-fills padding with cp.async src-size 0
            assert "ZFILL" in body, f"{arch} {frag}: vectorised A loads without zero-fill"
    assert any(FINALIZE in n for n in convs), f"{arch}: {FINALIZE} missing"


@pytest.mark.parametrize("arch", ARCHS)
def test_conv_kernels_do_not_spill(cubins, tool, arch):
    convs = _conv_functions(tool, cubins[arch])
    assert len(convs) == len(VARIANTS) + 1
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
    assert found == len(VARIANTS) + 1, f"{arch}: resource usage found for {found} conv kernels"
