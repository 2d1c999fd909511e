// Host-side pieces both CUTLASS sm_90a translation units share (conv2d_sm90.cu: the forward;
// conv2d_sm90_bwd.cu: dgrad and wgrad): the CUTLASS problem of our argument structs, the packed NHWC
// epilogue strides, CUTLASS's host-side checks, one run, and the device check.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"

#include "../common.h"

namespace rk {
namespace sm90 {

// The 2-D cross-correlation of an argument struct with the forward view's sizes (x (N, H, W, Cin),
// filter (Cout, KH, KW, Cin); Conv2dArgs and Conv2dSm90BwdArgs name them alike): ConvProblemShape
// derives the output's (N, OH, OW, Cout) and assigns the A/B/C operands per operator.
template <typename ProblemShape, typename Args>
ProblemShape make_problem(const Args& a) {
  const int N = static_cast<int>(a.N), H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int C = static_cast<int>(a.Cin), K = static_cast<int>(a.Cout);
  const int R = static_cast<int>(a.KH), S = static_cast<int>(a.KW);
  return ProblemShape(cutlass::conv::Mode::kCrossCorrelation, {N, H, W, C}, {K, R, S, C},
                      {static_cast<int>(a.pad_h), static_cast<int>(a.pad_w)},
                      {static_cast<int>(a.pad_h), static_cast<int>(a.pad_w)},
                      {static_cast<int>(a.stride_h), static_cast<int>(a.stride_w)}, {1, 1}, 1);
}

// An epilogue's C/D strides ((w, h, n), 1, 0) from the problem's packed NHWC C strides (the forward's
// output, the dgrad's grad_x).
template <typename Stride, typename ProblemShape>
Stride nhwc_output_stride(const ProblemShape& ps) {
  Stride s{};
  cute::for_each(cute::make_seq<cute::rank<0>(Stride{})>{},
                 [&](auto i) { cute::get<0, i>(s) = ps.stride_C[ProblemShape::RankT - 2 - i]; });
  return s;
}

// CUTLASS's own host-side checks of the arguments we built (no device access): run before the
// device check, so they are exercised (and tested) on machines without an sm_90 GPU.
template <typename Conv>
void check_conv(const typename Conv::Arguments& args, int64_t workspace_bytes, const char* fn, const char* what) {
  const size_t need = Conv::get_workspace_size(args);
  if (static_cast<int64_t>(need) > workspace_bytes)
    throw ArgError(cat(fn, ": ", what, " needs ", need, " bytes of CUTLASS workspace, got ", workspace_bytes));
  const cutlass::Status st = Conv::can_implement(args);
  if (st != cutlass::Status::kSuccess)
    throw ArgError(cat(fn, ": CUTLASS cannot implement this convolution (", what, "): ", cutlassGetStatusString(st),
                       " (TMA limits: channels multiple of 8, padding <= 128, pad - (kernel - 1) >= -128, "
                       "kernel size <= 255)"));
}

// check_conv, then one launch on `stream` (workspace: CUTLASS's own, or nullptr).
template <typename Conv>
void run_conv(const typename Conv::Arguments& args, void* workspace, int64_t workspace_bytes, cudaStream_t stream,
              const char* fn, const char* what) {
  check_conv<Conv>(args, workspace_bytes, fn, what);
  Conv op;
  cutlass::Status st = op.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess)
    throw CudaError(cat(fn, ": ", what, " initialize: ", cutlassGetStatusString(st)));
  st = op.run(stream);
  if (st != cutlass::Status::kSuccess) throw CudaError(cat(fn, ": ", what, " run: ", cutlassGetStatusString(st)));
  check_launch(what);
}

// The sm_90a cubin runs on compute capability 9.0 only: an ArgError naming the device otherwise.
inline void require_sm90(const char* fn) {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), cat(fn, ": cudaGetDevice").c_str());
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    throw ArgError(cat(fn, ": the sm_90a kernels run on compute capability 9.0 (H100/H200/GH200) only; device ", dev,
                       " is ", major, ".", minor));
}

}  // namespace sm90
}  // namespace rk
