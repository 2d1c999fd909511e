// Fused residual epilogue: out = act(x * scale[c] + shift[c] + identity * id_scale[c] + id_shift[c])
// and its backward. Torch-free API: device pointers (as uintptr_t, 0 = absent), sizes, stream.
//
// Memory layout: x, identity, out, grad_out, grad_x, grad_identity are dense tensors sharing one
// layout; the channel of flat element i is (i / inner) % C. NCHW-contiguous: inner = H*W;
// channels_last (NHWC in memory): inner = 1. numel = N*C*H*W.
// Per-channel tensors (scale, shift, id_scale, id_shift, grad sums) are float32 for
// float32/float16/bfloat16 activations and float64 for float64 activations; contiguous, length C.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct BnAddReluArgs {
  DType dtype;
  std::uintptr_t x, scale, shift, identity, id_scale, id_shift, out;  // 0 = absent (except x, out)
  int64_t numel, C, inner;
  bool relu;
  std::uintptr_t stream;
};

// Forward. Validates, returns immediately when numel == 0.
void bn_add_relu_forward(const BnAddReluArgs& a);

struct BnAddReluBackwardArgs {
  DType dtype;
  // inputs
  std::uintptr_t grad_out;  // required
  std::uintptr_t out;       // saved forward output: ReLU mask is out > 0 (required iff relu)
  std::uintptr_t x;         // required iff grad_scale requested
  std::uintptr_t scale;     // 0 = scale is 1
  std::uintptr_t identity;  // required iff grad_id_scale requested
  std::uintptr_t id_scale;  // 0 = id_scale is 1
  // outputs (0 = not requested)
  std::uintptr_t grad_x;         // g * scale[c]
  std::uintptr_t grad_identity;  // g * id_scale[c]
  std::uintptr_t grad_scale;     // sum over N,H,W of g * x    (per channel)
  std::uintptr_t grad_shift;     // sum over N,H,W of g        (per channel; also d id_shift)
  std::uintptr_t grad_id_scale;  // sum over N,H,W of g * identity
  std::uintptr_t workspace;      // device scratch of backward_workspace_bytes(...) bytes
  int64_t workspace_bytes;
  int64_t numel, C, inner;
  bool relu;
  std::uintptr_t stream;
};
// g = grad_out * (out > 0) if relu else grad_out; reductions are deterministic (no atomics).
int64_t bn_add_relu_backward_workspace_bytes(DType dtype, int64_t numel, int64_t C, int64_t inner);
void bn_add_relu_backward(const BnAddReluBackwardArgs& a);

}  // namespace rk
