"""Index math of the bn_add_relu CUDA kernels, checked on the host (no GPU needed).

tests/host/bn_add_relu_index_check.cu includes csrc/bn_add_relu_impl.cuh (the helpers the
kernels use: 64-bit division by invariants, the forward's incremental channel tracking, the
backward tilings and workspace layout, the vector-width choice), is compiled by nvcc as host code
and walks every thread of the launch grids for a set of shapes: every vector must be visited
exactly once with the right channel, every partial-sum slot written exactly once. Skipped only
when there is no nvcc (then the CUDA backend is not built either).
"""

import subprocess
from pathlib import Path

import pytest

from rk_build import find_nvcc

REPO = Path(__file__).resolve().parents[1]


def test_bn_add_relu_index_math(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine (the CUDA backend is not built either)")
    exe = tmp_path / "bn_add_relu_index_check"
    build = subprocess.run([nvcc, "-std=c++17", "-O2", f"-I{REPO / 'csrc'}",
                            str(REPO / "tests" / "host" / "bn_add_relu_index_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"compiling the index check failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "OK (0 failures)" in run.stdout, f"{run.stdout}\n{run.stderr}"
