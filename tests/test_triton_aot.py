"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100) and sm_80 (A100), on any
machine: every kernel must compile for representative dtype/flag/tiling combinations (the
block sizes the GPU heuristics pick for ResNet shapes), without register spills, and the
streaming kernels must use 16-byte vector loads/stores where their tiling allows it.

The compile runs in a child process without TRITON_INTERPRET (see rk_aot.py), so this works
when the test process itself runs the interpreter. The reusable helper is ``rk_aot`` (the
Triton convolution kernels use it too, asserting tensor-core instructions via
``rk_aot.tensor_core_instructions``).
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
import torch

import rk_aot
from rk_aot import KernelSpec

MOD = "resnet_kernels.triton_ops.bn_add_relu"
K = importlib.import_module(MOD)

ACT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
CPU = torch.device("cpu")  # the device only sets the (runtime) number of programs, not the constexprs

# Register budgets (sm_90, 65536 registers per SM). The streaming forward must keep >= 50%
# occupancy (1024 threads per SM -> <= 64 registers per thread) to have enough loads in flight;
# the backward keeps three accumulators per thread and may use up to 128 (25% occupancy, with
# 4 vector loads in flight per thread per tensor).
MAX_REGS = {"_fwd_kernel": 64, "_bwd_cols_kernel": 128, "_bwd_planes_kernel": 128, "_sum_partials_kernel": 64}


def _i(is64: bool) -> str:
    return "i64" if is64 else "i32"


def _fwd_spec(dtype, N, C, HW, layout, flags, arch, int64=False, want_mode=None):
    cfg = K._forward_config(N, C, HW, layout, torch.empty(0, dtype=dtype).element_size(), interpret=False)
    if want_mode is not None:
        assert cfg["MODE"] == want_mode, (cfg, want_mode)
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    act = ACT[dtype]
    has = dict(HAS_SCALE=True, HAS_SHIFT=True, HAS_ID=True, HAS_ID_SCALE=True, HAS_ID_SHIFT=True, RELU=True)
    has.update(flags)
    sig = {"x_ptr": act, "out_ptr": act, "id_ptr": act}
    for n, flag in (("scale_ptr", "HAS_SCALE"), ("shift_ptr", "HAS_SHIFT"), ("id_scale_ptr", "HAS_ID_SCALE"),
                    ("id_shift_ptr", "HAS_ID_SHIFT")):
        sig[n] = acc if has[flag] else act  # the launcher passes x for an absent operand
    for n in ("R", "S_V", "C", "inner", "numel"):
        sig[n] = _i(int64)
    numel = N * C * HW
    runtime = (("R", cfg["R"]), ("S_V", cfg["S_V"]), ("C", C), ("inner", HW if layout == "nchw" else 1),
               ("numel", numel))
    div16 = tuple(n for n, v in runtime if v % 16 == 0)  # what triton's launcher would specialize
    constexprs = dict(MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
                      IS64=dtype == torch.float64, INNER_ONE=layout == "nhwc", INT64=int64, **has)
    return KernelSpec(MOD, "_fwd_kernel", sig, constexprs, num_warps=cfg["num_warps"], arch=arch,
                      divisible_by_16=div16)


def _bwd_spec(dtype, N, C, HW, layout, flags, arch, int64=False):
    cfg = K._backward_config(N, C, HW, layout, torch.empty(0, dtype=dtype).element_size(), CPU, interpret=False)
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    act = ACT[dtype]
    f = dict(RELU=True, HAS_SCALE=True, HAS_ID_SCALE=True, NEED_GX=True, NEED_GI=True, NEED_GS=True, NEED_GB=True,
             NEED_GIS=True)
    f.update(flags)
    sig = {n: act for n in ("go_ptr", "out_ptr", "x_ptr", "id_ptr", "gx_ptr", "gi_ptr")}
    sig.update(scale_ptr=acc if f["HAS_SCALE"] else act, id_scale_ptr=acc if f["HAS_ID_SCALE"] else act,
               ps_ptr=acc if f["NEED_GS"] else act, pb_ptr=acc if f["NEED_GB"] else act,
               pis_ptr=acc if f["NEED_GIS"] else act)
    constexprs = dict(VEC=cfg["VEC"], IS64=dtype == torch.float64, INT64=int64, **f)
    if cfg["kind"] == "cols":
        kernel = "_bwd_cols_kernel"
        sig.update(M=_i(int64), C_V=_i(int64), TILES="i32")
        constexprs.update(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
    else:
        kernel = "_bwd_planes_kernel"
        sig.update(N=_i(int64), C=_i(int64), HW_V=_i(int64), N_TILES="i32", HW_TILES="i32")
        constexprs.update(BLOCK_N=cfg["BLOCK_N"], BLOCK_HW=cfg["BLOCK_HW"])
    return KernelSpec(MOD, kernel, sig, constexprs, num_warps=cfg["num_warps"], arch=arch)


def _sum_spec(dtype, P, C, arch):
    cfg = K._sum_config(P, C, interpret=False)
    t = "*fp64" if dtype == torch.float64 else "*fp32"
    sig = {"part_ptr": t, "out0_ptr": t, "out1_ptr": t, "out2_ptr": t, "P": "i32", "C": "i32"}
    return KernelSpec(MOD, "_sum_partials_kernel", sig,
                      dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], IS64=dtype == torch.float64),
                      num_warps=cfg["num_warps"], arch=arch)


def _cases():
    """(id, spec, expect_vector_access)"""
    out = []
    DT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    BN_ADD = {}
    ADD = dict(HAS_SCALE=False, HAS_SHIFT=False, HAS_ID_SCALE=False, HAS_ID_SHIFT=False)
    BN_NORELU = dict(HAS_ID=False, HAS_ID_SCALE=False, HAS_ID_SHIFT=False, RELU=False)
    for arch in (90, 80):
        dts = DT if arch == 90 else (torch.float16,)
        for dt in dts:
            n = DT_NAME[dt]
            # forward: NCHW 56x56 planes, channels_last C=64 columns, NCHW 7x7 (flat), C=3 channels_last (flat)
            out.append((f"sm{arch}-fwd-planes-{n}-bn_add", _fwd_spec(dt, 256, 64, 56 * 56, "nchw", BN_ADD, arch,
                                                                     want_mode=K.MODE_PLANES), True))
            out.append((f"sm{arch}-fwd-cols-{n}-bn_add", _fwd_spec(dt, 256, 64, 56 * 56, "nhwc", BN_ADD, arch,
                                                                   want_mode=K.MODE_COLS), True))
            out.append((f"sm{arch}-fwd-flat-{n}-bn_add", _fwd_spec(dt, 256, 512, 7 * 7, "nchw", BN_ADD, arch,
                                                                   want_mode=K.MODE_FLAT), True))
            out.append((f"sm{arch}-bwd-cols-{n}-all", _bwd_spec(dt, 256, 64, 56 * 56, "nhwc", {}, arch), True))
            out.append((f"sm{arch}-bwd-planes-{n}-all", _bwd_spec(dt, 256, 64, 56 * 56, "nchw", {}, arch), True))
        if arch == 90:
            dt = torch.float16
            out.append(("sm90-fwd-cols-fp16-add_relu", _fwd_spec(dt, 256, 512, 49, "nhwc", ADD, arch,
                                                                 want_mode=K.MODE_COLS), True))
            out.append(("sm90-fwd-planes-fp32-bn_norelu", _fwd_spec(torch.float32, 8, 64, 112 * 112, "nchw", BN_NORELU,
                                                                    arch, want_mode=K.MODE_PLANES), True))
            out.append(("sm90-fwd-flat-fp16-C3-nhwc", _fwd_spec(dt, 4, 3, 224 * 224, "nhwc", BN_ADD, arch,
                                                                want_mode=K.MODE_FLAT), True))
            out.append(("sm90-fwd-planes-bf16-int64", _fwd_spec(torch.bfloat16, 4096, 64, 112 * 112, "nchw", BN_ADD,
                                                                arch, int64=True), True))
            out.append(("sm90-fwd-flat-fp16-int64", _fwd_spec(dt, 4096, 512, 7 * 7 * 23, "nchw", BN_ADD, arch,
                                                              int64=True, want_mode=K.MODE_FLAT), True))
            out.append(("sm90-bwd-planes-fp16-7x7", _bwd_spec(dt, 256, 512, 49, "nchw", {}, arch), False))
            out.append(("sm90-bwd-cols-fp16-C3", _bwd_spec(dt, 256, 3, 56 * 56, "nhwc", {}, arch), False))
            out.append(("sm90-bwd-cols-bf16-add_relu", _bwd_spec(torch.bfloat16, 256, 512, 49, "nhwc",
                                                                 dict(HAS_SCALE=False, HAS_ID_SCALE=False,
                                                                      NEED_GS=False, NEED_GIS=False), arch), True))
            out.append(("sm90-bwd-planes-fp32-norelu-gx", _bwd_spec(torch.float32, 256, 128, 28 * 28, "nchw",
                                                                    dict(RELU=False, NEED_GI=False, NEED_GIS=False),
                                                                    arch), True))
            out.append(("sm90-bwd-planes-fp32-int64", _bwd_spec(torch.float32, 4096, 64, 112 * 112, "nchw", {}, arch,
                                                                int64=True), True))
            out.append(("sm90-bwd-cols-fp16-int64", _bwd_spec(dt, 4096, 64, 112 * 112, "nhwc", {}, arch, int64=True),
                        True))
        for dt in (torch.float32, torch.float64) if arch == 90 else (torch.float32,):
            out.append((f"sm{arch}-sum-{DT_NAME[dt]}", _sum_spec(dt, 264, 512, arch), False))
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def compiled():
    res = rk_aot.aot_compile([c[1] for c in CASES])
    return dict(zip(IDS, res))


def test_helper_runs_outside_the_interpreter():
    # The point of the subprocess: this process may be interpreting (no GPU here), the AOT worker never is.
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "TRITON_INTERPRET" not in rk_aot._child_env()


def test_every_kernel_is_covered():
    jitted = rk_aot.jit_functions(K)
    kernels = {n for n in jitted if n.endswith("_kernel")}
    assert kernels == set(K.KERNELS), "KERNELS must list every @triton.jit *_kernel of the module"
    for arch in (90, 80):
        covered = {c[1].kernel for c in CASES if c[1].arch == arch}
        assert covered == kernels, f"sm_{arch}: kernels without an AOT case: {kernels - covered}"


@pytest.mark.parametrize("case", IDS)
def test_aot_compiles_without_spills(compiled, case, record_property):
    res = compiled[case]
    spec = res.spec
    print(f"\n{case}: {res.summary()} (triton {res.triton_version})")
    record_property("registers", res.n_regs)
    record_property("spills", res.n_spills)
    assert res.name == spec.kernel
    assert res.n_spills == 0, f"{case}: {res.summary()}"
    assert res.stack_bytes == 0, f"{case}: {res.summary()}"
    assert 0 < res.n_regs <= MAX_REGS[spec.kernel], f"{case}: {res.summary()}"
    target = f".target sm_{spec.arch}"
    assert target in res.ptx
    expect_vec = dict((c[0], c[2]) for c in CASES)[case]
    loads, stores = rk_aot.global_vector_accesses(res)
    if expect_vec:
        assert loads, f"{case}: no vector global loads in the PTX"
        if spec.kernel == "_fwd_kernel" or spec.constexprs.get("NEED_GX"):
            assert stores, f"{case}: no vector global stores in the PTX"
    # no atomics anywhere: the per-channel sums are deterministic two-pass reductions
    assert re.search(r"\b(atom|red)\.global", res.ptx) is None, f"{case}: atomics in the PTX"


def test_aot_reports_bad_specs_with_kernel_name():
    spec = KernelSpec(MOD, "_sum_partials_kernel", {"part_ptr": "*fp32", "bogus": "i32"}, {"BLOCK_P": 4}, arch=90)
    with pytest.raises(rk_aot.AotError, match=r"_sum_partials_kernel: bad spec: missing arguments \['out0_ptr'.*"
                                              r"unknown \['bogus'\]"):
        rk_aot.aot_compile_one(spec)
