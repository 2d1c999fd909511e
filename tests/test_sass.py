"""Build and machine-code checks of the CUDA extension ``resnet_kernels._C`` (no GPU needed).

* ``_C`` must import whenever a CUDA compiler (nvcc) is on this machine: if it is missing, the
  test FAILS (never skips) and shows why, including the compiler's errors from a rebuild of the
  sources of this checkout.
* With ``cuobjdump`` (shipped in the triton wheel, else the CUDA toolkit's), the installed
  ``_C*.so`` must hold cubins for every architecture in ``EXPECTED_ARCHS``; each of those must
  contain every kernel in ``EXPECTED_KERNELS``; no kernel may use local memory (register spills
  or a stack frame: ``cuobjdump -res-usage`` LOCAL/STACK, cross-checked against STL/LDL in the
  SASS of the heaviest instantiation of each expected kernel).
* ``TENSOR_CORE_KERNELS`` lists kernels that must issue tensor-core instructions (HMMA/HGMMA):
  ``uses_tensor_cores`` is the reusable check.

Adding a kernel: append its name (the C++ identifier, also for templates: every instantiation
matches) to ``EXPECTED_KERNELS``, and to ``TENSOR_CORE_KERNELS`` if it must use tensor cores.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rk_build import find_cuobjdump, find_nvcc, rebuild_errors, require_C_or_fail  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]
EXPECTED_ARCHS = ("sm_80", "sm_90")

# C++ identifiers of the kernels every architecture's cubin must contain.
EXPECTED_KERNELS = [
    # csrc/bn_add_relu.cu
    "bn_add_relu_fwd_kernel",
    # csrc/bn_add_relu_backward.cu
    "bn_add_relu_bwd_nhwc_kernel",
    "bn_add_relu_bwd_nchw_kernel",
    "bn_add_relu_bwd_reduce_kernel",
    # csrc/maxpool.cu
    "maxpool2d_fwd_kernel",
    "maxpool2d_bwd_kernel",
    # csrc/nhwc_stats.cu (the statistics of the sm_90a convolution's training path)
    "nhwc_tile_stats_kernel",
    "nhwc_stats_finalize_kernel",
    # csrc/batch_norm.cu
    "bn_act_fwd_kernel",
    "bn_bits_pack_kernel",
    "bn_act_bwd_reduce_kernel",
    "bn_act_bwd_finalize_kernel",
    "bn_act_bwd_apply_kernel",
    "bn_running_update_kernel",
]

# kernel identifier -> {arch: tensor-core opcodes of which at least one must appear in the SASS
# of every instantiation of the kernel for that arch} (tests/test_conv_sass.py checks the exact
# HMMA flavour of each convolution variant).
TENSOR_CORE_KERNELS: dict[str, dict[str, tuple[str, ...]]] = {
    # csrc/conv2d.cu: implicit-GEMM convolution (mma.sync on sm_80 and sm_90)
    "conv2d_igemm_kernel": {"sm_80": ("HMMA",), "sm_90": ("HMMA", "HGMMA")},
}

TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "IMMA", "DMMA")


# --------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 600) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res.stdout


# --------------------------------------------------------------------------------------------
# the extension and its machine code
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def so_path() -> str:
    return require_C_or_fail().__file__


def _cuobjdump() -> str:
    tool = find_cuobjdump()
    if tool is None:
        pytest.fail("cuobjdump not found (expected in the triton wheel: triton/backends/nvidia/bin/cuobjdump, "
                    "or in the CUDA toolkit): cannot inspect resnet_kernels._C", pytrace=False)
    return tool


@functools.lru_cache(maxsize=None)
def elf_archs(so: str) -> frozenset[str]:
    """Architectures with a cubin (SASS) in ``so`` (cuobjdump --list-elf)."""
    out = _run([_cuobjdump(), "--list-elf", so])
    return frozenset(re.findall(r"\.(sm_\d+a?)\.cubin", out))


@functools.lru_cache(maxsize=None)
def resource_usage(so: str) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {mangled function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}}."""
    out = _run([_cuobjdump(), "-res-usage", so])
    table: dict[str, dict[str, dict[str, int]]] = {}
    arch = None
    fn = None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            table.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and arch is not None and "REG:" in line:
            table[arch][fn] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return table


def matches(mangled: str, ident: str) -> bool:
    """Whether mangled symbol ``mangled`` is (an instantiation of) the C++ identifier ``ident``:
    extern "C" names are the identifier itself; Itanium-mangled ones contain <len><ident>."""
    # (no look-behind: the <len> may follow a digit, e.g. the id of an anonymous namespace)
    return mangled == ident or re.search(rf"{len(ident)}{re.escape(ident)}(?=[IEv]|$)", mangled) is not None


def functions_named(so: str, arch: str, ident: str) -> list[str]:
    return [f for f in resource_usage(so).get(arch, {}) if matches(f, ident)]


@functools.lru_cache(maxsize=None)
def sass_of(so: str, arch: str, function: str) -> str:
    """SASS of one function (mangled name) for one arch."""
    return _run([_cuobjdump(), "-sass", "-arch", arch, "-fun", function, so])


def opcodes_in(sass: str) -> set[str]:
    """Opcode mnemonics (without modifiers) of a SASS listing."""
    ops = set()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass):
        ops.add(m.group(1))
    return ops


def uses_tensor_cores(ident: str, arch: str, opcodes: tuple[str, ...] = TENSOR_CORE_OPCODES,
                      so: str | None = None) -> dict[str, bool]:
    """{instantiation: whether its SASS for ``arch`` contains one of ``opcodes``} for every
    function of ``_C`` named ``ident`` (empty when there is none)."""
    so = so or so_path()
    return {f: bool(opcodes_in(sass_of(so, arch, f)) & set(opcodes)) for f in functions_named(so, arch, ident)}


def assert_uses_tensor_cores(ident: str, arch: str, opcodes: tuple[str, ...] = TENSOR_CORE_OPCODES) -> None:
    found = uses_tensor_cores(ident, arch, opcodes)
    assert found, f"no kernel named {ident} in the {arch} cubin of {so_path()}"
    without = [f for f, ok in found.items() if not ok]
    assert not without, f"{len(without)} instantiation(s) of {ident} issue none of {opcodes} on {arch}: {without[:3]}"


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_C_imports_when_nvcc_present():
    mod = require_C_or_fail()
    built = {f"sm_{a.strip()}" for a in str(mod.built_archs).split(",") if a.strip()}
    missing = [a for a in EXPECTED_ARCHS if a not in built]
    assert not missing, (f"_C was built for {sorted(built)}, missing {missing} "
                         f"(RESNET_KERNELS_CUDA_ARCHS, or an nvcc that cannot target them)")


def test_matches_identifier():
    m = "_ZN2rk3bar22bn_add_relu_fwd_kernelIfLi4ELb1ELi63EEEvPKT_"
    assert matches(m, "bn_add_relu_fwd_kernel")
    assert not matches(m, "add_relu_fwd_kernel")
    assert not matches(m, "bn_add_relu_fwd")
    assert matches("conv_kernel", "conv_kernel") and not matches("conv_kernel2", "conv_kernel")
    anon = "_ZN2rk4conv41_GLOBAL__N__934d1f76_9_conv2d_cu_018686d019conv2d_igemm_kernelI6__halfLi0ELb0EEEvNS0_6ParamsE"
    assert matches(anon, "conv2d_igemm_kernel") and not matches(anon, "igemm_kernel")


def test_cubins_for_every_arch():
    archs = elf_archs(so_path())
    missing = [a for a in EXPECTED_ARCHS if a not in archs]
    assert not missing, f"{so_path()} has cubins for {sorted(archs)}, missing {missing}"


@pytest.mark.parametrize("arch", EXPECTED_ARCHS)
def test_expected_kernels_present(arch):
    so = so_path()
    usage = resource_usage(so)
    assert arch in usage, f"cuobjdump -res-usage lists no {arch} code in {so} (archs: {sorted(usage)})"
    missing = [k for k in EXPECTED_KERNELS if not functions_named(so, arch, k)]
    assert not missing, f"{arch}: kernels missing from {so}: {missing}"


@pytest.mark.parametrize("arch", EXPECTED_ARCHS)
def test_no_local_memory(arch):
    """No kernel spills registers or uses a stack frame (local memory), on any arch."""
    so = so_path()
    funcs = resource_usage(so).get(arch, {})
    assert funcs, f"no {arch} functions in {so}"
    bad = {f: u for f, u in funcs.items() if u.get("LOCAL", 0) or u.get("STACK", 0)}
    assert not bad, (f"{arch}: {len(bad)} kernel(s) use local memory (spills / stack), e.g. "
                     + "; ".join(f"{f}: {u}" for f, u in list(bad.items())[:5]))


@pytest.mark.parametrize("arch", EXPECTED_ARCHS)
def test_no_spill_instructions_in_heaviest_instantiations(arch):
    """SASS cross-check of the resource table: the instantiation of each expected kernel with the
    most registers (the likeliest to spill) has no local loads/stores."""
    so = so_path()
    usage = resource_usage(so).get(arch, {})
    for k in EXPECTED_KERNELS:
        funcs = functions_named(so, arch, k)
        assert funcs, f"{arch}: no {k}"
        heaviest = max(funcs, key=lambda f: usage[f].get("REG", 0))
        ops = opcodes_in(sass_of(so, arch, heaviest))
        assert ops, f"could not parse the SASS of {heaviest} ({arch})"
        assert not ops & {"STL", "LDL"}, f"{arch}: {heaviest} has local memory traffic: {sorted(ops & {'STL', 'LDL'})}"


@pytest.mark.parametrize("arch", EXPECTED_ARCHS)
def test_tensor_core_helper_sees_absence(arch):
    """The helper must be able to say no: the elementwise epilogue kernels issue no MMA."""
    found = uses_tensor_cores("bn_add_relu_bwd_reduce_kernel", arch)
    assert found and not any(found.values()), found


@pytest.mark.parametrize("ident", sorted(TENSOR_CORE_KERNELS) or [pytest.param(None, marks=pytest.mark.skip(
    reason="no kernel is required to use tensor cores yet (TENSOR_CORE_KERNELS is empty)"))])
def test_tensor_core_kernels(ident):
    for arch, ops in TENSOR_CORE_KERNELS[ident].items():
        assert_uses_tensor_cores(ident, arch, ops)


if __name__ == "__main__":  # python tests/test_sass.py: quick summary
    so = so_path()
    print(so, sorted(elf_archs(so)))
    for a, fs in resource_usage(so).items():
        print(a, len(fs), "functions, max REG", max(u["REG"] for u in fs.values()))
    sys.exit(0)


def test_find_nvcc_matches_setup():
    """tests/rk_build.py's nvcc lookup is setup.py's (the functions are compared by running
    setup.py's own definitions, which cannot be imported: setup.py runs setup() at import)."""
    import rk_build

    tree = ast.parse((REPO / "setup.py").read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("find_nvcc", "_real_nvcc")]
    assert len(defs) == 2, "setup.py must define find_nvcc and _real_nvcc"
    ns = {"os": os, "re": re, "shutil": shutil, "subprocess": subprocess, "Path": Path}
    exec(compile(ast.Module(body=defs, type_ignores=[]), "setup.py", "exec"), ns)  # noqa: S102
    assert ns["find_nvcc"]() == rk_build.find_nvcc()


@pytest.mark.parametrize("arch", EXPECTED_ARCHS)
def test_batch_norm_reduce_arrives_on_its_counters(arch, tmp_path):
    """Every instantiation of bn_act_bwd_reduce_kernel runs the finalize in its own launch: a
    gpu-scope atomic add on its arrival counter and gpu-scope fences in its SASS (csrc/batch_norm.cu);
    the other batch_norm.cu kernels have no atomic."""
    tool = _cuobjdump()
    subprocess.run([tool, "-xelf", f"batch_norm.{arch}", so_path()], cwd=tmp_path, capture_output=True, check=True,
                   timeout=300)
    cubin = tmp_path / f"batch_norm.{arch}.cubin"
    assert cubin.is_file(), f"no batch_norm.{arch}.cubin in {so_path()}"
    parts = re.split(r"\n\s*Function : (\S+)\s*\n", _run([tool, "-sass", str(cubin)]))
    funcs = dict(zip(parts[1::2], parts[2::2]))
    reduces = {n: b for n, b in funcs.items() if matches(n, "bn_act_bwd_reduce_kernel")}
    assert len(reduces) == 128, f"{arch}: {len(reduces)} reduce instantiations"
    for name, body in funcs.items():
        atomic = re.search(r"\bATOMG?\.E\.ADD\S*\.GPU\b", body) is not None
        fence = re.search(r"\bMEMBAR\S*\.GPU\b", body) is not None
        if name in reduces:
            assert atomic and fence, f"{arch} {name}: no gpu-scope atomic add / fence (the finalize's arrival)"
        else:
            assert not atomic, f"{arch} {name}: an unexpected atomic"
