// Convolution weight gradient on tensor cores (sm_80+), the BN-backward operand computed in
// registers as it is loaded: csrc/conv2d_wgrad.h.
//
// GEMM per filter tap (r, s): C[co][ci] = sum over pixels k = (n, oh, ow) of dy[k][co] * x_rs[k][ci],
// x_rs[k] = x[n, oh*sh - ph + r, ow*sw - pw + s] (zero outside the image). One CTA: a 128 (co) x
// 64 (ci) tile of one tap over the pixel range of its split, K tiles of 32 pixels. Both operands
// are channels-contiguous (K-major) in memory and in shared memory ([32 pixels][128 co] and
// [32 pixels][64 ci] rows, 16-byte chunks XOR-swizzled with row & 7) and reach the mma fragments by
// ldmatrix.trans; register-staged (loaded before a tile's math, the operand computed and stored
// after it), two buffers. The pixel walk of the x rows advances by 32 pixels per tile with
// compare-and-wrap (no division in the main loop).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "acc_types.cuh"
#include "arrival.cuh"
#include "bn_backward_operand.cuh"
#include "conv2d_layout.h"
#include "conv2d_wgrad.h"
#include "ptx.cuh"

namespace rk {
namespace wgrad {
namespace {

using bnbwd::elem;
using bnbwd::ld16;
using conv::c_col;
using conv::c_row;
using conv::MI;
using conv::NI;
using conv::Pixel;
using conv::WARP_M;
using conv::WARP_N;

constexpr int kThreads = 128;
constexpr int BM = 128;  // output channels
constexpr int BN = 64;   // input channels
constexpr int BK = 32;   // pixels per K tile
constexpr int A_ROW = BM * 2;  // bytes per pixel row of the A tile (16 chunks)
constexpr int B_ROW = BN * 2;  // (8 chunks)
constexpr int A_STAGE = BK * A_ROW;
constexpr int B_STAGE = BK * B_ROW;
constexpr int SMEM_BYTES = 2 * (A_STAGE + B_STAGE);
constexpr int A_CPR = BM / 8;              // chunks per A row (16)
constexpr int B_CPR = BN / 8;              // (8)
constexpr int AROWS = BK * A_CPR / kThreads;  // A chunks per thread (4): rows tid / 16 + 8 i
constexpr int BROWS = BK * B_CPR / kThreads;  // B chunks per thread (2): rows tid / 8 + 16 i
constexpr int A_RSTEP = kThreads / A_CPR;     // 8
constexpr int B_RSTEP = kThreads / B_CPR;     // 16
constexpr int kMaxSplits = 64;
static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory");

__device__ __forceinline__ int a_swz(int row, int chunk) { return row * A_ROW + ((chunk ^ (row & 7)) << 4); }
__device__ __forceinline__ int b_swz(int row, int chunk) { return row * B_ROW + ((chunk ^ (row & 7)) << 4); }

struct Params {
  bnbwd::Operand dy;  // the A operand's sources (C = Cout)
  const void* x;
  bnbwd::Upstream up;  // x recomputed from up.y when given (x null)
  void* gw;
  float* part;  // [splits][KH*KW][Cout][Cin] or nullptr (one split: written directly)
  int* counters;  // [KH*KW][m_tiles][n_tiles] int32 arrival counters, all zero (splits > 1)
  long long gws[4];
  int N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw, OH, OW;
  int M;            // pixels N*OH*OW
  int m_tiles, n_tiles, taps, splits;
  int tiles_per_split;  // K tiles (of BK pixels) per split
};

// ---- split-K, in the same launch: after writing its float32 partial of a (tap, co tile, ci tile),
// a CTA arrives on that tile's counter (arrive_last, arrival.cuh); the last of the tile's `splits`
// arrivals sums the tile's partials in split order from L2 (ld.cg), rounds once and writes grad_weight, and
// puts the counter back to 0. Which CTA is last varies; the sum's order does not: deterministic.
// Not inlined: the main loop's register allocation stays that of the kernel without it.
struct SplitReduce {
  const float* part;  // [splits][taps][Cout][Cin]
  void* gw;
  int* counters;  // [taps][m_tiles][n_tiles]
  long long gws[4];
  int Cout, Cin, taps, splits;
};
template <typename T>
__device__ __noinline__ void split_arrive_reduce(const SplitReduce a, int* s_flag, int tid, int tile, int tap, int r,
                                                 int s, int m0, int n0) {
  if (!arrive_last(a.counters + tile, a.splits, s_flag)) return;
  const long long per = static_cast<long long>(a.taps) * a.Cout * a.Cin;  // one split's partials
  const long long tap_off = r * a.gws[2] + s * a.gws[3];
  T* const gw = static_cast<T*>(a.gw);
  constexpr int PAIRS = BN / 2;  // ci pairs per co row (float2)
  for (int j = tid; j < BM * PAIRS; j += kThreads) {
    const int co = m0 + j / PAIRS, ci = n0 + (j % PAIRS) * 2;
    if (co >= a.Cout || ci >= a.Cin) continue;  // Cin % 8 == 0: ci + 1 < Cin too
    const float* src = a.part + (static_cast<long long>(tap) * a.Cout + co) * a.Cin + ci;
    float v0 = 0.f, v1 = 0.f;
#pragma unroll 4
    for (int sp = 0; sp < a.splits; ++sp) {
      const float2 q = __ldcg(reinterpret_cast<const float2*>(src + sp * per));
      v0 += q.x;
      v1 += q.y;
    }
    const long long o = co * a.gws[0] + ci * a.gws[1] + tap_off;
    gw[o] = from_acc<T>(v0);
    gw[o + a.gws[1]] = from_acc<T>(v1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) conv2d_wgrad_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  const uint32_t a_base = conv::smem_addr(smem);
  const uint32_t b_base = a_base + 2 * A_STAGE;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  // ---- the CTA's tile: n tile fastest, then m tile, tap, split (divisions before the main loop)
  int b = static_cast<int>(blockIdx.x);
  const int nt = b % p.n_tiles;
  b /= p.n_tiles;
  const int mt = b % p.m_tiles;
  b /= p.m_tiles;
  const int tap = b % p.taps;
  const int split = b / p.taps;
  const int r = tap / p.KW, s = tap - (tap / p.KW) * p.KW;
  const int m0 = mt * BM, n0 = nt * BN;
  const int k_tile0 = split * p.tiles_per_split;
  const int KT = max(0, min(p.tiles_per_split, (p.M + BK - 1) / BK - k_tile0));
  const int k_end = p.M;

  const bool x_up = p.up.y != nullptr;

  // ---- A (dy) chunks: pixel rows a_row0 + 8 i, output channels co_a..co_a+7 (fixed per thread)
  const int a_cc = tid % A_CPR;
  const int a_row0 = tid / A_CPR;
  const int co_a = m0 + a_cc * 8;
  const bool co_ok = co_a < p.Cout;  // Cout % 8 == 0: a chunk is all in or all out
  bnbwd::Coef coef;
  bnbwd::load_coef(coef, p.dy, co_a, p.dy.coef != nullptr);
  int a_pix = k_tile0 * BK + a_row0;  // pixel of row a_row0 of the next tile to load

  // ---- B (x) chunks: pixel rows b_row0 + 16 i, input channels ci_b..ci_b+7; each row's output
  // pixel (n, oh, ow) walked along with it
  const int b_cc = tid % B_CPR;
  const int b_row0 = tid / B_CPR;
  const int ci_b = n0 + b_cc * 8;
  const bool ci_ok = ci_b < p.Cin;
  float xs_[8], xt_[8];  // x recomputed from up_y: x = relu(up_y * xs_ + xt_)
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    xs_[e] = 1.f;
    xt_[e] = 0.f;
    if (x_up && ci_ok) bnbwd::x_affine(p.up, ci_b + e, p.up.mean[ci_b + e], xs_[e], xt_[e]);
  }
  int b_pix[BROWS];
  Pixel b_px[BROWS];
#pragma unroll
  for (int i = 0; i < BROWS; ++i) {
    b_pix[i] = k_tile0 * BK + b_row0 + B_RSTEP * i;
    b_px[i] = conv::decompose_m(b_pix[i] < p.M ? b_pix[i] : 0, p.OH, p.OW);
  }
  const void* const xsrc = x_up ? p.up.y : p.x;

  bnbwd::Chunk ra[AROWS];
  uint32_t valid = 0;
  uint4 rx[BROWS];
  uint32_t xvalid = 0;

  auto load = [&]() {
    valid = 0;
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
      const int pix = a_pix + A_RSTEP * i;
      const bool ok = co_ok && pix < k_end;
      bnbwd::load_chunk(ra[i], p.dy, pix, co_a, ok);
      valid |= ok ? (1u << i) : 0u;
    }
    a_pix += BK;
    xvalid = 0;
#pragma unroll
    for (int i = 0; i < BROWS; ++i) {
      const int ih = b_px[i].p * p.sh - p.ph + r, iw = b_px[i].q * p.sw - p.pw + s;
      const bool ok = ci_ok && b_pix[i] < k_end && conv::in_image(ih, iw, p.H, p.W);
      const long long off = ((static_cast<long long>(b_px[i].n) * p.H + ih) * p.W + iw) * p.Cin + ci_b;
      rx[i] = ok ? ld16(xsrc, off) : make_uint4(0, 0, 0, 0);
      xvalid |= ok ? (1u << i) : 0u;
      // the row's pixel BK on
      b_pix[i] += BK;
      b_px[i].q += BK;
      while (b_px[i].q >= p.OW) {
        b_px[i].q -= p.OW;
        if (++b_px[i].p == p.OH) {
          b_px[i].p = 0;
          ++b_px[i].n;
        }
      }
    }
  };
  auto store = [&](int st) {
#pragma unroll
    for (int i = 0; i < AROWS; ++i)
      *reinterpret_cast<uint4*>(smem + st * A_STAGE + a_swz(a_row0 + A_RSTEP * i, a_cc)) =
          bnbwd::operand<T>(ra[i], coef, p.dy, (valid >> i) & 1u);
#pragma unroll
    for (int i = 0; i < BROWS; ++i) {
      uint4 v = rx[i];
      if (x_up)
        v = bnbwd::pack8<T>([&](int e) {
          const float xv = bnbwd::x_of(elem<T>(rx[i], e), xs_[e], xt_[e]);
          return ((xvalid >> i) & 1u) ? xv : 0.f;
        });
      *reinterpret_cast<uint4*>(smem + 2 * A_STAGE + st * B_STAGE + b_swz(b_row0 + B_RSTEP * i, b_cc)) = v;
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // ldmatrix.trans row addresses: A matrix (l >> 3): k rows +8 for matrices 2, 3, m +8 for 1, 3;
  // B matrix (l >> 3): k rows +8 for matrices 1, 3, n +8 for 2, 3
  const int a_k = ((lane >> 4) & 1) * 8 + (lane & 7), a_m = ((lane >> 3) & 1) * 8;
  const int b_k = ((lane >> 3) & 1) * 8 + (lane & 7), b_n = ((lane >> 4) & 1) * 8;
  auto compute = [&](int st) {
    const uint32_t a_st = a_base + st * A_STAGE;
    const uint32_t b_st = b_base + st * B_STAGE;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        conv::ldsm_x4_trans(af[mi], a_st + a_swz(ks * 16 + a_k, (wm * WARP_M + mi * 16 + a_m) >> 3));
#pragma unroll
      for (int np = 0; np < NI / 2; ++np) {
        uint32_t q[4];
        conv::ldsm_x4_trans(q, b_st + b_swz(ks * 16 + b_k, (wn * WARP_N + np * 16 + b_n) >> 3));
        bf[2 * np][0] = q[0];
        bf[2 * np][1] = q[1];
        bf[2 * np + 1][0] = q[2];
        bf[2 * np + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) conv::mma16<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  };

  if (KT > 0) {
    load();
    store(0);
  }
  __syncthreads();
  int st = 0;
  for (int kt = 0; kt < KT; ++kt) {
    const bool more = kt + 1 < KT;
    if (more) load();
    compute(st);
    if (more) store(st ^ 1);
    __syncthreads();
    st ^= 1;
  }

  // ---- epilogue: one split: round and write grad_weight (its strides); else float32 partials
  // [split][tap][co][ci] (ci pairs adjacent: float2)
  const long long tap_off = r * p.gws[2] + s * p.gws[3];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int co = m0 + wm * WARP_M + mi * 16 + c_row(lane, 2 * h);
        const int ci = n0 + wn * WARP_N + ni * 8 + c_col(lane, 0);
        if (co >= p.Cout || ci >= p.Cin) continue;  // Cin % 8 == 0: ci + 1 < Cin too
        const float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        if (p.part == nullptr) {
          T* const gw = static_cast<T*>(p.gw);
          const long long o = co * p.gws[0] + ci * p.gws[1] + tap_off;
          gw[o] = from_acc<T>(v0);
          gw[o + p.gws[1]] = from_acc<T>(v1);
        } else {
          const long long o = ((static_cast<long long>(split) * p.taps + tap) * p.Cout + co) * p.Cin + ci;
          *reinterpret_cast<float2*>(p.part + o) = make_float2(v0, v1);
        }
      }
  if (p.part != nullptr) {  // the pipeline's shared memory is dead: its first word is the flag
    const int tile = static_cast<int>(blockIdx.x) % (p.taps * p.m_tiles * p.n_tiles);
    split_arrive_reduce<T>(SplitReduce{p.part, p.gw, p.counters, {p.gws[0], p.gws[1], p.gws[2], p.gws[3]}, p.Cout,
                                       p.Cin, p.taps, p.splits},
                           reinterpret_cast<int*>(smem), tid, tile, tap, r, s, m0, n0);
  }
#else
  __trap();
#endif
}

constexpr int64_t kIntMax = 2147483647;

void check_int32(int64_t v, const char* fn, const char* what) {
  if (v > kIntMax) throw ArgError(cat(fn, ": ", what, " = ", v, " exceeds the 32-bit index range of the kernel"));
}

template <typename T>
void launch(const Params& p, int64_t ctas, cudaStream_t stream) {
  conv2d_wgrad_kernel<T><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(p);
  check_launch("conv2d_wgrad: conv2d_wgrad_kernel");
}

}  // namespace
}  // namespace wgrad

int64_t conv2d_wgrad_splits(int64_t N, int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t OH, int64_t OW) {
  using namespace wgrad;
  const int64_t tiles = KH * KW * ceil_div(Cout, BM) * ceil_div(Cin, BN);
  const int64_t k_tiles = ceil_div(N * OH * OW, BK);
  int64_t s = ceil_div(264, tiles);             // about two waves of 132 SMs at 2 CTAs/SM... or more
  s = std::min<int64_t>(s, ceil_div(k_tiles, 16));  // >= 16 K tiles (512 pixels) per split
  return std::max<int64_t>(1, std::min<int64_t>(s, kMaxSplits));
}

int64_t conv2d_wgrad_workspace_bytes(int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits) {
  return splits > 1 ? splits * KH * KW * Cout * Cin * static_cast<int64_t>(sizeof(float)) : 0;
}

int64_t conv2d_wgrad_counters(int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits) {
  using namespace wgrad;
  return splits > 1 ? KH * KW * ceil_div(Cout, BM) * ceil_div(Cin, BN) : 0;
}

void conv2d_wgrad(const Conv2dWgradArgs& a) {
  using namespace wgrad;
  const char* fn = "conv2d_wgrad";
  if (a.dtype != DType::F16 && a.dtype != DType::BF16)
    throw ArgError(cat(fn, ": dtype ", dtype_name(a.dtype), " is not supported (float16 or bfloat16)"));
  check_conv_sizes(a, fn, kZeroNone, {{a.splits, "splits"}});
  if (a.Cin % 8 != 0) throw ArgError(cat(fn, ": Cin = ", a.Cin, " must be a multiple of 8"));
  if (a.Cout % 8 != 0) throw ArgError(cat(fn, ": Cout = ", a.Cout, " must be a multiple of 8"));
  if (a.splits > kMaxSplits) throw ArgError(cat(fn, ": splits = ", a.splits, " > ", kMaxSplits));
  if (a.H + 2 * a.pad_h < a.KH || a.W + 2 * a.pad_w < a.KW)
    throw ArgError(cat(fn, ": the padded input is smaller than the kernel"));
  const int64_t OH = (a.H + 2 * a.pad_h - a.KH) / a.stride_h + 1;
  const int64_t OW = (a.W + 2 * a.pad_w - a.KW) / a.stride_w + 1;
  if (a.OH != OH) throw ArgError(cat(fn, ": OH = ", a.OH, " but the convolution gives ", OH));
  if (a.OW != OW) throw ArgError(cat(fn, ": OW = ", a.OW, " but the convolution gives ", OW));
  check_int32(a.N * OH * OW * a.Cout + BK * a.Cout, fn, "N*OH*OW*Cout");
  check_int32(a.N * a.H * a.W * a.Cin, fn, "N*H*W*Cin");
  check_int32(a.KH * a.KW * ceil_div(a.Cout, BM) * ceil_div(a.Cin, BN) * a.splits, fn, "CTAs");
  check_ptr(a.g, fn, "g");
  check_ptr(a.grad_weight, fn, "grad_weight");
  if (a.x == 0 && a.up_y == 0) throw ArgError(cat(fn, ": x is null and up_y is not given"));
  if (a.x != 0 && a.up_y != 0) throw ArgError(cat(fn, ": x and up_y are both given (one or the other)"));
  if (a.up_y) {
    check_ptr(a.up_mean, fn, "up_mean (up_y was given)");
    check_ptr(a.up_var, fn, "up_var (up_y was given)");
    if (a.up_w_dtype == DType::F64) throw ArgError(cat(fn, ": up_w_dtype float64 is not supported"));
  }
  for (auto [v, name] : {std::pair<std::uintptr_t, const char*>{a.g, "g"}, {a.mask, "mask"}, {a.y, "y"},
                         {a.x, "x"}, {a.up_y, "up_y"}})
    if (v % 16 != 0) throw ArgError(cat(fn, ": ", name, " must be 16-byte aligned"));
  if (a.grad_weight % 2 != 0) throw ArgError(cat(fn, ": grad_weight is not aligned to its element size"));
  if (a.mask && a.mask_bits) throw ArgError(cat(fn, ": mask and mask_bits are both given (one or neither)"));
  if ((a.coef != 0) != (a.mean != 0)) throw ArgError(cat(fn, ": coef and mean must be given together"));
  if (a.coef && a.y == 0) throw ArgError(cat(fn, ": coef given without y"));
  for (int i = 0; i < 4; ++i) {
    static const char* names[4] = {"gw_stride[0]", "gw_stride[1]", "gw_stride[2]", "gw_stride[3]"};
    check_nonneg(a.gw_stride[i], fn, names[i]);
  }
  const int64_t need = conv2d_wgrad_workspace_bytes(a.Cin, a.Cout, a.KH, a.KW, a.splits);
  if (need > 0) {
    check_ptr(a.workspace, fn, "workspace (splits > 1)");
    check_ptr(a.counters, fn, "counters (splits > 1)");
    if (a.workspace % 16 != 0) throw ArgError(cat(fn, ": workspace must be 16-byte aligned"));
    if (a.counters % 4 != 0) throw ArgError(cat(fn, ": counters must be 4-byte aligned"));
    if (a.workspace_bytes < need)
      throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", need, " required"));
    const int64_t need_cnt = conv2d_wgrad_counters(a.Cin, a.Cout, a.KH, a.KW, a.splits);
    if (a.counters_count < need_cnt)
      throw ArgError(cat(fn, ": counters_count = ", a.counters_count, " < ", need_cnt, " required"));
  }
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "conv2d_wgrad: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
             "conv2d_wgrad: cudaDeviceGetAttribute");
  if (major < 8)
    throw ArgError(cat(fn, ": needs a GPU of compute capability >= 8.0 (mma.sync); device ", dev, " is ", major, ".x"));

  Params p{};
  p.dy = bnbwd::operand_of(a.g, a.mask, a.mask_bits, a.y, a.coef, a.mean, a.Cout);
  p.x = reinterpret_cast<const void*>(a.x);
  p.up = bnbwd::upstream_of(a.up_y, a.up_mean, a.up_var, a.up_weight, a.up_bias, a.up_w_dtype, a.up_eps);
  p.gw = reinterpret_cast<void*>(a.grad_weight);
  p.part = need > 0 ? reinterpret_cast<float*>(a.workspace) : nullptr;
  p.counters = need > 0 ? reinterpret_cast<int*>(a.counters) : nullptr;
  for (int i = 0; i < 4; ++i) p.gws[i] = a.gw_stride[i];
  p.N = static_cast<int>(a.N);
  p.Cin = static_cast<int>(a.Cin);
  p.H = static_cast<int>(a.H);
  p.W = static_cast<int>(a.W);
  p.Cout = static_cast<int>(a.Cout);
  p.KH = static_cast<int>(a.KH);
  p.KW = static_cast<int>(a.KW);
  p.sh = static_cast<int>(a.stride_h);
  p.sw = static_cast<int>(a.stride_w);
  p.ph = static_cast<int>(a.pad_h);
  p.pw = static_cast<int>(a.pad_w);
  p.OH = static_cast<int>(OH);
  p.OW = static_cast<int>(OW);
  p.M = static_cast<int>(a.N * OH * OW);
  p.m_tiles = static_cast<int>(ceil_div(a.Cout, BM));
  p.n_tiles = static_cast<int>(ceil_div(a.Cin, BN));
  p.taps = static_cast<int>(a.KH * a.KW);
  p.splits = static_cast<int>(a.splits);
  p.tiles_per_split = static_cast<int>(ceil_div(ceil_div(p.M, BK), a.splits));
  const int64_t ctas = static_cast<int64_t>(p.taps) * p.m_tiles * p.n_tiles * p.splits;
  cudaStream_t stream = as_stream(a.stream);
  if (a.dtype == DType::F16)
    launch<__half>(p, ctas, stream);
  else
    launch<__nv_bfloat16>(p, ctas, stream);
}

}  // namespace rk
