// Max pooling with a one-byte argmax (resnet_kernels/ops/maxpool.py) and its backward.
// Torch-free API: device pointers (as uintptr_t, 0 = absent), sizes, stream.
//
//   out[n, c, oh, ow]    = max over the window rows oh*sh - ph + [0, kh), columns ow*sw - pw + [0, kw)
//                          (padding acts as -inf; a NaN in the window is the maximum)
//   argmax[n, c, oh, ow] = dh * kw + dw of that maximum (uint8): the first maximum in row-major
//                          scan order, the last NaN when the window holds one (PyTorch's rule)
//   grad_x[n, c, ih, iw] = sum of grad_out over the outputs whose argmax is (ih, iw), added in
//                          row-major output order in float (double for double), rounded once
//
// x / grad_x are (N, C, H, W), out / argmax / grad_out (N, C, OH, OW), all dense in one layout:
// NCHW-contiguous (nhwc = false) or channels_last (nhwc = true). Dilation 1, floor output size:
// OH = (H + 2 ph - kh) / sh + 1 (likewise OW); kh * kw <= 256, ph <= kh / 2, pw <= kw / 2.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct MaxPool2dArgs {
  DType dtype;
  std::uintptr_t x, out;  // required unless the output is empty
  std::uintptr_t argmax;  // 0 = not written (no gradient needed)
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
  bool nhwc;
  std::uintptr_t stream;
};

// Validates, returns immediately when the output is empty.
void maxpool2d_forward(const MaxPool2dArgs& a);

struct MaxPool2dBackwardArgs {
  DType dtype;
  std::uintptr_t grad_out, argmax, grad_x;  // required unless grad_x is empty
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
  bool nhwc;
  std::uintptr_t stream;
};

// Validates, returns immediately when grad_x is empty; writes every element of grad_x (a gather:
// no atomics, deterministic).
void maxpool2d_backward(const MaxPool2dBackwardArgs& a);

}  // namespace rk
