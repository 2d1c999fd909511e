"""Triton kernels of maxpool2d with a one-byte argmax (see ``resnet_kernels/ops/maxpool.py``):

* ``_fwd_kernel`` -- one output element per lane: the window's KH x KW elements scanned in
  row-major order (padding as -inf), the running maximum replaced when ``v > max or v != v``
  (PyTorch's rule: first maximum wins ties, a NaN is the maximum, the last NaN the argmax); the
  maximum and, with ``HAS_ARG``, its window position ``dh * KW + dw`` (uint8) stored.
* ``_bwd_kernel`` -- one input element per lane: gathers grad_out over the at most
  ceil(KH/SH) x ceil(KW/SW) outputs whose windows contain it, adding those whose argmax points at
  it, in row-major output order in the accumulation dtype; rounded once. No atomics:
  deterministic.

Flat indexing over the output (forward) or input (backward) elements in either layout: NCHW
(``NHWC`` False) or channels_last (``NHWC`` True: consecutive lanes are consecutive channels, so
loads and stores coalesce). 64-bit offsets (``INT64``) when a tensor has 2**31 elements or more.
Kernel size, stride and padding are compile-time constants (the stem's 3x3 / 2 / 1 is one
specialisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cast_for_store

KERNELS = ("_fwd_kernel", "_bwd_kernel")
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, arg_ptr, total, C, H, W, OH, OW,
                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, NHWC: tl.constexpr, HAS_ARG: tl.constexpr,
                IS64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < total
    if NHWC:
        c = o % C
        t = o // C
        ow = t % OW
        t = t // OW
        oh = t % OH
        n = t // OH
        base = n * H * W * C + c
        step_w = C
    else:
        ow = o % OW
        t = o // OW
        oh = t % OH
        nc = t // OH
        base = nc * H * W
        step_w = 1
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    if IS64:
        cmp_t = tl.float64
    else:
        cmp_t = tl.float32  # every 16-bit value converts exactly: the same comparisons
    best = tl.full([BLOCK], float("-inf"), cmp_t)
    # the first real element of the window: the argmax when every element is -inf
    fh = tl.maximum(h0, 0) - h0
    fw = tl.maximum(w0, 0) - w0
    arg = (fh * KW + fw).to(tl.int32)
    for dh in tl.static_range(KH):
        ih = h0 + dh
        hok = (ih >= 0) & (ih < H)
        for dw in tl.static_range(KW):
            iw = w0 + dw
            ok = mask & hok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + base + (ih * W + iw) * step_w, mask=ok, other=float("-inf")).to(cmp_t)
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            arg = tl.where(take, dh * KW + dw, arg)
    tl.store(out_ptr + o, cast_for_store(best, out_ptr), mask=mask)
    if HAS_ARG:
        tl.store(arg_ptr + o, arg.to(tl.uint8), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, arg_ptr, gx_ptr, total, C, H, W, OH, OW,
                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, NHWC: tl.constexpr, IS64: tl.constexpr,
                INT64: tl.constexpr, BLOCK: tl.constexpr):
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    NH: tl.constexpr = (KH + SH - 1) // SH  # outputs per axis whose windows can contain a pixel
    NW: tl.constexpr = (KW + SW - 1) // SW
    pid = tl.program_id(0)
    if INT64:
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    if NHWC:
        c = i % C
        t = i // C
        iw = t % W
        t = t // W
        ih = t % H
        n = t // H
        obase = n * OH * OW * C + c
        step_w = C
    else:
        iw = i % W
        t = i // W
        ih = t % H
        nc = t // H
        obase = nc * OH * OW
        step_w = 1
    # outputs oh with oh*SH - PH <= ih <= oh*SH - PH + KH - 1 (numerators kept >= 0)
    oh_lo = (tl.maximum(ih + PH - KH + 1, 0) + SH - 1) // SH
    oh_hi = tl.minimum((ih + PH) // SH, OH - 1)
    ow_lo = (tl.maximum(iw + PW - KW + 1, 0) + SW - 1) // SW
    ow_hi = tl.minimum((iw + PW) // SW, OW - 1)
    acc = tl.zeros([BLOCK], dtype=acc_t)
    for jh in tl.static_range(NH):
        oh = oh_lo + jh
        hok = mask & (oh <= oh_hi)
        dh = ih - (oh * SH - PH)
        for jw in tl.static_range(NW):
            ow = ow_lo + jw
            ok = hok & (ow <= ow_hi)
            dw = iw - (ow * SW - PW)
            off = obase + (oh * OW + ow) * step_w
            a = tl.load(arg_ptr + off, mask=ok, other=255).to(tl.int32)
            hit = ok & (a == dh * KW + dw)
            g = tl.load(g_ptr + off, mask=hit, other=0.0).to(acc_t)
            acc += tl.where(hit, g, 0.0)
    tl.store(gx_ptr + i, cast_for_store(acc, gx_ptr), mask=mask)


def _block(total: int) -> int:
    if INTERPRET:
        return 1024
    return 512


def maxpool2d_forward(x, out, argmax, k, s, p, layout) -> None:
    N, C, H, W = x.shape
    OH, OW = out.shape[2], out.shape[3]
    total = out.numel()
    blk = _block(total)
    big = max(x.numel(), total) > _INT32_MAX
    _fwd_kernel[(triton.cdiv(total, blk),)](
        x, out, argmax if argmax is not None else out, total, C, H, W, OH, OW,
        KH=k[0], KW=k[1], SH=s[0], SW=s[1], PH=p[0], PW=p[1], NHWC=layout == "nhwc", HAS_ARG=argmax is not None,
        IS64=x.dtype == torch.float64, INT64=big, BLOCK=blk)


def maxpool2d_backward(grad_out, argmax, grad_x, k, s, p, layout) -> None:
    N, C, OH, OW = grad_out.shape
    H, W = grad_x.shape[2], grad_x.shape[3]
    total = grad_x.numel()
    blk = _block(total)
    big = max(grad_out.numel(), total) > _INT32_MAX
    _bwd_kernel[(triton.cdiv(total, blk),)](
        grad_out, argmax, grad_x, total, C, H, W, OH, OW,
        KH=k[0], KW=k[1], SH=s[0], SW=s[1], PH=p[0], PW=p[1], NHWC=layout == "nhwc",
        IS64=grad_out.dtype == torch.float64, INT64=big, BLOCK=blk)
