"""Ahead-of-time compilation of the training-mode BatchNorm Triton kernels
(``triton_ops/batch_norm.py``) for sm_90 (and sm_80 for one dtype), on any machine, with the
tiling the GPU heuristics pick for ResNet shapes: every kernel compiles, without register spills,
within its register budget, with 16-byte vector loads/stores where the tiling allows them and no
atomics on the data (the per-channel sums are deterministic; the reduce kernels' only atomic is the
arrival counter of their in-launch finalize). The helper is rk_aot (a
child process without TRITON_INTERPRET), as in tests/test_triton_aot.py.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import rk_aot
from rk_aot import KernelSpec

MOD = "resnet_kernels.triton_ops.batch_norm"
K = importlib.import_module(MOD)

ACT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
CPU = torch.device("cpu")  # the device only sets the (runtime) number of programs, not the constexprs

# Register budgets (sm_90): the streaming elementwise kernels keep >= 50% occupancy (<= 64
# registers per thread); the reduce kernels keep three accumulators per element (<= 128, as
# bn_add_relu's backward); the per-channel kernels are tiny (C / 128 programs: occupancy does not
# matter; float64 needs two registers per value).
MAX_REGS = {"_fwd_kernel": 64, "_fwd_running_kernel": 64, "_apply_kernel": 64, "_reduce_cols_kernel": 128,
            "_reduce_planes_kernel": 128,
            "_running_kernel": 64}


def _i(int64: bool) -> str:
    return "i64" if int64 else "i32"


def _size(dt) -> int:
    return torch.empty(0, dtype=dt).element_size()


def _acc(dt) -> str:
    return "*fp64" if dt == torch.float64 else "*fp32"


def _ew_runtime(cfg, N, C, HW, layout, int64):
    """Runtime integer arguments of the elementwise kernels and those triton would mark divisible by 16."""
    vals = dict(R=cfg["R"], S_V=cfg["S_V"], C=C)
    sig = {n: _i(int64) for n in vals}
    return sig, tuple(n for n, v in vals.items() if v % 16 == 0)


def _fwd_spec(dt, N, C, HW, layout, arch, id_mode=K.ID_BN, relu=True, param_dt=None, int64=False, want_mode=None,
              want_vec=None, bits=False, running=None):
    """_fwd_kernel's spec; ``running`` (buffer dtypes, one per BatchNorm): _fwd_running_kernel's,
    the tail of the training block applying its BatchNorms' running-statistics updates."""
    cfg = K._elementwise_config(N, C, HW, layout, _size(dt), interpret=False, **K._fwd_load(id_mode))
    if bits:  # batch_norm_act_bits: the tiling that keeps each mask byte's 8 channels in one tile
        assert K.bits_in_kernel(C, layout)
        cfg = K._bits_config(cfg, C, cfg["R"], cfg["S_V"] * cfg["VEC"])
    if want_mode is not None:
        assert cfg["MODE"] == want_mode, (cfg, want_mode)
    if want_vec is not None:
        assert cfg["VEC"] == want_vec, (cfg, want_vec)
    act, acc = ACT[dt], _acc(dt)
    par = ACT[param_dt] if param_dt is not None else acc
    sig = dict(y_ptr=act, mean_ptr=acc, var_ptr=acc, w_ptr=par, b_ptr=par, id_ptr=act, im_ptr=acc, iv_ptr=acc,
               iw_ptr=par, ib_ptr=par, out_ptr=act, bits_ptr="*u8",
               eps="fp32", eps_lo="fp32", eps_lo2="fp32", id_eps="fp32",
               id_eps_lo="fp32", id_eps_lo2="fp32")
    rt, div16 = _ew_runtime(cfg, N, C, HW, layout, int64)
    sig.update(rt)
    constexprs = dict(MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"], HAS_W=True,
                      HAS_B=True, ID_MODE=id_mode, HAS_IW=id_mode == K.ID_BN, HAS_IB=id_mode == K.ID_BN,
                      RELU=relu, IS64=dt == torch.float64, INT64=int64, BITS=bits)
    kernel = "_fwd_kernel"
    if running is not None:
        kernel = "_fwd_running_kernel"
        rsig, rflags = _running_slots(running)
        sig.update(rsig)
        constexprs.update(RUN_BLOCK=min(triton_next_pow2(C), 512), **rflags)
    return KernelSpec(MOD, kernel, sig, constexprs, num_warps=cfg["num_warps"], arch=arch,
                      divisible_by_16=div16)


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _apply_spec(dt, N, C, HW, layout, arch, gi_mode=K.ID_BN, need_gy=True, relu=True, int64=False, want_mode=None,
                want_vec=None):
    cfg = K._elementwise_config(N, C, HW, layout, _size(dt), interpret=False,
                                **K._apply_load(relu, need_gy, gi_mode))
    if want_mode is not None:
        assert cfg["MODE"] == want_mode, (cfg, want_mode)
    if want_vec is not None:
        assert cfg["VEC"] == want_vec, (cfg, want_vec)
    act, acc = ACT[dt], _acc(dt)
    sig = dict(go_ptr=act, out_ptr=act, y_ptr=act, mean_ptr=acc, id_ptr=act, im_ptr=acc, coef_ptr=acc, gy_ptr=act,
               gi_ptr=act)
    rt, div16 = _ew_runtime(cfg, N, C, HW, layout, int64)
    sig.update(rt)
    constexprs = dict(MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"], RELU=relu,
                      NEED_GY=need_gy, GI_MODE=gi_mode, IS64=dt == torch.float64, INT64=int64)
    return KernelSpec(MOD, "_apply_kernel", sig, constexprs, num_warps=cfg["num_warps"], arch=arch,
                      divisible_by_16=div16)


def _reduce_spec(dt, N, C, HW, layout, arch, need=(True, True, True), relu=True, int64=False, mask_bits=False,
                 param_dt=None):
    cfg = K._reduce_config(N, C, HW, layout, _size(dt), CPU, interpret=False)
    act, acc = ACT[dt], _acc(dt)
    par = ACT[param_dt] if param_dt is not None else acc
    sig = dict(go_ptr=act, out_ptr="*u8" if mask_bits else act,
               y_ptr=act, mean_ptr=acc, id_ptr=act, im_ptr=acc, pg_ptr=acc, pd_ptr=acc,
               pi_ptr=acc, var_ptr=acc, w_ptr=par, iv_ptr=acc, iw_ptr=par, gw_ptr=par, gb_ptr=par, giw_ptr=par,
               gib_ptr=par, coef_ptr=acc, icoef_ptr=acc, cnt_ptr="*i32", eps="fp32", eps_lo="fp32", eps_lo2="fp32",
               id_eps="fp32", id_eps_lo="fp32", id_eps_lo2="fp32", inv_m="fp32", inv_m_lo="fp32", inv_m_lo2="fp32")
    # the in-launch finalize: every output of batch_norm_act_backward's / _coef's training use
    fin = dict(HAS_W=True, HAS_IW=need[2], W_GW=need[1], W_GB=need[0], W_GIW=need[2], W_GIB=need[2] and need[0],
               COEF_Y=need[0] and need[1], COEF_I=need[0] and need[2])
    block_c = cfg["BLOCK_C"] if cfg["kind"] == "cols" else 1
    constexprs = dict(VEC=cfg["VEC"], RELU=relu, NEED_G=need[0], NEED_D=need[1], NEED_I=need[2],
                      IS64=dt == torch.float64, INT64=int64, MASK_BITS=mask_bits,
                      FIN_BLOCK_P=K._finalize_rows(cfg["P"], block_c, interpret=False), **fin)
    if cfg["kind"] == "cols":
        kernel = "_reduce_cols_kernel"
        sig.update(M=_i(int64), C_V=_i(int64), TILES="i32")
        constexprs.update(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
    else:
        kernel = "_reduce_planes_kernel"
        sig.update(N=_i(int64), C=_i(int64), HW_V=_i(int64), N_TILES="i32", HW_TILES="i32")
        constexprs.update(BLOCK_N=cfg["BLOCK_N"], BLOCK_HW=cfg["BLOCK_HW"])
    return KernelSpec(MOD, kernel, sig, constexprs, num_warps=cfg["num_warps"], arch=arch)


def _running_spec(buf_dts, C, arch):
    """_running_kernel with len(buf_dts) of its RUNNING_SLOTS slots used (a block's BatchNorms),
    every buffer present, the others' flags 0."""
    cfg = K._running_config(C)
    sig, flags = _running_slots(buf_dts)
    return KernelSpec(MOD, "_running_kernel", sig, dict(BLOCK=cfg["BLOCK"], **flags), num_warps=cfg["num_warps"],
                      arch=arch)


def _running_slots(buf_dts):
    """The RUNNING_SLOTS slots' signature and flags (``_running_kernel``'s, ``_fwd_running_kernel``'s)."""
    buf_dts = list(buf_dts)
    sig, flags = {}, {}
    for s in range(K.RUNNING_SLOTS):
        dt = buf_dts[s] if s < len(buf_dts) else buf_dts[0]  # an unused slot gets slot 0's pointers
        acc = "*fp64" if dt == torch.float64 else "*fp32"
        sig.update({f"m{s}": acc, f"v{s}": acc, f"rm{s}": ACT[dt], f"rv{s}": ACT[dt], f"n{s}": "*i64"})
        for name in ("k", "f", "fu"):
            sig.update({f"{name}{s}": "fp32", f"{name}{s}_lo": "fp32", f"{name}{s}_lo2": "fp32"})
        sig[f"C{s}"] = "i32"
        flags[f"F{s}"] = (K.RUN_RM | K.RUN_RV | K.RUN_NBT | (K.RUN_RM64 | K.RUN_RV64 if dt == torch.float64 else 0)
                          if s < len(buf_dts) else 0)
    return sig, flags


def _cases():
    """(id, spec, expect_vector_access)"""
    out = []
    fp16, bf16, fp32, fp64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    for dt in (fp32, fp16, bf16, fp64):
        n = DT_NAME[dt]
        # ResNet layer1 at batch 256: NCHW 56x56 planes, channels_last C=64 columns; layer4 7x7 NCHW (flat)
        out.append((f"fwd-planes-{n}", _fwd_spec(dt, 256, 64, 56 * 56, "nchw", 90, want_mode=K.MODE_PLANES), True))
        out.append((f"fwd-cols-{n}", _fwd_spec(dt, 256, 64, 56 * 56, "nhwc", 90, want_mode=K.MODE_COLS), True))
        out.append((f"apply-planes-{n}", _apply_spec(dt, 256, 64, 56 * 56, "nchw", 90, want_mode=K.MODE_PLANES),
                    True))
        out.append((f"apply-cols-{n}", _apply_spec(dt, 256, 64, 56 * 56, "nhwc", 90, want_mode=K.MODE_COLS), True))
        out.append((f"reduce-planes-{n}", _reduce_spec(dt, 256, 64, 56 * 56, "nchw", 90), True))
        out.append((f"reduce-cols-{n}", _reduce_spec(dt, 256, 64, 56 * 56, "nhwc", 90), True))
    for dt in (fp16, bf16):
        n = DT_NAME[dt]
        # 7x7 planes (no vector width) and 14x14 planes (8-byte vectors for 16-bit data)
        out.append((f"fwd-planes-{n}-7x7", _fwd_spec(dt, 256, 512, 49, "nchw", 90, want_vec=1), False))
        out.append((f"apply-planes-{n}-7x7", _apply_spec(dt, 256, 512, 49, "nchw", 90, want_vec=1), False))
        out.append((f"fwd-planes-{n}-14x14", _fwd_spec(dt, 256, 256, 196, "nchw", 90, want_vec=4), True))
        out.append((f"apply-planes-{n}-14x14", _apply_spec(dt, 256, 256, 196, "nchw", 90, want_vec=4), True))
        # parameters in the activation dtype (model.to(bf16))
        out.append((f"fwd-cols-{n}-params-{n}", _fwd_spec(dt, 256, 64, 56 * 56, "nhwc", 90, param_dt=dt), True))
        out.append((f"reduce-cols-{n}-params-{n}", _reduce_spec(dt, 256, 512, 49, "nhwc", 90, param_dt=dt), True))
    out += [
        ("fwd-planes-fp32-7x7", _fwd_spec(fp32, 256, 512, 49, "nchw", 90, want_vec=1), False),
        ("apply-planes-fp32-7x7", _apply_spec(fp32, 256, 512, 49, "nchw", 90, want_vec=1), False),
        ("fwd-cols-fp16-C3", _fwd_spec(fp16, 4, 3, 224 * 224, "nhwc", 90, want_vec=1), False),
        ("apply-cols-fp16-C3", _apply_spec(fp16, 4, 3, 224 * 224, "nhwc", 90, want_vec=1), False),
        ("fwd-cols-bf16-raw-identity", _fwd_spec(bf16, 256, 256, 196, "nhwc", 90, id_mode=K.ID_RAW), True),
        ("fwd-planes-fp32-no-identity-norelu", _fwd_spec(fp32, 8, 64, 112 * 112, "nchw", 90, id_mode=K.ID_NONE,
                                                         relu=False), True),
        ("fwd-planes-bf16-int64", _fwd_spec(bf16, 4096, 64, 112 * 112, "nchw", 90, int64=True), True),
        ("apply-cols-bf16-raw-identity", _apply_spec(bf16, 256, 256, 196, "nhwc", 90, gi_mode=K.ID_RAW), True),
        ("apply-planes-fp32-gy-only-norelu", _apply_spec(fp32, 256, 128, 28 * 28, "nchw", 90, gi_mode=K.ID_NONE,
                                                         relu=False), True),
        ("apply-cols-fp16-int64", _apply_spec(fp16, 4096, 64, 112 * 112, "nhwc", 90, int64=True), True),
        ("reduce-planes-fp16-7x7", _reduce_spec(fp16, 256, 512, 49, "nchw", 90), False),
        ("reduce-cols-fp16-C3", _reduce_spec(fp16, 256, 3, 56 * 56, "nhwc", 90), False),
        ("reduce-planes-fp32-int64", _reduce_spec(fp32, 4096, 64, 112 * 112, "nchw", 90, int64=True), True),
        ("reduce-cols-bf16-gd-only", _reduce_spec(bf16, 256, 512, 49, "nhwc", 90, need=(False, True, False)), True),
        # the 1-bit ReLU mask (resnet_kernels/_bits.py): written by the forward, read by the reduce
        ("fwd-cols-bf16-bits", _fwd_spec(bf16, 256, 64, 56 * 56, "nhwc", 90, bits=True), True),
        ("fwd-cols-bf16-bits-C2048", _fwd_spec(bf16, 256, 2048, 49, "nhwc", 90, bits=True), True),
        ("fwd-planes-bf16-bits", _fwd_spec(bf16, 256, 64, 56 * 56, "nchw", 90, bits=True), True),
        # the block's tail applying its BatchNorms' running-statistics updates in the same launch
        ("fwd-running-cols-bf16-bits-block", _fwd_spec(bf16, 256, 256, 56 * 56, "nhwc", 90, bits=True,
                                                       running=[fp32] * 4), True),
        ("fwd-running-cols-bf16-bits-C2048", _fwd_spec(bf16, 256, 2048, 49, "nhwc", 90, bits=True,
                                                       running=[fp32, fp32, fp32]), True),
        ("fwd-running-planes-fp32-mixed", _fwd_spec(fp32, 32, 64, 56 * 56, "nchw", 90, bits=True,
                                                    running=[fp32, bf16, fp64]), True),
        ("reduce-cols-bf16-bits", _reduce_spec(bf16, 256, 256, 56 * 56, "nhwc", 90, mask_bits=True), True),
        ("reduce-planes-bf16-bits", _reduce_spec(bf16, 256, 64, 56 * 56, "nchw", 90, mask_bits=True), True),
        ("running-fp32", _running_spec([fp32], 512, 90), False),
        ("running-bf16", _running_spec([bf16], 64, 90), False),
        ("running-fp64", _running_spec([fp64], 2048, 90), False),
        # a bottleneck block with its projection: 4 BatchNorms in one launch (C up to 2048)
        ("running-block-fp32", _running_spec([fp32] * 4, 2048, 90), False),
        ("running-block-mixed", _running_spec([fp32, bf16, torch.float16, fp64], 1024, 90), False),
        # sm_80 (A100): one dtype per kernel
        ("sm80-fwd-cols-bf16", _fwd_spec(bf16, 256, 64, 56 * 56, "nhwc", 80), True),
        ("sm80-apply-planes-bf16", _apply_spec(bf16, 256, 64, 56 * 56, "nchw", 80), True),
        ("sm80-reduce-cols-bf16", _reduce_spec(bf16, 256, 64, 56 * 56, "nhwc", 80), True),
        ("sm80-reduce-planes-bf16", _reduce_spec(bf16, 256, 64, 56 * 56, "nchw", 80), True),
        ("sm80-fwd-running-cols-bf16-bits", _fwd_spec(bf16, 256, 64, 56 * 56, "nhwc", 80, bits=True,
                                                      running=[fp32] * 2), True),
        ("sm80-running-fp32", _running_spec([fp32], 512, 80), False),
        ("sm80-running-block-fp32", _running_spec([fp32] * 4, 2048, 80), False),
    ]
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def compiled():
    res = rk_aot.aot_compile([c[1] for c in CASES])
    return dict(zip(IDS, res))


def test_every_kernel_is_covered():
    jitted = rk_aot.jit_functions(K)
    kernels = {n for n in jitted if n.endswith("_kernel")}
    assert kernels == set(K.KERNELS), "KERNELS must list every @triton.jit *_kernel of the module"
    assert set(MAX_REGS) == kernels
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
    assert f".target sm_{spec.arch}" in res.ptx
    expect_vec = dict((c[0], c[2]) for c in CASES)[case]
    loads, stores = rk_aot.global_vector_accesses(res)
    if expect_vec:
        assert loads, f"{case}: no vector global loads in the PTX"
        if spec.kernel in ("_fwd_kernel", "_apply_kernel"):
            assert stores, f"{case}: no vector global stores in the PTX"
    # the per-channel sums are deterministic: no atomics on the data. The reduce kernels' one atomic is
    # their arrival counter (the in-launch finalize): a 32-bit acq_rel add at gpu scope
    atomics = re.findall(r"\b(?:atom|red)(?:\.[a-z0-9_]+)*", res.ptx)
    if spec.kernel in ("_reduce_cols_kernel", "_reduce_planes_kernel"):
        assert atomics and all(a.startswith("atom") and ".acq_rel" in a and ".gpu" in a and ".add" in a
                               and (".u32" in a or ".s32" in a) for a in atomics), f"{case}: {atomics}"
    else:
        assert not atomics, f"{case}: atomics in the PTX: {atomics}"
