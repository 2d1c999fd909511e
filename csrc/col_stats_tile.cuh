// Per-column (count, mean, M2) of a 64 x 32 subtile held in shared memory, by 128 threads: the
// arithmetic of the sm_90a training convolution's epilogue (csrc/sm90/col_stats_epilogue.hpp, which
// calls it once per 64 x 32 epilogue subtile on the subtile's values rounded to the output dtype)
// and of nhwc_tile_stats_kernel (csrc/nhwc_stats.cu, the same function on the same rounded values,
// so the host runner runs this exact code on the CPU). No CUTLASS, no torch.
//
// Thread t (0..127) owns column 8 * (t / 32) + t % 8 and the 16 contiguous rows 16 * g .. 16 * g + 15,
// g = (t % 32) / 8: an exact two-pass over its (at most 16) valid rows in float32 (the deviations are
// taken from the 16-row mean, so no sum-of-squares cancellation at any |mean| / std), then the four
// row groups of a column (lanes l, l ^ 8, l ^ 16, l ^ 24 of one warp) are combined by two butterfly
// shuffles with Chan's formula, always as combine(lower rows, higher rows), so every lane of the
// four ends with the same bits: ((g0 + g1) + (g2 + g3)). Deterministic: fixed order, no atomics.
#pragma once

#include "conv2d_layout.h"  // rk::conv::chan_combine, RK_HD

namespace rk {
namespace colstats {

constexpr int kSubRows = 64;     // epilogue subtile rows (CUTLASS's EpilogueTileAuto for a 128x128 tile, 16-bit out)
constexpr int kSubCols = 32;     // epilogue subtile columns
constexpr int kThreads = 128;    // one consumer warpgroup
constexpr int kGroupRows = 16;   // rows per thread
constexpr int kTileRows = 128;   // CTA tile rows: two subtiles per tile partial

struct Part {
  float n, mean, m2;
};

// The column (0..31) and first row (0, 16, 32, 48) thread t reduces.
RK_HD int thread_col(int t) { return 8 * (t >> 5) + (t & 7); }
RK_HD int thread_row0(int t) { return kGroupRows * ((t & 31) >> 3); }

// combine(a = the lower rows, b = the higher rows), in place into a
RK_HD void combine(Part& a, const Part& b) { conv::chan_combine(a.n, a.mean, a.m2, b.n, b.mean, b.m2); }

// Exact two-pass statistics of the valid rows (row < rows_valid) among the thread's 16; load(r, c)
// returns the subtile's value at (r, c) as float (already rounded to the output dtype).
template <typename Load>
RK_HD Part thread_two_pass(const Load& load, int t, int rows_valid) {
  const int c = thread_col(t), r0 = thread_row0(t);
  Part p{0.f, 0.f, 0.f};
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kGroupRows; ++i)
    if (r0 + i < rows_valid) {
      sum += load(r0 + i, c);
      p.n += 1.f;
    }
  if (p.n == 0.f) return p;
  p.mean = sum / p.n;
#pragma unroll
  for (int i = 0; i < kGroupRows; ++i)
    if (r0 + i < rows_valid) {
      const float d = load(r0 + i, c) - p.mean;
      p.m2 += d * d;
    }
  return p;
}

// One butterfly step: lanes l and l ^ mask exchange their parts; the one with the lower rows (mask
// bit clear) is always the left operand, so both lanes compute bit-identical results.
__device__ __forceinline__ void butterfly(Part& p, int lane, int mask) {
  Part o;
  o.n = __shfl_xor_sync(0xffffffffu, p.n, mask);
  o.mean = __shfl_xor_sync(0xffffffffu, p.mean, mask);
  o.m2 = __shfl_xor_sync(0xffffffffu, p.m2, mask);
  if (lane & mask) {
    Part lo = o;
    combine(lo, p);
    p = lo;
  } else {
    combine(p, o);
  }
}

// The column statistics of one subtile: every thread of the 128 must call it (warp shuffles); the
// result is the same in the four lanes of a column. rows_valid: rows of the subtile inside the
// problem (may be <= 0: then n = 0).
template <typename Load>
__device__ __forceinline__ Part subtile_column_stats(const Load& load, int t, int rows_valid) {
  Part p = thread_two_pass(load, t, rows_valid);
  const int lane = t & 31;
  butterfly(p, lane, 8);
  butterfly(p, lane, 16);
  return p;
}

}  // namespace colstats
}  // namespace rk
