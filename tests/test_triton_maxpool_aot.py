"""Ahead-of-time compilation of the maxpool2d Triton kernels (triton_ops/maxpool.py) for sm_90 and
sm_80 on any machine (rk_aot: a child process without TRITON_INTERPRET): the stem's 3x3 / 2 / 1
in every dtype and both layouts, a general window, 64-bit offsets; no register spills, no stack,
no atomics (the backward is a gather)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import rk_aot
from rk_aot import KernelSpec

MOD = "resnet_kernels.triton_ops.maxpool"
K = importlib.import_module(MOD)
ACT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
MAX_REGS = 96  # 4 elements per lane (BLOCK 512, 4 warps): at least 5 blocks of 128 threads per SM


def _spec(kernel, dtype, nhwc, arch, k=(3, 3), s=(2, 2), p=(1, 1), int64=False):
    act, it = ACT[dtype], ("i64" if int64 else "i32")
    sizes = {n: it for n in ("total", "C", "H", "W", "OH", "OW")}
    geo = dict(KH=k[0], KW=k[1], SH=s[0], SW=s[1], PH=p[0], PW=p[1], NHWC=nhwc, IS64=dtype == torch.float64,
               INT64=int64, BLOCK=512)
    if kernel == "_fwd_kernel":
        sig = {"x_ptr": act, "out_ptr": act, "arg_ptr": "*u8", **sizes}
        geo["HAS_ARG"] = True
    else:
        sig = {"g_ptr": act, "arg_ptr": "*u8", "gx_ptr": act, **sizes}
    return KernelSpec(MOD, kernel, sig, geo, num_warps=4, arch=arch)


def _cases():
    out = []
    for arch in (90, 80):
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64) if arch == 90 else (torch.bfloat16,):
            for nhwc in (True, False):
                lay = "nhwc" if nhwc else "nchw"
                for kernel in K.KERNELS:
                    out.append((f"sm{arch}-{kernel}-{NAME[dt]}-{lay}", _spec(kernel, dt, nhwc, arch)))
    for kernel in K.KERNELS:
        out.append((f"sm90-{kernel}-fp16-k5x3-s2x3", _spec(kernel, torch.float16, True, 90, (5, 3), (2, 3), (2, 0))))
        out.append((f"sm90-{kernel}-bf16-int64", _spec(kernel, torch.bfloat16, True, 90, int64=True)))
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(IDS, rk_aot.aot_compile([c[1] for c in CASES])))


def test_every_kernel_is_listed():
    jitted = {n for n in rk_aot.jit_functions(K) if n.endswith("_kernel")}
    assert jitted == set(K.KERNELS)


@pytest.mark.parametrize("case", IDS)
def test_aot_compiles_without_spills_or_atomics(compiled, case):
    res = compiled[case]
    print(f"\n{case}: {res.summary()}")
    assert res.name == res.spec.kernel
    assert res.n_spills == 0 and res.stack_bytes == 0, f"{case}: {res.summary()}"
    limit = 128 if res.spec.constexprs["INT64"] else MAX_REGS  # 64-bit offsets: twice the index registers
    if res.triton_version.startswith("3.6"):
        # triton 3.6's register allocation of the same kernels (measured in CI: up to 107 for a
        # 5x3 window, 162 with 64-bit offsets), still without spills: a budget of 168 keeps 3
        # CTAs of 128 threads per SM; the tighter budgets above hold on triton 3.8
        limit = 168
    assert 0 < res.n_regs <= limit, f"{case}: {res.summary()}"
    assert f".target sm_{res.spec.arch}" in res.ptx
    assert re.search(r"\b(atom|red)\.global", res.ptx) is None, f"{case}: atomics in the PTX"
