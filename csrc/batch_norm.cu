// Training-mode BatchNorm from given batch statistics (API and formulas: batch_norm.h; the
// contract: resnet_kernels/backends/torch_batch_norm.py).
//
// Every activation pass (forward apply, backward reduce, backward apply) walks the tensor with the
// tiling of bn_add_relu's backward (bar::BwdPlan, bn_add_relu_impl.cuh), so a thread's channels are
// fixed for its whole life and their per-channel values (the BN affine of the forward, the batch
// mean of the reduce, the four apply coefficients of the backward) are computed or loaded once
// into registers:
//   * channels_last (inner == 1): a block is bx vector columns (VEC consecutive channels each) x by
//     rows; grid = (P row slabs, column tiles); a thread strides over rows.
//   * NCHW (inner > 1): grid = C * P blocks of 256 threads; block (c, p) walks its contiguous share
//     of channel c's N * inner / VEC vectors, crossing (n, c) planes without divisions.
// VEC is 16 bytes of elements, 8 bytes for 16-bit types when only that fits, else 1 (C = 3, odd
// H*W, misaligned pointers): bar::pick_vec.
//
// Backward: the reduce kernel writes per-block partials of sum g, sum g*(y - mean) and
// sum g*(identity - id_mean) (centred on the batch mean: no cancellation when |mean| >> std) into
// the workspace as float[3][P][C]; in the same launch, the last block to arrive on the int32
// counter of its column tile (channels_last) or channel (NCHW) sums each of its channels' P partials
// in a fixed order (finalize_range: deterministic, the counter only picks the block; the tiling
// depends only on shape, dtype and alignment, never on the device; an empty batch runs
// bn_act_bwd_finalize_kernel alone), writes grad_weight/grad_bias/grad_id_* in their dtypes and the per-channel apply
// coefficients float[8][C] (mean, weight*invstd, sum_g/m, invstd^2*sum_gd/m; the same for the
// identity) after the partials; the apply kernel writes grad_y and grad_identity in one pass, the
// ReLU mask recomputed from the saved output.
//
// Template flags: the activation type, VEC, the tiling, and the operands that change memory
// traffic (identity none/raw/BN'd; which sums; which gradients). Weight/bias presence and the
// parameters' dtypes (float32 or the activation's 16-bit type) are uniform runtime values read
// once per thread; the ReLU is a uniform runtime flag (as in bn_add_relu). Instances per
// architecture: forward 48 + 6 writing the 1-bit mask (BITS: channels_last, VEC 8), bits
// pack 6, reduce 128 (half of them reading the 1-bit mask: MB), apply 80, finalize 1, running
// update 1.
#include "batch_norm.h"

#include "arrival.cuh"

#include "bn_add_relu_impl.cuh"
#include "bn_affine.cuh"

namespace rk {
namespace bnk {  // batch_norm internals

using bar::BwdPlan;
using bar::FastDivU64;
using bar::from_acc;
using bar::kThreads;
using bar::load_pack;
using bar::mul_rn;
using bar::NchwGeom;
using bar::Pack;
using bar::store_pack;
using bar::to_acc;

// kF32 / kF16 / kBF16, load_param_nobranch, BnParams, invstd_of, bn_affine: csrc/bn_affine.cuh

// A per-channel parameter of a runtime dtype code (uniform over the grid), in float32.
__device__ __forceinline__ float load_param(const void* p, int code, int64_t c) {
  if (code == kF16) return __half2float(static_cast<const __half*>(p)[c]);
  if (code == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[c]);
  return static_cast<const float*>(p)[c];
}
__device__ __forceinline__ void store_param(void* p, int code, int64_t c, float v) {
  if (code == kF16)
    static_cast<__half*>(p)[c] = __float2half_rn(v);
  else if (code == kBF16)
    static_cast<__nv_bfloat16*>(p)[c] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(p)[c] = v;
}

// Device view of a BwdPlan.
struct Tiling {
  int64_t C = 1;
  int64_t rows = 0, Cv = 0;  // channels_last
  int bx = 1, by = 1;        // channels_last
  NchwGeom g;                // NCHW
};

inline Tiling make_tiling(const BwdPlan& p, int64_t C) {
  Tiling t;
  t.C = C;
  if (p.nhwc) {
    t.rows = p.rows;
    t.Cv = C / p.vec;
    t.bx = p.bx;
    t.by = p.by;
  } else {
    t.g = bar::nchw_geom(p, C);
  }
  return t;
}
inline dim3 grid_of(const BwdPlan& p, int64_t C) {
  return p.nhwc ? dim3(static_cast<unsigned>(p.P), static_cast<unsigned>(p.col_tiles))
                : dim3(static_cast<unsigned>(C * p.P));
}
inline unsigned block_of(const BwdPlan& p) { return p.nhwc ? static_cast<unsigned>(p.bx * p.by) : kThreads; }

// First channel of this thread (channels_last: VEC consecutive ones; NCHW: one); false when the
// thread has no column (channels_last tiles wider than C, or rows beyond by).
template <bool NHWC, int VEC>
__device__ __forceinline__ bool thread_channels(const Tiling& t, int64_t& c0) {
  if constexpr (NHWC) {
    const int tx = static_cast<int>(threadIdx.x) % t.bx, ty = static_cast<int>(threadIdx.x) / t.bx;
    const int64_t cv = static_cast<int64_t>(blockIdx.y) * t.bx + tx;
    c0 = cv * VEC;
    return cv < t.Cv && ty < t.by;
  } else {
    int64_t p, j0, j1;
    t.g.block_range(blockIdx.x, c0, p, j0, j1);
    return true;
  }
}

// body(vi, pix) for every vector index of this thread (all of them share the thread's channels);
// pix is the pixel (n * H*W + h * W + w) of the vector's first element: channels_last, the row;
// NCHW, n * inner + q * VEC (the vector's VEC elements are pixels pix .. pix + VEC - 1).
template <bool NHWC, int VEC, typename Body>
__device__ __forceinline__ void for_each_vector(const Tiling& t, Body&& body) {
  if constexpr (NHWC) {
    const int tx = static_cast<int>(threadIdx.x) % t.bx, ty = static_cast<int>(threadIdx.x) / t.bx;
    const int64_t cv = static_cast<int64_t>(blockIdx.y) * t.bx + tx;
    if (cv >= t.Cv || ty >= t.by) return;
    const int64_t rstep = static_cast<int64_t>(gridDim.x) * t.by;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * t.by + ty; r < t.rows; r += rstep) body(r * t.Cv + cv, r);
  } else {
    int64_t c, p, j0, j1;
    t.g.block_range(blockIdx.x, c, p, j0, j1);
    int64_t j = j0 + threadIdx.x;  // vector index within channel c: j = n * inner_v + q
    if (j >= j1) return;
    int64_t n, q;
    t.g.start(j, n, q);
    for (; j < j1; j += kThreads) {
      body(t.g.vector_index(n, c, q), (n * t.g.inner_v + q) * VEC);
      t.g.advance(n, q);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward: out = act(y * scale + shift + R)
// ---------------------------------------------------------------------------------------------
enum IdMode : int { kIdNone = 0, kIdRaw = 1, kIdBn = 2 };

// Up to kBnRunningUpdateSlots running-statistics updates, passed by value (n = 0: none).
struct RunningSlots {
  const float* mean[kBnRunningUpdateSlots];
  const float* var[kBnRunningUpdateSlots];
  void* running_mean[kBnRunningUpdateSlots];  // nullptr = absent
  void* running_var[kBnRunningUpdateSlots];
  int64_t* num_batches_tracked[kBnRunningUpdateSlots];
  int rmd[kBnRunningUpdateSlots], rvd[kBnRunningUpdateSlots];
  float keep[kBnRunningUpdateSlots], take[kBnRunningUpdateSlots], take_var[kBnRunningUpdateSlots];
  int64_t C[kBnRunningUpdateSlots];
  int n;
};

// Thread `gid` of `total` updates channels gid, gid + total, ... of each slot (running = keep *
// running + take * statistic, in float32, rounded once to the buffer's dtype); thread 0 counts the
// batch. The buffers are disjoint from everything else the launch reads or writes (the callers check).
__device__ __forceinline__ void running_update(const RunningSlots& s, int64_t gid, int64_t total) {
#pragma unroll
  for (int i = 0; i < kBnRunningUpdateSlots; ++i) {
    if (i >= s.n) break;
    if (gid == 0 && s.num_batches_tracked[i] != nullptr) *s.num_batches_tracked[i] += 1;
    for (int64_t c = gid; c < s.C[i]; c += total) {
      if (s.running_mean[i] != nullptr)
        store_param(s.running_mean[i], s.rmd[i], c,
                    mul_rn(load_param(s.running_mean[i], s.rmd[i], c), s.keep[i]) + mul_rn(s.mean[i][c], s.take[i]));
      if (s.running_var[i] != nullptr)
        store_param(s.running_var[i], s.rvd[i], c,
                    mul_rn(load_param(s.running_var[i], s.rvd[i], c), s.keep[i]) +
                        mul_rn(s.var[i][c], s.take_var[i]));
    }
  }
}

// BITS: also the 1-bit mask of out > 0 (resnet_kernels/_bits.py: uint8 [pixel][ceil(C/8)], bit c % 8 of
// byte [pixel][c / 8]) in the same pass: channels_last with VEC == 8 (16-bit types, C % 8 == 0, 16-byte
// aligned pointers): a thread's vector is one byte of the mask, written by that thread alone.
// Elsewhere (float32, NCHW, C % 8 != 0) bn_bits_pack_kernel packs out afterwards.
template <typename T, int VEC, bool NHWC, int IDM, bool BITS>
__global__ void __launch_bounds__(kThreads, 2)
    bn_act_fwd_kernel(const T* __restrict__ y, const T* __restrict__ identity, T* __restrict__ out,
                      uint8_t* __restrict__ bits, const BnParams bn, const BnParams idbn, const Tiling t,
                      const bool relu, const RunningSlots run) {
  static_assert(!BITS || (NHWC && VEC == 8), "in-kernel bits: channels_last, 8 channels a thread");
  constexpr int NCH = NHWC ? VEC : 1;
  if (run.n != 0)  // the block's running-statistics updates (batch_norm_act_bits' running), every thread of the grid
    running_update(run, (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * gridDim.y * blockDim.x);
  int64_t c0;
  if (!thread_channels<NHWC, VEC>(t, c0)) return;  // no barriers in this kernel
  float s[NCH], b[NCH], is[NCH], ib[NCH];
#pragma unroll
  for (int k = 0; k < NCH; ++k) {
    bn_affine(bn, c0 + k, s[k], b[k]);
    is[k] = ib[k] = 0.f;
    if constexpr (IDM == kIdBn) bn_affine(idbn, c0 + k, is[k], ib[k]);
  }
  for_each_vector<NHWC, VEC>(t, [&](int64_t vi, int64_t pix) {
    const Pack<T, VEC> yv = load_pack<T, VEC>(y, vi);
    Pack<T, VEC> iv;
    if constexpr (IDM != kIdNone) iv = load_pack<T, VEC>(identity, vi);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = NHWC ? k : 0;
      float z = mul_rn(to_acc(yv.v[k]), s[ck]) + b[ck];
      if constexpr (IDM != kIdNone) {
        float r = to_acc(iv.v[k]);
        if constexpr (IDM == kIdBn) r = mul_rn(r, is[ck]) + ib[ck];
        z = z + r;
      }
      if (relu) z = z < 0.f ? 0.f : z;  // NaN propagates, like torch.relu
      ov.v[k] = from_acc<T>(z);
    }
    store_pack<T, VEC>(out, vi, ov);
    if constexpr (BITS) {
      uint32_t m = 0;  // of the stored (rounded) values, as _bits.pack compares them
#pragma unroll
      for (int k = 0; k < VEC; ++k) m |= (to_acc(ov.v[k]) > 0.f ? 1u : 0u) << k;
      bits[pix * (t.C / 8) + c0 / 8] = static_cast<uint8_t>(m);
    }
  });
}

// The 1-bit mask of out > 0 packed from out (where the forward cannot write it: NCHW, C % 8 != 0,
// or a vector width below 4): one thread per byte, every byte written (the bits past C are 0).
// channels_last: thread b writes byte b = [pixel][cb] from out[pixel][8cb .. 8cb+7]; NCHW: thread
// index ((n * CB + cb) * HW + s) (neighbouring threads read neighbouring pixels of a plane) writes
// byte [(n * HW + s)][cb] from out[n][8cb + j][s].
struct PackGeom {
  int64_t nbytes = 0, C = 1, CB = 1, HW = 1;
  FastDivU64 div_cb, div_hw;
};

template <typename T, bool NHWC>
__global__ void __launch_bounds__(kThreads) bn_bits_pack_kernel(const T* __restrict__ out, uint8_t* __restrict__ bits,
                                                                const PackGeom g) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < g.nbytes; i += stride) {
    int64_t byte, e0, estep, cb;
    if constexpr (NHWC) {
      const int64_t pix = static_cast<int64_t>(g.div_cb.div(static_cast<uint64_t>(i)));
      cb = i - pix * g.CB;
      byte = i;
      e0 = pix * g.C + cb * 8;
      estep = 1;
    } else {
      const int64_t rest = static_cast<int64_t>(g.div_hw.div(static_cast<uint64_t>(i)));
      const int64_t s = i - rest * g.HW;
      const int64_t n = static_cast<int64_t>(g.div_cb.div(static_cast<uint64_t>(rest)));
      cb = rest - n * g.CB;
      byte = (n * g.HW + s) * g.CB + cb;
      e0 = (n * g.C + cb * 8) * g.HW + s;
      estep = g.HW;
    }
    const int64_t nc = g.C - cb * 8 < 8 ? g.C - cb * 8 : 8;
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < nc) m |= (to_acc(out[e0 + j * estep]) > 0.f ? 1u : 0u) << j;
    bits[byte] = static_cast<uint8_t>(m);
  }
}

// ---------------------------------------------------------------------------------------------
// backward 2/3: per channel, the fixed-order sum of the P partials; per-channel gradients and the
// apply coefficients. Run by the reduce kernel's last-arriving block of each column tile (channels_last)
// or channel (NCHW), in the reduce's launch (finalize_range); by bn_act_bwd_finalize_kernel alone
// for an empty batch (no partials, every sum 0).
// ---------------------------------------------------------------------------------------------
enum SumFlag : int { kSumG = 1, kSumD = 2, kSumI = 4 };

struct FinParams {
  const float* ws = nullptr;  // float[3][P][C]
  float* coef = nullptr;      // float[8][C]
  int* counters = nullptr;    // int32 arrival counters of the reduce's blocks (per column tile / channel), all zero
  int64_t P = 0, C = 0;
  float m = 1.f;  // elements per channel
  int sums = 0;   // SumFlag bits present in ws
  BnParams bn, idbn;
  void *gw = nullptr, *gb = nullptr, *giw = nullptr, *gib = nullptr;
  int gwd = kF32, gbd = kF32, giwd = kF32, gibd = kF32;
  bool coef_y = false, coef_id = false;
  float *abk = nullptr, *id_abk = nullptr;  // float[3][C] (A, B, K) outputs (batch_norm_act_coef), or null
};

// (A, B, K) = (A, A * mean_g, A * invstd^2 * mean_gd) at column c of a float[3][C] output, with the
// rounding steps of triton_ops/batch_norm.py's _finalize_kernel: B = A * mean_g, K = (A * invstd^2) * mean_gd.
__device__ __forceinline__ void store_abk(float* out, int64_t C, int64_t c, float A, float invstd, float mean_g,
                                          float mean_gd) {
  out[c] = A;
  out[C + c] = mul_rn(A, mean_g);
  out[2 * C + c] = mul_rn(mul_rn(A, mul_rn(invstd, invstd)), mean_gd);
}

// The outputs of channel c from its three sums.
__device__ __forceinline__ void finalize_channel(const FinParams& f, int64_t c, float sum_g, float sum_gd,
                                                 float sum_gi) {
  if (f.gb != nullptr) store_param(f.gb, f.gbd, c, sum_g);
  if (f.gib != nullptr) store_param(f.gib, f.gibd, c, sum_g);
  if (f.gw != nullptr || f.coef_y || f.abk != nullptr) {
    const float invstd = invstd_of(f.bn.var, f.bn.eps, c);
    if (f.gw != nullptr) store_param(f.gw, f.gwd, c, mul_rn(sum_gd, invstd));
    const float A = f.bn.has_w ? mul_rn(load_param(f.bn.w, f.bn.wd, c), invstd) : invstd;
    if (f.coef_y) {
      f.coef[c] = f.bn.mean[c];
      f.coef[f.C + c] = A;
      f.coef[2 * f.C + c] = sum_g / f.m;
      f.coef[3 * f.C + c] = mul_rn(mul_rn(invstd, invstd), sum_gd / f.m);
    }
    if (f.abk != nullptr) store_abk(f.abk, f.C, c, A, invstd, sum_g / f.m, sum_gd / f.m);
  }
  if (f.giw != nullptr || f.coef_id || f.id_abk != nullptr) {
    const float invstd = invstd_of(f.idbn.var, f.idbn.eps, c);
    if (f.giw != nullptr) store_param(f.giw, f.giwd, c, mul_rn(sum_gi, invstd));
    const float A = f.idbn.has_w ? mul_rn(load_param(f.idbn.w, f.idbn.wd, c), invstd) : invstd;
    if (f.coef_id) {
      f.coef[4 * f.C + c] = f.idbn.mean[c];
      f.coef[5 * f.C + c] = A;
      f.coef[6 * f.C + c] = sum_g / f.m;
      f.coef[7 * f.C + c] = mul_rn(mul_rn(invstd, invstd), sum_gi / f.m);
    }
    if (f.id_abk != nullptr) store_abk(f.id_abk, f.C, c, A, invstd, sum_g / f.m, sum_gi / f.m);
  }
}

// Channels [c_lo, c_hi) by the whole block, 32 at a time: lane ty (of the block's blockDim / 32 full
// warps: 8 for a 256-thread block) sums partials p = ty, ty + lanes, ... of channel c_lo + 32 k + tx
// in float32 (L2 loads: other blocks of the launch wrote them), then the lanes in order; thread
// (tx, 0) writes the channel's outputs. Every thread of the block calls it.
__device__ __forceinline__ void finalize_range(const FinParams& f, int64_t c_lo, int64_t c_hi) {
  __shared__ float sm[kThreads / 32][32];
  const int lanes = static_cast<int>(blockDim.x) / 32;  // >= 6: blocks have >= 193 threads
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  for (int64_t cb = c_lo; cb < c_hi; cb += 32) {
    const int64_t c = cb + tx;
    float S[3] = {0.f, 0.f, 0.f};
    for (int s = 0; s < 3; ++s) {
      if (!(f.sums & (1 << s))) continue;  // uniform
      const float* src = f.ws + static_cast<int64_t>(s) * f.P * f.C;
      float t = 0.f;
      if (ty < lanes && c < c_hi) {
        for (int64_t p = ty; p < f.P; p += lanes) t += __ldcg(src + p * f.C + c);
      }
      if (ty < lanes) sm[ty][tx] = t;
      __syncthreads();
      float r = sm[0][tx];
      for (int l = 1; l < lanes; ++l) r += sm[l][tx];
      S[s] = r;
      __syncthreads();  // sm is rewritten by the next sum
    }
    if (ty == 0 && c < c_hi) finalize_channel(f, c, S[0], S[1], S[2]);
  }
}

// An empty batch's finalize (every sum 0: f.sums == 0): 32 channels per block.
__global__ void __launch_bounds__(kThreads) bn_act_bwd_finalize_kernel(const FinParams f) {
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32;
  finalize_range(f, c0, c0 + 32 < f.C ? c0 + 32 : f.C);
}

// ---------------------------------------------------------------------------------------------
// backward 1/3: per-block partials of sum g, sum g*(y - mean), sum g*(identity - id_mean)
// ---------------------------------------------------------------------------------------------
// MB: the ReLU mask is the 1-bit mask of out > 0 (out_bits, resnet_kernels/_bits.py: bit c % 8 of
// byte [pixel][c / 8], CB = ceil(C/8) bytes a pixel) instead of out (relu is then true): channels_last
// with VEC a multiple of 8 reads one byte per 8 channels, otherwise one byte per element.
template <typename T, int VEC, bool NHWC, bool SD, bool SI, bool MB>
__global__ void __launch_bounds__(kThreads, 2)
    bn_act_bwd_reduce_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                             const uint8_t* __restrict__ out_bits, const T* __restrict__ y,
                             const T* __restrict__ identity, const float* __restrict__ mean,
                             const float* __restrict__ id_mean, float* __restrict__ ws, const Tiling t,
                             const bool relu, const FinParams f) {
  constexpr int NCH = NHWC ? VEC : 1;
  __shared__ float red[NHWC ? kThreads * VEC : kThreads / 32];
  int64_t c0;
  const bool active = thread_channels<NHWC, VEC>(t, c0);
  float mu[NCH], imu[NCH], a0[NCH], a1[NCH], a2[NCH];
#pragma unroll
  for (int k = 0; k < NCH; ++k) {
    a0[k] = a1[k] = a2[k] = mu[k] = imu[k] = 0.f;
    if constexpr (SD) {
      if (active) mu[k] = mean[c0 + k];
    }
    if constexpr (SI) {
      if (active) imu[k] = id_mean[c0 + k];
    }
  }
  for_each_vector<NHWC, VEC>(t, [&](int64_t vi, int64_t pix) {
    const Pack<T, VEC> gv = load_pack<T, VEC>(grad_out, vi);
    Pack<T, VEC> ov, yv, iv;
    if constexpr (!MB) {
      if (relu) ov = load_pack<T, VEC>(out, vi);
    }
    if constexpr (SD) yv = load_pack<T, VEC>(y, vi);
    if constexpr (SI) iv = load_pack<T, VEC>(identity, vi);
    constexpr int NB = MB && NHWC && VEC % 8 == 0 ? VEC / 8 : 1;  // whole bytes of this vector
    uint32_t mb[NB];
    const int64_t CB = (t.C + 7) / 8;
    if constexpr (MB && NHWC && VEC % 8 == 0) {
#pragma unroll
      for (int j = 0; j < NB; ++j) mb[j] = out_bits[pix * CB + c0 / 8 + j];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = NHWC ? k : 0;
      float g = to_acc(gv.v[k]);
      if constexpr (MB) {
        uint32_t byte, bit;
        if constexpr (NHWC && VEC % 8 == 0) {
          byte = mb[k / 8];
          bit = k % 8;
        } else if constexpr (NHWC) {
          byte = out_bits[pix * CB + (c0 + k) / 8];
          bit = static_cast<uint32_t>((c0 + k) % 8);
        } else {
          byte = out_bits[(pix + k) * CB + c0 / 8];
          bit = static_cast<uint32_t>(c0 % 8);
        }
        g = (byte >> bit) & 1u ? g : 0.f;
      } else {
        if (relu) g = to_acc(ov.v[k]) > 0.f ? g : 0.f;
      }
      a0[ck] += g;
      if constexpr (SD) a1[ck] += mul_rn(g, to_acc(yv.v[k]) - mu[ck]);
      if constexpr (SI) a2[ck] += mul_rn(g, to_acc(iv.v[k]) - imu[ck]);
    }
  });
  if constexpr (NHWC) {
    const int64_t PC = static_cast<int64_t>(gridDim.x) * t.C;  // one sum's [P][C] block
    bar::nhwc_block_partial<float, VEC>(a0, red, t.bx, t.by, t.C, ws);
    if constexpr (SD) bar::nhwc_block_partial<float, VEC>(a1, red, t.bx, t.by, t.C, ws + PC);
    if constexpr (SI) bar::nhwc_block_partial<float, VEC>(a2, red, t.bx, t.by, t.C, ws + 2 * PC);
  } else {
    int64_t c, p, j0, j1;
    t.g.block_range(blockIdx.x, c, p, j0, j1);
    const int64_t PC = t.g.P * t.C;
    const int64_t slot = p * t.C + c;
    float s = bar::block_sum<float>(a0[0], red);
    if (threadIdx.x == 0) ws[slot] = s;
    if constexpr (SD) {
      s = bar::block_sum<float>(a1[0], red);
      if (threadIdx.x == 0) ws[PC + slot] = s;
    }
    if constexpr (SI) {
      s = bar::block_sum<float>(a2[0], red);
      if (threadIdx.x == 0) ws[2 * PC + slot] = s;
    }
  }
  // ---- the finalize, in this launch: every block of a column tile (channels_last) or of a channel
  // (NCHW) arrives on its counter after its partials (arrive_last, arrival.cuh); the last of the P
  // arrivals sums the P partials of its channels in a fixed order (finalize_range) and puts
  // the counter back to 0. Which block is last varies, the order does not: deterministic.
  __shared__ int s_last;
  int64_t slot, c_lo, c_hi, arrivals;
  if constexpr (NHWC) {
    const int64_t width = static_cast<int64_t>(t.bx) * VEC;
    slot = blockIdx.y;
    c_lo = slot * width;
    c_hi = c_lo + width < t.C ? c_lo + width : t.C;
    arrivals = gridDim.x;
  } else {
    int64_t p, j0, j1;
    t.g.block_range(blockIdx.x, slot, p, j0, j1);
    c_lo = slot;
    c_hi = slot + 1;
    arrivals = t.g.P;
  }
  if (arrive_last(f.counters + slot, static_cast<int>(arrivals), &s_last)) finalize_range(f, c_lo, c_hi);
}

// ---------------------------------------------------------------------------------------------
// backward 3/3: grad_y = A * ((g - mg) - (y - mean) * k), grad_identity likewise or = g
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void load_coefs(const float* __restrict__ coef, int64_t C, int64_t c, int j0, float& mu,
                                           float& A, float& mg, float& k) {
  mu = coef[j0 * C + c];
  A = coef[(j0 + 1) * C + c];
  mg = coef[(j0 + 2) * C + c];
  k = coef[(j0 + 3) * C + c];
}

__device__ __forceinline__ float bn_input_grad(float g, float x, float mu, float A, float mg, float k) {
  return mul_rn(A, (g - mg) - mul_rn(x - mu, k));
}

template <typename T, int VEC, bool NHWC, bool GY, int GIM>
__global__ void __launch_bounds__(kThreads, 2)
    bn_act_bwd_apply_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ y,
                            const T* __restrict__ identity, T* __restrict__ grad_y, T* __restrict__ grad_identity,
                            const float* __restrict__ coef, const Tiling t, const bool relu) {
  constexpr int NCH = NHWC ? VEC : 1;
  int64_t c0;
  if (!thread_channels<NHWC, VEC>(t, c0)) return;  // no barriers in this kernel
  float mu[NCH], A[NCH], mg[NCH], kk[NCH], imu[NCH], iA[NCH], img[NCH], ik[NCH];
#pragma unroll
  for (int k = 0; k < NCH; ++k) {
    mu[k] = A[k] = mg[k] = kk[k] = imu[k] = iA[k] = img[k] = ik[k] = 0.f;
    if constexpr (GY) load_coefs(coef, t.C, c0 + k, 0, mu[k], A[k], mg[k], kk[k]);
    if constexpr (GIM == kIdBn) load_coefs(coef, t.C, c0 + k, 4, imu[k], iA[k], img[k], ik[k]);
  }
  for_each_vector<NHWC, VEC>(t, [&](int64_t vi, int64_t pix) {
    const Pack<T, VEC> gv = load_pack<T, VEC>(grad_out, vi);
    Pack<T, VEC> ov, yv, iv, gyv, giv;
    if (relu) ov = load_pack<T, VEC>(out, vi);
    if constexpr (GY) yv = load_pack<T, VEC>(y, vi);
    if constexpr (GIM == kIdBn) iv = load_pack<T, VEC>(identity, vi);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = NHWC ? k : 0;
      float g = to_acc(gv.v[k]);
      if (relu) g = to_acc(ov.v[k]) > 0.f ? g : 0.f;
      if constexpr (GY) gyv.v[k] = from_acc<T>(bn_input_grad(g, to_acc(yv.v[k]), mu[ck], A[ck], mg[ck], kk[ck]));
      if constexpr (GIM == kIdRaw) giv.v[k] = from_acc<T>(g);
      if constexpr (GIM == kIdBn)
        giv.v[k] = from_acc<T>(bn_input_grad(g, to_acc(iv.v[k]), imu[ck], iA[ck], img[ck], ik[ck]));
    }
    if constexpr (GY) store_pack<T, VEC>(grad_y, vi, gyv);
    if constexpr (GIM != kIdNone) store_pack<T, VEC>(grad_identity, vi, giv);
  });
}

// ---------------------------------------------------------------------------------------------
// running statistics
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) bn_running_update_kernel(const RunningSlots s) {
  running_update(s, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// fn(Tag<T>{}) for the activation type of d; float64 (and anything else) is refused.
template <typename Fn>
void with_dtype(DType d, const char* fn, Fn&& f) {
  switch (d) {
    case DType::F32: f(Tag<float>{}); return;
    case DType::F16: f(Tag<__half>{}); return;
    case DType::BF16: f(Tag<__nv_bfloat16>{}); return;
    default:
      throw ArgError(cat(fn, ": dtype ", dtype_name(d),
                         " is not supported (float32, float16, bfloat16; the torch implementation serves float64)"));
  }
}

// fn(integral_constant<int, V>) for the vector width vec picked by bar::pick_vec for T.
template <typename T, typename Fn>
void with_vec(int vec, Fn&& fn) {
  constexpr int V = bar::vec_of<T>();
  constexpr int H = sizeof(T) == 2 ? V / 2 : 1;
  if (vec == V) {
    fn(std::integral_constant<int, V>{});
  } else if (H > 1 && vec == H) {
    if constexpr (H > 1) fn(std::integral_constant<int, H>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

template <typename Fn>
void with_bool(bool v, Fn&& fn) {
  if (v)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

template <typename Fn>
void with_id_mode(int m, Fn&& fn) {
  if (m == kIdBn)
    fn(std::integral_constant<int, kIdBn>{});
  else if (m == kIdRaw)
    fn(std::integral_constant<int, kIdRaw>{});
  else
    fn(std::integral_constant<int, kIdNone>{});
}

template <typename... Ptrs>
int pick_vec_for(DType d, int64_t C, int64_t inner, Ptrs... ptrs) {
  const std::uintptr_t acts[] = {ptrs...};
  return bar::pick_vec(d, C, inner, [&](int64_t bytes) {
    for (std::uintptr_t p : acts)
      if (p % static_cast<std::uintptr_t>(bytes) != 0) return false;  // absent (0) counts as aligned
    return true;
  });
}

inline void check_param_dtype(DType d, std::uintptr_t p, const char* fn, const char* arg) {
  if (p != 0 && d != DType::F32 && d != DType::F16 && d != DType::BF16)
    throw ArgError(cat(fn, ": ", arg, " has dtype ", dtype_name(d), " (expected float32, float16 or bfloat16)"));
}

inline int64_t param_size(DType d) { return bar::elem_size(d); }


// Per-channel plan of the three passes: the 16-bit-vector (or wider) tiling of bn_add_relu.
inline BwdPlan plan_for(int64_t numel, int64_t C, int64_t inner, int vec, const char* fn) {
  return bar::make_bwd_plan(numel, C, inner, vec, fn);
}

inline int64_t coef_offset(const BwdPlan& p, int64_t C) { return 3 * p.P * C; }  // in floats
inline int64_t workspace_floats(const BwdPlan& p, int64_t C) { return 3 * p.P * C + 8 * C; }

// (defined after the entry points) the checked slots of up to kBnRunningUpdateSlots updates
RunningSlots running_slots(const std::vector<BnRunningUpdateArgs>& list, const char* fn, bool may_be_empty);
}  // namespace bnk

// =============================================================================================
// entry points
// =============================================================================================
void batch_norm_act_forward(const BatchNormActArgs& a) { batch_norm_act_forward_running(a, {}); }

void batch_norm_act_forward_running(const BatchNormActArgs& a, const std::vector<BnRunningUpdateArgs>& running) {
  using namespace bnk;
  const char* fn = "batch_norm_act_forward";
  with_dtype(a.dtype, fn, [](auto) {});  // refuses float64 before anything else
  const RunningSlots run = running_slots(running, fn, true);
  for (size_t i = 0; i < running.size(); ++i)
    if (running[i].stream != a.stream)
      throw ArgError(cat(fn, ": running[", i, "].stream differs from args.stream (one launch, one stream)"));
  if (!bar::check_geometry(fn, a.numel, a.C, a.inner)) {
    if (!running.empty()) bn_running_update_many(running);  // no output to write: the updates alone
    return;
  }
  check_ptr(a.y, fn, "y");
  check_ptr(a.mean, fn, "mean");
  check_ptr(a.var, fn, "var");
  check_ptr(a.out, fn, "out");
  if (a.identity == 0 && (a.id_mean || a.id_var || a.id_weight || a.id_bias))
    throw ArgError(cat(fn, ": id_mean/id_var/id_weight/id_bias were given without identity"));
  if ((a.id_mean == 0) != (a.id_var == 0))
    throw ArgError(cat(fn, ": id_mean and id_var must be given together (the identity's own BatchNorm)"));
  if (a.id_mean == 0 && (a.id_weight || a.id_bias))
    throw ArgError(cat(fn, ": id_weight/id_bias were given without id_mean/id_var"));
  check_param_dtype(a.weight_dtype, a.weight, fn, "weight");
  check_param_dtype(a.bias_dtype, a.bias, fn, "bias");
  check_param_dtype(a.id_weight_dtype, a.id_weight, fn, "id_weight");
  check_param_dtype(a.id_bias_dtype, a.id_bias, fn, "id_bias");
  const int64_t es = bar::elem_size(a.dtype);
  const char* ename = dtype_name(a.dtype);
  bar::check_aligned(a.y, es, fn, "y", ename);
  bar::check_aligned(a.identity, es, fn, "identity", ename);
  bar::check_aligned(a.out, es, fn, "out", ename);
  bar::check_aligned(a.mean, 4, fn, "mean", "float32");
  bar::check_aligned(a.var, 4, fn, "var", "float32");
  bar::check_aligned(a.id_mean, 4, fn, "id_mean", "float32");
  bar::check_aligned(a.id_var, 4, fn, "id_var", "float32");
  bar::check_aligned(a.weight, param_size(a.weight_dtype), fn, "weight", dtype_name(a.weight_dtype));
  bar::check_aligned(a.bias, param_size(a.bias_dtype), fn, "bias", dtype_name(a.bias_dtype));
  bar::check_aligned(a.id_weight, param_size(a.id_weight_dtype), fn, "id_weight", dtype_name(a.id_weight_dtype));
  bar::check_aligned(a.id_bias, param_size(a.id_bias_dtype), fn, "id_bias", dtype_name(a.id_bias_dtype));

  const int vec = pick_vec_for(a.dtype, a.C, a.inner, a.y, a.identity, a.out);
  const BwdPlan plan = plan_for(a.numel, a.C, a.inner, vec, fn);
  const Tiling t = make_tiling(plan, a.C);
  const BnParams bn = bn_params(a.mean, a.var, a.weight, a.weight_dtype, a.bias, a.bias_dtype, a.eps);
  const BnParams idbn =
      bn_params(a.id_mean, a.id_var, a.id_weight, a.id_weight_dtype, a.id_bias, a.id_bias_dtype, a.id_eps);
  const int idm = a.identity == 0 ? kIdNone : (a.id_mean == 0 ? kIdRaw : kIdBn);
  // the bits in the forward kernel (bn_act_fwd_kernel's BITS), else packed by a second launch
  const bool bits_in = a.bits != 0 && plan.nhwc && vec == 8;
  cudaStream_t st = as_stream(a.stream);
  uint8_t* bits = reinterpret_cast<uint8_t*>(a.bits);
  with_dtype(a.dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_vec<T>(vec, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      with_bool(plan.nhwc, [&](auto nc) {
        constexpr bool NHWC = decltype(nc)::value;
        with_id_mode(idm, [&](auto ic) {
          constexpr int IDM = decltype(ic)::value;
          with_bool(bits_in, [&](auto bc) {
            constexpr bool BITS = decltype(bc)::value;
            if constexpr (!BITS || (NHWC && VEC == 8)) {
              bn_act_fwd_kernel<T, VEC, NHWC, IDM, BITS><<<grid_of(plan, a.C), block_of(plan), 0, st>>>(
                  reinterpret_cast<const T*>(a.y), reinterpret_cast<const T*>(a.identity),
                  reinterpret_cast<T*>(a.out), bits, bn, idbn, t, a.relu, run);
              check_launch("bn_act_fwd_kernel");
            }
          });
        });
      });
    });
    if (a.bits != 0 && !bits_in) {
      PackGeom g;
      g.C = a.C;
      g.CB = ceil_div(a.C, int64_t(8));
      g.HW = a.inner;
      g.nbytes = a.numel / a.C * g.CB;
      g.div_cb = FastDivU64(static_cast<uint64_t>(g.CB));
      g.div_hw = FastDivU64(static_cast<uint64_t>(g.HW));
      const int64_t blocks = std::min<int64_t>(ceil_div(g.nbytes, int64_t(kThreads)), 4096);
      with_bool(plan.nhwc, [&](auto nc) {
        constexpr bool NHWC = decltype(nc)::value;
        bn_bits_pack_kernel<T, NHWC><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(
            reinterpret_cast<const T*>(a.out), bits, g);
        check_launch("bn_bits_pack_kernel");
      });
    }
  });
}

int64_t batch_norm_act_backward_workspace_bytes(DType dtype, int64_t numel, int64_t C, int64_t inner) {
  using namespace bnk;
  const char* fn = "batch_norm_act_backward_workspace_bytes";
  with_dtype(dtype, fn, [](auto) {});
  if (!bar::check_geometry(fn, numel, C, inner)) return 0;
  // The launch picks the vector width from the pointers' alignment too: cover every candidate.
  int64_t floats = 0;
  for (int64_t v : {int64_t(1), static_cast<int64_t>(bar::half_vec_width(dtype)), bar::vec_width(dtype)})
    if (v >= 1 && bar::run_allows(C, inner, v))
      floats = std::max(floats, workspace_floats(plan_for(numel, C, inner, static_cast<int>(v), fn), C));
  return floats * 4;
}

void batch_norm_act_backward(const BatchNormActBackwardArgs& a) {
  using namespace bnk;
  const char* fn = "batch_norm_act_backward";
  with_dtype(a.dtype, fn, [](auto) {});
  check_nonneg(a.numel, fn, "numel");
  if (a.numel > 0) bar::check_geometry(fn, a.numel, a.C, a.inner);
  check_nonneg(a.C, fn, "C");
  const bool y_side = a.grad_y || a.grad_weight || a.coef;
  if (a.numel > 0) {  // an empty tensor's data pointer may be 0
    check_ptr(a.grad_out, fn, "grad_out");
    if (a.relu && a.out == 0 && a.out_bits == 0)
      throw ArgError(cat(fn, ": out (the saved forward output, the ReLU mask) is required when relu=true (or ",
                         "out_bits, its 1-bit mask)"));
    if (y_side && a.y == 0)
      throw ArgError(cat(fn, ": y, mean and var are required to compute grad_y, grad_weight or coef"));
    if (a.grad_identity && a.identity == 0)
      throw ArgError(cat(fn, ": identity is required to compute grad_identity"));
  }
  if (y_side && (a.mean == 0 || a.var == 0))
    throw ArgError(cat(fn, ": y, mean and var are required to compute grad_y, grad_weight or coef"));
  if (a.out_bits != 0 && (!a.relu || a.out != 0))
    throw ArgError(cat(fn, ": out_bits (the 1-bit ReLU mask) needs relu=true and out=0 (one mask)"));
  if (a.out_bits != 0 && (a.grad_y != 0 || a.grad_identity != 0))
    throw ArgError(cat(fn, ": out_bits is read by the reduce pass only: grad_y/grad_identity need out, not out_bits"));
  if ((a.grad_id_weight || a.grad_id_bias) && a.id_mean == 0)
    throw ArgError(cat(fn, ": grad_id_weight/grad_id_bias need the identity's own BatchNorm (id_mean, id_var)"));
  if (a.id_coef && a.id_mean == 0)
    throw ArgError(cat(fn, ": id_coef needs the identity's own BatchNorm (id_mean, id_var)"));
  if (a.id_mean != 0 && ((a.identity == 0 && a.numel > 0) || a.id_var == 0))
    throw ArgError(cat(fn, ": id_mean was given without identity or id_var"));
  if (a.id_mean == 0 && a.id_weight != 0) throw ArgError(cat(fn, ": id_weight was given without id_mean/id_var"));
  check_param_dtype(a.weight_dtype, a.weight, fn, "weight");
  check_param_dtype(a.id_weight_dtype, a.id_weight, fn, "id_weight");
  check_param_dtype(a.grad_weight_dtype, a.grad_weight, fn, "grad_weight");
  check_param_dtype(a.grad_bias_dtype, a.grad_bias, fn, "grad_bias");
  check_param_dtype(a.grad_id_weight_dtype, a.grad_id_weight, fn, "grad_id_weight");
  check_param_dtype(a.grad_id_bias_dtype, a.grad_id_bias, fn, "grad_id_bias");
  const int64_t es = bar::elem_size(a.dtype);
  const char* ename = dtype_name(a.dtype);
  bar::check_aligned(a.grad_out, es, fn, "grad_out", ename);
  bar::check_aligned(a.out, es, fn, "out", ename);
  bar::check_aligned(a.y, es, fn, "y", ename);
  bar::check_aligned(a.identity, es, fn, "identity", ename);
  bar::check_aligned(a.grad_y, es, fn, "grad_y", ename);
  bar::check_aligned(a.grad_identity, es, fn, "grad_identity", ename);
  bar::check_aligned(a.mean, 4, fn, "mean", "float32");
  bar::check_aligned(a.var, 4, fn, "var", "float32");
  bar::check_aligned(a.id_mean, 4, fn, "id_mean", "float32");
  bar::check_aligned(a.id_var, 4, fn, "id_var", "float32");
  bar::check_aligned(a.workspace, 4, fn, "workspace", "float32");
  bar::check_aligned(a.coef, 4, fn, "coef", "float32");
  bar::check_aligned(a.id_coef, 4, fn, "id_coef", "float32");
  bar::check_aligned(a.weight, param_size(a.weight_dtype), fn, "weight", dtype_name(a.weight_dtype));
  bar::check_aligned(a.id_weight, param_size(a.id_weight_dtype), fn, "id_weight", dtype_name(a.id_weight_dtype));
  bar::check_aligned(a.grad_weight, param_size(a.grad_weight_dtype), fn, "grad_weight",
                     dtype_name(a.grad_weight_dtype));
  bar::check_aligned(a.grad_bias, param_size(a.grad_bias_dtype), fn, "grad_bias", dtype_name(a.grad_bias_dtype));
  bar::check_aligned(a.grad_id_weight, param_size(a.grad_id_weight_dtype), fn, "grad_id_weight",
                     dtype_name(a.grad_id_weight_dtype));
  bar::check_aligned(a.grad_id_bias, param_size(a.grad_id_bias_dtype), fn, "grad_id_bias",
                     dtype_name(a.grad_id_bias_dtype));

  const bool id_bn = a.id_mean != 0;
  const bool empty = a.numel == 0;
  // what the apply pass writes, and which sums it and the per-channel gradients need
  const bool gy = a.grad_y != 0 && !empty;
  const int gim = (a.grad_identity == 0 || empty) ? kIdNone : (id_bn ? kIdBn : kIdRaw);
  const bool sum_d = (gy || a.grad_weight || a.coef) && !empty;
  const bool sum_i = (gim == kIdBn || a.grad_id_weight || a.id_coef) && !empty;
  const bool any_sum = gy || gim == kIdBn || a.grad_weight || a.grad_bias || a.grad_id_weight || a.grad_id_bias ||
                       a.coef || a.id_coef;
  if (!any_sum && gim == kIdNone) return;  // nothing requested

  const int vec = empty ? 1
                        : pick_vec_for(a.dtype, a.C, a.inner, a.grad_out, a.relu ? a.out : std::uintptr_t(0),
                                       y_side ? a.y : std::uintptr_t(0), a.identity, a.grad_y, a.grad_identity);
  BwdPlan plan;
  plan.P = 0;  // an empty batch: every sum is 0 (the finalize pass reads no partials)
  if (!empty) plan = plan_for(a.numel, a.C, a.inner, vec, fn);
  const bool reduce = any_sum && !empty;
  if (reduce) {
    const int64_t need = workspace_floats(plan, a.C) * 4;
    check_ptr(a.workspace, fn, "workspace");
    if (a.workspace_bytes < need)
      throw ArgError(cat(fn, ": workspace is too small: ", a.workspace_bytes, " bytes given, ", need,
                         " needed (use batch_norm_act_backward_workspace_bytes)"));
    check_ptr(a.counters, fn, "counters");
    const int64_t need_cnt = plan.nhwc ? plan.col_tiles : a.C;  // <= C: batch_norm_act_backward_counters
    if (a.counters_count < need_cnt)
      throw ArgError(cat(fn, ": counters_count = ", a.counters_count, " < ", need_cnt, " required"));
  }
  cudaStream_t st = as_stream(a.stream);
  float* ws = reinterpret_cast<float*>(a.workspace);
  float* coef = reduce ? ws + coef_offset(plan, a.C) : nullptr;
  const Tiling t = empty ? Tiling{} : make_tiling(plan, a.C);
  const bool mb = a.out_bits != 0;
  const uint8_t* ob = reinterpret_cast<const uint8_t*>(a.out_bits);

  FinParams f;
  f.ws = ws;
  f.coef = coef;
  f.counters = reinterpret_cast<int*>(a.counters);
  f.P = plan.P;
  f.C = a.C;
  f.m = empty ? 1.f : static_cast<float>(a.numel / a.C);
  f.sums = reduce ? (kSumG | (sum_d ? kSumD : 0) | (sum_i ? kSumI : 0)) : 0;
  f.bn = bn_params(a.mean, a.var, a.weight, a.weight_dtype, 0, DType::F32, a.eps);
  f.idbn = bn_params(a.id_mean, a.id_var, a.id_weight, a.id_weight_dtype, 0, DType::F32, a.id_eps);
  f.gw = reinterpret_cast<void*>(a.grad_weight);
  f.gb = reinterpret_cast<void*>(a.grad_bias);
  f.giw = reinterpret_cast<void*>(a.grad_id_weight);
  f.gib = reinterpret_cast<void*>(a.grad_id_bias);
  f.gwd = static_cast<int>(a.grad_weight_dtype);
  f.gbd = static_cast<int>(a.grad_bias_dtype);
  f.giwd = static_cast<int>(a.grad_id_weight_dtype);
  f.gibd = static_cast<int>(a.grad_id_bias_dtype);
  f.coef_y = gy;
  f.coef_id = gim == kIdBn;
  f.abk = reinterpret_cast<float*>(a.coef);
  f.id_abk = reinterpret_cast<float*>(a.id_coef);

  with_dtype(a.dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* go = reinterpret_cast<const T*>(a.grad_out);
    const T* o = reinterpret_cast<const T*>(a.out);
    const T* yy = reinterpret_cast<const T*>(a.y);
    const T* id = reinterpret_cast<const T*>(a.identity);
    if (reduce) {  // the reduce, and in its launch the finalize (its last-arriving blocks)
      with_vec<T>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        with_bool(plan.nhwc, [&](auto nc) {
          constexpr bool NHWC = decltype(nc)::value;
          with_bool(sum_d, [&](auto dc) {
            constexpr bool SD = decltype(dc)::value;
            with_bool(sum_i, [&](auto ic) {
              constexpr bool SI = decltype(ic)::value;
              with_bool(mb, [&](auto mc) {
                constexpr bool MB = decltype(mc)::value;
                bn_act_bwd_reduce_kernel<T, VEC, NHWC, SD, SI, MB><<<grid_of(plan, a.C), block_of(plan), 0, st>>>(
                    go, o, ob, yy, id, reinterpret_cast<const float*>(a.mean),
                    reinterpret_cast<const float*>(a.id_mean), ws, t, a.relu, f);
                check_launch("bn_act_bwd_reduce_kernel");
              });
            });
          });
        });
      });
    }
    if (any_sum && !reduce && a.C > 0) {  // an empty batch: no reduce, every sum 0
      bn_act_bwd_finalize_kernel<<<static_cast<unsigned>(ceil_div(a.C, 32)), kThreads, 0, st>>>(f);
      check_launch("bn_act_bwd_finalize_kernel");
    }
    if (gy || gim != kIdNone) {
      with_vec<T>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        with_bool(plan.nhwc, [&](auto nc) {
          constexpr bool NHWC = decltype(nc)::value;
          with_bool(gy, [&](auto yc) {
            constexpr bool GY = decltype(yc)::value;
            with_id_mode(gim, [&](auto ic) {
              constexpr int GIM = decltype(ic)::value;
              if constexpr (GY || GIM != kIdNone) {
                bn_act_bwd_apply_kernel<T, VEC, NHWC, GY, GIM><<<grid_of(plan, a.C), block_of(plan), 0, st>>>(
                    go, o, yy, id, reinterpret_cast<T*>(a.grad_y), reinterpret_cast<T*>(a.grad_identity), coef, t,
                    a.relu);
                check_launch("bn_act_bwd_apply_kernel");
              }
            });
          });
        });
      });
    }
  });
}

void bn_running_update(const BnRunningUpdateArgs& a) { bn_running_update_many({a}); }

void bn_running_update_many(const std::vector<BnRunningUpdateArgs>& list) {
  using namespace bnk;
  const char* fn = "bn_running_update";
  const RunningSlots s = running_slots(list, fn, false);
  if (s.n == 0) return;
  int64_t C_max = 0;
  for (int i = 0; i < s.n; ++i) C_max = std::max(C_max, s.C[i]);
  const int64_t blocks = std::max<int64_t>(1, ceil_div(C_max, kThreads));
  bn_running_update_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(list[0].stream)>>>(s);
  check_launch("bn_running_update_kernel");
}

namespace bnk {
// The checked slots of up to kBnRunningUpdateSlots updates (none: n = 0, allowed where `may_be_empty`).
RunningSlots running_slots(const std::vector<BnRunningUpdateArgs>& list, const char* fn, bool may_be_empty) {
  if ((list.empty() && !may_be_empty) || list.size() > static_cast<size_t>(kBnRunningUpdateSlots))
    throw ArgError(cat(fn, ": ", may_be_empty ? "running" : "args", " must hold ", may_be_empty ? 0 : 1, " to ",
                       kBnRunningUpdateSlots, " updates per launch, got ", list.size()));
  RunningSlots s{};
  for (size_t i = 0; i < list.size(); ++i) {
    const BnRunningUpdateArgs& a = list[i];
    if (a.stream != list[0].stream)
      throw ArgError(cat(fn, ": args[", i, "].stream differs from args[0].stream (one launch, one stream)"));
    check_nonneg(a.C, fn, "C");
    if (a.running_mean) check_ptr(a.mean, fn, "mean");
    if (a.running_var) check_ptr(a.var, fn, "var");
    check_param_dtype(a.running_mean_dtype, a.running_mean, fn, "running_mean");
    check_param_dtype(a.running_var_dtype, a.running_var, fn, "running_var");
    bar::check_aligned(a.mean, 4, fn, "mean", "float32");
    bar::check_aligned(a.var, 4, fn, "var", "float32");
    bar::check_aligned(a.running_mean, param_size(a.running_mean_dtype), fn, "running_mean",
                       dtype_name(a.running_mean_dtype));
    bar::check_aligned(a.running_var, param_size(a.running_var_dtype), fn, "running_var",
                       dtype_name(a.running_var_dtype));
    bar::check_aligned(a.num_batches_tracked, 8, fn, "num_batches_tracked", "int64");
    for (size_t j = 0; j < i; ++j) {
      const BnRunningUpdateArgs& b = list[j];
      for (std::uintptr_t p : {a.running_mean, a.running_var, a.num_batches_tracked})
        if (p != 0 && (p == b.running_mean || p == b.running_var || p == b.num_batches_tracked))
          throw ArgError(cat(fn, ": args[", i, "] updates a buffer of args[", j, "] (one launch updates each once)"));
    }
  }
  for (const BnRunningUpdateArgs& a : list) {
    if (a.num_batches_tracked == 0 && (a.C == 0 || (a.running_mean == 0 && a.running_var == 0))) continue;
    const int i = s.n++;
    s.mean[i] = reinterpret_cast<const float*>(a.mean);
    s.var[i] = reinterpret_cast<const float*>(a.var);
    s.running_mean[i] = reinterpret_cast<void*>(a.running_mean);
    s.running_var[i] = reinterpret_cast<void*>(a.running_var);
    s.num_batches_tracked[i] = reinterpret_cast<int64_t*>(a.num_batches_tracked);
    s.rmd[i] = static_cast<int>(a.running_mean_dtype);
    s.rvd[i] = static_cast<int>(a.running_var_dtype);
    // the reference's scalars: (1 - factor), factor and factor * unbias in double, then float32
    s.keep[i] = static_cast<float>(1.0 - a.factor);
    s.take[i] = static_cast<float>(a.factor);
    s.take_var[i] = static_cast<float>(a.factor * a.unbias);
    s.C[i] = a.C;
  }
  return s;
}
}  // namespace bnk

}  // namespace rk
