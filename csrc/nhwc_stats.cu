// Deterministic per-channel batch statistics of an fp32 (M, C) row-major matrix (the fp32 output
// of the sm_90a convolution, csrc/sm90/conv2d_sm90.cu: NHWC, so channels are columns), fused with
// its rounding to the output dtype. No CUTLASS here: plain CUDA, two kernels, built for every
// architecture (so the host runner and any GPU can test it). API: nhwc_stats.h.
//
//   nhwc_tile_stats_kernel: one block per (128-row tile, 32 channels); every thread takes the
//     exact two-pass (mean, M2) of 16 rows of one channel (reading them twice); the 8 row
//     groups of a channel are combined in a fixed order (Chan's formula); the block writes the
//     tile's (mean, M2) partial and y rounded to T.
//   nhwc_stats_finalize_kernel: one block per channel combines the tile partials in a
//     fixed order (strided runs per thread, then a fixed binary tree), in float64.
// No atomics anywhere: the result depends only on the data and the shapes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "conv2d_layout.h"  // rk::conv::chan_combine
#include "nhwc_stats.h"

namespace rk {
namespace nhwc_stats {
namespace {

constexpr int kStatRows = 128;             // rows per tile partial
constexpr int kStatCols = 32;              // channels per block (one warp row, 128-byte loads)
constexpr int kStatGroups = 8;             // row groups per block (warps)
constexpr int kStatPerThread = kStatRows / kStatGroups;  // 16 rows per thread
constexpr int kStatThreads = kStatCols * kStatGroups;   // 256
constexpr int kStatFinThreads = 256;

template <typename T>
__device__ __forceinline__ T stat_from_f(float v);
template <>
__device__ __forceinline__ float stat_from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half stat_from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 stat_from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// yf: (M, C) float32 row-major; y: (M, C) of T row-major (channels_last output) or nullptr; part_mean /
// part_m2: (m_tiles, C) float32. grid = (m_tiles, ceil(C / 32)), block = 256.
template <typename T>
__global__ void __launch_bounds__(kStatThreads)
    nhwc_tile_stats_kernel(const float* __restrict__ yf, T* __restrict__ y, float* __restrict__ part_mean,
                                  float* __restrict__ part_m2, int M, int C) {
  const int tx = threadIdx.x % kStatCols;
  const int ty = threadIdx.x / kStatCols;
  const int c = blockIdx.y * kStatCols + tx;
  const int m0 = blockIdx.x * kStatRows;
  const bool col_ok = c < C;
  // pass 1: round to T, store, sum; pass 2: the squared deviations from this thread's mean
  // (the same 16 values read again, from L1/L2: no register array, no local memory)
  int n = 0;
  float sum = 0.f;
#pragma unroll 4
  for (int i = 0; i < kStatPerThread; ++i) {
    const int m = m0 + ty + i * kStatGroups;
    if (col_ok && m < M) {
      const long long o = static_cast<long long>(m) * C + c;
      const float v = yf[o];
      if (y != nullptr) y[o] = stat_from_f<T>(v);
      sum += v;
      ++n;
    }
  }
  const float mean = n > 0 ? sum / static_cast<float>(n) : 0.f;
  float m2 = 0.f;
#pragma unroll 4
  for (int i = 0; i < kStatPerThread; ++i) {
    const int m = m0 + ty + i * kStatGroups;
    if (col_ok && m < M) {
      const float d = yf[static_cast<long long>(m) * C + c] - mean;
      m2 += d * d;
    }
  }
  __shared__ float s_n[kStatGroups][kStatCols], s_mean[kStatGroups][kStatCols], s_m2[kStatGroups][kStatCols];
  s_n[ty][tx] = static_cast<float>(n);
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && col_ok) {
    float na = s_n[0][tx], ma = s_mean[0][tx], qa = s_m2[0][tx];
    for (int g = 1; g < kStatGroups; ++g) conv::chan_combine(na, ma, qa, s_n[g][tx], s_mean[g][tx], s_m2[g][tx]);
    const long long o = static_cast<long long>(blockIdx.x) * C + c;
    part_mean[o] = ma;
    part_m2[o] = qa;
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
  nhwc_stats_finalize_kernel<<<static_cast<unsigned>(a.C), kStatFinThreads, 0, stream>>>(
      pm, pq, tiles, static_cast<int>(a.M), static_cast<int>(a.C), reinterpret_cast<float*>(a.mean),
      reinterpret_cast<float*>(a.var));
  check_launch("nhwc_stats_forward: nhwc_stats_finalize_kernel");
}

}  // namespace rk
