// Internal helpers shared by the fused residual epilogue kernels (bn_add_relu.cu: forward and
// argument checks; bn_add_relu_backward.cu: backward). Not part of the public API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "acc_types.cuh"
#include "bn_add_relu.h"
#include "common.h"

namespace rk {
namespace bar {  // bn_add_relu internals

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks

// Element types (acc_types.cuh), also under bar:: for its users
using rk::AccOf;
using rk::acc_t;
using rk::from_acc;
using rk::to_acc;

// Products rounded on their own (no FMA contraction), so the elementwise results round exactly
// like the reference's separate multiply and add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// VEC consecutive elements moved as one 16-byte (or sizeof(T)) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int64_t vi) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[vi];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t vi, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[vi] = v;
}

// Division by a loop-invariant 64-bit divisor without the (slow, stack-using) 64-bit division
// subroutine: q = n / d = (t + ((n - t) >> 1)) >> (l - 1), t = mulhi(m, n), where
// l = ceil(log2 d) and m = floor(2^64 * (2^l - d) / d) + 1 (Granlund & Montgomery, round-up
// variant; exact for every n < 2^64 and d >= 2). d == 1 is special-cased (l = 0).
struct FastDivU64 {
  uint64_t d = 1, m = 0;
  int shift = 0;  // l - 1, or -1 for d == 1

  FastDivU64() = default;
  explicit FastDivU64(uint64_t divisor) : d(divisor) {
    if (d <= 1) {
      d = 1;
      shift = -1;
      return;
    }
    int l = 0;
    while (l < 64 && (uint64_t(1) << l) < d) ++l;  // 2^(l-1) < d <= 2^l
    const unsigned __int128 two_l = static_cast<unsigned __int128>(1) << l;
    const unsigned __int128 num = (two_l - d) << 64;
    m = static_cast<uint64_t>(num / d) + 1;
    shift = l - 1;
  }
#if defined(__CUDACC__)
  __host__ __device__ __forceinline__ uint64_t div(uint64_t n) const {
    if (shift < 0) return n;
#if defined(__CUDA_ARCH__)
    const uint64_t t = __umul64hi(m, n);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(m) * n) >> 64);
#endif
    return (t + ((n - t) >> 1)) >> shift;
  }
#else
  uint64_t div(uint64_t n) const {
    if (shift < 0) return n;
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(m) * n) >> 64);
    return (t + ((n - t) >> 1)) >> shift;
  }
#endif
};

// Forward iteration space: flat vectors v in [0, nvec), grid-stride `stride`. The channel group of
// v is (v / inner_v) % Cg; a thread computes it once (start) and then advances it by the stride
// without dividing (advance). Shared by the kernel and the host-side index check.
struct FwdGeom {
  int64_t nvec = 0, inner_v = 1, Cg = 1, stride = 1, step_q = 0, step_c = 0;
  FastDivU64 div_inner, div_cg;

  FwdGeom() = default;
  FwdGeom(int64_t nvec_, int64_t inner_v_, int64_t Cg_, int64_t stride_)
      : nvec(nvec_), inner_v(inner_v_), Cg(Cg_), stride(stride_), step_q(stride_ % inner_v_),
        step_c((stride_ / inner_v_) % Cg_), div_inner(static_cast<uint64_t>(inner_v_)),
        div_cg(static_cast<uint64_t>(Cg_)) {}

  // q: position of v inside its run of inner_v vectors sharing a channel group; c: the group.
  __host__ __device__ __forceinline__ void start(int64_t v, int64_t& q, int64_t& c) const {
    const int64_t run = static_cast<int64_t>(div_inner.div(static_cast<uint64_t>(v)));
    q = v - run * inner_v;
    c = run - static_cast<int64_t>(div_cg.div(static_cast<uint64_t>(run))) * Cg;
  }
  // (q, c) of v + stride from those of v: step_q = stride % inner_v, step_c = (stride / inner_v) % Cg.
  __host__ __device__ __forceinline__ void advance(int64_t& q, int64_t& c) const {
    q += step_q;
    c += step_c;
    if (q >= inner_v) {
      q -= inner_v;
      ++c;
    }
    if (c >= Cg) c -= Cg;
  }
};

// Elements per 16-byte vector.
template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------
inline int64_t elem_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F64: return 8;
  }
  return 0;
}
inline int64_t acc_size(DType d) { return d == DType::F64 ? 8 : 4; }
inline int64_t vec_width(DType d) { return 16 / elem_size(d); }

inline bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

inline void check_aligned(std::uintptr_t p, int64_t bytes, const char* fn, const char* arg, const char* what) {
  if (p != 0 && p % static_cast<std::uintptr_t>(bytes) != 0)
    throw ArgError(cat(fn, ": ", arg, " (0x", std::hex, p, std::dec, ") is not aligned to ", bytes,
                       " bytes, the size of its element type ", what));
}

// Geometry checks shared by forward, backward and the workspace query. Returns false when
// numel == 0 (nothing to launch).
inline bool check_geometry(const char* fn, int64_t numel, int64_t C, int64_t inner) {
  check_nonneg(numel, fn, "numel");
  if (numel == 0) return false;
  check_positive(C, fn, "C");
  check_positive(inner, fn, "inner");
  if (C > INT32_MAX) throw ArgError(cat(fn, ": C must be < 2^31, got ", C));
  if (inner > numel || C > numel || inner > numel / C)
    throw ArgError(cat(fn, ": C*inner (", C, "*", inner, ") exceeds numel (", numel, ")"));
  if (numel % (C * inner) != 0)
    throw ArgError(cat(fn, ": numel (", numel, ") must be a multiple of C*inner (", C, "*", inner, "=", C * inner,
                       "): the layout is N x C x inner (NCHW: inner = H*W) or N*H*W x C (channels_last: inner = 1)"));
  return true;
}

int sm_count();  // multiprocessors of the current device (cached per device)

// ---------------------------------------------------------------------------------------------
// Backward plan (shared by the workspace query and the launch, so both agree exactly).
// Partial sums live in the workspace as Acc[3][P][C]: sum index (0: g, 1: g*x, 2: g*identity),
// partial index p, channel; a second kernel reduces each channel over p in a fixed order.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBwdTargetBlocks = 1024;  // about one full wave on A100/H100 (fixed: results do
                                            // not depend on the device's SM count)
constexpr int64_t kBwdMaxPartials = 1024;   // P cap: bounds the workspace and the second pass
constexpr int64_t kBwdMinIters = 8;         // vectors per thread before splitting further
constexpr int64_t kMaxGridY = 65535;

struct BwdPlan {
  bool nhwc = false;  // inner == 1 tiling, else NCHW plane tiling
  int vec = 1;
  // channels_last: block = bx (vector columns) x by (rows); grid = (P row slabs, col_tiles)
  int bx = 0, by = 0;
  int64_t col_tiles = 0;
  // NCHW: grid = C * P blocks; block (c, p) covers per-channel vectors [p*L, min(T, (p+1)*L))
  int64_t inner_v = 0, per_c = 0, L = 0, step_n = 0, step_q = 0;
  int64_t P = 1;
  int64_t rows = 0;  // channels_last: numel / C

  int64_t workspace_bytes(int64_t C, int64_t acc_bytes) const { return 3 * P * C * acc_bytes; }
};

// NCHW backward iteration space (device side of BwdPlan). Block b handles channel c = b / P and
// the vectors [j0, j1) of that channel, j = n * inner_v + q; threads stride by kThreads.
struct NchwGeom {
  int64_t C = 1, inner_v = 1, per_c = 0, L = 0, P = 1, step_n = 0, step_q = 0;
  FastDivU64 div_inner;

  __host__ __device__ __forceinline__ void block_range(uint32_t b, int64_t& c, int64_t& p, int64_t& j0,
                                                        int64_t& j1) const {
    const uint32_t P32 = static_cast<uint32_t>(P);  // P <= kBwdMaxPartials
    const uint32_t c32 = b / P32;
    c = c32;
    p = b - c32 * P32;
    j0 = p * L;
    j1 = j0 + L < per_c ? j0 + L : per_c;
  }
  __host__ __device__ __forceinline__ void start(int64_t j, int64_t& n, int64_t& q) const {
    n = static_cast<int64_t>(div_inner.div(static_cast<uint64_t>(j)));
    q = j - n * inner_v;
  }
  // (n, q) of j + kThreads: step_n = kThreads / inner_v, step_q = kThreads % inner_v
  __host__ __device__ __forceinline__ void advance(int64_t& n, int64_t& q) const {
    q += step_q;
    n += step_n;
    if (q >= inner_v) {
      q -= inner_v;
      ++n;
    }
  }
  // flat vector index of (n, c, q)
  __host__ __device__ __forceinline__ int64_t vector_index(int64_t n, int64_t c, int64_t q) const {
    return (n * C + c) * inner_v + q;
  }
};

inline NchwGeom nchw_geom(const BwdPlan& p, int64_t C) {
  NchwGeom g;
  g.C = C;
  g.inner_v = p.inner_v;
  g.per_c = p.per_c;
  g.L = p.L;
  g.P = p.P;
  g.step_n = p.step_n;
  g.step_q = p.step_q;
  g.div_inner = FastDivU64(static_cast<uint64_t>(p.inner_v));
  return g;
}

inline BwdPlan make_bwd_plan(int64_t numel, int64_t C, int64_t inner, int vec, const char* fn) {
  BwdPlan p;
  p.vec = vec;
  if (inner == 1) {
    p.nhwc = true;
    const int64_t Cv = C / vec;
    p.rows = numel / C;
    p.bx = static_cast<int>(Cv <= 64 ? Cv : 32);
    p.by = kThreads / p.bx;
    p.col_tiles = ceil_div(Cv, p.bx);
    if (p.col_tiles > kMaxGridY)
      throw ArgError(cat(fn, ": C=", C, " is too large for the channels_last backward tiling (at most ",
                         kMaxGridY * 32 * vec, " channels)"));
    const int64_t by_work = ceil_div(p.rows, static_cast<int64_t>(p.by) * kBwdMinIters);
    const int64_t by_target = ceil_div(kBwdTargetBlocks, p.col_tiles);
    p.P = std::max<int64_t>(1, std::min(std::min(by_work, by_target), kBwdMaxPartials));
  } else {
    p.nhwc = false;
    p.inner_v = inner / vec;
    const int64_t N = numel / (C * inner);
    p.per_c = N * p.inner_v;
    const int64_t by_work = ceil_div(p.per_c, kThreads * kBwdMinIters);
    const int64_t by_target = ceil_div(kBwdTargetBlocks, C);
    p.P = std::max<int64_t>(1, std::min(std::min(by_work, by_target), kBwdMaxPartials));
    if (C * p.P > INT32_MAX) throw ArgError(cat(fn, ": C=", C, " is too large for the NCHW backward grid"));
    p.L = ceil_div(p.per_c, p.P);
    p.step_n = kThreads / p.inner_v;
    p.step_q = kThreads % p.inner_v;
  }
  return p;
}

// Vector widths (elements) the kernels are instantiated for: 16-byte accesses, plus 8-byte ones
// for 16-bit types (e.g. NCHW 14x14 planes: 196 % 8 != 0 but 196 % 4 == 0), plus scalar.
inline int half_vec_width(DType d) { return elem_size(d) == 2 ? static_cast<int>(vec_width(d) / 2) : 0; }

// Whether a vector of v elements never straddles a channel boundary (channels_last: a vector is
// v consecutive channels; NCHW: v consecutive elements of one (n, c) plane).
inline bool run_allows(int64_t C, int64_t inner, int64_t v) { return inner == 1 ? C % v == 0 : inner % v == 0; }

// Widest vector the geometry allows when every activation pointer is aligned to its size.
// ptr_ok(bytes) says whether all activation pointers are aligned to `bytes`.
template <typename PtrOk>
int pick_vec(DType d, int64_t C, int64_t inner, PtrOk&& ptr_ok) {
  const int64_t es = elem_size(d);
  const int64_t v = vec_width(d), h = half_vec_width(d);
  if (run_allows(C, inner, v) && ptr_ok(v * es)) return static_cast<int>(v);
  if (h > 1 && run_allows(C, inner, h) && ptr_ok(h * es)) return static_cast<int>(h);
  return 1;
}

// Calls fn(std::integral_constant<int, F>{}) for the F in Is... equal to v.
template <typename Fn, int... Is>
bool dispatch_int(int v, Fn&& fn, std::integer_sequence<int, Is...>) {
  return ((v == Is ? (fn(std::integral_constant<int, Is>{}), true) : false) || ...);
}

// ---------------------------------------------------------------------------------------------
// Block reductions of the first (partial-sum) pass, shared by bn_add_relu_backward.cu and
// batch_norm.cu. Fixed order: the results depend only on the launch shape.
// ---------------------------------------------------------------------------------------------
// Column sums of a block's (by x bx*VEC) register tile, written as partial p = blockIdx.x.
template <typename Acc, int VEC>
__device__ __forceinline__ void nhwc_block_partial(const Acc (&acc)[VEC], Acc* red, int bx, int by, int64_t C,
                                                   Acc* __restrict__ ws_s) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) red[threadIdx.x * VEC + k] = acc[k];  // [ty][tx][k] = [ty][col]
  __syncthreads();
  const int width = bx * VEC;
  for (int col = threadIdx.x; col < width; col += blockDim.x) {
    Acc t = Acc(0);
    for (int y = 0; y < by; ++y) t += red[y * width + col];
    const int64_t ch = static_cast<int64_t>(blockIdx.y) * width + col;
    if (ch < C) ws_s[static_cast<int64_t>(blockIdx.x) * C + ch] = t;
  }
  __syncthreads();
}

// Sum over the block in a fixed order (shuffle tree, then warps in order); result on thread 0.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  Acc t = Acc(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) t += sm[w];
  }
  __syncthreads();
  return t;
}

}  // namespace bar
}  // namespace rk
