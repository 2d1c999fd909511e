"""The convolution's shared-memory swizzles (csrc/conv2d_layout.h) are bank-conflict free, checked
on the host (no GPU needed): tests/host/conv_swizzle_check.cpp includes the header, walks every
ldmatrix.x4 row address of the main loop and every 16-byte store of the tile loads for each CTA
tile configuration of csrc/conv2d.cu (128 x 64 and 128 x 128 with 64-byte K tiles, 128 x 128 with
128-byte K tiles in 3 and 4 stages), and requires the 8 addresses of each shared-memory phase to
fall in 8 different 16-byte bank groups, the swizzle to be a bijection of a stage's slots, and the
unswizzled layout (its control) to conflict."""

import subprocess
from pathlib import Path

import pytest

import host_runner

REPO = Path(__file__).resolve().parents[1]


def test_conv_swizzles_are_bank_conflict_free(tmp_path):
    cxx = host_runner.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    exe = tmp_path / "conv_swizzle_check"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", f"-I{REPO / 'csrc'}",
                            str(REPO / "tests" / "host" / "conv_swizzle_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"compiling the swizzle check failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0 and "OK (0 failures)" in run.stdout, f"{run.stdout}\n{run.stderr}"
    assert "128x128, 128-byte K, 4 st    swizzled  : 512 phases, 0 extra wavefronts" in run.stdout
