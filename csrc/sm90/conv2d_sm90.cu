// sm_90a (Hopper) implicit-GEMM convolution built from CUTLASS 3.x collectives: TMA im2col loads
// of the NHWC activations, TMA loads of the KRSC filter, wgmma (HGMMA) with fp32 accumulators,
// a warp-specialized producer/consumer pipeline and a TMA-store epilogue. Compiled only for
// sm_90a (-gencode arch=compute_90a,code=sm_90a), only when the CUTLASS headers were found at
// build time (CMakeLists.txt, setup.py); csrc/sm90/README.md has the details.
//
// Two kernels per dtype (bf16, fp16, and float32 computed in TF32 when the caller allows TF32),
// CTA tile 128x128 by 128 bytes of K (64 16-bit or 32 float elements), cluster 1x1x1:
//   * FusedConv<T>: out = act(conv(x, w) * scale[k] + bias[k] + residual), one kernel. The
//     epilogue is CUTLASS's epilogue-visitor tree PerColLinCombPerColBiasEltAct: alpha is the
//     per-channel scale vector (or the scalar 1), bias the per-channel bias (or 0), beta * C the
//     residual (beta = 1 with the residual as the C operand, beta = 0 without: then C is never
//     loaded), and the activation is Clamp with lower bound 0 (ReLU) or -inf (identity), a
//     runtime argument, so ReLU costs no second instance.
//   * StatsConv<T>: the training forward. out = conv(x, w) in T, and from the same epilogue (our
//     visitor node Sm90ColStatsPartials, col_stats_epilogue.hpp) each 128-row CTA tile's per-channel
//     (mean, M2) of the T-rounded output, written to float32 partials without atomics; then
//     nhwc_stats_combine (csrc/nhwc_stats.cu, built for every architecture) combines the partials in
//     float64 in a fixed order into mean and the biased var. Two launches, deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "cutlass/cutlass.h"
// (include order as in CUTLASS's examples: some collectives use KernelHardwareInfo undeclared)
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "../common.h"
#include "../conv2d.h"
#include "../nhwc_stats.h"
#include "col_stats_epilogue.hpp"
#include "conv_common.hpp"
#include "conv2d_sm90.h"

namespace rk {
namespace sm90 {
namespace {

using namespace cute;

constexpr cutlass::conv::Operator kFprop = cutlass::conv::Operator::kFprop;
using ProblemShape = cutlass::conv::ConvProblemShape<kFprop, 2>;
using LayoutNHWC = cutlass::layout::TensorNHWC;
// 128 bytes of K per stage row: 64 bf16/fp16 or 32 float (TF32) elements, the same shared memory
// per stage for every dtype (6 stages; 5 for the float fused-epilogue kernel, whose float C and D
// epilogue buffers take more of the carveout)
template <typename T>
using TileShapeOf = Shape<_128, _128, Shape<Int<128 / static_cast<int>(sizeof(T))>>>;
using ClusterShape = Shape<_1, _1, _1>;

// The pieces shared by both kernels: mainloop over T operands, an epilogue of output type D.
template <typename T, typename ElementC, typename ElementD, typename FusionOp>
struct ConvKernelOf {
  static constexpr int kAlignT = 16 / sizeof(T);
  static constexpr int kAlignC = 16 / sizeof(cute::conditional_t<cute::is_void_v<ElementC>, ElementD, ElementC>);
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShapeOf<T>, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, LayoutNHWC, kAlignC, ElementD,
      LayoutNHWC, kAlignD, cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kFprop, T, LayoutNHWC, kAlignT, T, LayoutNHWC, kAlignT,
      float, TileShapeOf<T>, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <typename T>
using FusedConv = ConvKernelOf<
    T, T, T,
    cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<cutlass::epilogue::thread::Clamp, T, float, float, T,
                                                             float>>;

// out = acc rounded to T (no C), the node passing acc through and writing the per-tile statistics
template <typename T>
using StatsConv = ConvKernelOf<
    T, void, T,
    cutlass::epilogue::fusion::Sm90EVT<Sm90ColStatsPartials<T, colstats::kSubRows, colstats::kSubCols>,
                                       cutlass::epilogue::fusion::Sm90AccFetch>>;

template <typename T>
typename FusedConv<T>::Conv::Arguments fused_args(const Conv2dArgs& a) {
  using Conv = typename FusedConv<T>::Conv;
  using Kernel = typename Conv::ConvKernel;
  const ProblemShape ps = make_problem<ProblemShape>(a);
  typename Conv::Arguments args{};
  args.problem_shape = ps;
  args.mainloop.ptr_A = reinterpret_cast<const T*>(a.x);
  args.mainloop.ptr_B = reinterpret_cast<const T*>(a.w);
  auto& fus = args.epilogue.thread;
  fus.alpha = 1.f;
  fus.alpha_ptr = reinterpret_cast<const float*>(a.scale);  // nullptr: the scalar alpha = 1
  fus.bias_ptr = reinterpret_cast<const float*>(a.bias);    // nullptr: bias 0
  fus.beta = a.residual ? 1.f : 0.f;                        // beta 0: C is never loaded
  fus.beta_ptr = nullptr;
  fus.activation.lower_bound = a.relu ? 0.f : -std::numeric_limits<float>::infinity();
  fus.activation.upper_bound = std::numeric_limits<float>::infinity();
  // without a residual C points at out (never read: beta = 0) so that its TMA descriptor is valid
  args.epilogue.ptr_C = reinterpret_cast<const T*>(a.residual ? a.residual : a.out);
  args.epilogue.dC = nhwc_output_stride<typename Kernel::StrideC>(ps);
  args.epilogue.ptr_D = reinterpret_cast<T*>(a.out);
  args.epilogue.dD = nhwc_output_stride<typename Kernel::StrideD>(ps);
  return args;
}

template <typename T>
typename StatsConv<T>::Conv::Arguments stats_args(const Conv2dArgs& a, float* part_mean, float* part_m2) {
  using Conv = typename StatsConv<T>::Conv;
  using Kernel = typename Conv::ConvKernel;
  const ProblemShape ps = make_problem<ProblemShape>(a);
  typename Conv::Arguments args{};
  args.problem_shape = ps;
  args.mainloop.ptr_A = reinterpret_cast<const T*>(a.x);
  args.mainloop.ptr_B = reinterpret_cast<const T*>(a.w);
  // Sm90EVT's arguments: the child's (Sm90AccFetch: none), then the node's
  args.epilogue.thread = {{}, {part_mean, part_m2, static_cast<int>(a.Cout)}};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nhwc_output_stride<typename Kernel::StrideC>(ps);
  args.epilogue.ptr_D = reinterpret_cast<T*>(a.out);
  args.epilogue.dD = nhwc_output_stride<typename Kernel::StrideD>(ps);
  return args;
}

// Layout of the caller's workspace: [per-tile partials: mean (m_tiles, Cout), M2 (m_tiles, Cout)
// float32, nhwc_stats_workspace_bytes(M, Cout) bytes][CUTLASS's own workspace], each piece
// 256-byte aligned.
struct Workspace {
  int64_t stats = 0, stats_bytes = 0, cutlass = 0, cutlass_bytes = 0, total = 0;
};

int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// f(T{}) with T the CUTLASS element type of a.dtype (validate() has admitted it: float only with
// allow_tf32, computed in TF32)
template <typename F>
decltype(auto) by_dtype(const Conv2dArgs& a, F&& f) {
  if (a.dtype == DType::BF16) return f(cutlass::bfloat16_t{});
  if (a.dtype == DType::F16) return f(cutlass::half_t{});
  return f(float{});
}

template <typename T>
int64_t cutlass_workspace(const Conv2dArgs& a, bool stats) {
  if (stats)
    return static_cast<int64_t>(StatsConv<T>::Conv::get_workspace_size(stats_args<T>(a, nullptr, nullptr)));
  return static_cast<int64_t>(FusedConv<T>::Conv::get_workspace_size(fused_args<T>(a)));
}

Workspace layout(const Conv2dArgs& a, bool stats) {
  Workspace w;
  const int64_t M = a.N * a.OH * a.OW;
  int64_t off = 0;
  if (stats && M > 0 && a.Cout > 0) {
    w.stats = off;
    w.stats_bytes = nhwc_stats_workspace_bytes(M, a.Cout);
    off += align256(w.stats_bytes);
  }
  w.cutlass = off;
  if (M > 0 && a.Cout > 0)
    w.cutlass_bytes = by_dtype(a, [&](auto t) { return cutlass_workspace<decltype(t)>(a, stats); });
  w.total = off + align256(w.cutlass_bytes);
  return w;
}

constexpr int64_t kIntMax = 2147483647;

void validate(const Conv2dArgs& a) {
  const char* fn = "conv2d_sm90_forward";
  if (a.dtype != DType::BF16 && a.dtype != DType::F16 && a.dtype != DType::F32)
    throw ArgError(cat(fn, ": dtype must be float16, bfloat16 or float32 (the sm_90a kernels), got ",
                       dtype_name(a.dtype)));
  if (a.dtype == DType::F32 && !a.allow_tf32)
    throw ArgError(cat(fn, ": float32 runs in TF32 on the sm_90a kernels: allow_tf32 must be true (the exact "
                       "float32 convolution is conv2d_forward's)"));
  // TMA moves rows of 16 bytes: 8 bf16/fp16 or 4 float channels
  const int64_t vec = a.dtype == DType::F32 ? 4 : 8;
  check_conv_sizes(a, fn, kZeroCout);
  if (a.Cin % vec != 0)
    throw ArgError(cat(fn, ": Cin must be a multiple of ", vec, " (16-byte TMA rows of ", dtype_name(a.dtype),
                       "), got ", a.Cin));
  if (a.Cout % vec != 0)
    throw ArgError(cat(fn, ": Cout must be a multiple of ", vec, " (16-byte TMA rows of ", dtype_name(a.dtype),
                       "), got ", a.Cout));
  if (a.stride_h > 8 || a.stride_w > 8)
    throw ArgError(cat(fn, ": stride must be <= 8 (TMA im2col element strides), got (", a.stride_h, ", ",
                       a.stride_w, ")"));
  if (a.pad_h > 128 || a.pad_w > 128 || a.pad_h - (a.KH - 1) < -128 || a.pad_w - (a.KW - 1) < -128 ||
      a.pad_h - (a.KH - 1) > 127 || a.pad_w - (a.KW - 1) > 127 || a.KH > 255 || a.KW > 255)
    throw ArgError(cat(fn, ": padding (", a.pad_h, ", ", a.pad_w, ") with kernel (", a.KH, ", ", a.KW,
                       ") is outside the TMA im2col corner limits (pad <= 128, pad - (kernel - 1) in [-128, 127])"));
  const int64_t OH = (a.H + 2 * a.pad_h - a.KH) / a.stride_h + 1;
  const int64_t OW = (a.W + 2 * a.pad_w - a.KW) / a.stride_w + 1;
  if (a.H + 2 * a.pad_h < a.KH || a.W + 2 * a.pad_w < a.KW || a.OH != OH || a.OW != OW)
    throw ArgError(cat(fn, ": OH, OW = (", a.OH, ", ", a.OW, ") but the convolution gives (", OH, ", ", OW, ")"));
  if (a.ldw != a.KH * a.KW * a.Cin)
    throw ArgError(cat(fn, ": ldw must equal KH*KW*Cin = ", a.KH * a.KW * a.Cin, " (packed KRSC filter), got ", a.ldw));
  if (a.N * a.H * a.W * a.Cin > kIntMax || a.N * OH * OW * a.Cout > kIntMax || a.Cout * a.ldw > kIntMax)
    throw ArgError(cat(fn, ": tensors of more than 2^31 - 1 elements are not supported"));
  const int64_t xs[4] = {a.H * a.W * a.Cin, 1, a.W * a.Cin, a.Cin};
  const int64_t os[4] = {OH * OW * a.Cout, 1, OW * a.Cout, a.Cout};
  for (int i = 0; i < 4; ++i) {
    if (a.x_stride[i] != xs[i])
      throw ArgError(cat(fn, ": x must be channels_last contiguous (strides (", xs[0], ", 1, ", xs[2], ", ", xs[3],
                         ")), got stride[", i, "] = ", a.x_stride[i]));
    if (a.out_stride[i] != os[i])
      throw ArgError(cat(fn, ": out must be channels_last contiguous (strides (", os[0], ", 1, ", os[2], ", ", os[3],
                         ")), got stride[", i, "] = ", a.out_stride[i]));
    if (a.residual && a.res_stride[i] != os[i])
      throw ArgError(cat(fn, ": residual must be channels_last contiguous like out, got stride[", i,
                         "] = ", a.res_stride[i]));
  }
  check_ptr(a.x, fn, "x");
  check_ptr(a.w, fn, "w");
  check_ptr(a.out, fn, "out");
  if (a.x % 16 || a.w % 16 || a.out % 16 || a.residual % 16)
    throw ArgError(cat(fn, ": x, w, out and residual must be 16-byte aligned (TMA)"));
  if (a.scale % 16 || a.bias % 16) throw ArgError(cat(fn, ": scale and bias must be 16-byte aligned"));
  const bool stats = a.mean != 0 || a.var != 0;
  if (stats) {
    check_ptr(a.mean, fn, "mean (var was given)");
    check_ptr(a.var, fn, "var (mean was given)");
    if (a.scale || a.bias || a.residual || a.relu)
      throw ArgError(cat(fn, ": statistics are of conv(x, w) alone: scale, bias, residual and relu must be absent"));
  }
  if (a.mean % 4 || a.var % 4) throw ArgError(cat(fn, ": mean and var must be 4-byte aligned"));
  if (a.bn_mean || a.bn_var || a.bn_weight || a.bn_bias)
    throw ArgError(cat(fn, ": the operand prologue (bn_mean ...) is the mma.sync kernel's (conv2d_forward) only"));
}

// The per-tile partials in the caller's workspace (nhwc_stats' layout: means, then M2s).
std::pair<float*, float*> part_ptrs(const Conv2dArgs& a, const Workspace& w) {
  float* pm = reinterpret_cast<float*>(a.workspace + w.stats);
  return {pm, pm + ceil_div(a.N * a.OH * a.OW, static_cast<int64_t>(colstats::kTileRows)) * a.Cout};
}

constexpr const char* kFn = "conv2d_sm90_forward";

template <typename T>
void check(const Conv2dArgs& a, const Workspace& w) {
  if (a.mean == 0)
    check_conv<typename FusedConv<T>::Conv>(fused_args<T>(a), w.cutlass_bytes, kFn, "fused-epilogue kernel");
  else
    check_conv<typename StatsConv<T>::Conv>(stats_args<T>(a, part_ptrs(a, w).first, part_ptrs(a, w).second),
                                            w.cutlass_bytes, kFn, "statistics-epilogue kernel");
}

template <typename T>
void launch(const Conv2dArgs& a, const Workspace& w, cudaStream_t stream) {
  char* ws = reinterpret_cast<char*>(a.workspace);
  void* cws = w.cutlass_bytes ? ws + w.cutlass : nullptr;
  const bool stats = a.mean != 0;
  if (!stats) {
    run_conv<typename FusedConv<T>::Conv>(fused_args<T>(a), cws, w.cutlass_bytes, stream, kFn,
                                          "fused-epilogue kernel");
    return;
  }
  const auto parts = part_ptrs(a, w);
  run_conv<typename StatsConv<T>::Conv>(stats_args<T>(a, parts.first, parts.second), cws, w.cutlass_bytes, stream,
                                        kFn, "statistics-epilogue kernel");
  nhwc_stats_combine(parts.first, parts.second, a.N * a.OH * a.OW, a.Cout, reinterpret_cast<float*>(a.mean),
                     reinterpret_cast<float*>(a.var), a.stream);
}

}  // namespace
}  // namespace sm90

int64_t conv2d_sm90_workspace_bytes(const Conv2dArgs& a) {
  sm90::validate(a);
  return sm90::layout(a, a.mean != 0).total;
}

void conv2d_sm90_forward(const Conv2dArgs& a) {
  const char* fn = "conv2d_sm90_forward";
  sm90::validate(a);
  const bool stats = a.mean != 0;
  const sm90::Workspace w = sm90::layout(a, stats);
  if (w.total > 0) check_ptr(a.workspace, fn, "workspace");
  if (a.workspace_bytes < w.total)
    throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", w.total, " required"));
  if (a.workspace % 256) throw ArgError(cat(fn, ": workspace must be 256-byte aligned"));
  if (a.Cout > 0 && a.N * a.OH * a.OW > 0) sm90::by_dtype(a, [&](auto t) { sm90::check<decltype(t)>(a, w); });
  sm90::require_sm90(fn);
  cudaStream_t stream = as_stream(a.stream);
  const int64_t M = a.N * a.OH * a.OW;
  if (a.Cout == 0) return;
  if (M == 0) {  // not reached with N, H, W > 0; kept for symmetry with conv2d_forward
    if (stats) {
      check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.mean), 0xFF, a.Cout * sizeof(float), stream), fn);
      check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.var), 0xFF, a.Cout * sizeof(float), stream), fn);
    }
    return;
  }
  sm90::by_dtype(a, [&](auto t) { sm90::launch<decltype(t)>(a, w, stream); });
}

}  // namespace rk
