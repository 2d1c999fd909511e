"""Triton implicit-GEMM convolution dgrad (input gradient) with the BN-backward operand fused into
its prologue and the residual / upstream-ReLU / upstream-BN reductions fused into its epilogue.

Contract, argument for argument: ``conv2d_dgrad`` of resnet_kernels/backends/torch_conv_backward.py
(outputs preallocated, written in place; ``conv_dtype`` is the reference's knob, accepted and
ignored here). float32, float16 and bfloat16 activations; float64 is refused (TypeError: the op
layer routes it to the torch/aten implementations). Dilation 1, groups 1.

GEMM view: M = N*H*W input pixels (rows), N_gemm = Cin (columns), K = KH*KW*Cout, reduced in the
order (kh, kw, co) so that a channels_last gradient gives contiguous co runs. Row (n, h, w) and
tap (kh, kw) read the output position oh = (h + ph - kh) / sh, ow = (w + pw - kw) / sw when both
are integers in range (else the tap contributes 0). One loop iteration = one tap x one BLOCK_K
chunk of output channels (the chunked K loop of triton_ops/conv2d.py; there is no packed loop:
Cout, the reduced channel count here, is >= 64 in every ResNet conv).

Strides > 1: the rows are split into the sh*sw parity classes (h % sh, w % sw) = (rh, rw), one per
program_id(1) (grid (row tiles x column tiles, sh*sw); one class at stride 1). Within a class the
taps that reach its rows are the same for every row: kh = kh0 + j*sh with kh0 = (rh + ph) % sh
(likewise kw), where (h + ph - kh) / sh is exact, so the K loop visits only those taps (about
KH*KW/(sh*sw) of them: a 3x3 stride-2 dgrad does 1, 2 or 4 taps per class instead of 9 masked ones;
a 1x1 stride-2 dgrad does its one tap for the (0, 0) class and none for the other three, whose
grad_x is the epilogue alone). Only the range checks of oh/ow remain per row.

Operand prologue (A tile, [BLOCK_M, BLOCK_K], per iteration): g (and the ReLU mask, y) loaded
through their strides, ``bn_dy`` in fp32 (g' = g*(mask > 0); dy = A*g' - (B + K*(y - mean)) with
the per-channel coef rows), the elements of invalid taps / rows / channels forced to 0 (after
bn_dy: B + K*(y - mean) is not 0 there), then ``round_to`` the activation dtype: the same dy
operand the reference rounds once before its convolution. The B tile is the (K, Cin) weight
matrix read through three strides (tap, co, ci). A 16-bit weight whose memory already is a
Cin-contiguous operand is read in place, no pack launch and no cache entry
(``_weight_cache.conv_dgrad_inplace_strides``): a channels_last weight (tap stride Cin, co stride
KH*KW*Cin) or any 1x1 weight with a unit Cin stride (contiguous ones too), with 16-byte-aligned
tap and co strides (Cin % 8 == 0: every ResNet conv whose grad_x is computed). Otherwise it is
packed once per weight version (``_weight_cache``), K-contiguous for fp32 (the tf32 MMA's B operand;
no usual weight layout is K-contiguous here, so fp32 always packs) and Cin-contiguous for 16-bit
types, as the forward packs it. In training every weight changes every step, so a pack is one
copy launch per conv per step (counted by the accountant, backends/__init__.py).

Epilogue (fp32): + residual (times (res_mask > 0) when given), then where(up_out > 0, ., 0) when
up_out is given; grad_x stored once in its dtype through its strides (NCHW or channels_last).
With up_out, each program also writes, for its BLOCK_N channels, sum(grad_x) and
sum(grad_x * (up_y - up_mean)) of its rows of the ROUNDED grad_x (what the reference sums) to row
class * MT + pid_m of a (2, P, Cin) fp32 buffer, P = sh*sw*MT, MT = row tiles of the largest class
(tiles past a smaller class's rows write zeros; one writer per element). The upstream finalize runs
in the same launch (issue 12: was a separate ``_finalize_kernel``, 32 launches per ResNet-50
training step): after its partial stores each program arrives on its column tile's int32 counter
(a CTA barrier, then one gpu-scope acq_rel ``atomic_add``: the pattern of batch_norm.py's
``_reduce_cols_kernel``, the conv statistics' merge and the wgrad's split-K; counters from
``_common.arrival_counters``, dropped if the launch raises). All P programs of a column tile arrive
(every parity class, every row tile: the (P, BLOCK_N) slice of the partials is theirs alone); the
last one runs batch_norm.py's ``_finalize_block`` on the tile's BLOCK_N channels: it sums the P
partial rows in row order (from L2, ``.cg``; deterministic: which program sums varies, the order
does not), writes up_coef (A, A*sum_g/m, A*invstd^2*sum_gd/m) and up_grad_weight / up_grad_bias,
and puts the counter back to 0. The finalize's branch at the end of the kernel made the compiler
hold the epilogue's row math across the K loop (AOT, triton 3.8: up to 255 registers and 32 bytes
of spills on the 1x1 128x128 bf16 tile with 1-bit masks on sm_80); with HAS_UP the epilogue
recomputes its rows after the loop from conv2d.py's ``_arange_after_loop``, and every config stays
spill-free on triton 3.6 and 3.8 with its config unchanged (registers below).

Upstream mask recomputed (``UP_FROM_Y``, the op's x = None: no up_out): the epilogue loads up_y
first (it reads it for the reductions anyway), computes z = up_y * s + t with the upstream BN's
per-channel s = up_weight * (1/sqrt(up_var + eps)), t = up_bias - up_mean * s (fp32, per program
from the vectors) and masks with round(z) > 0, z rounded to the activation dtype: the test
``h > 0`` of the materialised h = round(relu(z)). ``z > 0`` alone would differ: a positive z
below half the dtype's smallest subnormal (fp16: z <= 2**-25, bf16: z <= 2**-134) rounds to 0
(tests/ops/test_conv_backward.py ``test_x_none_mask_is_that_of_the_rounded_h``). One activation
read fewer than with up_out.

Registers (AOT, bf16, 0 spills everywhere; sm_90 / sm_80; before the in-launch finalize -> with it):
triton 3.8: l1 3x3 128x64x64 180 / 179 -> 191 / 182 (up_out and x = None alike); b 1x1 128x128x64
220 / 246 -> 228 / 255, its 1-bit-mask variant 220 / 250 -> 196 / 255, x = None 255 / 248 -> 255 / 255;
fp32 tiles +1 to +30 (at most 182). Triton 3.6: b 1x1 128x128x64 236 / 255 -> 244 / 255, 1-bit
masks 251 / 255 -> 254 / 255, x = None 252 / 255 -> 255 / 255; l1 3x3 176 / 194 -> 181 / 194. The
1x1 128x128 16-bit tiles were at the limit before (255 without spills) and still are: the first
config to change (to 128x64 columns) if a triton version spills there. Tried and not kept: the
finalize's channel index from ``_arange_after_loop`` too (triton 3.8 sm_80 255 -> 250, but 24 bytes
of spills with 3.6 on sm_90, x = None); the epilogue's columns from it (more registers on sm_90).

Launches per call: 1 (``_conv2d_dgrad_kernel``, the upstream finalize included); + 1 for the
weight pack when the weight is not read in place and its pack is not cached (+ 1 copy when up_coef
is not contiguous: the finalize writes a contiguous (3, Cin) buffer).

Bytes per call (counted, not measured; E_out = N*Cout*OH*OW, E_in = N*Cin*H*W elements of s bytes):
DRAM-ideal reads of g (+ mask, + y with coef): 1-3 E_out s, each A tile being re-read from L2 by
the ceil(Cin/BLOCK_N) column tiles and, for KH*KW > 1, by neighbouring taps; the weight
(KH*KW*Cout*Cin s, from L2 after the first tiles; in place, or a packed copy once per weight
version); residual,
res_mask, up_out, up_y: up to 4 E_in s; grad_x written once: E_in s; with up_out 2*P*Cin*4 bytes of
partials written and read back (by the finalizing programs), (3, Cin) coefficients and (Cin,)
vectors.

Precision: fp16/bf16 operands on the tensor cores with fp32 accumulation; fp32 uses tf32 when
``allow_tf32`` and 3xTF32 (``tf32x3``) otherwise, as the forward. Under ``TRITON_INTERPRET=1`` one
small config is used and the dot operands are upcast to fp32 (the interpreter computes bf16 dots
wrongly); the dy operand is still rounded to the activation dtype first.

Configs: ``select_config`` (heuristic, no autotuning), checked ahead of time for sm_90/sm_80 by
tests/test_triton_conv2d_dgrad_aot.py (tensor-core instructions, no spills).

Known limits (not measured: no GPU here): NCHW tensors are correct but slow (the A gather is not
contiguous along co, and a stride-2 class's rows are every other pixel of a row); the A operand
goes global -> registers (prologue) -> MMA, so it is not a plain cp.async tile (Triton pipelines
the g/mask/y loads through shared memory where it can: large shared-memory footprints, 1 CTA per
SM for the fused 128x64 16-bit tiles); the tile heuristic is untuned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._bits import bits_shape, is_bits
from ._common import (INTERPRET, arrival_counters, bn_channels, bn_dy, cast_for_store, drop_arrival_counters, mask_bit,
                      round_to)
from .batch_norm import _finalize_block, _finalize_rows
from .conv2d import _arange_after_loop
from .bn_add_relu import _on_device

from .. import _weight_cache  # noqa: E402 (kept apart from the line above: merge-friendly)

# triton 3.6 (the GPU images' version) allocates registers differently on sm_80 (see select_config)
_TRITON_36 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)

__all__ = ["conv2d_dgrad", "DgradConfig", "select_config"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _conv2d_dgrad_kernel(
    g_ptr, mk_ptr, y_ptr, mean_ptr, coef_ptr, w_ptr, gx_ptr,
    res_ptr, rm_ptr, uo_ptr, uy_ptr, um_ptr, part_ptr,
    NB, CIN, H, W, COUT, OH, OW, MT, P,
    swr, swk, swn, scoef,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w,
    uv_ptr, uw_ptr, ub_ptr, up_eps,
    cnt_ptr, ugw_ptr, ugb_ptr, ucoef_ptr, inv_m,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_COEF: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES_MASK: tl.constexpr,
    HAS_UP: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASK_BITS: tl.constexpr = False, RES_BITS: tl.constexpr = False,
    UP_FROM_Y: tl.constexpr = False, UP_HAS_W: tl.constexpr = False, UP_HAS_B: tl.constexpr = False,
    FIN_BLOCK_P: tl.constexpr = 1, W_GW: tl.constexpr = False, W_GB: tl.constexpr = False,
    COEF_Y: tl.constexpr = False,
):
    # MASK_BITS / RES_BITS: mk_ptr / rm_ptr are 1-bit ReLU masks (resnet_kernels/_bits.py: byte
    # [n, h, w, c // 8] of a contiguous (N, H, W, ceil(C/8)) uint8 tensor), not activations
    # UP_FROM_Y (with HAS_UP): no up_out; the upstream ReLU mask is recomputed from up_y as
    # round(up_y * s + t) > 0 (s, t from up_mean/uv/uw/ub: the upstream BN's affine; UP_HAS_W /
    # UP_HAS_B: weight / bias given, else 1 / 0), uo_ptr unused
    # HAS_UP: the last program to arrive on column tile pid_n's counter (cnt_ptr) runs the upstream
    # BN's finalize (batch_norm.py ``_finalize_block``: up_var uv_ptr, up_weight uw_ptr (UP_HAS_W),
    # up_grad_weight ugw_ptr (W_GW), up_grad_bias ugb_ptr (W_GB), (3, CIN) up_coef ucoef_ptr (COEF_Y),
    # inv_m = 1 / (N*H*W), FIN_BLOCK_P partial rows per step)
    # ---- grouped tile order (as the forward): GROUP_M row tiles sweep all column tiles together;
    # axis 1: the parity class (rh, rw) of the rows (one class when the stride is 1)
    pid = tl.program_id(0)
    cls = tl.program_id(1)
    num_pid_m = MT
    num_pid_n = tl.cdiv(CIN, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # ---- rows: the class's pixels h = hq*sh + rh, w = wq*sw + rw, m -> (n, hq, wq)
    rh = cls // stride_w
    rw = cls % stride_w
    hc = (H - rh + stride_h - 1) // stride_h  # rows / columns of the class (may be 0)
    wc = (W - rw + stride_w - 1) // stride_w
    mc = NB * hc * wc
    hc1 = tl.maximum(hc, 1)
    wc1 = tl.maximum(wc, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < mc
    wq = offs_m % wc1
    t = offs_m // wc1
    hq = t % hc1
    nb = t // hc1
    hh = hq * stride_h + rh
    ww = wq * stride_w + rw
    nb64 = nb.to(tl.int64)  # batch offsets in int64: activations may exceed 2**31 elements
    g_row = nb64 * sgn
    # the taps that reach the class: kh = kh0 + j*sh (j < nth), oh = hq + dh0 - j (exact)
    kh0 = (rh + pad_h) % stride_h
    kw0 = (rw + pad_w) % stride_w
    nth = (KH - kh0 + stride_h - 1) // stride_h
    ntw = (KW - kw0 + stride_w - 1) // stride_w
    oh0 = hq + (rh + pad_h - kh0) // stride_h
    ow0 = wq + (rw + pad_w - kw0) // stride_w

    # ---- columns: input channels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    n_mask = offs_n < CIN
    offs_kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one iteration = one filter tap (kh, kw) x one BLOCK_K chunk of output channels
    num_cb = tl.cdiv(COUT, BLOCK_K)
    for it in range(0, nth * ntw * num_cb):
        cb = it % num_cb
        jj = it // num_cb
        jw = jj % ntw
        jh = jj // ntw
        r = (kh0 + jh * stride_h) * KW + (kw0 + jw * stride_w)  # the tap kh*KW + kw
        oh = oh0 - jh
        ow = ow0 - jw
        row_ok = m_mask & (oh >= 0) & (ow >= 0) & (oh < OH) & (ow < OW)
        offs_c = cb * BLOCK_K + offs_kk
        offs_c = tl.max_contiguous(tl.multiple_of(offs_c, BLOCK_K), BLOCK_K)
        g_off = (g_row + oh * sgh + ow * sgw)[:, None] + offs_c[None, :] * sgc
        b_ptrs = w_ptr + (r * swr + offs_c[:, None] * swk + offs_n[None, :] * swn)
        if EVEN_K:
            a_mask = row_ok[:, None]
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            c_mask = offs_c < COUT
            a_mask = row_ok[:, None] & c_mask[None, :]
            b = tl.load(b_ptrs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        gv = tl.load(g_ptr + g_off, mask=a_mask, other=0.0).to(tl.float32)
        if HAS_MASK:
            if MASK_BITS:
                mrow = ((nb64 * OH + oh) * OW + ow) * ((COUT + 7) // 8)
                mv = mask_bit(mk_ptr, mrow[:, None], offs_c[None, :], a_mask)
            else:
                mv = tl.load(mk_ptr + g_off, mask=a_mask, other=0.0)
        else:
            mv = gv
        if HAS_COEF:
            yv = tl.load(y_ptr + g_off, mask=a_mask, other=0.0).to(tl.float32)
            if EVEN_K:
                mu = tl.load(mean_ptr + offs_c).to(tl.float32)
                ca = tl.load(coef_ptr + offs_c).to(tl.float32)
                cb_ = tl.load(coef_ptr + scoef + offs_c).to(tl.float32)
                ck = tl.load(coef_ptr + 2 * scoef + offs_c).to(tl.float32)
            else:
                mu = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
                ca = tl.load(coef_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
                cb_ = tl.load(coef_ptr + scoef + offs_c, mask=c_mask, other=0.0).to(tl.float32)
                ck = tl.load(coef_ptr + 2 * scoef + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            dy = bn_dy(gv, mv, yv, mu[None, :], ca[None, :], cb_[None, :], ck[None, :], HAS_MASK, True)
            # invalid taps/rows/channels: 0 after bn_dy (B + K*(y - mean) is not 0 there)
            dy = tl.where(a_mask, dy, 0.0)
        else:
            dy = bn_dy(gv, mv, gv, gv, gv, gv, gv, HAS_MASK, False)  # masked loads: already 0
        a = round_to(dy, g_ptr.dtype.element_ty)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- fused epilogue in fp32
    if HAS_UP:
        # the rows again, after the loop (conv2d.py's ``_arange_after_loop``: not held across the K
        # loop; with the finalize's branch at the end of the kernel they were: see the module docstring)
        offs_m = pid_m * BLOCK_M + _arange_after_loop(BLOCK_M)
        m_mask = offs_m < mc
        wq = offs_m % wc1
        t = offs_m // wc1
        hq = t % hc1
        nb = t // hc1
        hh = hq * stride_h + rh
        ww = wq * stride_w + rw
        nb64 = nb.to(tl.int64)
    gx = acc
    out_mask = m_mask[:, None] & n_mask[None, :]
    x_off = (nb64 * sxn + hh * sxh + ww * sxw)[:, None] + offs_n[None, :] * sxc
    if HAS_RES:
        rv = tl.load(res_ptr + x_off, mask=out_mask, other=0.0).to(tl.float32)
        if HAS_RES_MASK:
            if RES_BITS:
                rrow = ((nb64 * H + hh) * W + ww) * ((CIN + 7) // 8)
                rmv = mask_bit(rm_ptr, rrow[:, None], offs_n[None, :], out_mask)
            else:
                rmv = tl.load(rm_ptr + x_off, mask=out_mask, other=0.0)
            rv = tl.where(rmv > 0, rv, 0.0)
        gx = gx + rv
    if HAS_UP:
        if UP_FROM_Y:
            # the upstream output x = round(relu(z)) (the forward prologue's formula,
            # _common.bn_relu_tile) is > 0 exactly when the rounded value is (z > 0 alone is not
            # enough: a tiny z > 0 rounds to 0 in fp16/bf16)
            uy = tl.load(uy_ptr + x_off, mask=out_mask, other=0.0).to(tl.float32)
            um, u_sc, u_b = bn_channels(um_ptr, uv_ptr, uw_ptr, ub_ptr, offs_n, n_mask, up_eps, UP_HAS_W, UP_HAS_B)
            hz = (uy - um[None, :]) * u_sc[None, :]  # bn_relu_tile's z (the ReLU cannot change the test)
            if UP_HAS_B:
                hz = hz + u_b[None, :]
            hz = round_to(hz, gx_ptr.dtype.element_ty)
            gx = tl.where(hz > 0, gx, 0.0)
        else:
            uo = tl.load(uo_ptr + x_off, mask=out_mask, other=0.0)
            gx = tl.where(uo > 0, gx, 0.0)
    gr = cast_for_store(gx, gx_ptr)
    tl.store(gx_ptr + x_off, gr, mask=out_mask)
    if HAS_UP:
        # the upstream BN-backward partial sums of the rounded grad_x, one row per M tile
        gf = tl.where(out_mask, gr.to(tl.float32), 0.0)
        if not UP_FROM_Y:  # (UP_FROM_Y: loaded for the mask above)
            uy = tl.load(uy_ptr + x_off, mask=out_mask, other=0.0).to(tl.float32)
            um = tl.load(um_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        d = tl.where(out_mask, uy - um[None, :], 0.0)
        p_off = (cls * MT + pid_m) * CIN + offs_n
        tl.store(part_ptr + p_off, tl.sum(gf, axis=0), mask=n_mask)
        tl.store(part_ptr + P * CIN + p_off, tl.sum(gf * d, axis=0), mask=n_mask)

    # ---- the upstream finalize, in this launch (after everything else: the accumulator and the
    # epilogue's tiles are dead). Release: every thread's partial stores happen before the
    # (one-thread) arrival on column tile pid_n's counter (a CTA barrier, then a gpu-scope acq_rel
    # atomic: the pattern of batch_norm.py's ``_reduce_cols_kernel``, the conv statistics' merge and
    # the wgrad's split-K). All P = sh*sw*MT programs of the column tile (every class, every row
    # tile: those past a smaller class's rows wrote zeros) arrive; the last one sums the P partial
    # rows in row order (which program that is varies run to run, the order does not) and puts the
    # counter back to 0.
    if HAS_UP:
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == P - 1:
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _finalize_block(part_ptr, part_ptr + P * CIN, part_ptr, uv_ptr, uw_ptr, uv_ptr, uw_ptr,
                            ugw_ptr, ugb_ptr, ugw_ptr, ugb_ptr, ucoef_ptr, ucoef_ptr,
                            up_eps, up_eps, up_eps, up_eps, up_eps, up_eps, inv_m, inv_m, inv_m, P, CIN,
                            cols, cols < CIN, FIN_BLOCK_P, BLOCK_N, True, True, False, UP_HAS_W, False,
                            W_GW, W_GB, False, False, COEF_Y, False, False)
            tl.store(cnt_ptr + pid_n, 0)


# ----------------------------------------------------------------------------------------------
# configs

@dataclass(frozen=True)
class DgradConfig:
    BLOCK_M: int
    BLOCK_N: int  # input channels
    BLOCK_K: int  # output channels per K step
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # weight operand K-contiguous; None: in place where the weight allows it (Cin-contiguous, 16-bit),
    # else packed by dtype (as the forward); False: the same; True forces the K-major pack
    w_kmajor: Optional[bool] = None


# The interpreter runs one program at a time in numpy: one small config.
INTERPRETER_CONFIG = DgradConfig(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)


def select_config(M: int, cin: int, cout: int, kh: int, kw: int, dtype: torch.dtype,
                  arch: Optional[int] = None, allow_tf32: bool = True) -> DgradConfig:
    """Heuristic GPU config for ResNet dgrad shapes (batch 256, channels_last), M = N*H*W, the
    column tile over Cin and the K step over Cout. Checked by the AOT report
    (tests/test_triton_conv2d_dgrad_aot.py, triton 3.6 and 3.8: registers, spills, tensor cores):
    * rows: 128 (64 for M < 4096);
    * columns (Cin): 16-bit 128 for Cin >= 128, 64 for 64 <= Cin < 128 and for fp32 (tf32 or
      not), the next power of two >= 16 below (the 7x7 stem's dgrad, Cin = 3, gets 16-wide tiles
      instead of 64 mostly-empty ones). fp32 128x128 tiles with the fused operand prologue (g,
      mask, y tiles in fp32 registers) and epilogue need 255 registers on sm_90 and spill with
      triton 3.6 (BLOCK_K 16 too: 255, no spill: too close);
    * K step (Cout): 16-bit 64 (32 while Cout < 64), fp32 32 on sm_90 and 16 below (the forward's
      choice: mma.sync holds the whole fp32 K slice in registers);
    * 8 warps, also for the small tiles (the stem's 128x16, 64x64 fp32): with 4 warps triton 3.8's
      ptxas settled at 96-128 registers and spilled 8-16 bytes on sm_80 (fp32 stem, fp32 64x64);
      3 stages (fp32 on sm_80 too: 4 stages spilled with triton 3.8 on the fused 3x3 stride-2
      case).
    Registers of the fused variant at these configs (AOT, triton 3.8 / 3.6, the upstream finalize
    in the launch): 255 without spills for the 16-bit 128x128x64 tile on sm_80 (and with 3.6 on
    sm_90, x = None), ~150-230 elsewhere (module docstring).
    ``arch`` is the compute capability as major*10+minor (default: the current CUDA device)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    is_fp32 = dtype == torch.float32
    block_m = 128 if M >= 4096 else 64
    num_warps = 8
    if cin >= 128 and not is_fp32:
        block_n = 128
    elif cin >= 64:
        block_n = 64
    else:
        block_n = max(16, triton.next_power_of_2(cin))
    if is_fp32:
        block_k = 32 if arch >= 90 else 16
        num_stages = 3
        if arch < 90 and _TRITON_36:
            # triton 3.6 held 8-warp fp32 tiles on sm_80 to 128 registers: the 128x64x16 tile with the
            # 1-bit mask prologue spilled 8 bytes (also with 2 stages); 64x64x16 on 4 warps: <= 180, no
            # spill. Triton 3.8 does the opposite (4 warps held to 128: 8 bytes of spill on the
            # small-batch 3x3), so it keeps 128x64x16 on 8 warps (AOT test, both versions)
            block_m, num_warps = 64, 4
    else:
        block_k = 64 if cout >= 64 else 32
        num_stages = 3
    return DgradConfig(block_m, block_n, block_k, GROUP_M=8, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# the weight operand

def _weight_kmajor(dtype: torch.dtype) -> bool:
    """K-contiguous for fp32 (the tf32 B operand), Cin-contiguous for 16-bit types: the
    forward's rule (triton_ops/conv2d.py ``_weight_kmajor``)."""
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor, kmajor: bool, dtype: torch.dtype) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> the (K, Cin) dgrad GEMM operand in ``dtype``, K = KH*KW*Cout indexed
    (kh*KW + kw)*Cout + co. K-major: the transpose of a contiguous (Cin, K) matrix, strides (1, K);
    N-major: contiguous (K, Cin), strides (Cin, 1)."""
    cout, cin, kh, kw = weight.shape
    ktot = cout * kh * kw
    w = weight.to(dtype)
    if kmajor:
        return w.permute(1, 2, 3, 0).reshape(cin, ktot).contiguous().t()
    return w.permute(2, 3, 0, 1).reshape(ktot, cin).contiguous()


# ----------------------------------------------------------------------------------------------
# launcher

@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element addressing (dims of size 1 may carry any stride)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


@dataclass
class _Plan:
    """Everything one launch of the dgrad kernel needs (built from shapes, strides and dtypes only:
    works on meta tensors, which the AOT test compiles from)."""
    grid: Tuple[int, int]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    config: DgradConfig
    part: Optional[torch.Tensor]
    P: int
    M: int
    counter_key: Optional[tuple] = None  # the arrival counters' cache key (upstream finalize only)


def _bits_of(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """``t`` is the 1-bit ReLU mask of a tensor shaped like ``ref`` (resnet_kernels/_bits.py)."""
    return is_bits(t) and tuple(t.shape) == bits_shape(ref.shape) and t.is_contiguous()


def _check(g, mask, y, mean, coef, weight, grad_x, residual, res_mask, up_out, up_y, up_mean):
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton conv2d_dgrad: activations must be float32, float16 or bfloat16, got {g.dtype} "
                        "(float64 runs on the torch/aten implementations)")
    if grad_x.dtype != g.dtype:
        raise TypeError(f"triton conv2d_dgrad: grad_x ({grad_x.dtype}) must have g's dtype ({g.dtype})")
    n, cout, _, _ = g.shape
    cout_w, cin, _, _ = weight.shape
    if cout_w != cout or grad_x.shape[0] != n or grad_x.shape[1] != cin:
        raise ValueError(f"triton conv2d_dgrad: g {tuple(g.shape)}, weight {tuple(weight.shape)} and grad_x "
                         f"{tuple(grad_x.shape)} do not describe one convolution")
    for name, t in (("mask", mask), ("y", y)):
        if t is not None and not _same_strides(t, g) and not (name == "mask" and _bits_of(t, g)):
            raise ValueError(f"triton conv2d_dgrad: {name} must have g's shape and layout")
    for name, t in (("residual", residual), ("res_mask", res_mask), ("up_out", up_out), ("up_y", up_y)):
        if t is not None and not _same_strides(t, grad_x) and not (name == "res_mask" and _bits_of(t, grad_x)):
            raise ValueError(f"triton conv2d_dgrad: {name} must have grad_x's shape and layout")
    if coef is not None and (y is None or mean is None):
        raise ValueError("triton conv2d_dgrad: coef needs y and mean")
    if up_out is not None and (up_y is None or up_mean is None):
        raise ValueError("triton conv2d_dgrad: up_out needs up_y and up_mean (and up_var, up_coef)")
    if up_out is None and up_y is not None and up_mean is None:
        raise ValueError("triton conv2d_dgrad: up_y needs up_mean (and up_var, up_coef)")


def _prepare(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y, up_mean,
             allow_tf32, config: Optional[DgradConfig] = None, arch: Optional[int] = None, up_bn=None,
             up_fin=None) -> _Plan:
    """``up_bn`` = (up_var, up_weight, up_bias, up_eps): the upstream BN (with up_y given: its
    finalize's variance, weight and eps; with up_out None too, the upstream ReLU mask recomputed from
    up_y, ``UP_FROM_Y``). ``up_fin`` = (up_coef, up_grad_weight, up_grad_bias), each None or written
    by the finalize (up_coef a contiguous (3, Cin) fp32 tensor)."""
    n, cout, oh, ow = g.shape
    _, cin, kh, kw = weight.shape
    h, w = grad_x.shape[2], grad_x.shape[3]
    (sh, sw), (ph, pw) = (int(e) for e in stride), (int(e) for e in padding)
    M = n * h * w
    if config is None and arch is None and not INTERPRET and g.is_cuda:
        arch = _cuda_arch(g.device.index if g.device.index is not None else torch.cuda.current_device())
    cfg = config or select_config(M, cin, cout, kh, kw, g.dtype, arch, bool(allow_tf32))
    inplace = _weight_cache.conv_dgrad_inplace_strides(weight, g.dtype) if not cfg.w_kmajor else None
    if inplace is not None:
        # the weight's own memory is the Cin-contiguous operand: no pack launch, no cache entry (a
        # cached view would keep the weight alive)
        w2, w_strides = weight, inplace
    else:
        kmajor = cfg.w_kmajor if cfg.w_kmajor is not None else _weight_kmajor(g.dtype)
        w2 = _weight_cache.packed(weight, ("triton_conv2d_dgrad", kmajor, g.dtype),
                                  functools.partial(pack_weight, kmajor=kmajor, dtype=g.dtype))
        w_strides = (cout * w2.stride(0), w2.stride(0), w2.stride(1))  # (tap, co, ci) of the (K, Cin) matrix
    # row tiles per parity class (the largest class, (0, 0)); P partial rows: one per (class, tile)
    num_classes = sh * sw
    num_m_tiles = triton.cdiv(n * triton.cdiv(h, sh) * triton.cdiv(w, sw), cfg.BLOCK_M)
    P = num_classes * num_m_tiles
    from_y = up_out is None and up_y is not None
    has_up = up_out is not None or from_y
    part = _alloc.empty((2, P, cin), dtype=torch.float32, device=g.device) if has_up else None
    num_n_tiles = triton.cdiv(cin, cfg.BLOCK_N)
    # one arrival counter per column tile (the upstream finalize)
    counters, counter_key = arrival_counters(g.device, num_n_tiles) if has_up else (None, None)
    dummy = grad_x  # stands in for absent pointers (never dereferenced: constexpr-disabled)

    def opt(t):
        return t if t is not None else dummy

    if coef is not None:
        coef = coef if coef.stride(-1) == 1 else coef.contiguous()
        mean = mean.contiguous()
    if up_mean is not None:
        up_mean = up_mean.contiguous()
    if g.dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "tf32x3"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    args = (
        g, opt(mask), opt(y if coef is not None else None), opt(mean if coef is not None else None), opt(coef),
        w2, grad_x, opt(residual), opt(res_mask if residual is not None else None), opt(up_out),
        opt(up_y if has_up else None), opt(up_mean if has_up else None), opt(part),
        n, cin, h, w, cout, oh, ow, num_m_tiles, P,
        *w_strides, coef.stride(0) if coef is not None else 0,
        *g.stride(), *grad_x.stride(),
        sh, sw, ph, pw,
    )
    up_coef = up_grad_weight = up_grad_bias = None
    if has_up:
        if up_bn is None or up_bn[0] is None:
            raise ValueError("triton conv2d_dgrad: the upstream reductions (up_out / up_y) need up_var")
        up_var, up_weight, up_bias, up_eps = up_bn
        up_coef, up_grad_weight, up_grad_bias = up_fin if up_fin is not None else (None, None, None)
        args += (up_var.contiguous(), opt(None if up_weight is None else up_weight.contiguous()),
                 opt(None if up_bias is None or not from_y else up_bias.contiguous()), float(up_eps))
    else:
        args += (dummy, dummy, dummy, 0.0)
    args += (opt(counters), opt(up_grad_weight), opt(up_grad_bias), opt(up_coef), 1.0 / M)
    constexprs = dict(
        KH=kh, KW=kw,
        HAS_MASK=mask is not None, HAS_COEF=coef is not None, HAS_RES=residual is not None,
        HAS_RES_MASK=residual is not None and res_mask is not None, HAS_UP=has_up,
        EVEN_K=cout % cfg.BLOCK_K == 0,
        MASK_BITS=mask is not None and is_bits(mask),
        RES_BITS=residual is not None and res_mask is not None and is_bits(res_mask),
        DOT_PRECISION=precision, UPCAST_DOT=INTERPRET,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
    )
    # (no upstream: all False / 1, the kernel's defaults)
    constexprs.update(UP_FROM_Y=from_y, UP_HAS_W=has_up and up_bn[1] is not None,
                      UP_HAS_B=from_y and up_bn[2] is not None)
    constexprs.update(FIN_BLOCK_P=_finalize_rows(P, cfg.BLOCK_N, INTERPRET) if has_up else 1,
                      W_GW=up_grad_weight is not None, W_GB=up_grad_bias is not None, COEF_Y=up_coef is not None)
    grid = (num_m_tiles * num_n_tiles, num_classes)
    return _Plan(grid, args, constexprs, cfg.num_warps, cfg.num_stages, cfg, part, P, M, counter_key)


def _launch(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y, up_mean,
            up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32,
            config: Optional[DgradConfig] = None, up_bias=None) -> None:
    _check(g, mask, y, mean, coef, weight, grad_x, residual, res_mask, up_out, up_y, up_mean)
    if g.numel() == 0 or grad_x.numel() == 0:  # not reached through the op layer
        return
    has_up = up_out is not None or up_y is not None
    coef_out = up_coef
    if has_up and up_coef is not None and not up_coef.is_contiguous():
        # the finalize writes a contiguous (3, Cin) buffer
        coef_out = _alloc.empty((3, grad_x.shape[1]), dtype=up_coef.dtype, device=up_coef.device)
    plan = _prepare(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y,
                    up_mean, allow_tf32, config, up_bn=(up_var, up_weight, up_bias, up_eps),
                    up_fin=(coef_out, up_grad_weight, up_grad_bias))
    with _on_device(g):
        try:
            _conv2d_dgrad_kernel[plan.grid](*plan.args, **plan.constexprs,
                                            num_warps=plan.num_warps, num_stages=plan.num_stages)
        except BaseException:
            # it may have run partly (interpreter): the counters may not be all 0
            drop_arrival_counters(plan.counter_key)
            raise
        if coef_out is not up_coef:
            up_coef.copy_(coef_out)


def conv2d_dgrad(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y, up_mean,
                 up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                 conv_dtype: Optional[torch.dtype] = None, up_bias=None) -> None:
    """grad_x (and, with up_out, up_coef / up_grad_weight / up_grad_bias) written in place: the
    contract of ``resnet_kernels.backends.torch_conv_backward.conv2d_dgrad`` (see the module
    docstring). ``conv_dtype`` is the reference's and is ignored. up_out None with up_y given: the
    upstream output is recomputed from up_y (relu(up_y * s + t) > 0, s, t from up_mean, up_var,
    up_weight, ``up_bias``, up_eps) for the mask instead of read."""
    _launch(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y, up_mean,
            up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, up_bias=up_bias)
