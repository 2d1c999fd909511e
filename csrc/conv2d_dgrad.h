// Implicit-GEMM convolution data gradient (dgrad) with the BatchNorm-backward-and-ReLU operand
// computed as it is loaded and the training block's epilogue extras (csrc/conv2d_dgrad.cu).
// Torch-free API: device pointers (as uintptr_t, 0 = absent), sizes, stream. The contract is
// resnet_kernels/backends/torch_conv_backward.py's ``conv2d_dgrad`` (the reference):
//
//   g'  = g * (mask > 0)                        mask: an activation like g, or 1-bit (mask_bits)
//   dy  = A[co] * g' - (B[co] + K[co] * (y - mean[co]))   coef = (A, B, K) rows (3, Cout) float32,
//                                                          else dy = g'; computed in float32 and
//                                                          rounded to dtype (the GEMM operand)
//   gx  = conv_transpose(dy, w)[n, ci, h, w]    (float32 accumulation, mma.sync m16n8k16)
//   gx += residual * (res_mask > 0)             residual / res_mask optional (res_mask 1-bit: res_bits)
//   gx  = gx * (up_out > 0)                     up_out optional (the upstream unit's ReLU output = x);
//                                               with up_y given and up_out absent, up_out is recomputed
//                                               from up_y: round(relu(up_y * s + t)), s = up_weight *
//                                               rsqrt(up_var + up_eps) (up_weight absent: 1), t = up_bias
//                                               - up_mean * s (up_bias absent: 0), in float32
//   grad_x = round(gx)
//   upstream reductions (up_y given): per input channel ci over N, H, W (m = N*H*W)
//     sum_g = sum(grad_x), sum_gd = sum(grad_x * (up_y - up_mean[ci])) (per-CTA float32 partials,
//     combined in a fixed order in float64 in the same launch: every CTA of a column tile arrives on
//     an int32 counter of its group of partial rows, the group's last arrival sums the group in
//     row order, and with several groups the last group's summer sums the groups in group order:
//     deterministic, the counters pick who sums, not the order), then
//     invstd = rsqrt(up_var + up_eps), A = up_weight * invstd (up_weight absent: invstd)
//     up_coef (3, Cin) float32 = (A, A * sum_g / m, A * invstd^2 * sum_gd / m)
//     up_grad_weight = sum_gd * invstd, up_grad_bias = sum_g (each optional, dtype up_gw_dtype)
//
// Supported (everything else is an ArgError naming the argument; the Python launcher's
// dgrad_refusal routes such calls to cuDNN): dtype float16 / bfloat16; every activation-shaped tensor
// (g, mask, y, residual, res_mask, up_out, up_y, grad_x) dense channels_last (NHWC-contiguous)
// and 16-byte aligned; Cin and Cout multiples of 8; stride 1 or 2 per dimension; at most
// 9 filter taps per stride parity class (ceil(KH/sh) * ceil(KW/sw) <= 9: 1x1, 3x3,
// 3x3 stride 2, ...); dilation 1, groups 1.
//
// Tensors
//   g, mask, y      (N, Cout, OH, OW) of dtype, channels_last; mask_bits: uint8 (N, OH, OW, ceil(Cout/8))
//   w               the weight (Cout, Cin, KH, KW) of dtype, element strides w_stride with w_stride[1] == 1
//                   (input channels contiguous: channels_last, or any 1x1), the others multiples of 8,
//                   16-byte aligned
//   coef (3, Cout), mean (Cout,) float32 contiguous (both or neither)
//   residual, res_mask, up_out, up_y, grad_x  (N, Cin, H, W) of dtype, channels_last;
//                   res_bits: uint8 (N, H, W, ceil(Cin/8))
//   up_mean, up_var (Cin,) float32; up_weight, up_bias (Cin,) of up_w_dtype or 0; up_coef (3, Cin) float32
//   up_grad_weight, up_grad_bias (Cin,) of up_gw_dtype or 0
//   workspace: conv2d_dgrad_workspace_bytes(...) bytes, 8-byte aligned (the upstream partials and
//              group sums; 0 without up_y)
//   counters: conv2d_dgrad_counters(...) int32 arrival counters, ALL ZERO at launch (the kernel puts
//              them back to 0); launches sharing them run one at a time (one stream). 0 without up_y.
// Requires a device of compute capability >= 8.0.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct Conv2dDgradArgs {
  DType dtype;
  std::uintptr_t g, mask, mask_bits, y, coef, mean;  // operand side; 0 = absent (not g)
  std::uintptr_t w;                                  // (Cout, Cin, KH, KW), w_stride[1] == 1
  int64_t w_stride[4];
  std::uintptr_t grad_x;                             // output
  std::uintptr_t residual, res_mask, res_bits, up_out;
  std::uintptr_t up_y, up_mean, up_var, up_weight;   // upstream reductions: up_y given
  std::uintptr_t up_bias;                            // only to recompute up_out (up_out = 0)
  std::uintptr_t up_coef, up_grad_weight, up_grad_bias;
  std::uintptr_t workspace;
  int64_t workspace_bytes;
  std::uintptr_t counters;  // int32, all zero (up_y given)
  int64_t counters_count;   // counters available (>= conv2d_dgrad_counters)
  DType up_w_dtype;   // dtype of up_weight (float32 or dtype)
  DType up_gw_dtype;  // dtype of up_grad_weight / up_grad_bias
  double up_eps;
  int64_t N, Cin, H, W, Cout, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t OH, OW;
  std::uintptr_t stream;
};

// Bytes of device workspace conv2d_dgrad needs (0 without the upstream reductions).
int64_t conv2d_dgrad_workspace_bytes(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w,
                                     bool upstream);

// Arrival counters conv2d_dgrad needs (0 without the upstream reductions).
int64_t conv2d_dgrad_counters(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w,
                              bool upstream);

// Validates every argument (rk::ArgError naming it), then launches the dgrad kernel on `stream` (the
// upstream finalize in the same launch).
void conv2d_dgrad(const Conv2dDgradArgs& a);

}  // namespace rk
