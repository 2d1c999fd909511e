// Implicit-GEMM convolution weight gradient (wgrad) with the BatchNorm-backward-and-ReLU operand
// computed as it is loaded (csrc/conv2d_wgrad.cu). Torch-free API: device pointers (as uintptr_t,
// 0 = absent), sizes, strides, stream. Contract: resnet_kernels/backends/torch_conv_backward.py's
// ``conv2d_wgrad`` (the reference):
//
//   dy  = the operand of csrc/conv2d_dgrad.h (g, mask or mask_bits, y, coef, mean), float32, rounded
//         to dtype
//   gw[co, ci, r, s] = sum over (n, oh, ow) of dy[n, co, oh, ow] * x[n, ci, oh*sh - ph + r, ow*sw - pw + s]
//         float32 accumulation (mma.sync m16n8k16); deterministic split-K over the pixels: with
//         splits > 1 each split writes float32 partials to the workspace and arrives on its tile's
//         int32 counter (`counters`, conv2d_wgrad_counters(...) of them, ALL ZERO at launch and
//         left so); the tile's last arrival sums the partials in split order and rounds once, in
//         the same launch; with one split the kernel rounds and writes directly.
//   x   given, or (x = 0, up_y given) recomputed as it is loaded: x = round(relu(up_y * s + t)),
//         s = up_weight * rsqrt(up_var + up_eps) (up_weight absent: 1), t = up_bias - up_mean * s
//         (up_bias absent: 0), in float32: what batch_norm_act writes (torch_conv_backward.upstream_input).
//
// Supported (else rk::ArgError naming the argument): dtype float16 / bfloat16; g, mask, y, x / up_y
// dense channels_last, 16-byte aligned; Cin and Cout multiples of 8; any stride, padding, kernel.
// grad_weight (Cout, Cin, KH, KW) of dtype with element strides gw_stride (any layout).
// Requires a device of compute capability >= 8.0.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct Conv2dWgradArgs {
  DType dtype;
  std::uintptr_t g, mask, mask_bits, y, coef, mean;  // the operand, as conv2d_dgrad's
  std::uintptr_t x;                                  // or 0 with up_y given
  std::uintptr_t up_y, up_mean, up_var, up_weight, up_bias;  // x recomputed (up_weight / up_bias optional)
  DType up_w_dtype;                                          // of up_weight and up_bias (float32 or dtype)
  double up_eps;
  std::uintptr_t grad_weight;
  int64_t gw_stride[4];  // element strides of grad_weight: co, ci, r, s
  std::uintptr_t workspace;
  int64_t workspace_bytes;
  std::uintptr_t counters;  // int32, all zero (splits > 1)
  int64_t counters_count;   // counters available (>= conv2d_wgrad_counters)
  int64_t splits;  // split-K count (>= 1): conv2d_wgrad_splits(...) or any other
  int64_t N, Cin, H, W, Cout, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t OH, OW;
  std::uintptr_t stream;
};

// The split-K count the kernel is tuned for (from the shape only: results depend on it, and stay
// the same from run to run and device to device).
int64_t conv2d_wgrad_splits(int64_t N, int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t OH, int64_t OW);
// Bytes of workspace for `splits` (0 for one split).
int64_t conv2d_wgrad_workspace_bytes(int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits);
// Arrival counters for `splits` (0 for one split): one per (tap, 128-channel co tile, 64-channel ci tile).
int64_t conv2d_wgrad_counters(int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits);

void conv2d_wgrad(const Conv2dWgradArgs& a);

}  // namespace rk
