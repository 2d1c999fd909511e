// Training-mode BatchNorm from given batch statistics (the contract: resnet_kernels/backends/
// torch_batch_norm.py): apply + optional residual (raw or with its own BN) + optional ReLU in one
// pass, the full BN backward (through the batch statistics) as one fixed-order reduce then one
// apply pass, and the running-statistics update. Torch-free API: device pointers (as uintptr_t,
// 0 = absent), sizes, dtype codes, the stream.
//
// Memory layout: y, identity, out, grad_out, grad_y, grad_identity are dense (N, C, H, W) tensors
// sharing one layout; the channel of flat element i is (i / inner) % C. NCHW-contiguous:
// inner = H*W; channels_last: inner = 1. numel = N*C*H*W.
// Activation dtypes: float32, float16, bfloat16 (float64 is refused with an ArgError: the torch
// implementation serves it). mean/var/id_mean/id_var are float32, contiguous, length C.
// weight/bias/id_weight/id_bias (and their gradients, and the running buffers) are contiguous,
// length C, each of its own dtype code: float32, float16 or bfloat16 (the activation dtype under
// model.to(bfloat16)). All math in float32, every output rounded once.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace rk {

// out = act(y * scale + shift + R), scale = weight * invstd (weight 0: invstd), shift = bias - mean * scale
// (bias 0: -mean * scale), invstd = 1 / sqrt(var + eps); R = identity * id_scale + id_shift (same
// from the id_* statistics) when id_mean != 0, identity when identity != 0 and id_mean == 0, else 0.
struct BatchNormActArgs {
  DType dtype;  // activations
  std::uintptr_t y, mean, var, weight, bias;                     // weight/bias: 0 = absent
  std::uintptr_t identity, id_mean, id_var, id_weight, id_bias;  // 0 = absent
  std::uintptr_t out;
  // bits (0 = not needed): the 1-bit mask of out > 0 too, a contiguous uint8 (N, H, W, ceil(C/8))
  // array (resnet_kernels/_bits.py: bit c % 8 of byte [n, h, w, c / 8]; the bits past C are 0),
  // every byte written. Written by the forward kernel itself on channels_last (inner == 1) for
  // float16/bfloat16 with C % 8 == 0 and every activation pointer 16-byte aligned (8 channels a
  // thread: a byte); otherwise (float32, NCHW, C % 8 != 0, misaligned pointers) packed from out by
  // a second launch (bn_bits_pack_kernel).
  std::uintptr_t bits;
  DType weight_dtype, bias_dtype, id_weight_dtype, id_bias_dtype;  // of the pointers above (ignored when 0)
  double eps, id_eps;
  int64_t numel, C, inner;
  bool relu;
  std::uintptr_t stream;
};
// One launch (none when numel == 0), two with bits outside the forward kernel's cases (above).
void batch_norm_act_forward(const BatchNormActArgs& a);

// g = grad_out * (out > 0) if relu else grad_out; sums over N, H, W per channel:
// sum_g, sum_gd = sum g * (y - mean), sum_gdi = sum g * (identity - id_mean).
// grad_bias = sum_g, grad_weight = sum_gd * invstd,
// grad_y = weight * invstd * (g - sum_g / m - (y - mean) * invstd^2 * sum_gd / m), m = numel / C;
// with id_mean: grad_id_bias = sum_g, grad_id_weight = sum_gdi * id_invstd, grad_identity likewise;
// without id_mean: grad_identity = g. Every output is optional (0 = not needed).
// Launches: reduce (per-block partials into the workspace) + finalize (fixed-order sum of the
// partials per channel; writes the per-channel gradients and the apply coefficients) + apply
// (grad_y and grad_identity in one pass): (any sum needed ? 2 : 0) + (grad_y or grad_identity ? 1 : 0),
// a sum being needed for grad_y, grad_weight, grad_bias, grad_id_*, or grad_identity with id_mean:
// 3 in training with every gradient; 1 when only a raw grad_identity is. Deterministic.
// coef / id_coef (float32 [3][C] each, 0 = not needed): the finalize pass also writes the input
// gradients' per-channel coefficients there, rows (A, B, K) with grad_x = A * g - (B + K * (x - mean)):
// A = weight * invstd, B = A * (sum_g / m), K = A * invstd^2 * (sum_gd / m) (the identity's from its
// own statistics; id_coef needs id_mean). A call with coef and without grad_y/grad_identity is the
// reduce + finalize half alone (2 launches): the op batch_norm_act_coef, for the fused convolution
// backward that applies the coefficients itself.
struct BatchNormActBackwardArgs {
  DType dtype;
  std::uintptr_t grad_out, out, y, mean, var, weight;  // out: read iff relu and out_bits == 0; weight 0 = 1
  // out_bits: the ReLU mask as the 1-bit mask of out > 0 (layout: BatchNormActArgs::bits) instead of
  // out (0 = absent; needs relu and out == 0); read by the reduce pass only: with out_bits, grad_y
  // and grad_identity are refused (the batch_norm_act_coef half).
  std::uintptr_t out_bits;
  std::uintptr_t identity, id_mean, id_var, id_weight;
  std::uintptr_t grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias;  // 0 = not needed
  std::uintptr_t coef, id_coef;  // float32 [3][C] (A, B, K) of y's / the identity's BN; 0 = not needed
  DType weight_dtype, id_weight_dtype, grad_weight_dtype, grad_bias_dtype, grad_id_weight_dtype,
      grad_id_bias_dtype;
  std::uintptr_t workspace;  // device scratch of batch_norm_act_backward_workspace_bytes(...) bytes
  int64_t workspace_bytes;
  // int32 arrival counters, ALL ZERO at launch and left so (at least C of them suffice): the reduce
  // pass's last-arriving block of each column tile / channel runs the finalize in the same launch
  std::uintptr_t counters;
  int64_t counters_count;
  double eps, id_eps;
  int64_t numel, C, inner;
  bool relu;
  std::uintptr_t stream;
};
int64_t batch_norm_act_backward_workspace_bytes(DType dtype, int64_t numel, int64_t C, int64_t inner);
void batch_norm_act_backward(const BatchNormActBackwardArgs& a);

// running_mean = (1 - factor) * running_mean + factor * mean;
// running_var = (1 - factor) * running_var + factor * unbias * var; num_batches_tracked += 1 (int64).
// In float32, rounded once to each buffer's dtype; in place; one launch.
// bn_running_update_many: up to kBnRunningUpdateSlots such updates (a residual block's BatchNorms,
// each its own C, factor, unbias, buffers and dtypes) in one launch; every element's stream must be
// the same, and no buffer may appear in two elements (they are updated concurrently).
constexpr int kBnRunningUpdateSlots = 4;
struct BnRunningUpdateArgs {
  std::uintptr_t mean, var;                                       // float32, length C
  std::uintptr_t running_mean, running_var, num_batches_tracked;  // 0 = absent
  DType running_mean_dtype, running_var_dtype;
  double factor, unbias;
  int64_t C;
  std::uintptr_t stream;
};
void bn_running_update(const BnRunningUpdateArgs& a);
void bn_running_update_many(const std::vector<BnRunningUpdateArgs>& a);

// batch_norm_act_forward, and in the same launch the running-statistics updates of up to
// kBnRunningUpdateSlots BatchNorms (bn_running_update_many's; the training block's tail,
// batch_norm_act_bits): every thread of the forward's grid takes a share of their channels. The
// buffers must not overlap anything the forward reads or writes (the caller checks). numel == 0:
// the updates alone (bn_running_update_many's launch).
void batch_norm_act_forward_running(const BatchNormActArgs& a, const std::vector<BnRunningUpdateArgs>& running);

}  // namespace rk
