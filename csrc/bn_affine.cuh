// One BatchNorm's per-channel affine (scale, shift) from its batch statistics and optional
// weight/bias of a runtime dtype, shared by batch_norm.cu's forward (bn_act_fwd_kernel) and the
// convolution's operand prologue (conv2d.cu, PRO): both compute h = relu(y * scale + shift) with
// these exact operations, so the prologue's h is bitwise the one batch_norm_act writes.
// Not part of the public API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"

namespace rk {
namespace bnk {

constexpr int kF32 = static_cast<int>(DType::F32);
constexpr int kF16 = static_cast<int>(DType::F16);
constexpr int kBF16 = static_cast<int>(DType::BF16);

// A per-channel parameter of a runtime dtype code without a branch (the forward's prologue): the
// three candidate values are loaded from in-bounds addresses whatever the dtype (the float32 one
// as two 16-bit halves at 2*c*w and 2*c*w + w - 1, w = 2 for float32 and 1 for 16-bit codes) and
// selected. Branches on the uniform codes and presence flags there, repeated for each of a
// thread's up to 2 x 8 channels, made the compiler thread jumps into one copy of the prologue per
// combination of codes (1296 copies of the sqrt and division in one kernel: 100,000 PTX lines).
__device__ __forceinline__ float load_param_nobranch(const void* p, int code, int64_t c) {
  const uint16_t* h = static_cast<const uint16_t*>(p);
  const int64_t w = code == kF32 ? 2 : 1;
  const uint32_t lo = h[c * w], hi = h[c * w + w - 1];
  const float f32 = __uint_as_float(lo | (hi << 16));
  const float f16 = __half2float(static_cast<const __half*>(p)[c]);
  const float bf16 = __uint_as_float(lo << 16);
  return code == kF32 ? f32 : (code == kF16 ? f16 : bf16);
}

// One BatchNorm's per-channel inputs. An absent weight/bias is given as has_w/has_b = false and a
// pointer to any float32 array of length C (never 0: loads stay unconditional, see above).
struct BnParams {
  const float* mean = nullptr;
  const float* var = nullptr;
  const void* w = nullptr;
  const void* b = nullptr;
  int wd = kF32, bd = kF32;
  bool has_w = false, has_b = false;
  float eps = 0.f;
};

__device__ __forceinline__ float invstd_of(const float* var, float eps, int64_t c) {
  return 1.0f / sqrtf(var[c] + eps);  // correctly rounded sqrt and division (no fast math)
}

// scale = weight * invstd, shift = -mean * scale + bias: the reference's operations and order
// (weight 1: 1 * invstd is exact; bias 0: adding 0 changes at most the sign of a zero shift).
__device__ __forceinline__ void bn_affine(const BnParams& p, int64_t c, float& scale, float& shift) {
  const float invstd = invstd_of(p.var, p.eps, c);
  const float w = load_param_nobranch(p.w, p.wd, c), b = load_param_nobranch(p.b, p.bd, c);
  scale = __fmul_rn(p.has_w ? w : 1.f, invstd);
  shift = __fmul_rn(-p.mean[c], scale) + (p.has_b ? b : 0.f);
}

inline BnParams bn_params(std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w, DType wd, std::uintptr_t b,
                          DType bd, double eps) {
  BnParams p;
  p.mean = reinterpret_cast<const float*>(mean);
  p.var = reinterpret_cast<const float*>(var);
  p.has_w = w != 0;
  p.has_b = b != 0;
  // absent: read (and ignore) mean, a float32 array of length C
  p.w = reinterpret_cast<const void*>(w != 0 ? w : mean);
  p.b = reinterpret_cast<const void*>(b != 0 ? b : mean);
  p.wd = w != 0 ? static_cast<int>(wd) : kF32;
  p.bd = b != 0 ? static_cast<int>(bd) : kF32;
  p.eps = static_cast<float>(eps);
  return p;
}

}  // namespace bnk
}  // namespace rk
