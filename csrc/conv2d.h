// Implicit-GEMM 2-D convolution with a fused fp32 epilogue and optional per-channel batch
// statistics. Torch-free API: device pointers (as uintptr_t, 0 = absent), sizes, element
// strides, stream.
//
//   out[n,k,p,q] = act( conv(x, w)[n,k,p,q] * scale[k] + bias[k] + residual[n,k,p,q] )
//   act = ReLU if relu else identity; scale absent = 1, bias absent = 0, residual absent = 0.
//   conv: dilation 1, groups 1, zero padding, stride (stride_h, stride_w), padding (pad_h, pad_w).
//
// Tensors
//   x        (N, Cin, H, W) of `dtype`, any element strides x_stride[4] = (n, c, h, w) (NCHW and
//            NHWC both work; NHWC with Cin a multiple of 8 (16-bit) / 4 (fp32) takes the fast
//            16-byte cp.async path, anything else a 16-byte-chunk gather path).
//   w        weight re-laid out as a (Cout, ldw) row-major matrix whose row k_out holds
//            w[k_out, c, r, s] at column (r*KW + s)*Cp + c, i.e. (Cout, KH, KW, Cp) contiguous
//            per row, where Cp = Cin rounded up to a multiple of 16 / sizeof(dtype) (8 for
//            16-bit, 4 for fp32): the columns of channels c in [Cin, Cp) must be ZERO; ldw >= K =
//            KH*KW*Cp, ldw a multiple of 8, the columns [K, ldw) must be ZERO too (zero columns are
//            multiplied by zeros and must not be NaN), pointer 16-byte aligned.
//   scale, bias  (Cout,) float32 contiguous, or 0.
//   residual (N, Cout, OH, OW) of `dtype`, element strides res_stride[4], or 0.
//   out      (N, Cout, OH, OW) of `dtype`, element strides out_stride[4].
//   Tensor elements must be naturally aligned; out must not overlap x, w or residual.
// Statistics (optional): mean/var (Cout,) float32 receive the per-channel mean and BIASED
//   variance over N*OH*OW of y = conv(x, w) (fp32 accumulators, before scale/bias/residual/act),
//   in the convolution's own launch. They need a device workspace of conv2d_workspace_bytes(...)
//   bytes (8-byte aligned: per-tile float32 partials, per-group float64 partials) and
//   conv2d_stats_counters(...) int32 arrival counters that are ALL ZERO at launch (the kernel puts
//   them back to 0: a launch that completes leaves them as it found them). Each CTA writes its
//   tile's (mean, M2) partial and arrives on its (group of m-tiles, column tile) counter (CTA
//   barrier, a gpu-scope fence, one atomicAdd); the group's last arrival merges the group's tile
//   partials in tile order (float64) and, with several groups, arrives on its column tile's
//   counter, whose last arrival merges the group partials in group order and writes mean/var.
//   Which CTA arrives last varies; the merge order does not: deterministic (bitwise reproducible),
//   the counters decide who merges, not what. Launches that share a counter buffer must run one
//   at a time (one stream).
// Operand prologue (optional, bn_mean != 0): x is a BatchNorm's input y_prev and the convolution
//   consumes h = relu(y_prev * scale[c] + shift[c]) instead, scale = bn_weight * 1/sqrt(bn_var + eps),
//   shift = -bn_mean * scale + bn_bias (absent weight 1, bias 0), in float32 and rounded to `dtype`:
//   batch_norm_act_forward's arithmetic (csrc/bn_affine.cuh), so h is bitwise what it writes; the
//   zero padding applies to h. bn_mean/bn_var (Cin,) float32, bn_weight/bn_bias (Cin,) of
//   bn_weight_dtype/bn_bias_dtype (float32, float16, bfloat16) or 0. Needs Cp <=
//   kConvPrologueMaxChannels and no scale/bias/residual/relu (the statistics are allowed).
// Math: float16/bfloat16 use mma.m16n8k16 tensor cores with fp32 accumulation; float32 uses
//   TF32 mma.m16n8k8 when allow_tf32, else 3xTF32 (big/small split, error comparable to FP32 FMA).
//   float64 is not supported (the op layer routes it to the torch backend).
// Requires a device of compute capability >= 8.0.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct Conv2dArgs {
  DType dtype;
  std::uintptr_t x, w, scale, bias, residual, out;  // 0 = absent (scale, bias, residual only)
  std::uintptr_t mean, var;                          // stats outputs: both or neither
  std::uintptr_t workspace;                          // required iff stats requested
  int64_t workspace_bytes;
  std::uintptr_t counters;                           // int32, all zero; required iff stats requested
  int64_t counters_count;                            // counters available (>= conv2d_stats_counters)
  int64_t N, Cin, H, W, Cout, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t OH, OW;
  int64_t ldw;
  int64_t x_stride[4];    // element strides of x: n, c, h, w
  int64_t out_stride[4];  // of out: n, k, p, q
  int64_t res_stride[4];  // of residual (ignored when residual == 0)
  bool relu;
  bool allow_tf32;
  std::uintptr_t stream;
  std::uintptr_t bn_mean, bn_var, bn_weight, bn_bias;  // operand prologue: bn_mean 0 = none
  DType bn_weight_dtype, bn_bias_dtype;
  double bn_eps;
};

// The operand prologue's channel limit (Cp, the padded Cin): its per-channel table is in shared memory.
constexpr int64_t kConvPrologueMaxChannels = 1536;

// Bytes of device workspace conv2d_forward needs (0 when compute_stats is false).
int64_t conv2d_workspace_bytes(int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats);

// Arrival counters (int32, all zero at launch) conv2d_forward's statistics need (0 when
// compute_stats is false).
int64_t conv2d_stats_counters(int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats);

// Validates every argument (rk::ArgError naming it), then launches on `stream`.
void conv2d_forward(const Conv2dArgs& a);

}  // namespace rk
