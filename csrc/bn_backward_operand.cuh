// The BN-backward operand of the convolution backward (contract: csrc/conv2d_dgrad.h, the same in
// resnet_kernels/backends/torch_conv_backward.py; Triton's triton_ops/_common.bn_dy), computed in
// registers from one 8-channel chunk of a pixel as the operand is staged, shared by the A operands
// of conv2d_dgrad.cu and conv2d_wgrad.cu so that both kernels compute it with the same operations:
//   g' = g * (mask > 0)                        mask: an activation like g, or 1 bit (bit c % 8 of
//                                              byte c / 8 of the pixel's ceil(C / 8) bytes)
//   dy = a[c] * g' - (b[c] + k[c] * (y - mean[c]))   with coef = (a, b, k) rows (3, C), else g'
// in float32, rounded to T (float16 / bfloat16). Also the upstream unit's output recomputed from its
// BN input when it is not materialised (the dgrad's upstream ReLU mask, the wgrad's x operand), and
// the 16-byte vector helpers of both kernels.
// Not part of the public API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "acc_types.cuh"
#include "common.h"

namespace rk {
namespace bnbwd {

// ---- 16-byte vectors of 8 16-bit values of type T (channels c..c+7 of one pixel)

// element e (0..7), converted to float
template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int e) {
  const uint32_t w = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
  const unsigned short b = static_cast<unsigned short>((e & 1) ? (w >> 16) : (w & 0xffffu));
  return to_acc(*reinterpret_cast<const T*>(&b));
}
template <typename T>
__device__ __forceinline__ uint32_t bits_of(float v) {
  const T h = from_acc<T>(v);
  return *reinterpret_cast<const unsigned short*>(&h);
}
// two floats rounded to T: a in the low half
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return bits_of<T>(a) | (bits_of<T>(b) << 16);
}
// 8 floats f(0), ..., f(7) rounded to T and packed (element e in bits 16e..16e+15)
template <typename T, typename F>
__device__ __forceinline__ uint4 pack8(F&& f) {
  uint32_t w4[4];
#pragma unroll
  for (int e2 = 0; e2 < 4; ++e2) {
    const float lo = f(2 * e2), hi = f(2 * e2 + 1);  // in element order
    w4[e2] = pack2<T>(lo, hi);
  }
  return make_uint4(w4[0], w4[1], w4[2], w4[3]);
}
__device__ __forceinline__ uint4 ld16(const void* base, long long elem_off) {
  return __ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(base) + elem_off));
}
// element c of a per-channel vector of dtype code 0 float32, 1 float16, 2 bfloat16
__device__ __forceinline__ float vec_at(const void* v, int code, int c) {
  if (code == 0) return static_cast<const float*>(v)[c];
  if (code == 1) return to_acc(static_cast<const __half*>(v)[c]);
  return to_acc(static_cast<const __nv_bfloat16*>(v)[c]);
}

// ---- the operand

// Its sources (a kernel parameter): pixels [pix][C], channels contiguous; nullptr = absent (not g).
struct Operand {
  const void* g;        // the gradient of the BN + ReLU output
  const void* mask;     // the ReLU's output (kept where > 0), or
  const uint8_t* bits;  // its 1-bit form [pix][bytes] (at most one of the two)
  const void* y;        // the BN input (with coef)
  const float* coef;    // (3, C): a, b, k
  const float* mean;    // (C,)
  int C;                // channels per pixel (a multiple of 8)
  int bytes;            // bytes per pixel of bits: ceil(C / 8)
};

inline Operand operand_of(std::uintptr_t g, std::uintptr_t mask, std::uintptr_t bits, std::uintptr_t y,
                          std::uintptr_t coef, std::uintptr_t mean, int64_t C) {
  Operand o;
  o.g = reinterpret_cast<const void*>(g);
  o.mask = reinterpret_cast<const void*>(mask);
  o.bits = reinterpret_cast<const uint8_t*>(bits);
  o.y = reinterpret_cast<const void*>(y);
  o.coef = reinterpret_cast<const float*>(coef);
  o.mean = reinterpret_cast<const float*>(mean);
  o.C = static_cast<int>(C);
  o.bytes = static_cast<int>((C + 7) / 8);
  return o;
}

// The staged registers of one chunk (those of absent sources are neither loaded nor read).
struct Chunk {
  uint4 g, y, m;
  uint32_t bits;
};

// Chunk c..c+7 (c % 8 == 0) of pixel pix when ok, else zeros.
__device__ __forceinline__ void load_chunk(Chunk& s, const Operand& o, long long pix, int c, bool ok) {
  const long long off = pix * o.C + c;
  s.g = ok ? ld16(o.g, off) : make_uint4(0, 0, 0, 0);
  if (o.coef != nullptr) s.y = ok ? ld16(o.y, off) : make_uint4(0, 0, 0, 0);
  if (o.mask != nullptr) s.m = ok ? ld16(o.mask, off) : make_uint4(0, 0, 0, 0);
  if (o.bits != nullptr) s.bits = ok ? __ldg(o.bits + (pix * o.bytes + (c >> 3))) : 0u;
}

// The coefficients of channels c..c+7 (with coef).
struct Coef {
  float a[8], b[8], k[8], mu[8];
};

// Channels c..c+7 when ok, zeros past C. (The bound is tested per channel although C % 8 == 0 makes
// a chunk all in or all out: with one test per chunk the dgrad<__half, UP> kernel took 255
// registers instead of 253 with nvcc 13.0 sm_80.)
__device__ __forceinline__ void load_coef(Coef& k, const Operand& o, int c, bool ok) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool in = ok && c + e < o.C;
    k.a[e] = in ? __ldg(o.coef + c + e) : 0.f;
    k.b[e] = in ? __ldg(o.coef + o.C + c + e) : 0.f;
    k.k[e] = in ? __ldg(o.coef + 2 * o.C + c + e) : 0.f;
    k.mu[e] = in ? __ldg(o.mean + c + e) : 0.f;
  }
}

// The chunk's operand, rounded to T and packed (16 bytes); zeros when !valid. (Written out rather
// than through pack8: with the lambda, nvcc 13.0 made the dgrad's main loop 48 instructions per
// k-step longer, over tests/test_conv_backward_sass.py's budget.)
template <typename T>
__device__ __forceinline__ uint4 operand(const Chunk& s, const Coef& k, const Operand& o, bool valid) {
  uint32_t w4[4];
#pragma unroll
  for (int e2 = 0; e2 < 4; ++e2) {
    float d[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int e = 2 * e2 + h;
      float gp = elem<T>(s.g, e);
      if (o.mask != nullptr && !(elem<T>(s.m, e) > 0.f)) gp = 0.f;
      if (o.bits != nullptr && !((s.bits >> e) & 1u)) gp = 0.f;
      float v = gp;
      if (o.coef != nullptr) v = k.a[e] * gp - (k.b[e] + k.k[e] * (elem<T>(s.y, e) - k.mu[e]));
      d[h] = valid ? v : 0.f;
    }
    w4[e2] = pack2<T>(d[0], d[1]);
  }
  return make_uint4(w4[0], w4[1], w4[2], w4[3]);
}

// ---- the upstream unit's output x = relu(up_y * s + t), recomputed from its BN input up_y:
// s = up_weight * (1 / sqrt(up_var + eps)) (up_weight absent: 1), t = up_bias - up_mean * s
// (up_bias absent: 0), in float32 with batch_norm_act's operations (bn_affine.cuh, batch_norm.cu's
// bn_act_fwd_kernel: products rounded before the additions, __fmul_rn, so that nvcc does not
// contract them into an FMA): x rounded to T is bitwise what batch_norm_act writes. (The host
// runner compiles with -ffp-contract=off: it cannot tell a contracted product from a rounded one.)

// Its sources (a kernel parameter); y nullptr = not given.
struct Upstream {
  const void* y;        // [pix][C] of the activation dtype
  const float* mean;    // (C,)
  const float* var;     // (C,)
  const void* weight;   // (C,) of w_code, or nullptr
  const void* bias;     // (C,) of w_code, or nullptr
  int w_code;           // 0 float32, 1 float16, 2 bfloat16
  float eps;
};

inline Upstream upstream_of(std::uintptr_t y, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t weight,
                            std::uintptr_t bias, DType w_dtype, double eps) {
  Upstream u;
  u.y = reinterpret_cast<const void*>(y);
  u.mean = reinterpret_cast<const float*>(mean);
  u.var = reinterpret_cast<const float*>(var);
  u.weight = reinterpret_cast<const void*>(weight);
  u.bias = reinterpret_cast<const void*>(bias);
  u.w_code = w_dtype == DType::F32 ? 0 : w_dtype == DType::F16 ? 1 : 2;
  u.eps = static_cast<float>(eps);
  return u;
}

// s and t of channel c; mean = u.mean[c], loaded by the caller
__device__ __forceinline__ void x_affine(const Upstream& u, int c, float mean, float& s, float& t) {
  const float sc = __fmul_rn(u.weight != nullptr ? vec_at(u.weight, u.w_code, c) : 1.f, 1.f / sqrtf(u.var[c] + u.eps));
  s = sc;
  t = __fmul_rn(-mean, sc) + (u.bias != nullptr ? vec_at(u.bias, u.w_code, c) : 0.f);
}

// x of one element of up_y (float32: the caller rounds it to T)
__device__ __forceinline__ float x_of(float up_y, float s, float t) { return fmaxf(__fmul_rn(up_y, s) + t, 0.f); }

}  // namespace bnbwd
}  // namespace rk
