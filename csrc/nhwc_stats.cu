// Deterministic per-channel batch statistics of an fp32 (M, C) row-major matrix (NHWC, so channels
// are columns) rounded to the output dtype, fused with that rounding; and the combine of per-tile
// partials that the sm_90a training convolution's epilogue writes (csrc/sm90/col_stats_epilogue.hpp).
// No CUTLASS here: plain CUDA, two kernels, built for every architecture (so the host runner and
// any GPU can test them). API: nhwc_stats.h.
//
//   nhwc_tile_stats_kernel: one block of 128 threads per (128-row tile, 32 channels): the tile is
//     two 64 x 32 subtiles; each is rounded to T (written to y) into shared memory and reduced by
//     rk::colstats::subtile_column_stats (csrc/col_stats_tile.cuh): the very function, order and
//     rounding of the sm_90a epilogue, so this kernel on the host runner is the CPU model of that
//     epilogue's arithmetic; the two subtiles are Chan-combined (first, second); the block writes the
//     tile's (mean, M2) partial of the ROUNDED values (what a BatchNorm after the conv sees).
//   nhwc_stats_finalize_kernel: one block per channel combines the tile partials in a
//     fixed order (strided runs per thread, then a fixed binary tree), in float64.
// No atomics anywhere: the result depends only on the data and the shapes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "col_stats_tile.cuh"  // rk::colstats (and rk::conv::chan_combine)
#include "nhwc_stats.h"

namespace rk {
namespace nhwc_stats {
namespace {

constexpr int kStatRows = colstats::kTileRows;    // rows per tile partial (the sm_90a CTA tile)
constexpr int kStatCols = colstats::kSubCols;     // channels per block
constexpr int kStatThreads = colstats::kThreads;  // 128
constexpr int kStatFinThreads = 256;

template <typename T>
__device__ __forceinline__ T stat_from_f(float v);
template <>
__device__ __forceinline__ float stat_from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half stat_from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 stat_from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float stat_to_f(float v) { return v; }
__device__ __forceinline__ float stat_to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float stat_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// yf: (M, C) float32 row-major; y: (M, C) of T row-major (channels_last output) or nullptr; part_mean /
// part_m2: (m_tiles, C) float32. grid = (m_tiles, ceil(C / 32)), block = 128.
template <typename T>
__global__ void __launch_bounds__(kStatThreads)
    nhwc_tile_stats_kernel(const float* __restrict__ yf, T* __restrict__ y, float* __restrict__ part_mean,
                           float* __restrict__ part_m2, int M, int C) {
  constexpr int R = colstats::kSubRows, W = colstats::kSubCols;
  __shared__ float sub[R * W];
  const int t = threadIdx.x;
  const int c0 = blockIdx.y * W;
  const int m0 = blockIdx.x * kStatRows;
  colstats::Part run{0.f, 0.f, 0.f};
  for (int h = 0; h < kStatRows / R; ++h) {
    const int mh = m0 + h * R;
    // load + round the 64 x 32 subtile (one 128-byte row segment per warp and step); zeros outside
#pragma unroll 4
    for (int j = 0; j < R * W / kStatThreads; ++j) {
      const int idx = t + j * kStatThreads, r = idx / W, c = idx % W;
      float v = 0.f;
      if (mh + r < M && c0 + c < C) {
        const long long o = static_cast<long long>(mh + r) * C + c0 + c;
        const T q = stat_from_f<T>(yf[o]);
        if (y != nullptr) y[o] = q;
        v = stat_to_f(q);
      }
      sub[idx] = v;
    }
    __syncthreads();
    const float* s = sub;
    auto load = [s](int r, int c) { return s[r * W + c]; };
    const colstats::Part p = colstats::subtile_column_stats(load, t, M - mh);
    if (h == 0)
      run = p;
    else
      colstats::combine(run, p);
    __syncthreads();  // the subtile is rewritten by the next h
  }
  const int c = c0 + colstats::thread_col(t);
  if ((t & 31) < 8 && c < C) {
    const long long o = static_cast<long long>(blockIdx.x) * C + c;
    part_mean[o] = run.mean;
    part_m2[o] = run.m2;
  }
}

// One block per channel: the m_tiles partials of channel c (tile t holds min(128, M - 128 t) rows)
// combined in float64, in a fixed order; writes mean[c] and the biased var[c].
__global__ void __launch_bounds__(kStatFinThreads)
    nhwc_stats_finalize_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                                      int m_tiles, int M, int C, float* __restrict__ mean, float* __restrict__ var) {
  const int c = blockIdx.x;
  const int tid = threadIdx.x;
  double n = 0.0, mu = 0.0, m2 = 0.0;
  for (int t = tid; t < m_tiles; t += kStatFinThreads) {
    const long long o = static_cast<long long>(t) * C + c;
    const int rows = M - t * kStatRows < kStatRows ? M - t * kStatRows : kStatRows;
    conv::chan_combine(n, mu, m2, static_cast<double>(rows), static_cast<double>(part_mean[o]),
                       static_cast<double>(part_m2[o]));
  }
  __shared__ double s_n[kStatFinThreads], s_mu[kStatFinThreads], s_m2[kStatFinThreads];
  s_n[tid] = n;
  s_mu[tid] = mu;
  s_m2[tid] = m2;
  __syncthreads();
  for (int half = kStatFinThreads / 2; half > 0; half >>= 1) {
    if (tid < half) {
      double na = s_n[tid], ma = s_mu[tid], qa = s_m2[tid];
      conv::chan_combine(na, ma, qa, s_n[tid + half], s_mu[tid + half], s_m2[tid + half]);
      s_n[tid] = na;
      s_mu[tid] = ma;
      s_m2[tid] = qa;
    }
    __syncthreads();
  }
  if (tid == 0) {
    mean[c] = static_cast<float>(s_mu[0]);
    var[c] = static_cast<float>(s_m2[0] / s_n[0]);
  }
}

template <typename T>
void launch(const NhwcStatsArgs& a, float* pm, float* pq, int tiles, cudaStream_t stream) {
  const int M = static_cast<int>(a.M), C = static_cast<int>(a.C);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(C, kStatCols)));
  nhwc_tile_stats_kernel<T><<<grid, kStatThreads, 0, stream>>>(reinterpret_cast<const float*>(a.yf),
                                                               reinterpret_cast<T*>(a.y), pm, pq, M, C);
  check_launch("nhwc_stats_forward: nhwc_tile_stats_kernel");
}

}  // namespace
}  // namespace nhwc_stats

int64_t nhwc_stats_workspace_bytes(int64_t M, int64_t C) {
  check_nonneg(M, "nhwc_stats_workspace_bytes", "M");
  check_nonneg(C, "nhwc_stats_workspace_bytes", "C");
  return 2 * ceil_div(M, nhwc_stats::kStatRows) * C * static_cast<int64_t>(sizeof(float));
}

void nhwc_stats_forward(const NhwcStatsArgs& a) {
  using namespace nhwc_stats;
  const char* fn = "nhwc_stats_forward";
  if (a.dtype == DType::F64) throw ArgError(cat(fn, ": dtype float64 is not supported (y is float32/16/bf16)"));
  check_nonneg(a.M, fn, "M");
  check_nonneg(a.C, fn, "C");
  if (a.M * a.C > 2147483647LL || a.M > 2147483647LL)
    throw ArgError(cat(fn, ": M*C = ", a.M * a.C, " exceeds the 32-bit range of the kernels"));
  check_ptr(a.mean, fn, "mean");
  check_ptr(a.var, fn, "var");
  const int64_t need = nhwc_stats_workspace_bytes(a.M, a.C);
  if (a.M * a.C > 0) {
    check_ptr(a.yf, fn, "yf");
    check_ptr(a.workspace, fn, "workspace");
  }
  if (a.workspace_bytes < need) throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", need, " required"));
  const int64_t eb = a.dtype == DType::F32 ? 4 : 2;
  if (a.yf % 4 || a.mean % 4 || a.var % 4 || a.workspace % 4 || a.y % eb)
    throw ArgError(cat(fn, ": yf, mean, var, workspace must be 4-byte aligned and y ", eb, "-byte aligned"));
  cudaStream_t stream = as_stream(a.stream);
  if (a.C == 0) return;
  if (a.M == 0) {  // statistics of an empty set: NaN, like torch.var_mean
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.mean), 0xFF, a.C * sizeof(float), stream), fn);
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.var), 0xFF, a.C * sizeof(float), stream), fn);
    return;
  }
  const int tiles = static_cast<int>(ceil_div(a.M, kStatRows));
  float* pm = reinterpret_cast<float*>(a.workspace);
  float* pq = pm + static_cast<int64_t>(tiles) * a.C;
  switch (a.dtype) {
    case DType::F32: launch<float>(a, pm, pq, tiles, stream); break;
    case DType::F16: launch<__half>(a, pm, pq, tiles, stream); break;
    case DType::BF16: launch<__nv_bfloat16>(a, pm, pq, tiles, stream); break;
    case DType::F64: break;
  }
  nhwc_stats_combine(pm, pq, a.M, a.C, reinterpret_cast<float*>(a.mean), reinterpret_cast<float*>(a.var), a.stream);
}

void nhwc_stats_combine(const float* part_mean, const float* part_m2, int64_t M, int64_t C, float* mean, float* var,
                        std::uintptr_t stream) {
  using namespace nhwc_stats;
  if (M <= 0 || C <= 0 || M > 2147483647LL || M * C > 2147483647LL)
    throw ArgError(cat("nhwc_stats_combine: M = ", M, ", C = ", C, " must be positive with M*C < 2^31"));
  const int tiles = static_cast<int>(ceil_div(M, kStatRows));
  nhwc_stats_finalize_kernel<<<static_cast<unsigned>(C), kStatFinThreads, 0, as_stream(stream)>>>(
      part_mean, part_m2, tiles, static_cast<int>(M), static_cast<int>(C), mean, var);
  check_launch("nhwc_stats_combine: nhwc_stats_finalize_kernel");
}

}  // namespace rk
