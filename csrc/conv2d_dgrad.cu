// Convolution data gradient on tensor cores (sm_80+), the BN-backward operand computed in
// registers as it is loaded: csrc/conv2d_dgrad.h. Tiling, swizzle, ldmatrix and mma fragment
// mapping are the forward's (conv2d_layout.h); the operands are register-staged (global -> registers
// before a tile's math, the operand computed and stored to shared memory after it), two buffers.
//
// GEMM view per stride parity class (a_h, a_w) in [0, sh) x [0, sw): the input pixels
// h = a_h + sh * i, w = a_w + sw * j (rows m -> (n, i, j), M_c = N * H_c * W_c), columns = input
// channels ci, K = (co tile, tap of the class, co): a filter tap (r, s) belongs to the class when
// (a_h + ph - r) % sh == 0 and (a_w + pw - s) % sw == 0, and then reads dy at
// (oh, ow) = (i + dh, j + dw), dh = (a_h + ph - r) / sh, dw = (a_w + pw - s) / sw (host-computed
// per tap: no division in the main loop). Stride 1 is one class with every tap; stride 2 is four
// classes (the 1x1 stride-2 classes without taps write the epilogue of gx = 0 only).
//
// A tile [BM pixels][32 co] = dy (K-contiguous, ldmatrix), B tile [32 co][BN ci] = w[co, ci, r, s]
// read in place (input channels contiguous: a channels_last weight, or any 1x1; ldmatrix.trans, the
// wgrad's B tile). K runs co tile outer, taps inner: the per-channel coefficients of a thread's 8
// channels are reloaded only when the co tile changes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "acc_types.cuh"
#include "arrival.cuh"
#include "bn_backward_operand.cuh"
#include "conv2d_dgrad.h"
#include "conv2d_layout.h"
#include "ptx.cuh"

namespace rk {
namespace dgrad {
namespace {

using bnbwd::elem;
using bnbwd::ld16;
using conv::BK_BYTES;
using conv::BM;
using conv::BN;
using conv::c_col;
using conv::c_row;
using conv::CHUNKS;
using conv::KSTEPS;
using conv::MI;
using conv::NI;
using conv::Pixel;
using conv::swz;
using conv::WARP_M;
using conv::WARP_N;

constexpr int kThreads = 128;
constexpr int kMaxTaps = 9;     // per parity class
constexpr int kMaxClasses = 4;  // stride <= 2
constexpr int BKE = 32;         // K elements (output channels) per tile, 16-bit
constexpr int A_STAGE = BM * BK_BYTES;
constexpr int B_STAGE = BN * BK_BYTES;
constexpr int EP_LD = BN + 4;  // epilogue staging row (floats)
constexpr int PIPE_BYTES = 2 * (A_STAGE + B_STAGE);
constexpr int EP_BYTES = BM * EP_LD * 4;
constexpr int SMEM_BYTES = PIPE_BYTES > EP_BYTES ? PIPE_BYTES : EP_BYTES;
constexpr int ROW_STEP = kThreads / CHUNKS;  // 32
constexpr int AROWS = BM / ROW_STEP;         // 4
constexpr int B_CPR = BN / 8;                // B tile: 16-byte chunks per co row (8)
constexpr int B_RSTEP = kThreads / B_CPR;    // rows tid / 8 + 16 i
constexpr int BROWS = BKE / B_RSTEP;         // 2
constexpr int VPR = BN / 8;                  // epilogue: 8-channel vectors per tile row
constexpr int EP_ROWS = kThreads / VPR;      // rows handled at once (16)
static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory");
static_assert(BKE * BN * 2 == B_STAGE, "the B tile is [32 co][64 ci]");
static_assert(2 * EP_ROWS * BN * 4 <= SMEM_BYTES, "upstream partial staging fits");

struct ClassInfo {
  int a_h, a_w;        // parity of the class's input pixels
  int Hc, Wc, Mc;      // pixels per image row / column / in all: rows of the class's GEMM
  int m_tiles;         // ceil(Mc / BM)
  int cta_start;       // first CTA (blockIdx.x) of the class
  int part_start;      // first m tile of the class in the upstream partials
  int ntaps;
  int dh[kMaxTaps], dw[kMaxTaps];  // dy pixel (i + dh, j + dw) of each tap
  int dpix[kMaxTaps];              // dh * OW + dw
  int wofs[kMaxTaps];              // r * w_stride[2] + s * w_stride[3]
};

// the upstream finalize's arguments (upstream_arrive_finalize, below)
struct UpFinalize {
  const float* part;  // [2][tiles][Cin]
  double* grp;        // [2][groups][Cin]
  int* counters;
  const float* up_var;
  const void* up_weight;
  float* up_coef;
  void* up_gw;
  void* up_gb;
  int tiles, Cin, n_tiles, group_rows, groups, w_code, gw_code;  // w_code / gw_code: 0 f32, 1 f16, 2 bf16
  float eps;
  double m;  // N*H*W
};

struct Params {
  bnbwd::Operand dy;  // the A operand's sources (C = Cout)
  const void* w;
  void* gx;
  const void* res;
  const void* res_mask;
  const uint8_t* rbits;
  const void* up_out;
  bnbwd::Upstream up;  // up_y (UP) and its BN: up_out recomputed from it when up_out is null
  float* part;  // [2][tiles][Cin] (sum_g, sum_gd) or nullptr
  UpFinalize fin;  // the upstream finalize's arguments (UP)
  int N, Cin, H, W, Cout, OH, OW, sw, sh;
  long long ws0;  // w_stride[0] (w_stride[1] == 1)
  int xbytes;     // of res_bits (ceil(Cin / 8))
  int co_tiles;   // ceil(Cout / 32)
  int n_tiles;    // ceil(Cin / BN)
  int tiles;      // upstream partial rows (all classes' m tiles)
  int nclasses;
  ClassInfo cls[kMaxClasses];
};

// the B tile: [32 co rows][64 ci] (8 chunks per row, XOR-swizzled with row & 7)
__device__ __forceinline__ int b_swz(int row, int chunk) { return row * (BN * 2) + ((chunk ^ (row & 7)) << 4); }

template <typename W>
__device__ __forceinline__ float load_vec(const void* v, int c) {
  return to_acc(static_cast<const W*>(v)[c]);
}
template <typename W>
__device__ __forceinline__ void store_vec(void* v, int c, float x) {
  static_cast<W*>(v)[c] = from_acc<W>(x);
}

// ---- the upstream finalize, in the dgrad's launch (conv2d_dgrad.h): every CTA of a column tile
// (all parity classes' row tiles) arrives, after its partial row, on the counter of its (group of
// group_rows partial rows, column tile) (arrive_last, arrival.cuh); the group's last arrival
// sums the group's rows in row order in float64 from L2 (ld.cg) and, with several groups, arrives
// on the column tile's counter, whose last arrival sums the group sums in group order and writes
// the upstream outputs. Which CTA is last varies, the order does not: deterministic. Each counter
// goes back to 0 in its last arrival. Not inlined: the main loop's registers stay the kernel's own.

// The (sum_g, sum_gd) of rows r0 .. r1 - 1 (load(r, g, d)) of one channel, in row order in float64
// by the CTA's 2 * BN threads: thread tid takes channel tid % BN (ok: it exists) and the first
// (tid < BN) or second half of the rows; the halves are added (first + second) through s (2 * BN
// doubles of shared memory). The result is in the threads tid < BN. Every thread calls it.
template <typename Load>
__device__ __forceinline__ void sum_rows(const Load& load, int r0, int r1, bool ok, int tid, double* s, double& sg,
                                         double& sd) {
  static_assert(kThreads == 2 * BN, "two threads per channel");
  const int cl = tid % BN;
  const int mid = r0 + (r1 - r0 + 1) / 2;
  const int lo = tid < BN ? r0 : mid, hi = tid < BN ? mid : r1;
  sg = sd = 0.0;
  if (ok) {
#pragma unroll 4
    for (int r = lo; r < hi; ++r) {
      double g, d;
      load(r, g, d);
      sg += g;
      sd += d;
    }
  }
  if (tid >= BN) {
    s[cl] = sg;
    s[BN + cl] = sd;
  }
  __syncthreads();
  if (tid < BN) {
    sg += s[cl];
    sd += s[BN + cl];
  }
  __syncthreads();  // s is free again
}

__device__ __forceinline__ void finalize_channel(const UpFinalize& a, int c, double sg, double sd) {
  const float sum_g = static_cast<float>(sg), sum_gd = static_cast<float>(sd);
  const float invstd = 1.f / sqrtf(a.up_var[c] + a.eps);
  float wv = 1.f;
  if (a.up_weight != nullptr)
    wv = a.w_code == 0 ? load_vec<float>(a.up_weight, c)
         : a.w_code == 1 ? load_vec<__half>(a.up_weight, c)
                         : load_vec<__nv_bfloat16>(a.up_weight, c);
  const float av = wv * invstd;
  const float mf = static_cast<float>(a.m);
  a.up_coef[c] = av;
  a.up_coef[a.Cin + c] = av * (sum_g / mf);
  a.up_coef[2 * a.Cin + c] = av * (invstd * invstd) * (sum_gd / mf);
  const float gw = sum_gd * invstd;
  if (a.up_gw != nullptr) {
    if (a.gw_code == 0) store_vec<float>(a.up_gw, c, gw);
    else if (a.gw_code == 1) store_vec<__half>(a.up_gw, c, gw);
    else store_vec<__nv_bfloat16>(a.up_gw, c, gw);
  }
  if (a.up_gb != nullptr) {
    if (a.gw_code == 0) store_vec<float>(a.up_gb, c, sum_g);
    else if (a.gw_code == 1) store_vec<__half>(a.up_gb, c, sum_g);
    else store_vec<__nv_bfloat16>(a.up_gb, c, sum_g);
  }
}

// row: this CTA's partial row (its class's part_start + its m tile); smem: the kernel's (dead)
// shared memory, 2 * BN doubles then the flag
__device__ __noinline__ void upstream_arrive_finalize(const UpFinalize a, unsigned char* smem, int tid, int row,
                                                      int n0) {
  double* const s_dbl = reinterpret_cast<double*>(smem);
  int* const s_last = reinterpret_cast<int*>(smem + 2 * BN * sizeof(double));
  const int col = n0 + tid % BN;
  const bool okc = col < a.Cin;
  const int nt = n0 / BN;
  const int grp = row / a.group_rows;
  const int r0 = grp * a.group_rows;
  const int r1 = min(r0 + a.group_rows, a.tiles);
  if (!arrive_last(a.counters + grp * a.n_tiles + nt, r1 - r0, s_last)) return;
  const long long TC = static_cast<long long>(a.tiles) * a.Cin;
  const float* const part = a.part;
  const int Cin = a.Cin;
  auto row_part = [=](int r, double& g, double& d) {
    const long long o = static_cast<long long>(r) * Cin + col;
    g = static_cast<double>(__ldcg(part + o));
    d = static_cast<double>(__ldcg(part + TC + o));
  };
  double sg, sd;
  sum_rows(row_part, r0, r1, okc, tid, s_dbl, sg, sd);
  if (a.groups == 1) {
    if (tid < BN && okc) finalize_channel(a, col, sg, sd);
    return;
  }
  const long long GC = static_cast<long long>(a.groups) * a.Cin;
  if (tid < BN && okc) {
    a.grp[static_cast<long long>(grp) * a.Cin + col] = sg;
    a.grp[GC + static_cast<long long>(grp) * a.Cin + col] = sd;
  }
  if (!arrive_last(a.counters + a.groups * a.n_tiles + nt, a.groups, s_last)) return;
  const double* const gsum = a.grp;
  auto group_part = [=](int g_, double& g, double& d) {
    const long long o = static_cast<long long>(g_) * Cin + col;
    g = __ldcg(gsum + o);
    d = __ldcg(gsum + GC + o);
  };
  sum_rows(group_part, 0, a.groups, okc, tid, s_dbl, sg, sd);
  if (tid < BN && okc) finalize_channel(a, col, sg, sd);
}

// ---- the dgrad kernel --------------------------------------------------------------------
// Registers: the accumulators (64), the staged operand (g, y, mask: 3 x 4 chunks of 16 bytes, the
// weight's 2 chunks), the 8 channels' coefficients; 2 CTAs of 128 threads per SM (<= 255 registers).
template <typename T, bool UP>
__global__ void __launch_bounds__(kThreads, 2) conv2d_dgrad_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  const uint32_t a_base = conv::smem_addr(smem);
  const uint32_t b_base = a_base + 2 * A_STAGE;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  // ---- the class and the tile of this CTA (divisions here only, before the main loop)
  const int b = static_cast<int>(blockIdx.x);
  int cl = 0;
#pragma unroll
  for (int c = 1; c < kMaxClasses; ++c)
    if (c < p.nclasses && b >= p.cls[c].cta_start) cl = c;
  const ClassInfo& ci_ = p.cls[cl];
  const int a_h = ci_.a_h, a_w = ci_.a_w, Hc = ci_.Hc, Wc = ci_.Wc, Mc = ci_.Mc;
  const int ntaps = ci_.ntaps;
  const conv::TileCoord tile = conv::tile_of(b - ci_.cta_start, ci_.m_tiles, p.n_tiles);
  const int m0 = tile.m * BM;
  const int n0 = tile.n * BN;

  const T* __restrict__ wp = static_cast<const T*>(p.w);
  const bool has_coef = p.dy.coef != nullptr;

  // ---- per-thread A rows: class pixel (i, j) of image n, as the dy pixel index n*OH*OW + i*OW + j
  // (a tap adds dpix); rows past Mc get i far outside, so the tap's bounds test masks them
  const int chunk = conv::vec_chunk(tid);
  const int row0 = tid >> 2;
  int a_i[AROWS], a_j[AROWS], a_pix[AROWS];
#pragma unroll
  for (int r = 0; r < AROWS; ++r) {
    const int m = m0 + row0 + ROW_STEP * r;
    const Pixel px = conv::decompose_m(m < Mc ? m : 0, Hc, Wc);
    a_i[r] = m < Mc ? px.p : -(1 << 28);
    a_j[r] = px.q;
    a_pix[r] = (px.n * p.OH + px.p) * p.OW + px.q;
  }
  // weight chunks: output channel rows b_row0 + 16 i of the K tile, input channels ci_b..ci_b+7
  const int b_cc = tid % B_CPR, b_row0 = tid / B_CPR;
  const int ci_b = n0 + b_cc * 8;
  const bool ci_ok = ci_b < p.Cin;  // Cin % 8 == 0

  // ---- staged registers of the next tile
  bnbwd::Chunk ra[AROWS];
  uint32_t valid = 0;  // bit r: chunk r of A is inside dy
  uint4 rw[BROWS];
  bnbwd::Coef coef;  // of the thread's 8 channels of the current co tile
  int ld_tap = 0, ld_co = 0;          // tile to load next: tap index, first channel of the co tile
  int st_co = 0;                      // channels of the tile whose registers are staged

  auto load = [&]() {
    const int co = ld_co + chunk * 8;
    const bool co_ok = co < p.Cout;  // Cout % 8 == 0: a chunk is all in or all out
    const int dh = ci_.dh[ld_tap], dw = ci_.dw[ld_tap], dpix = ci_.dpix[ld_tap];
    valid = 0;
#pragma unroll
    for (int r = 0; r < AROWS; ++r) {
      const bool ok = co_ok && conv::in_image(a_i[r] + dh, a_j[r] + dw, p.OH, p.OW);
      bnbwd::load_chunk(ra[r], p.dy, static_cast<long long>(a_pix[r] + dpix), co, ok);
      valid |= ok ? (1u << r) : 0u;
    }
    const int wofs = ci_.wofs[ld_tap];
#pragma unroll
    for (int r = 0; r < BROWS; ++r) {
      const int cw = ld_co + b_row0 + B_RSTEP * r;
      const bool ok = ci_ok && cw < p.Cout;
      rw[r] = ok ? ld16(wp, cw * p.ws0 + wofs + ci_b) : make_uint4(0, 0, 0, 0);
    }
    // a new co tile: its channels' coefficients (the staged tile of the old one is stored already)
    if (has_coef && ld_tap == 0 && ld_co != st_co) bnbwd::load_coef(coef, p.dy, co, true);
    st_co = ld_co;
    if (++ld_tap == ntaps) {
      ld_tap = 0;
      ld_co += BKE;
    }
  };
  // the staged tile's operand dy (rounded) and weight chunks into stage st
  auto store = [&](int st) {
#pragma unroll
    for (int r = 0; r < AROWS; ++r)
      *reinterpret_cast<uint4*>(smem + st * A_STAGE + swz(row0 + ROW_STEP * r, chunk)) =
          bnbwd::operand<T>(ra[r], coef, p.dy, (valid >> r) & 1u);
#pragma unroll
    for (int r = 0; r < BROWS; ++r)
      *reinterpret_cast<uint4*>(smem + 2 * A_STAGE + st * B_STAGE + b_swz(b_row0 + B_RSTEP * r, b_cc)) = rw[r];
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // ldmatrix.trans row addresses of the B tile (matrix l >> 3: k rows +8 for 1, 3; n +8 for 2, 3)
  const int b_k = ((lane >> 3) & 1) * 8 + (lane & 7), b_n = ((lane >> 4) & 1) * 8;
  auto compute = [&](int st) {
    const uint32_t a_st = a_base + st * A_STAGE;
    const uint32_t b_st = b_base + st * B_STAGE;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        conv::ldsm_x4(af[mi], a_st + swz(wm * WARP_M + mi * 16 + conv::a_ldsm_row(lane), conv::a_ldsm_chunk(lane, ks)));
#pragma unroll
      for (int np = 0; np < NI / 2; ++np) {
        uint32_t r[4];
        conv::ldsm_x4_trans(r, b_st + b_swz(ks * 16 + b_k, (wn * WARP_N + np * 16 + b_n) >> 3));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) conv::mma16<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  };

  // ---- main loop: two buffers, the next tile's loads in flight across this tile's math
  const int KT = ntaps * p.co_tiles;
  st_co = -1;
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
    if (more) store(st ^ 1);  // the other buffer: last read before the previous __syncthreads
    __syncthreads();
    st ^= 1;
  }

  // ---- epilogue: the accumulators staged through shared memory [BM][EP_LD] (float32), then per
  // 8-channel vector of one pixel: + residual (masked), * (up_out > 0), rounded, stored (16 bytes);
  // with UP the per-channel sums of the rounded grad_x over the tile's rows
  float* const s_ep = reinterpret_cast<float*>(smem);
  const int g_row = wm * WARP_M, g_col = wn * WARP_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        s_ep[(g_row + mi * 16 + c_row(lane, i)) * EP_LD + g_col + ni * 8 + c_col(lane, i)] = acc[mi][ni][i];
  __syncthreads();
  T* __restrict__ gx = static_cast<T*>(p.gx);
  const int cv = tid % VPR;  // this thread's 8 channels: the same for all its rows
  const int col0 = n0 + cv * 8;
  const bool col_ok = col0 < p.Cin;
  float up_mu[8], s_g[8], s_gd[8], xs_[8], xt_[8];  // xs_, xt_: up_out recomputed = relu(up_y * xs_ + xt_)
  const bool x_up = UP && p.up_out == nullptr;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    s_g[e] = 0.f;
    s_gd[e] = 0.f;
    up_mu[e] = (UP && col_ok) ? __ldg(p.up.mean + col0 + e) : 0.f;
    xs_[e] = 1.f;
    xt_[e] = 0.f;
    if (x_up && col_ok) bnbwd::x_affine(p.up, col0 + e, up_mu[e], xs_[e], xt_[e]);
  }
#pragma unroll 1
  for (int r = tid / VPR; r < BM; r += EP_ROWS) {
    const int m = m0 + r;
    if (m >= Mc || !col_ok) continue;
    const Pixel px = conv::decompose_m(m, Hc, Wc);
    const int h = a_h + p.sh * px.p, w = a_w + p.sw * px.q;
    const long long pix = (static_cast<long long>(px.n) * p.H + h) * p.W + w;
    const long long off = pix * p.Cin + col0;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = s_ep[r * EP_LD + cv * 8 + e];
    if (p.res != nullptr) {
      const uint4 rv = ld16(p.res, off);
      const uint4 rmv = p.res_mask != nullptr ? ld16(p.res_mask, off) : make_uint4(0, 0, 0, 0);
      const uint32_t rb = p.rbits != nullptr ? __ldg(p.rbits + (pix * p.xbytes + (col0 >> 3))) : 0u;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        bool keep = true;
        if (p.res_mask != nullptr) keep = elem<T>(rmv, e) > 0.f;
        if (p.rbits != nullptr) keep = (rb >> e) & 1u;
        v[e] += keep ? elem<T>(rv, e) : 0.f;
      }
    }
    if (p.up_out != nullptr) {
      const uint4 uo = ld16(p.up_out, off);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (!(elem<T>(uo, e) > 0.f)) v[e] = 0.f;
    }
    uint4 uy = make_uint4(0, 0, 0, 0);
    if constexpr (UP) uy = ld16(p.up.y, off);
    if (x_up) {  // the upstream ReLU mask of x = round(relu(up_y * s + t)) (rounded: exactly batch_norm_act's zeros)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float xv = bnbwd::x_of(elem<T>(uy, e), xs_[e], xt_[e]);
        if (!(to_acc(from_acc<T>(xv)) > 0.f)) v[e] = 0.f;
      }
    }
    const uint4 outv = bnbwd::pack8<T>([&](int e) { return v[e]; });
    *reinterpret_cast<uint4*>(gx + off) = outv;
    if constexpr (UP) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float gr = elem<T>(outv, e);
        s_g[e] += gr;
        s_gd[e] += gr * (elem<T>(uy, e) - up_mu[e]);
      }
    }
  }
  if constexpr (UP) {
    // the tile's per-channel partials: the EP_ROWS threads of one channel vector in a fixed order
    __syncthreads();  // the staging tile is read
    float* const s_pg = reinterpret_cast<float*>(smem);  // [EP_ROWS][BN]
    float* const s_pd = s_pg + EP_ROWS * BN;
    const int rr = tid / VPR;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      s_pg[rr * BN + cv * 8 + e] = s_g[e];
      s_pd[rr * BN + cv * 8 + e] = s_gd[e];
    }
    __syncthreads();
    if (tid < BN && n0 + tid < p.Cin) {
      float sg = 0.f, sd = 0.f;
#pragma unroll 1
      for (int k = 0; k < EP_ROWS; ++k) {
        sg += s_pg[k * BN + tid];
        sd += s_pd[k * BN + tid];
      }
      const long long o = static_cast<long long>(ci_.part_start + tile.m) * p.Cin + n0 + tid;
      p.part[o] = sg;
      p.part[static_cast<long long>(p.tiles) * p.Cin + o] = sd;
    }
    static_assert(2 * BN * sizeof(double) + sizeof(int) <= SMEM_BYTES, "upstream_arrive_finalize's shared memory");
    upstream_arrive_finalize(p.fin, smem, tid, ci_.part_start + tile.m, n0);
  }
#else
  __trap();
#endif
}

constexpr int64_t kIntMax = 2147483647;

void check_int32(int64_t v, const char* fn, const char* what) {
  if (v > kIntMax) throw ArgError(cat(fn, ": ", what, " = ", v, " exceeds the 32-bit index range of the kernel"));
}

// Partial rows per group of the upstream finalize: about sqrt(tiles), at least 16 (both levels read
// about sqrt(tiles) rows per channel; csrc/conv2d.cu's statistics merge groups the same way).
int64_t up_group_rows(int64_t tiles) {
  int64_t g = 1;
  while (g * g < tiles) ++g;
  return g < 16 ? 16 : g;
}

// The parity classes of the input (class extents, m tiles); taps filled by the caller.
int64_t total_tiles(int64_t N, int64_t H, int64_t W, int64_t sh, int64_t sw) {
  int64_t t = 0;
  for (int64_t ah = 0; ah < sh; ++ah)
    for (int64_t aw = 0; aw < sw; ++aw) {
      const int64_t hc = H > ah ? ceil_div(H - ah, sh) : 0, wc = W > aw ? ceil_div(W - aw, sw) : 0;
      t += ceil_div(N * hc * wc, BM);
    }
  return t;
}

template <typename T>
void launch(const Params& p, bool up, dim3 grid, cudaStream_t stream) {
  if (up) {
    conv2d_dgrad_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
    check_launch("conv2d_dgrad: conv2d_dgrad_kernel (upstream reductions)");
  } else {
    conv2d_dgrad_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
    check_launch("conv2d_dgrad: conv2d_dgrad_kernel");
  }
}

}  // namespace
}  // namespace dgrad

int64_t conv2d_dgrad_workspace_bytes(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w,
                                     bool upstream) {
  const char* fn = "conv2d_dgrad_workspace_bytes";
  check_nonneg(N, fn, "N");
  check_nonneg(Cin, fn, "Cin");
  check_nonneg(H, fn, "H");
  check_nonneg(W, fn, "W");
  check_positive(stride_h, fn, "stride_h");
  check_positive(stride_w, fn, "stride_w");
  if (!upstream) return 0;
  const int64_t tiles = dgrad::total_tiles(N, H, W, stride_h, stride_w);
  const int64_t groups = ceil_div(tiles, dgrad::up_group_rows(tiles));
  // [2][groups][Cin] float64 group sums, then [2][tiles][Cin] float32 partial rows
  return 2 * groups * Cin * static_cast<int64_t>(sizeof(double)) +
         2 * tiles * Cin * static_cast<int64_t>(sizeof(float));
}

int64_t conv2d_dgrad_counters(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w,
                              bool upstream) {
  conv2d_dgrad_workspace_bytes(N, Cin, H, W, stride_h, stride_w, upstream);  // the same checks
  if (!upstream) return 0;
  const int64_t tiles = dgrad::total_tiles(N, H, W, stride_h, stride_w);
  const int64_t groups = ceil_div(tiles, dgrad::up_group_rows(tiles));
  return (groups + (groups > 1 ? 1 : 0)) * ceil_div(Cin, dgrad::BN);
}

void conv2d_dgrad(const Conv2dDgradArgs& a) {
  using namespace dgrad;
  const char* fn = "conv2d_dgrad";
  if (a.dtype != DType::F16 && a.dtype != DType::BF16)
    throw ArgError(cat(fn, ": dtype ", dtype_name(a.dtype), " is not supported (float16 or bfloat16)"));
  check_conv_sizes(a, fn, kZeroNone);
  if (a.stride_h > 2 || a.stride_w > 2)
    throw ArgError(cat(fn, ": stride (", a.stride_h, ", ", a.stride_w, ") is not supported (1 or 2 per dimension)"));
  if (a.Cin % 8 != 0) throw ArgError(cat(fn, ": Cin = ", a.Cin, " must be a multiple of 8"));
  if (a.Cout % 8 != 0) throw ArgError(cat(fn, ": Cout = ", a.Cout, " must be a multiple of 8"));
  if (a.H + 2 * a.pad_h < a.KH || a.W + 2 * a.pad_w < a.KW)
    throw ArgError(cat(fn, ": the padded input is smaller than the kernel"));
  const int64_t OH = (a.H + 2 * a.pad_h - a.KH) / a.stride_h + 1;
  const int64_t OW = (a.W + 2 * a.pad_w - a.KW) / a.stride_w + 1;
  if (a.OH != OH) throw ArgError(cat(fn, ": OH = ", a.OH, " but the convolution gives ", OH));
  if (a.OW != OW) throw ArgError(cat(fn, ": OW = ", a.OW, " but the convolution gives ", OW));
  if (ceil_div(a.KH, a.stride_h) * ceil_div(a.KW, a.stride_w) > kMaxTaps)
    throw ArgError(cat(fn, ": a ", a.KH, " x ", a.KW, " kernel at stride (", a.stride_h, ", ", a.stride_w,
                       ") has more than ", kMaxTaps, " taps per stride parity class"));
  check_int32(a.N * OH * OW * a.Cout + BM * a.Cout, fn, "N*OH*OW*Cout");
  check_int32(a.N * a.H * a.W + BM, fn, "N*H*W");
  check_int32(a.Cin * a.KH * a.KW * a.Cout, fn, "the weight's numel");
  for (int i = 0; i < 4; ++i) {
    static const char* names[4] = {"w_stride[0]", "w_stride[1]", "w_stride[2]", "w_stride[3]"};
    check_nonneg(a.w_stride[i], fn, names[i]);
    check_int32(a.w_stride[i] * 8, fn, names[i]);
  }
  if (a.w_stride[1] != 1 && a.Cin > 1)
    throw ArgError(cat(fn, ": w_stride[1] = ", a.w_stride[1], " must be 1 (input channels contiguous: a channels_last "
                       "weight, or a 1x1)"));
  if (a.w_stride[0] % 8 || (a.KH > 1 && a.w_stride[2] % 8) || (a.KW > 1 && a.w_stride[3] % 8))
    throw ArgError(cat(fn, ": w_stride = (", a.w_stride[0], ", ", a.w_stride[1], ", ", a.w_stride[2], ", ",
                       a.w_stride[3], ") must keep 8-element chunks 16-byte aligned (multiples of 8)"));
  // ---- pointers: present, 16-byte aligned (every vector access is 16 bytes)
  check_ptr(a.g, fn, "g");
  check_ptr(a.w, fn, "w");
  check_ptr(a.grad_x, fn, "grad_x");
  for (auto [v, name] : {std::pair<std::uintptr_t, const char*>{a.g, "g"}, {a.mask, "mask"}, {a.y, "y"},
                         {a.w, "w"}, {a.grad_x, "grad_x"}, {a.residual, "residual"}, {a.res_mask, "res_mask"},
                         {a.up_out, "up_out"}, {a.up_y, "up_y"}})
    if (v % 16 != 0) throw ArgError(cat(fn, ": ", name, " must be 16-byte aligned"));
  if (a.mask && a.mask_bits) throw ArgError(cat(fn, ": mask and mask_bits are both given (one or neither)"));
  if (a.res_mask && a.res_bits) throw ArgError(cat(fn, ": res_mask and res_bits are both given (one or neither)"));
  if ((a.res_mask || a.res_bits) && !a.residual) throw ArgError(cat(fn, ": res_mask given without residual"));
  if ((a.coef != 0) != (a.mean != 0)) throw ArgError(cat(fn, ": coef and mean must be given together"));
  if (a.coef && a.y == 0) throw ArgError(cat(fn, ": coef given without y"));
  if ((a.coef % 4) || (a.mean % 4)) throw ArgError(cat(fn, ": coef and mean must be 4-byte aligned"));
  const bool up = a.up_y != 0;
  if (up) {
    check_ptr(a.up_mean, fn, "up_mean (up_y was given)");
    check_ptr(a.up_var, fn, "up_var (up_y was given)");
    check_ptr(a.up_coef, fn, "up_coef (up_y was given)");
    check_ptr(a.workspace, fn, "workspace (up_y was given)");
    check_ptr(a.counters, fn, "counters (up_y was given)");
    if (a.up_mean % 4 || a.up_var % 4 || a.up_coef % 4 || a.counters % 4)
      throw ArgError(cat(fn, ": up_mean, up_var, up_coef and counters must be 4-byte aligned"));
    if (a.workspace % 8) throw ArgError(cat(fn, ": workspace must be 8-byte aligned"));
    const int64_t need = conv2d_dgrad_workspace_bytes(a.N, a.Cin, a.H, a.W, a.stride_h, a.stride_w, true);
    if (a.workspace_bytes < need)
      throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", need, " required"));
    const int64_t need_cnt = conv2d_dgrad_counters(a.N, a.Cin, a.H, a.W, a.stride_h, a.stride_w, true);
    if (a.counters_count < need_cnt)
      throw ArgError(cat(fn, ": counters_count = ", a.counters_count, " < ", need_cnt, " required"));
    if (a.up_w_dtype == DType::F64) throw ArgError(cat(fn, ": up_w_dtype float64 is not supported"));
    if (a.up_gw_dtype == DType::F64) throw ArgError(cat(fn, ": up_gw_dtype float64 is not supported"));
  }
  // ---- device
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "conv2d_dgrad: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
             "conv2d_dgrad: cudaDeviceGetAttribute");
  if (major < 8)
    throw ArgError(cat(fn, ": needs a GPU of compute capability >= 8.0 (mma.sync); device ", dev, " is ", major, ".x"));
  cudaStream_t stream = as_stream(a.stream);

  Params p{};
  p.dy = bnbwd::operand_of(a.g, a.mask, a.mask_bits, a.y, a.coef, a.mean, a.Cout);
  p.w = reinterpret_cast<const void*>(a.w);
  p.gx = reinterpret_cast<void*>(a.grad_x);
  p.res = reinterpret_cast<const void*>(a.residual);
  p.res_mask = reinterpret_cast<const void*>(a.res_mask);
  p.rbits = reinterpret_cast<const uint8_t*>(a.res_bits);
  p.up_out = reinterpret_cast<const void*>(a.up_out);
  p.up = bnbwd::upstream_of(a.up_y, a.up_mean, a.up_var, a.up_weight, a.up_bias, a.up_w_dtype, a.up_eps);
  p.N = static_cast<int>(a.N);
  p.Cin = static_cast<int>(a.Cin);
  p.H = static_cast<int>(a.H);
  p.W = static_cast<int>(a.W);
  p.Cout = static_cast<int>(a.Cout);
  p.OH = static_cast<int>(OH);
  p.OW = static_cast<int>(OW);
  p.sh = static_cast<int>(a.stride_h);
  p.sw = static_cast<int>(a.stride_w);
  p.ws0 = a.w_stride[0];
  p.xbytes = static_cast<int>(ceil_div(a.Cin, 8));
  p.co_tiles = static_cast<int>(ceil_div(a.Cout, BKE));
  p.n_tiles = static_cast<int>(ceil_div(a.Cin, BN));
  int ctas = 0, tiles = 0;
  p.nclasses = 0;
  for (int ah = 0; ah < p.sh; ++ah)
    for (int aw = 0; aw < p.sw; ++aw) {
      ClassInfo& c = p.cls[p.nclasses];
      c.a_h = ah;
      c.a_w = aw;
      c.Hc = a.H > ah ? static_cast<int>(ceil_div(a.H - ah, a.stride_h)) : 0;
      c.Wc = a.W > aw ? static_cast<int>(ceil_div(a.W - aw, a.stride_w)) : 0;
      c.Mc = p.N * c.Hc * c.Wc;
      c.m_tiles = static_cast<int>(ceil_div(c.Mc, BM));
      c.cta_start = ctas;
      c.part_start = tiles;
      c.ntaps = 0;
      for (int r = 0; r < a.KH; ++r) {
        const int dr = ah + static_cast<int>(a.pad_h) - r;  // oh = (h + ph - r) / sh
        if (((dr % p.sh) + p.sh) % p.sh != 0) continue;
        for (int s = 0; s < a.KW; ++s) {
          const int ds = aw + static_cast<int>(a.pad_w) - s;
          if (((ds % p.sw) + p.sw) % p.sw != 0) continue;
          const int t = c.ntaps++;
          c.dh[t] = dr >= 0 ? dr / p.sh : -((-dr) / p.sh);  // exact: dr is a multiple of sh
          c.dw[t] = ds >= 0 ? ds / p.sw : -((-ds) / p.sw);
          c.dpix[t] = c.dh[t] * p.OW + c.dw[t];
          c.wofs[t] = static_cast<int>(r * a.w_stride[2] + s * a.w_stride[3]);
        }
      }
      ctas += c.m_tiles * p.n_tiles;
      tiles += c.m_tiles;
      ++p.nclasses;
    }
  p.tiles = tiles;
  if (up && ctas == 0)  // every input pixel is in some parity class: never with positive sizes
    throw ArgError(cat(fn, ": no tiles for the upstream reductions"));
  if (up) {  // the finalize runs in the kernel's launch (upstream_arrive_finalize)
    UpFinalize& f = p.fin;
    const int64_t group_rows = up_group_rows(tiles);
    const int64_t groups = ceil_div(tiles, group_rows);
    f.grp = reinterpret_cast<double*>(a.workspace);
    f.part = reinterpret_cast<const float*>(f.grp + 2 * groups * a.Cin);
    p.part = const_cast<float*>(f.part);
    f.counters = reinterpret_cast<int*>(a.counters);
    f.up_var = reinterpret_cast<const float*>(a.up_var);
    f.up_weight = reinterpret_cast<const void*>(a.up_weight);
    f.up_coef = reinterpret_cast<float*>(a.up_coef);
    f.up_gw = reinterpret_cast<void*>(a.up_grad_weight);
    f.up_gb = reinterpret_cast<void*>(a.up_grad_bias);
    f.tiles = static_cast<int>(tiles);
    f.Cin = p.Cin;
    f.n_tiles = p.n_tiles;
    f.group_rows = static_cast<int>(group_rows);
    f.groups = static_cast<int>(groups);
    f.w_code = a.up_w_dtype == DType::F32 ? 0 : a.up_w_dtype == DType::F16 ? 1 : 2;
    f.gw_code = a.up_gw_dtype == DType::F32 ? 0 : a.up_gw_dtype == DType::F16 ? 1 : 2;
    f.eps = static_cast<float>(a.up_eps);
    f.m = static_cast<double>(a.N * a.H * a.W);
  }
  if (ctas > 0) {
    const dim3 grid(static_cast<unsigned>(ctas));
    if (a.dtype == DType::F16)
      launch<__half>(p, up, grid, stream);
    else
      launch<__nv_bfloat16>(p, up, grid, stream);
  }
}

}  // namespace rk
