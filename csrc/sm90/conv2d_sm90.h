// sm_90a (Hopper) implicit-GEMM convolution (csrc/sm90/conv2d_sm90.cu, CUTLASS 3.x collectives).
// Torch-free; takes the same argument struct as conv2d_forward (csrc/conv2d.h) with narrower
// requirements:
//   dtype float16 or bfloat16, or float32 with allow_tf32 (computed in TF32: wgmma reads the top 10
//   mantissa bits of each operand); x (N, Cin, H, W) and out / residual (N, Cout, OH, OW)
//   channels_last contiguous (strides (H*W*C, 1, W*C, C)), 16-byte aligned; Cin, Cout multiples of
//   16 bytes' worth of channels (8 bf16/fp16, 4 float32); w the packed KRSC filter (Cout, KH, KW,
//   Cin) contiguous, ldw = KH*KW*Cin; scale, bias (Cout,) float32, 16-byte aligned, or 0; stride <=
//   8; padding within the TMA im2col limits (pad <= 128, pad - (kernel - 1) >= -128); dilation 1,
//   groups 1; allow_tf32 true for float32 (ignored for 16-bit inputs).
//   Statistics (mean and var given): scale, bias, residual absent and relu false.
//   workspace: conv2d_sm90_workspace_bytes(a) bytes, 256-byte aligned (with statistics it holds
//   the epilogue's per-128-row-tile (mean, M2) partials, 2 * ceil(M / 128) * Cout floats).
//   Statistics: of the output rounded to dtype (what a BatchNorm after the conv sees), mean and
//   biased var, deterministic.
// Runs on a device of compute capability 9.0 only (an sm_90a cubin); anything else is an ArgError.
// Compiled into _C only when the build found CUTLASS and an nvcc that targets sm_90a
// (module attribute _C.sm90_kernels says which, _C.sm90_note why not).
#pragma once
#include <cstdint>

#include "../conv2d.h"

namespace rk {

// Validates `a` (ArgError naming the argument) and returns the workspace it needs.
int64_t conv2d_sm90_workspace_bytes(const Conv2dArgs& a);

// Validates every argument, then launches on a.stream.
void conv2d_sm90_forward(const Conv2dArgs& a);

}  // namespace rk
