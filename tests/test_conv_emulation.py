"""Host-side check of the CUDA convolution's index math (no GPU needed): compiles and runs
tests/csrc_emu/conv2d_emu.cpp, which drives the kernel's __host__ __device__ helpers
(csrc/conv2d_layout.h) through an emulation of the tile loads, the shared-memory swizzle,
ldmatrix and the mma fragment layouts of the PTX ISA, on ResNet-like shapes (7x7 s2 Cin=3, 3x3
s1/s2, 1x1 s1/s2, odd sizes, partial tiles), NCHW and NHWC, 16- and 32-bit elements, and
compares with a direct convolution exactly. The emulation also models cp.async commit groups,
cp.async.wait_group and __syncthreads intervals and reports shared-memory races in the pipeline;
test_conv2d_pipeline_race_model_catches_bugs checks that it does catch typical pipeline bugs."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "csrc_emu" / "conv2d_emu.cpp"


def _cxx():
    for c in ("c++", "g++", "clang++"):
        if shutil.which(c):
            return shutil.which(c)
    return None


def _build_and_run(tmp_path, bug=0):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / f"conv2d_emu_{bug}"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-DEMU_BUG={bug}", f"-I{ROOT / 'csrc'}", str(SRC), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


def test_conv2d_index_math_emulation(tmp_path):
    r = _build_and_run(tmp_path)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("exact") == 32, r.stdout
    assert "race:" not in r.stdout, r.stdout


# 1: cp.async.wait_group too shallow; 2: no __syncthreads; 3: stage refill issued before the barrier
@pytest.mark.parametrize("bug", [1, 2, 3])
def test_conv2d_pipeline_race_model_catches_bugs(tmp_path, bug):
    r = _build_and_run(tmp_path, bug)
    assert r.returncode != 0 and "race:" in r.stdout, r.stdout + r.stderr
