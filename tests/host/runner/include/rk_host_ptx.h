// Host implementations of csrc/ptx.cuh's PTX helpers (same names and signatures), for the
// test-only host runner. Each forwards to the runner (runner.cpp), which implements the PTX
// instruction: cp.async (copies land only when the cp.async.wait_group retiring their group
// executes), ldmatrix.x4 and mma.sync with the fragment layouts of the PTX ISA, cvt.rna.tf32.
#pragma once

#include <cstdint>

#include "rk_host.h"

namespace rk_host {
enum MmaKind : int { kMmaF16 = 0, kMmaBF16 = 1, kMmaTF32 = 2 };
void cp_async_cg16(uint32_t dst, const void* src, int src_bytes);
void cp_async_commit_group();
void cp_async_wait_group(int n);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr);
void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr);
void mma_sync(int kind, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
uint32_t cvt_rna_tf32(float f);
}  // namespace rk_host

namespace rk {
namespace conv {
namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return ::rk_host::cvta_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  ::rk_host::cp_async_cg16(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::rk_host::cp_async_commit_group(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::rk_host::cp_async_wait_group(N);
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { ::rk_host::ldmatrix_x4(r, addr); }
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  ::rk_host::ldmatrix_x4_trans(r, addr);
}

template <typename T>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::rk_host::mma_sync(::rk_host::kMmaF16, d, a, b0, b1);
}
template <>
__device__ __forceinline__ void mma16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  ::rk_host::mma_sync(::rk_host::kMmaBF16, d, a, b0, b1);
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::rk_host::mma_sync(::rk_host::kMmaTF32, d, a, b0, b1);
}
__device__ __forceinline__ uint32_t to_tf32(uint32_t f) { return ::rk_host::cvt_rna_tf32(__uint_as_float(f)); }

}  // namespace
}  // namespace conv
}  // namespace rk

// the launch's dynamic shared memory: the runner's buffer (usable up to the launch's byte count)
#define RK_DYNAMIC_SHARED(name) unsigned char* const name = ::rk_host::dynamic_shared()
