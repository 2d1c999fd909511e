// Shared helpers for the torch-free C++ API of resnet_kernels._C.
// Kernels take raw device pointers, sizes, strides and a cudaStream_t. Every entry point
// validates its arguments (throwing rk::ArgError -> Python ValueError) and checks every launch
// (throwing rk::CudaError -> Python RuntimeError).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace rk {

// Element type codes shared with Python (resnet_kernels/backends/cuda_backend.py).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "unknown";
}

struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline DType check_dtype(int code, const char* fn, const char* arg) {
  if (code < 0 || code > 3)
    throw ArgError(cat(fn, ": ", arg, " has unsupported dtype code ", code,
                       " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)"));
  return static_cast<DType>(code);
}

inline void check_ptr(std::uintptr_t p, const char* fn, const char* arg) {
  if (p == 0) throw ArgError(cat(fn, ": ", arg, " is a null device pointer"));
}

inline void check_nonneg(int64_t v, const char* fn, const char* arg) {
  if (v < 0) throw ArgError(cat(fn, ": ", arg, " must be >= 0, got ", v));
}

inline void check_positive(int64_t v, const char* fn, const char* arg) {
  if (v <= 0) throw ArgError(cat(fn, ": ", arg, " must be > 0, got ", v));
}

// Extents of a convolution's argument struct that an entry point accepts at zero (an empty batch, image or
// output channel set); check_conv_sizes requires the others positive.
enum ConvZeroOk : unsigned { kZeroNone = 0u, kZeroN = 1u, kZeroCin = 2u, kZeroH = 4u, kZeroW = 8u, kZeroCout = 16u };

// The size checks every convolution entry point makes of its argument struct (fields N, Cin, H, W, Cout, KH,
// KW, stride_h, stride_w, pad_h, pad_w), in this order, so a call with several bad fields names the first:
// the extents N, Cin, H, W, Cout positive, or >= 0 where `zero_ok` has their bit; KH, KW, stride_h, stride_w
// positive; then `more_positive` (fields of the struct's own, also positive); pad_h, pad_w >= 0.
template <typename Args>
void check_conv_sizes(const Args& a, const char* fn, unsigned zero_ok,
                      std::initializer_list<std::pair<int64_t, const char*>> more_positive = {}) {
  const auto extent = [&](int64_t v, const char* name, unsigned bit) {
    if (zero_ok & bit)
      check_nonneg(v, fn, name);
    else
      check_positive(v, fn, name);
  };
  extent(a.N, "N", kZeroN);
  extent(a.Cin, "Cin", kZeroCin);
  extent(a.H, "H", kZeroH);
  extent(a.W, "W", kZeroW);
  extent(a.Cout, "Cout", kZeroCout);
  check_positive(a.KH, fn, "KH");
  check_positive(a.KW, fn, "KW");
  check_positive(a.stride_h, fn, "stride_h");
  check_positive(a.stride_w, fn, "stride_w");
  for (auto [v, name] : more_positive) check_positive(v, fn, name);
  check_nonneg(a.pad_h, fn, "pad_h");
  check_nonneg(a.pad_w, fn, "pad_w");
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not poisoned
    throw CudaError(cat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
  }
}

// Call right after a <<<>>> launch.
inline void check_launch(const char* kernel_name) { check_cuda(cudaGetLastError(), kernel_name); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace rk
