// The arrival of a CTA on an int32 counter after its partial results (the single-launch reductions
// of conv2d.cu, conv2d_dgrad.cu, conv2d_wgrad.cu and batch_norm.cu): every thread calls it after its
// stores; true, in every thread, in the CTA that arrives last of `expected`, which then reads the
// other CTAs' partials (with L2 loads, __ldcg) and finishes the reduction. The counters are all zero
// at launch, and the last arrival puts its counter back to 0 (every arrival is in by then).
// Release: the CTA barrier (every thread's stores before it), then thread 0's gpu-scope fence
// (cumulative: it orders what the barrier made visible to thread 0) and its atomicAdd, as CUTLASS's
// split-K semaphore; acquire: thread 0's fence after the atomic, then a barrier. Which CTA arrives
// last varies from run to run; callers reduce in a fixed order, so the result does not.
// flag: one int of shared memory the caller provides (the kernels reuse their dead pipeline memory).
#pragma once

namespace rk {

__device__ __forceinline__ bool arrive_last(int* counter, int expected, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int arrived = atomicAdd(counter, 1);
    __threadfence();
    const int last = arrived == expected - 1;
    *flag = last;
    if (last) *counter = 0;
  }
  __syncthreads();
  return *flag != 0;
}

}  // namespace rk
