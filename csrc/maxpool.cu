// Max pooling with a one-byte argmax and its gather backward (API and semantics: maxpool.h).
//
// Memory-bound: one thread per output element (forward) or input element (backward) in a
// grid-stride loop over the flat tensor, index arithmetic in 32 bits when every tensor has fewer
// than 2^31 elements (template I), 64 bits otherwise. In channels_last consecutive threads are
// consecutive channels, so every load and store coalesces; in NCHW consecutive outputs read
// every sh-th element of a row. The forward scans the window in row-major order and replaces the
// running maximum when v > max || v != v, exactly PyTorch's rule (ties: the first maximum; NaN:
// the maximum, the last NaN the argmax); values compare in float (double), exact for every
// dtype. The backward visits the at most ceil(kh/sh) x ceil(kw/sw) outputs whose windows contain
// its input element, in row-major order, and adds grad_out where their argmax points at it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "acc_types.cuh"
#include "common.h"
#include "maxpool.h"

namespace rk {
namespace pool {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this

template <typename I>
__device__ __forceinline__ I imin(I a, I b) {
  return a < b ? a : b;
}

struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int kh, kw, sh, sw, ph, pw;
};

template <typename T, typename I, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    maxpool2d_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ argmax, Geometry g) {
  using Acc = acc_t<T>;
  const I C = static_cast<I>(g.C), H = static_cast<I>(g.H), W = static_cast<I>(g.W);
  const I OH = static_cast<I>(g.OH), OW = static_cast<I>(g.OW);
  const I total = static_cast<I>(g.N) * C * OH * OW;
  const I step = static_cast<I>(gridDim.x) * kThreads;
  for (I o = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; o < total; o += step) {
    I ow, oh, base, wstep;
    if constexpr (NHWC) {
      const I c = o % C;
      I t = o / C;
      ow = t % OW;
      t /= OW;
      oh = t % OH;
      base = (t / OH) * H * W * C + c;
      wstep = C;
    } else {
      ow = o % OW;
      I t = o / OW;
      oh = t % OH;
      base = (t / OH) * H * W;
      wstep = 1;
    }
    const I h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const int hs = static_cast<int>(h0 < 0 ? -h0 : 0), ws = static_cast<int>(w0 < 0 ? -w0 : 0);
    const int he = static_cast<int>(imin(static_cast<I>(g.kh), H - h0));
    const int we = static_cast<int>(imin(static_cast<I>(g.kw), W - w0));
    Acc best = -std::numeric_limits<Acc>::infinity();
    int arg = hs * g.kw + ws;  // the first real element: the argmax when every element is -inf
    for (int dh = hs; dh < he; ++dh) {
      const I row = base + (h0 + dh) * W * wstep;  // h0 + dh and w0 + dw are >= 0 here
      for (int dw = ws; dw < we; ++dw) {
        const Acc v = to_acc(x[row + (w0 + dw) * wstep]);
        if (v > best || v != v) {
          best = v;
          arg = dh * g.kw + dw;
        }
      }
    }
    out[o] = from_acc<T>(best);
    if (argmax != nullptr) argmax[o] = static_cast<uint8_t>(arg);
  }
}

template <typename T, typename I, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    maxpool2d_bwd_kernel(const T* __restrict__ grad_out, const uint8_t* __restrict__ argmax, T* __restrict__ grad_x,
                         Geometry g) {
  using Acc = acc_t<T>;
  const I C = static_cast<I>(g.C), H = static_cast<I>(g.H), W = static_cast<I>(g.W);
  const I OH = static_cast<I>(g.OH), OW = static_cast<I>(g.OW);
  const I total = static_cast<I>(g.N) * C * H * W;
  const I step = static_cast<I>(gridDim.x) * kThreads;
  for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    I iw, ih, obase, wstep;
    if constexpr (NHWC) {
      const I c = i % C;
      I t = i / C;
      iw = t % W;
      t /= W;
      ih = t % H;
      obase = (t / H) * OH * OW * C + c;
      wstep = C;
    } else {
      iw = i % W;
      I t = i / W;
      ih = t % H;
      obase = (t / H) * OH * OW;
      wstep = 1;
    }
    // outputs oh with oh*sh - ph <= ih <= oh*sh - ph + kh - 1 (numerators kept >= 0)
    const I hn = ih + g.ph - g.kh + 1, wn = iw + g.pw - g.kw + 1;
    const I oh_lo = (hn > 0 ? hn + g.sh - 1 : g.sh - 1) / g.sh;
    const I oh_hi = imin(static_cast<I>((ih + g.ph) / g.sh), OH - 1);
    const I ow_lo = (wn > 0 ? wn + g.sw - 1 : g.sw - 1) / g.sw;
    const I ow_hi = imin(static_cast<I>((iw + g.pw) / g.sw), OW - 1);
    Acc acc = 0;
    for (I oh = oh_lo; oh <= oh_hi; ++oh) {
      const I dh = ih - (oh * g.sh - g.ph);
      for (I ow = ow_lo; ow <= ow_hi; ++ow) {
        const I dw = iw - (ow * g.sw - g.pw);
        const I off = obase + (oh * OW + ow) * wstep;
        if (static_cast<I>(argmax[off]) == dh * g.kw + dw) acc += to_acc(grad_out[off]);
      }
    }
    grad_x[i] = from_acc<T>(acc);
  }
}

const char* const kFwd = "maxpool2d_forward";
const char* const kBwd = "maxpool2d_backward";

void check_geometry(const char* fn, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  check_nonneg(N, fn, "N");
  check_nonneg(C, fn, "C");
  check_positive(H, fn, "H");
  check_positive(W, fn, "W");
  check_positive(kh, fn, "kh");
  check_positive(kw, fn, "kw");
  check_positive(sh, fn, "sh");
  check_positive(sw, fn, "sw");
  check_nonneg(ph, fn, "ph");
  check_nonneg(pw, fn, "pw");
  if (kh * kw > 256)
    throw ArgError(cat(fn, ": kh * kw = ", kh * kw, " exceeds 256 (the argmax is one byte)"));
  if (2 * ph > kh || 2 * pw > kw)
    throw ArgError(cat(fn, ": padding (", ph, ", ", pw, ") must be at most half of the kernel (", kh, ", ", kw, ")"));
  if (sh >= (int64_t(1) << 31) || sw >= (int64_t(1) << 31))
    throw ArgError(cat(fn, ": sh and sw must be below 2^31, got ", sh, ", ", sw));
  const int64_t oh = (H + 2 * ph - kh) / sh + 1, ow = (W + 2 * pw - kw) / sw + 1;
  if (H + 2 * ph < kh || W + 2 * pw < kw || OH != oh || OW != ow)
    throw ArgError(cat(fn, ": OH x OW must be (H + 2 ph - kh) / sh + 1 x (W + 2 pw - kw) / sw + 1 = ",
                       (H + 2 * ph < kh ? 0 : oh), "x", (W + 2 * pw < kw ? 0 : ow), ", got ", OH, "x", OW));
}

void check_aligned(std::uintptr_t p, int64_t bytes, const char* fn, const char* arg) {
  if (p % static_cast<std::uintptr_t>(bytes) != 0)
    throw ArgError(cat(fn, ": ", arg, " (", p, ") is not aligned to ", bytes, " bytes"));
}

int64_t elem_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F64: return 8;
  }
  return 1;
}

Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw,
                  int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  return Geometry{N, C, H, W, OH, OW, static_cast<int>(kh), static_cast<int>(kw), static_cast<int>(sh),
                  static_cast<int>(sw), static_cast<int>(ph), static_cast<int>(pw)};
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, kThreads), kMaxBlocks)));
}

template <typename T, typename I, bool NHWC>
void launch_fwd(const MaxPool2dArgs& a, const Geometry& g, int64_t total) {
  maxpool2d_fwd_kernel<T, I, NHWC><<<blocks_for(total), kThreads, 0, as_stream(a.stream)>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), reinterpret_cast<uint8_t*>(a.argmax), g);
  check_launch("maxpool2d_fwd_kernel");
}

template <typename T, typename I, bool NHWC>
void launch_bwd(const MaxPool2dBackwardArgs& a, const Geometry& g, int64_t total) {
  maxpool2d_bwd_kernel<T, I, NHWC><<<blocks_for(total), kThreads, 0, as_stream(a.stream)>>>(
      reinterpret_cast<const T*>(a.grad_out), reinterpret_cast<const uint8_t*>(a.argmax),
      reinterpret_cast<T*>(a.grad_x), g);
  check_launch("maxpool2d_bwd_kernel");
}

// F(T, I, NHWC) for the runtime dtype, index width and layout
template <template <typename, typename, bool> class L, typename A>
void dispatch(DType d, bool wide, bool nhwc, const A& a, const Geometry& g, int64_t total) {
  auto by_layout = [&](auto tag_t, auto tag_i) {
    using T = decltype(tag_t);
    using I = decltype(tag_i);
    if (nhwc)
      L<T, I, true>::run(a, g, total);
    else
      L<T, I, false>::run(a, g, total);
  };
  auto by_index = [&](auto tag_t) {
    if (wide)
      by_layout(tag_t, int64_t{});
    else
      by_layout(tag_t, int32_t{});
  };
  switch (d) {
    case DType::F32: by_index(float{}); break;
    case DType::F16: by_index(__half{}); break;
    case DType::BF16: by_index(__nv_bfloat16{}); break;
    case DType::F64: by_index(double{}); break;
  }
}

template <typename T, typename I, bool NHWC>
struct Fwd {
  static void run(const MaxPool2dArgs& a, const Geometry& g, int64_t total) { launch_fwd<T, I, NHWC>(a, g, total); }
};
template <typename T, typename I, bool NHWC>
struct Bwd {
  static void run(const MaxPool2dBackwardArgs& a, const Geometry& g, int64_t total) {
    launch_bwd<T, I, NHWC>(a, g, total);
  }
};

constexpr int64_t kInt32Limit = (int64_t(1) << 31) - 1;

}  // namespace pool

void maxpool2d_forward(const MaxPool2dArgs& a) {
  using namespace pool;
  check_dtype(static_cast<int>(a.dtype), kFwd, "dtype");
  check_geometry(kFwd, a.N, a.C, a.H, a.W, a.OH, a.OW, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw);
  const int64_t total = a.N * a.C * a.OH * a.OW;
  if (total == 0) return;
  check_ptr(a.x, kFwd, "x");
  check_ptr(a.out, kFwd, "out");
  const int64_t es = elem_size(a.dtype);
  check_aligned(a.x, es, kFwd, "x");
  check_aligned(a.out, es, kFwd, "out");
  const bool wide = std::max(a.N * a.C * a.H * a.W, total) > kInt32Limit;
  dispatch<Fwd>(a.dtype, wide, a.nhwc, a,
                geometry(a.N, a.C, a.H, a.W, a.OH, a.OW, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw), total);
}

void maxpool2d_backward(const MaxPool2dBackwardArgs& a) {
  using namespace pool;
  check_dtype(static_cast<int>(a.dtype), kBwd, "dtype");
  check_geometry(kBwd, a.N, a.C, a.H, a.W, a.OH, a.OW, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw);
  const int64_t total = a.N * a.C * a.H * a.W;
  if (total == 0) return;
  check_ptr(a.grad_out, kBwd, "grad_out");
  check_ptr(a.argmax, kBwd, "argmax");
  check_ptr(a.grad_x, kBwd, "grad_x");
  const int64_t es = elem_size(a.dtype);
  check_aligned(a.grad_out, es, kBwd, "grad_out");
  check_aligned(a.grad_x, es, kBwd, "grad_x");
  const bool wide = std::max(a.N * a.C * a.OH * a.OW, total) > kInt32Limit;
  dispatch<Bwd>(a.dtype, wide, a.nhwc, a,
                geometry(a.N, a.C, a.H, a.W, a.OH, a.OW, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw), total);
}

}  // namespace rk
