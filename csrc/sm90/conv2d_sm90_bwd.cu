// sm_90a (Hopper) convolution backward from CUTLASS 3.x collectives: the data gradient (kDgrad: TMA
// im2col loads of dy, TMA loads of the KRSC filter, wgmma, TMA-store epilogue with the residual as
// the C operand) and the weight gradient (kWgrad: TMA loads of dy, TMA im2col loads of x, wgmma,
// a direct-store epilogue into the KRSC weight gradient). Compiled only for sm_90a with the forward
// (csrc/sm90/conv2d_sm90.cu; CMakeLists.txt, setup.py), torch-free; contract in conv2d_sm90_bwd.h.
//
// Two kernels per dtype (bf16, fp16), cluster 1x1x1, fp32 accumulators, one rounding:
//   * DgradConv<T>: grad_x = conv_transpose(dy, w) + beta * residual, CTA tile 128x128x64 (M = N*H*W
//     pixels, N = Cin, K = Cout*KH*KW), epilogue LinearCombination (beta = 1 with a residual, 0
//     without: then C is never loaded).
//   * WgradConv<T>: grad_w = sum over (n, oh, ow) of dy * x, CTA tile 128x128x64 (M = Cout,
//     N = Cin*KH*KW, K = N*OH*OW). No split-K (CUTLASS's sm90 conv kernel has no tile scheduler
//     that splits K): every output element is one CTA's fixed-order sum, deterministic, no atomics.
//     The price is parallelism: ceil(Cout/128) * ceil(Cin*KH*KW/128) CTAs (ResNet-50 layer1's 3x3,
//     64 -> 64: 5 CTAs on 132 SMs); the measured 'auto' decides whether that ever wins.
#include <cuda_runtime.h>

#include <cstdint>

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
#include "cutlass/util/packed_stride.hpp"

#include "../common.h"
#include "conv2d_sm90_bwd.h"
#include "conv_common.hpp"

namespace rk {
namespace sm90bwd {
namespace {

using namespace cute;

constexpr cutlass::conv::Operator kDgrad = cutlass::conv::Operator::kDgrad;
constexpr cutlass::conv::Operator kWgrad = cutlass::conv::Operator::kWgrad;
using LayoutNHWC = cutlass::layout::TensorNHWC;
using ClusterShape = Shape<_1, _1, _1>;

template <typename T>
struct DgradConv {
  static constexpr int kAlign = 16 / sizeof(T);
  using TileShape = Shape<_128, _128, Shape<_64>>;
  using ProblemShape = cutlass::conv::ConvProblemShape<kDgrad, 2>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, LayoutNHWC, kAlign, T, LayoutNHWC, kAlign,
      cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kDgrad, T, LayoutNHWC, kAlign, T, LayoutNHWC, kAlign, float,
      TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <typename T>
struct WgradConv {
  static constexpr int kAlign = 16 / sizeof(T);
  using TileShape = Shape<_128, Shape<_128>, Shape<_64>>;
  using ProblemShape = cutlass::conv::ConvProblemShape<kWgrad, 2>;
  // the direct-store epilogue CUTLASS's own sm90 wgrad tests use (KCSR tag: the (K, (C, S, R)) output)
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, cutlass::layout::TensorKCSR, kAlign, T,
      cutlass::layout::TensorKCSR, kAlign, cutlass::epilogue::NoSmemWarpSpecialized>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kWgrad, T, LayoutNHWC, kAlign, T, LayoutNHWC, kAlign, float,
      TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <typename T>
typename DgradConv<T>::Conv::Arguments dgrad_args(const Conv2dSm90BwdArgs& a) {
  using Conv = typename DgradConv<T>::Conv;
  using Kernel = typename Conv::ConvKernel;
  const auto ps = sm90::make_problem<typename DgradConv<T>::ProblemShape>(a);
  typename Conv::Arguments args{};
  args.problem_shape = ps;
  args.mainloop.ptr_A = reinterpret_cast<const T*>(a.dy);
  args.mainloop.ptr_B = reinterpret_cast<const T*>(a.w);
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = a.residual ? 1.f : 0.f;  // beta 0: C is never loaded
  // without a residual C points at grad_x (never read: beta = 0) so that its TMA descriptor is valid
  args.epilogue.ptr_C = reinterpret_cast<const T*>(a.residual ? a.residual : a.grad_x);
  args.epilogue.dC = sm90::nhwc_output_stride<typename Kernel::StrideC>(ps);
  args.epilogue.ptr_D = reinterpret_cast<T*>(a.grad_x);
  args.epilogue.dD = sm90::nhwc_output_stride<typename Kernel::StrideD>(ps);
  return args;
}

template <typename T>
typename WgradConv<T>::Conv::Arguments wgrad_args(const Conv2dSm90BwdArgs& a) {
  using Conv = typename WgradConv<T>::Conv;
  using Kernel = typename Conv::ConvKernel;
  const auto ps = sm90::make_problem<typename WgradConv<T>::ProblemShape>(a);
  typename Conv::Arguments args{};
  args.problem_shape = ps;
  args.mainloop.ptr_A = reinterpret_cast<const T*>(a.dy);
  args.mainloop.ptr_B = reinterpret_cast<const T*>(a.x);
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;  // C never read
  args.epilogue.ptr_C = reinterpret_cast<const T*>(a.grad_w);
  args.epilogue.dC = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, ps.shape_C, ps.stride_C, kWgrad);
  args.epilogue.ptr_D = reinterpret_cast<T*>(a.grad_w);
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, ps.shape_C, ps.stride_C, kWgrad);
  return args;
}

constexpr int64_t kIntMax = 2147483647;

// Everything both kernels require; `dgrad` selects the pointers and the stride rule of that one.
void validate(const Conv2dSm90BwdArgs& a, bool dgrad) {
  const char* fn = dgrad ? "conv2d_sm90_dgrad" : "conv2d_sm90_wgrad";
  if (a.dtype != DType::BF16 && a.dtype != DType::F16)
    throw ArgError(cat(fn, ": dtype must be float16 or bfloat16 (the sm_90a kernels), got ", dtype_name(a.dtype)));
  check_conv_sizes(a, fn, kZeroNone);
  if (a.Cin % 8 != 0) throw ArgError(cat(fn, ": Cin must be a multiple of 8 (16-byte TMA rows), got ", a.Cin));
  if (a.Cout % 8 != 0) throw ArgError(cat(fn, ": Cout must be a multiple of 8 (16-byte TMA rows), got ", a.Cout));
  if (dgrad && (a.stride_h != 1 || a.stride_w != 1))
    throw ArgError(cat(fn, ": stride must be (1, 1) (CUTLASS's sm90 dgrad is unit-stride), got (", a.stride_h, ", ",
                       a.stride_w, ")"));
  if (a.stride_h > 8 || a.stride_w > 8)
    throw ArgError(cat(fn, ": stride must be <= 8 (TMA im2col element strides), got (", a.stride_h, ", ",
                       a.stride_w, ")"));
  if (a.pad_h > 128 || a.pad_w > 128 || a.pad_h - (a.KH - 1) < -128 || a.pad_w - (a.KW - 1) < -128 ||
      a.pad_h - (a.KH - 1) > 127 || a.pad_w - (a.KW - 1) > 127 || a.KH > 255 || a.KW > 255)
    throw ArgError(cat(fn, ": padding (", a.pad_h, ", ", a.pad_w, ") with kernel (", a.KH, ", ", a.KW,
                       ") is outside the TMA im2col corner limits (pad <= 128, pad - (kernel - 1) in [-128, 127])"));
  if (a.H + 2 * a.pad_h < a.KH || a.W + 2 * a.pad_w < a.KW)
    throw ArgError(cat(fn, ": the padded input (", a.H + 2 * a.pad_h, ", ", a.W + 2 * a.pad_w,
                       ") is smaller than the kernel (", a.KH, ", ", a.KW, ")"));
  const int64_t OH = (a.H + 2 * a.pad_h - a.KH) / a.stride_h + 1;
  const int64_t OW = (a.W + 2 * a.pad_w - a.KW) / a.stride_w + 1;
  if (a.OH != OH || a.OW != OW)
    throw ArgError(cat(fn, ": OH, OW = (", a.OH, ", ", a.OW, ") but the convolution gives (", OH, ", ", OW, ")"));
  if (a.N * a.H * a.W * a.Cin > kIntMax || a.N * OH * OW * a.Cout > kIntMax || a.Cout * a.KH * a.KW * a.Cin > kIntMax)
    throw ArgError(cat(fn, ": tensors of more than 2^31 - 1 elements are not supported"));
  check_ptr(a.dy, fn, "dy");
  if (dgrad) {
    check_ptr(a.w, fn, "w");
    check_ptr(a.grad_x, fn, "grad_x");
    if (a.dy % 16 || a.w % 16 || a.grad_x % 16 || a.residual % 16)
      throw ArgError(cat(fn, ": dy, w, grad_x and residual must be 16-byte aligned (TMA)"));
  } else {
    check_ptr(a.x, fn, "x");
    check_ptr(a.grad_w, fn, "grad_w");
    if (a.dy % 16 || a.x % 16 || a.grad_w % 16)
      throw ArgError(cat(fn, ": dy, x and grad_w must be 16-byte aligned (TMA)"));
  }
}

template <typename T>
int64_t cutlass_workspace(const Conv2dSm90BwdArgs& a, bool dgrad) {
  if (dgrad) return static_cast<int64_t>(DgradConv<T>::Conv::get_workspace_size(dgrad_args<T>(a)));
  return static_cast<int64_t>(WgradConv<T>::Conv::get_workspace_size(wgrad_args<T>(a)));
}

int64_t workspace_bytes(const Conv2dSm90BwdArgs& a, bool dgrad) {
  validate(a, dgrad);
  const int64_t b = a.dtype == DType::BF16 ? cutlass_workspace<cutlass::bfloat16_t>(a, dgrad)
                                           : cutlass_workspace<cutlass::half_t>(a, dgrad);
  return (b + 255) / 256 * 256;
}

// CUTLASS's host-side checks, then the device check, then the launch (the checks run first so that
// machines without an sm_90 GPU exercise them)
template <typename Conv>
void check_and_run(const typename Conv::Arguments& args, const Conv2dSm90BwdArgs& a, const char* fn,
                   const char* what) {
  sm90::check_conv<Conv>(args, a.workspace_bytes, fn, what);
  sm90::require_sm90(fn);
  sm90::run_conv<Conv>(args, a.workspace_bytes > 0 ? reinterpret_cast<void*>(a.workspace) : nullptr,
                       a.workspace_bytes, as_stream(a.stream), fn, what);
}

template <typename T>
void dgrad(const Conv2dSm90BwdArgs& a, const char* fn) {
  check_and_run<typename DgradConv<T>::Conv>(dgrad_args<T>(a), a, fn, "dgrad kernel");
}

template <typename T>
void wgrad(const Conv2dSm90BwdArgs& a, const char* fn) {
  check_and_run<typename WgradConv<T>::Conv>(wgrad_args<T>(a), a, fn, "wgrad kernel");
}

void check_workspace(const Conv2dSm90BwdArgs& a, int64_t need, const char* fn) {
  if (a.workspace_bytes < need) throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", need, " required"));
  if (need > 0) check_ptr(a.workspace, fn, "workspace");
  if (a.workspace % 256) throw ArgError(cat(fn, ": workspace must be 256-byte aligned"));
}

}  // namespace
}  // namespace sm90bwd

int64_t conv2d_sm90_dgrad_workspace_bytes(const Conv2dSm90BwdArgs& a) { return sm90bwd::workspace_bytes(a, true); }

int64_t conv2d_sm90_wgrad_workspace_bytes(const Conv2dSm90BwdArgs& a) { return sm90bwd::workspace_bytes(a, false); }

void conv2d_sm90_dgrad(const Conv2dSm90BwdArgs& a) {
  const char* fn = "conv2d_sm90_dgrad";
  sm90bwd::check_workspace(a, sm90bwd::workspace_bytes(a, true), fn);
  if (a.dtype == DType::BF16)
    sm90bwd::dgrad<cutlass::bfloat16_t>(a, fn);
  else
    sm90bwd::dgrad<cutlass::half_t>(a, fn);
}

void conv2d_sm90_wgrad(const Conv2dSm90BwdArgs& a) {
  const char* fn = "conv2d_sm90_wgrad";
  sm90bwd::check_workspace(a, sm90bwd::workspace_bytes(a, false), fn);
  if (a.dtype == DType::BF16)
    sm90bwd::wgrad<cutlass::bfloat16_t>(a, fn);
  else
    sm90bwd::wgrad<cutlass::half_t>(a, fn);
}

}  // namespace rk
