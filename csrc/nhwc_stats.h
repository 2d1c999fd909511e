// Per-channel mean and biased variance of a float32 (M, C) row-major matrix (a convolution's fp32
// output in NHWC order: M = N*OH*OW rows, C channels) ROUNDED (to nearest even) to `dtype` (the
// values a BatchNorm after a bf16/fp16 conv sees; float32: unchanged), deterministic (per-128-row
// tile (mean, M2) by the sm_90a epilogue's own arithmetic, csrc/col_stats_tile.cuh: exact two-pass
// per 16 rows, fixed-order Chan combines; the tiles combined in float64 in a fixed order), and
// optionally the rounded matrix into y. Torch-free.
//   yf        (M, C) float32, row-major, 4-byte aligned (may be 0 when M*C == 0)
//   y         (M, C) of dtype (float32/float16/bfloat16), row-major, or 0 (no copy)
//   mean, var (C,) float32 (M == 0: NaN)
//   workspace nhwc_stats_workspace_bytes(M, C) bytes, 4-byte aligned
// The sm_90a convolution (csrc/sm90/conv2d_sm90.cu) computes the tile partials in its epilogue and
// calls nhwc_stats_combine; nhwc_stats_forward is bound in _C for tests (the host runner runs it on
// the CPU: the CPU check of that epilogue's arithmetic).
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct NhwcStatsArgs {
  DType dtype;
  std::uintptr_t yf, y, mean, var, workspace;
  int64_t workspace_bytes;
  int64_t M, C;
  std::uintptr_t stream;
};

int64_t nhwc_stats_workspace_bytes(int64_t M, int64_t C);

// Validates every argument (ArgError naming it), then launches on a.stream.
void nhwc_stats_forward(const NhwcStatsArgs& a);

// The second half alone: per-channel mean and biased var from per-128-row-tile partials
// part_mean / part_m2 ((ceil(M / 128), C) float32 row-major; tile t holds min(128, M - 128 t) rows),
// combined in float64 in a fixed order (one launch). Used by the sm_90a convolution, whose epilogue
// writes these partials (csrc/sm90/col_stats_epilogue.hpp). M, C > 0; the pointers device memory.
void nhwc_stats_combine(const float* part_mean, const float* part_m2, int64_t M, int64_t C, float* mean, float* var,
                        std::uintptr_t stream);

}  // namespace rk
