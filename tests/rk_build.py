"""Build-tool helpers shared by the tests (tests/ is on sys.path): where nvcc and cuobjdump are,
and the "nvcc exists but _C is missing" rule with the compiler's errors.

``find_nvcc`` is setup.py's lookup (setup.py cannot be imported from the installed package;
tests/test_sass.py::test_find_nvcc_matches_setup keeps the two the same). The csrc/ rebuild that
explains a missing ``_C`` runs once per test session (a 1.5-minute compile of every source):
``require_C_or_fail`` caches its failure message, so every test that needs ``_C`` fails with the
same explanation instead of recompiling.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from resnet_kernels import _ext

REPO = Path(__file__).resolve().parents[1]


def find_nvcc() -> str | None:
    """Where setup.py looks for nvcc: CUDA_HOME, CUDA_PATH, PATH (through a wrapper script to the
    real compiler), /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return _real_nvcc(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


@functools.lru_cache(maxsize=None)
def _real_nvcc(nvcc: str) -> str:
    """PATH may hold a wrapper script around the toolkit's nvcc; nvcc --dryrun prints its home."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
        if m and (Path(m.group(1)) / "nvcc").exists():
            return str(Path(m.group(1)) / "nvcc")
    except (OSError, subprocess.SubprocessError):
        pass
    return nvcc


def find_cuobjdump() -> str | None:
    """cuobjdump from the triton wheel, else next to nvcc, else on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump"
            if cand.exists():
                return str(cand)
    nvcc = find_nvcc()
    if nvcc:
        cand = Path(nvcc).resolve().parent / "cuobjdump"
        if cand.exists():
            return str(cand)
    return shutil.which("cuobjdump")


@functools.lru_cache(maxsize=None)
def rebuild_errors(nvcc: str, arch: str = "sm_80") -> str:
    """Compile every csrc/*.cu and csrc/*.cpp of this checkout (one arch, objects discarded) and
    return the compiler's complaints: the build error text when _C failed to build. Cached: run
    at most once per (nvcc, arch) in a test session."""
    srcs = sorted((REPO / "csrc").glob("*.cu")) + sorted((REPO / "csrc").glob("*.cpp"))
    if not srcs:
        return f"(no sources under {REPO / 'csrc'} to rebuild)"
    incs = [f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    try:
        import pybind11

        incs.append(f"-I{pybind11.get_include()}")
    except ImportError:
        pass
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in srcs:
            cmd = [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-arch={arch}", *incs, "-c", str(src),
                   "-o", str(Path(tmp) / (src.name + ".o"))]
            if src.suffix == ".cpp":
                cmd[1:1] = ["-x", "cu"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                out.append(f"{src.name}: compiler timed out")
                continue
            if res.returncode != 0:
                out.append(f"--- {src.name} (exit {res.returncode}):\n{(res.stdout + res.stderr)[-6000:]}")
    return "\n".join(out) if out else "(every source compiled: the failure is in linking or loading)"


def require_C_or_fail():
    """_C, or: FAIL when nvcc exists (with the reason and the compiler's errors, computed once per
    session), skip when there is no nvcc (then the package is legitimately installed without the
    CUDA backend)."""
    mod = _ext.get_C()
    if mod is not None:
        return mod
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip(f"no nvcc on this machine and resnet_kernels._C is absent ({_ext.C_error()})")
    pytest.fail(f"nvcc exists ({nvcc}) but resnet_kernels._C is unavailable: {_ext.C_error()}\n"
                f"Rebuilding csrc/ of {REPO} with it gives:\n{rebuild_errors(nvcc)}", pytrace=False)
