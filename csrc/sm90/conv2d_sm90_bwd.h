// sm_90a (Hopper) convolution backward (csrc/sm90/conv2d_sm90_bwd.cu, CUTLASS 3.x collectives):
// the data gradient (dgrad) and the weight gradient (wgrad) of a convolution from a materialised
// gradient operand dy (the op's BN-backward-and-ReLU-masked gradient, written by one separate pass
// before these kernels: resnet_kernels/backends/cutlass_conv_backward.py). Torch-free.
//
// Requirements (both): dtype float16 or bfloat16; dy (N, Cout, OH, OW) channels_last contiguous;
// Cin, Cout multiples of 8; dilation 1, groups 1; padding within the TMA im2col limits (pad <= 128,
// pad - (kernel - 1) in [-128, 127], kernel <= 255); every tensor pointer 16-byte aligned; tensors
// of at most 2^31 - 1 elements.
//   dgrad: grad_x (N, Cin, H, W) = conv_transpose(dy, w) (+ residual), channels_last contiguous;
//          w the packed KRSC filter (Cout, KH, KW, Cin) contiguous; residual 0 or like grad_x (added
//          in the epilogue in float32 before the one rounding: CUTLASS's C operand with beta = 1);
//          stride 1 only (CUTLASS 3.x's sm90 dgrad is tested for unit stride only; strided dgrad
//          is the sm100 collectives'). x is not read.
//   wgrad: grad_w (Cout, KH, KW, Cin) KRSC contiguous (a channels_last weight's memory), in dtype,
//          from dy and x (N, Cin, H, W) channels_last contiguous; stride <= 8. No split-K: each CTA
//          reduces its whole N*OH*OW range in a fixed order (deterministic, no atomics); w, residual
//          and grad_x are not read.
// Accumulation in float32 (wgmma), one rounding to dtype. workspace: the *_workspace_bytes of the
// same arguments (CUTLASS's own; 0 for these kernels today), 256-byte aligned when nonzero.
// Runs on a device of compute capability 9.0 only (an sm_90a cubin); anything else is an ArgError.
// Compiled into _C only with the sm_90a forward (csrc/sm90/conv2d_sm90.h: same build conditions).
#pragma once
#include <cstdint>

#include "../common.h"

namespace rk {

struct Conv2dSm90BwdArgs {
  DType dtype;
  std::uintptr_t dy;        // (N, Cout, OH, OW) channels_last: the gradient operand
  std::uintptr_t w;         // dgrad: KRSC filter (Cout, KH, KW, Cin) contiguous
  std::uintptr_t x;         // wgrad: (N, Cin, H, W) channels_last
  std::uintptr_t residual;  // dgrad: 0 or (N, Cin, H, W) channels_last, added to grad_x
  std::uintptr_t grad_x;    // dgrad output (N, Cin, H, W) channels_last
  std::uintptr_t grad_w;    // wgrad output (Cout, KH, KW, Cin) contiguous, in dtype
  std::uintptr_t workspace;
  int64_t workspace_bytes;
  int64_t N, Cin, H, W, Cout, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t OH, OW;
  std::uintptr_t stream;
};

// Validate `a` for that kernel (ArgError naming the argument) and return the workspace it needs.
int64_t conv2d_sm90_dgrad_workspace_bytes(const Conv2dSm90BwdArgs& a);
int64_t conv2d_sm90_wgrad_workspace_bytes(const Conv2dSm90BwdArgs& a);

// Validate every argument (CUTLASS's can_implement included), then launch one kernel on a.stream.
void conv2d_sm90_dgrad(const Conv2dSm90BwdArgs& a);
void conv2d_sm90_wgrad(const Conv2dSm90BwdArgs& a);

}  // namespace rk
