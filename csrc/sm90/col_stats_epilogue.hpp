// An epilogue-visitor-tree node for the sm_90a training convolution (conv2d_sm90.cu, StatsConv<T>):
// passes its input through unchanged (the collective rounds it to T and stores it by TMA) and
// writes, per CTA tile (128 rows) and per output channel, the (mean, M2) of the tile's output
// values ROUNDED TO T (PyTorch's BatchNorm sees the rounded conv output) into two float32 (m_tiles,
// N) row-major arrays: the same per-tile partial layout nhwc_stats' combine kernel reads
// (csrc/nhwc_stats.h: nhwc_stats_combine, float64, fixed order). Why this node and not CUTLASS's
// Sm90RowReduction: csrc/sm90/README.md.
//
// Per 64 x 32 epilogue subtile (the collective's loop: epi_n outer, epi_m inner, both unrolled):
//   reduce():    each thread rounds its fp32 fragment to T (the collective's own converter, round to
//                nearest) and writes it to a 64 x 32 T scratch (row pitch 34) in this node's shared storage, at the
//                subtile coordinates of the collective's coordinate tensor (layout-agnostic);
//   tma_store(): called by the collective after its named barrier that publishes the subtile to
//                the TMA store (so the scratch writes are visible: no barrier of ours), every thread
//                runs rk::colstats::subtile_column_stats (csrc/col_stats_tile.cuh: exact two-pass per
//                16 rows, fixed butterfly combine), Chan-combines it into its running part of the
//                column (epi_m = 0, then 1), and after the last epi_m the lanes of row group 0 store
//                the tile's (mean, M2) of their column.
// The scratch is rewritten by the next subtile's reduce() only after the collective's second
// barrier in tma_store_fn (after producer_acquire), i.e. after every thread's reads of it here.
// Deterministic: fixed arithmetic order, no atomics; each (tile, channel) slot written by one thread.
#pragma once

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_conversion.h"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"

#include "../col_stats_tile.cuh"

namespace rk {
namespace sm90 {

using namespace cute;

template <class T, int EpiM, int EpiN>
struct Sm90ColStatsPartials {
  static_assert(EpiM == colstats::kSubRows && EpiN == colstats::kSubCols,
                "the statistics node is written for 64 x 32 epilogue subtiles (csrc/col_stats_tile.cuh)");

  // Row pitch EpiN + 2: the wgmma fragment's paired-column stores (8 rows per warp) and the
  // statistics' column reads (4 row groups 16 rows apart per warp) then spread over the banks
  // (with a pitch of 32 elements, both would hit 2 resp. 1 bank group: 4-way conflicts).
  static constexpr int kPitch = EpiN + 2;

  struct SharedStorage {
    alignas(16) T scratch[EpiM * kPitch];
  };

  struct Arguments {
    float* ptr_mean = nullptr;  // (ceil(M / 128), ld) float32: per-tile means
    float* ptr_m2 = nullptr;    // (ceil(M / 128), ld) float32: per-tile sums of squared deviations
    int ld = 0;                 // = N (Cout)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_mean != nullptr && args.ptr_m2 != nullptr && args.ld > 0;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE Sm90ColStatsPartials() {}
  CUTLASS_HOST_DEVICE Sm90ColStatsPartials(Params const& params, SharedStorage const& shared_storage)
      : params(params), scratch(const_cast<T*>(shared_storage.scratch)) {}

  Params params;
  T* scratch = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class ThrCoordTensor>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(ThrCoordTensor tCcD_, int off_m_, int off_n_, int rows_left_,
                                          int cols_left_, int m_tile_, int n0_, int thread_idx_, T* scratch_,
                                          Params const& params_)
        : tCcD(tCcD_), off_m(off_m_), off_n(off_n_), rows_left(rows_left_), cols_left(cols_left_),
          m_tile(m_tile_), n0(n0_), thread_idx(thread_idx_), scratch(scratch_), params(params_) {}

    ThrCoordTensor tCcD;  // (CPY, CPY_M, CPY_N, EPI_M, EPI_N): coordinates relative to the thread's first element
    int off_m, off_n;     // the thread's first element, relative to the CTA tile
    int rows_left;        // M - (first row of the tile)
    int cols_left;        // N - (first column of the tile)
    int m_tile, n0;       // tile row index, first column of the tile
    int thread_idx;
    T* scratch;
    Params const& params;
    colstats::Part run{0.f, 0.f, 0.f};

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementInput, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int, int,
                                                           int, cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      return frg_input;
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&&, SyncFn const&, int epi_m, int epi_n, bool, VTensor visit_results) {
      using Frg = typename decltype(visit_results)::value_type;  // Array<float, FragmentSize>
      using ElementIn = typename Frg::Element;
      constexpr int kFrg = Frg::kElements;
      cutlass::NumericConverter<T, ElementIn, cutlass::FloatRoundStyle::round_to_nearest> to_t{};
      Tensor crd = tCcD(_, _, _, epi_m, epi_n);
      const int base_m = off_m - epi_m * EpiM, base_n = off_n - epi_n * EpiN;
      CUTLASS_PRAGMA_UNROLL
      for (int v = 0; v < size(visit_results); ++v) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kFrg; ++i) {
          auto c = crd(v * kFrg + i);
          const int r = int(get<0>(c)) + base_m, col = int(get<1>(c)) + base_n;
          scratch[r * kPitch + col] = to_t(visit_results(v)[i]);
        }
      }
    }

    CUTLASS_DEVICE void tma_store(int epi_m, int epi_n, int, bool) {
      const T* s = scratch;
      auto load = [s](int r, int c) { return static_cast<float>(s[r * kPitch + c]); };
      const colstats::Part p = colstats::subtile_column_stats(load, thread_idx, rows_left - epi_m * EpiM);
      if (epi_m == 0)
        run = p;
      else
        colstats::combine(run, p);
      constexpr int kEpiTilesM = colstats::kTileRows / EpiM;
      if (epi_m == kEpiTilesM - 1 && (thread_idx & 31) < 8) {
        const int col = epi_n * EpiN + colstats::thread_col(thread_idx);
        if (col < cols_left) {
          const long long o = static_cast<long long>(m_tile) * params.ld + n0 + col;
          params.ptr_mean[o] = run.mean;
          params.ptr_m2[o] = run.m2;
        }
      }
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    static_assert(size<0>(decltype(args.epi_tile){}) == EpiM && size<1>(decltype(args.epi_tile){}) == EpiN,
                  "epilogue subtile must be EpiM x EpiN");
    static_assert(size<0>(decltype(args.tile_shape_mnk){}) == colstats::kTileRows, "CTA tile must have 128 rows");
    static_assert(decltype(size(args.tiled_copy))::value == colstats::kThreads, "one consumer warpgroup");
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    const int tile_m = int(size<0>(args.tile_shape_mnk)), tile_n = int(size<1>(args.tile_shape_mnk));
    // residue_cD = (M, N) - (tile origin); residue_tCcD = (M, N) - (thread's first element)
    const int rows_left = int(get<0>(args.residue_cD)), cols_left = int(get<1>(args.residue_cD));
    const int off_m = rows_left - int(get<0>(args.residue_tCcD));
    const int off_n = cols_left - int(get<1>(args.residue_tCcD));
    (void)M; (void)N; (void)K; (void)L; (void)k; (void)l; (void)tile_m;
    return ConsumerStoreCallbacks<decltype(args.tCcD)>(args.tCcD, off_m, off_n, rows_left, cols_left, int(m),
                                                       int(n) * tile_n, args.thread_idx, scratch, params);
  }
};

}  // namespace sm90
}  // namespace rk
