"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


def acc_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# The Triton interpreter converts float32 -> bfloat16 by truncation (round toward zero), while
# the GPU rounds to nearest even (cvt.rn.bf16.f32). Truncation pulls every stored bf16 value
# towards zero by half an ulp on average: a conv output y biased against its fp32 batch mean
# moves BN-normalised values that sit within an ulp of zero across the ReLU threshold, and each
# flipped ReLU mask element changes the gradients by O(grad_out) (found by `resnet-kernels
# check --dtypes bf16`). Under the interpreter, ``cast_for_store`` rounds to nearest even
# explicitly; on the GPU the flag is a compile-time False and it is a plain ``.to()``.
BF16_RTNE_FIX = tl.constexpr(INTERPRET)


@triton.jit
def cast_for_store(x, ptr):
    """``x`` converted to the element type of ``ptr`` with round-to-nearest-even (the GPU's
    conversion), also under the interpreter."""
    if BF16_RTNE_FIX:
        if ptr.dtype.element_ty == tl.bfloat16:
            f = x.to(tl.float32)
            b = f.to(tl.uint32, bitcast=True)
            # add half an ulp (minus one on an even kept mantissa: ties to even), then truncate
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            x = tl.where(f != f, f, b.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` converted to ``dtype`` with round-to-nearest-even, also under the interpreter (see
    ``cast_for_store``): e.g. an fp32 operand rounded to the activation dtype before ``tl.dot``."""
    if BF16_RTNE_FIX:
        if dtype == tl.bfloat16:
            f = x.to(tl.float32)
            b = f.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            x = tl.where(f != f, f, b.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def bn_dy(g, m, y, mu, a, b, k, HAS_MASK: tl.constexpr, HAS_COEF: tl.constexpr):
    """The BN-backward gradient operand of the fused convolution backward, elementwise in the
    accumulation type (contract: resnet_kernels/backends/torch_conv_backward.py):
    g' = g * (m > 0) when HAS_MASK; dy = a * g' - (b + k * (y - mu)) when HAS_COEF, else g'.
    g, y, mu, a, b, k: already loaded and converted to the accumulation type, broadcast to one
    shape (out-of-range elements of g must be 0 and stay 0: callers mask the result)."""
    if HAS_MASK:
        g = tl.where(m > 0, g, 0.0)
    if HAS_COEF:
        g = a * g - (b + k * (y - mu))
    return g


# arrival counters of the single-launch reductions: resnet_kernels/_counters.py (shared with the
# CUDA convolution's statistics, csrc/conv2d.cu)
from .._counters import (ARRIVAL_COUNTERS, MIN_ARRIVAL_COUNTERS, arrival_counters,  # noqa: E402,F401
                         drop_arrival_counters)



# The BatchNorm + ReLU of a unit recomputed inside a convolution: the forward's operand prologue
# (conv2d.py, ``conv2d_bn_stats``), the wgrad's x operand and the dgrad's upstream mask (x = None of
# ``conv2d_backward``). One formula for all three, the operations and order of batch_norm.py's
# ``_fwd_kernel`` (batch_norm_act): the activation the backward recomputes is bitwise the one the
# forward convolved (and the one batch_norm_act would have written).
@triton.jit
def bn_channel_scale(var, w, eps, HAS_W: tl.constexpr):
    """The per-channel scale rsqrt(var + eps) * w (w: only with HAS_W), fp32."""
    sc = tl.rsqrt(var + eps)
    if HAS_W:
        sc = sc * w
    return sc


@triton.jit
def bn_channels(mean_ptr, var_ptr, w_ptr, b_ptr, ch, ch_ok, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(mean, scale, bias) in fp32 of channels ``ch`` (``ch_ok``: the valid ones) for bn_relu_tile;
    the weight / bias only with HAS_W / HAS_B (otherwise 1 / 0: bias is then a placeholder)."""
    mu = tl.load(mean_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    w = mu
    if HAS_W:
        w = tl.load(w_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    b = mu
    if HAS_B:
        b = tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    sc = bn_channel_scale(tl.load(var_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32), w, eps, HAS_W)
    return mu, sc, b


@triton.jit
def bn_relu_tile(v, mu, sc, b, HAS_B: tl.constexpr):
    """relu((v - mu) * sc + b) in fp32 for a tile v whose columns are channels (mu, sc, b: per column;
    b only with HAS_B); where(z < 0, 0, z), not maximum: NaN propagates as in torch.relu."""
    z = (v - mu[None, :]) * sc[None, :]
    if HAS_B:
        z = z + b[None, :]
    return tl.where(z < 0, 0.0, z)

# The 1-bit ReLU mask (resnet_kernels/_bits.py): a contiguous uint8 (N, H, W, ceil(C/8)) tensor, bit
# c % 8 of byte [n, h, w, c // 8] = out[n, c, h, w] > 0, whatever out's layout.
@triton.jit
def mask_bit(bits_ptr, pix, c, mask):
    """The mask bit (0/1, int32) of channel(s) ``c`` at the byte row ``pix`` (the pixel's flat
    index n*H*W + h*W + w times CB = ceil(C/8), broadcast against c), 0 where ``mask`` is False."""
    b = tl.load(bits_ptr + pix + (c >> 3), mask=mask, other=0).to(tl.int32)
    return (b >> (c & 7)) & 1


@triton.jit
def pack_bits_cols(pos, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_R, BLOCK_C // 8] bytes of a [BLOCK_R, BLOCK_C] boolean tile whose columns are
    channels (the tile's first column a multiple of 8): bit j of byte k = pos[:, 8 k + j]."""
    w = (1 << tl.arange(0, 8)).to(tl.int32)
    p = tl.reshape(pos.to(tl.int32), [BLOCK_R, BLOCK_C // 8, 8]) * w[None, None, :]
    return tl.sum(p, axis=2).to(tl.uint8)


@triton.jit
def pack_bits_rows(pos, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_R // 8, BLOCK_S] bytes of a [BLOCK_R, BLOCK_S] boolean tile whose rows are channels
    (the tile's first row a multiple of 8): bit j of byte [k, s] = pos[8 k + j, s]."""
    w = (1 << tl.arange(0, 8)).to(tl.int32)
    p = tl.reshape(pos.to(tl.int32), [BLOCK_R // 8, 8, BLOCK_S]) * w[None, :, None]
    return tl.sum(p, axis=1).to(tl.uint8)
