// Host compatibility layer of the test-only host runner (tests/host/runner, docs/DESIGN.md):
// lets g++ compile csrc/*.cu for the CPU. The CUDA qualifiers become nothing (or `static` for
// __shared__, so one copy exists per kernel instantiation, shared by the fibers of the running
// CTA), the CUDA built-ins (threadIdx, __syncthreads, shuffles, ...) call the runner
// (runner.cpp), and __half/__nv_bfloat16 are bit-exact software types. The fake <cuda_runtime.h>,
// <cuda_fp16.h> and <cuda_bf16.h> next to this file include it. Launches (`k<<<g, b, s, st>>>(a)`)
// are rewritten to `::rk_host::launcher(g, b, s, st, k, "k")(a)` by the build (tests/host_runner.py).
// Dynamic shared memory (csrc/ptx.cuh's RK_DYNAMIC_SHARED) is one static buffer of the runner, its
// first `s` bytes usable by the launch; above 48 KiB the launch needs the kernel's
// cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) opt-in, as on a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define CUDART_VERSION 13000

// ---- runner entry points (runner.cpp) ---------------------------------------------------------
namespace rk_host {
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void syncthreads();
uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg);  // mode: 0 xor, 1 down, 2 up, 3 idx
[[noreturn]] void trap(const char* what);
uint32_t cvta_shared(const void* p);
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const void* func, void (*entry)(void*),
              void* ctx);
unsigned char* dynamic_shared();
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value);
int device_attribute(cudaDeviceAttr a);
void kernel_begin();
void kernel_end();
cudaError_t take_error();
cudaError_t peek_error();
const char* error_string(cudaError_t e);
int sm_count();
int blocks_per_sm();

template <typename... P>
struct LaunchCtx {
  void (*kernel)(P...);
  const std::tuple<P...>* params;
};

template <typename... P>
void fiber_entry(void* c) {
  const auto* ctx = static_cast<const LaunchCtx<P...>*>(c);
  // onto this fiber's stack, before checking starts
  std::tuple<P...> local = *ctx->params;
  void (*const kernel)(P...) = ctx->kernel;
  kernel_begin();
  std::apply(kernel, local);
  kernel_end();
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t dynamic_smem;
  const char* name;
  template <typename... A>
  void operator()(A&&... a) const {
    const std::tuple<P...> params(static_cast<P>(std::forward<A>(a))...);
    const LaunchCtx<P...> ctx{kernel, &params};
    run_grid(name, grid, block, dynamic_smem, reinterpret_cast<const void*>(kernel), &fiber_entry<P...>,
             const_cast<LaunchCtx<P...>*>(&ctx));
  }
};

template <typename... P>
Launch<P...> launcher(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, void (*k)(P...), const char* name) {
  return Launch<P...>{k, grid, block, dynamic_smem, name};
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace rk_host

#define threadIdx (::rk_host::thread_idx())
#define blockIdx (::rk_host::block_idx())
#define blockDim (::rk_host::block_dim())
#define gridDim (::rk_host::grid_dim())

inline void __syncthreads() { ::rk_host::syncthreads(); }
[[noreturn]] inline void __trap() { ::rk_host::trap("__trap()"); }
inline size_t __cvta_generic_to_shared(const void* p) { return ::rk_host::cvta_shared(p); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) ::rk_host::trap("__shfl_xor_sync: width != 32 is not modelled");
  return ::rk_host::from_bits<T>(::rk_host::shfl(mask, ::rk_host::to_bits(v), 0, lane_mask));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::rk_host::trap("__shfl_down_sync: width != 32 is not modelled");
  return ::rk_host::from_bits<T>(::rk_host::shfl(mask, ::rk_host::to_bits(v), 1, static_cast<int>(delta)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::rk_host::trap("__shfl_up_sync: width != 32 is not modelled");
  return ::rk_host::from_bits<T>(::rk_host::shfl(mask, ::rk_host::to_bits(v), 2, static_cast<int>(delta)));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) ::rk_host::trap("__shfl_sync: width != 32 is not modelled");
  return ::rk_host::from_bits<T>(::rk_host::shfl(mask, ::rk_host::to_bits(v), 3, src));
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// ld.global.cg (L2 only) and the inter-CTA primitives: CTAs run one after another, so a fence has
// nothing to order and an atomic is a plain read-modify-write (both accesses bounds-checked).
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
// Separately rounded products (the build passes -ffp-contract=off: nothing is fused on the host).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::fmaxf;
using std::fminf;

// ---- 16-bit floating-point types: storage only, conversions round to nearest even --------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types");

inline float __half2float(__half h) {
  const uint32_t s = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ffu;
  uint32_t f;
  if (e == 0x1f) {
    f = s | 0x7f800000u | (m << 13);  // inf / nan
  } else if (e != 0) {
    f = s | ((e + 112) << 23) | (m << 13);
  } else if (m == 0) {
    f = s;
  } else {  // subnormal: exact
    const float v = std::ldexp(static_cast<float>(m), -24);
    return s ? -v : v;
  }
  return __uint_as_float(f);
}
inline __half __float2half_rn(float x) {
  const uint32_t f = __float_as_uint(x);
  const uint16_t s = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const float a = std::fabs(x);
  if (std::isnan(x)) return __half{static_cast<uint16_t>(s | 0x7e00u)};
  if (a >= 65520.f) return __half{static_cast<uint16_t>(s | 0x7c00u)};  // rounds to inf
  if (a < 6.103515625e-05f) {                                          // subnormal half (or zero)
    const float q = std::nearbyint(a * 16777216.f);                    // units of 2^-24, ties even
    return __half{static_cast<uint16_t>(s | static_cast<uint16_t>(q))};
  }
  const uint32_t af = __float_as_uint(a);
  uint32_t m = af & 0x7fffffu;
  uint32_t e = (af >> 23) - 112;
  const uint32_t rest = m & 0x1fffu;
  m >>= 13;
  uint32_t h = (e << 10) | m;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: right
  return __half{static_cast<uint16_t>(s | h)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t f = __float_as_uint(x);
  if (std::isnan(x)) return __nv_bfloat16{static_cast<uint16_t>((f >> 16) | 0x40u)};
  f += 0x7fffu + ((f >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(f >> 16)};
}

// ---- runtime API subset used by csrc ----------------------------------------------------------
inline cudaError_t cudaGetLastError() { return ::rk_host::take_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::rk_host::peek_error(); }
inline const char* cudaGetErrorName(cudaError_t e) {
  if (e == cudaSuccess) return "cudaSuccess";
  return e == cudaErrorInvalidValue ? "cudaErrorInvalidValue" : "cudaErrorLaunchFailure";
}
inline const char* cudaGetErrorString(cudaError_t e) { return ::rk_host::error_string(e); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int /*device*/) {
  // the runner poses as a small sm_80 part (configurable: rk_host_configure_device): few SMs, so
  // grid-stride loops really loop
  *v = ::rk_host::device_attribute(a);
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return ::rk_host::set_func_attribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = ::rk_host::blocks_per_sm();
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
