// Implicit-GEMM convolution on tensor cores (sm_80+): cp.async multi-stage shared-memory
// pipeline, ldmatrix, mma.sync (m16n8k16 bf16/fp16, m16n8k8 tf32 / 3xTF32), fused fp32
// epilogue and deterministic per-channel batch statistics. Index math: conv2d_layout.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <utility>

#include "acc_types.cuh"
#include "arrival.cuh"
#include "bn_affine.cuh"
#include "conv2d.h"
#include "conv2d_layout.h"
#include "ptx.cuh"

namespace rk {
namespace conv {
namespace {

enum Math : int { kMma16 = 0, kTf32 = 1, k3xTf32 = 2 };

// the operand prologue's per-channel (scale, shift) table, after the 128 x 64 tile's pipeline
// buffers in the same static shared array
constexpr int PRO_TABLE_BYTES = 2 * kConvPrologueMaxChannels * static_cast<int>(sizeof(float));
static_assert(TileCfg<64>::SMEM_BYTES + PRO_TABLE_BYTES <= 48 * 1024, "the prologue table fits static shared memory");

struct Params {
  const void* x;
  const void* w;
  const float* scale;
  const float* bias;
  const void* res;
  void* out;
  float* part_mean;  // [m_tiles][Cout] or nullptr (no stats)
  float* part_m2;
  // the statistics merge in this launch (conv2d.h): groups of stat_group_tiles consecutive m-tiles,
  // [stat_groups][Cout] float64 group partials (stat_groups > 1), the outputs, int32 counters
  // ([stat_groups][n_tiles] per (group, column tile), then [n_tiles] per column tile), all zero
  double* grp_mean;
  double* grp_m2;
  float* mean_out;
  float* var_out;
  int* counters;
  int stat_group_tiles, stat_groups;
  int N, Cin, H, W, Cout, KH, KW;
  int sh, sw, ph, pw, OH, OW;
  int M, K, ldw, num_k_tiles;
  int m_tiles, n_tiles;  // grid: m_tiles * n_tiles CTAs in grouped order (tile_of)
  long long xs[4], os[4], rs[4];
  TapDeltas td;       // filter-tap iterator deltas (host-computed: kernel-parameter constants)
  long long tile_dc;  // offset of one K tile's worth of channels: BK elements * xs[1]
  int relu;
  // epilogue vector (16-byte) access: out_cvec: out's channel stride is 1 (vectors along channels,
  // else along pixels); out_al16: out is 16-byte aligned; out_pvec: out_al16 and pixels of one
  // image are contiguous (w stride 1, h stride OW); res_cvec / res_pvec: the same for the residual
  int out_cvec, out_al16, out_pvec, res_cvec, res_pvec;
  // operand prologue (the PRO kernels only; appended: the other kernels' parameter offsets are
  // unchanged): x's BatchNorm (batch_norm.cu's BnParams) and Cp, the channels of its table
  bnk::BnParams bn;
  int Cp;
};

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
};
template <>
struct Elem<__half> {
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// PTX wrappers (cp.async, ldmatrix, mma.sync, cvt.rna.tf32): csrc/ptx.cuh.

// ---- statistics merge (the last arrivals of conv2d_igemm_kernel; conv2d.h) ------------------
// (n, mean, M2) of one channel over rows r0 .. r1 - 1 of a partials array (load(r, n, mean, m2)),
// combined in row order with Chan's formula in float64 by the CTA's 2 * BN_ threads: thread tid
// takes the channel tid % BN_ (ok: it exists) and the first (tid < BN_) or second half of the rows,
// then the halves are combined (first, second) through s (3 * BN_ doubles of shared memory). The
// result is in the threads tid < BN_. Every thread of the CTA calls it (two barriers).
template <int BN_, typename Load>
__device__ __forceinline__ void merge_rows(const Load& load, int r0, int r1, bool ok, int tid, double* s, double& n,
                                           double& mu, double& m2) {
  const int cl = tid % BN_;
  const int mid = r0 + (r1 - r0 + 1) / 2;
  const int lo = tid < BN_ ? r0 : mid, hi = tid < BN_ ? mid : r1;
  n = mu = m2 = 0.0;
  if (ok) {
#pragma unroll 4
    for (int r = lo; r < hi; ++r) {
      double rn, rmu, rm2;
      load(r, rn, rmu, rm2);
      chan_combine(n, mu, m2, rn, rmu, rm2);
    }
  }
  if (tid >= BN_) {
    s[cl] = n;
    s[BN_ + cl] = mu;
    s[2 * BN_ + cl] = m2;
  }
  __syncthreads();
  if (tid < BN_) chan_combine(n, mu, m2, s[cl], s[BN_ + cl], s[2 * BN_ + cl]);
  __syncthreads();  // s is free again
}

// The per-tile partials' arrival and merge (conv2d.h), after a CTA has written its partial: its own
// function, not inlined, so that its registers do not weigh on the main loop's allocation (inlined,
// the 16-bit vector kernel's loop grew by 8 instructions per k-step at its 128-register cap).
struct StatsMerge {
  const float* part_mean;  // [m_tiles][Cout]
  const float* part_m2;
  double* grp_mean;  // [groups][Cout] (groups > 1)
  double* grp_m2;
  float* mean;  // (Cout,) outputs
  float* var;
  int* counters;  // [groups][n_tiles], then [n_tiles]; all zero
  int M, Cout, m_tiles, n_tiles, group_tiles, groups;
};
template <int BN_>
__device__ __noinline__ void stats_arrive_merge(const StatsMerge a, unsigned char* smem, int tid, int tile_m, int n0) {
  // ---- the merge, in this launch (conv2d.h): the arrival on the counter of this (group, column
  // tile) (arrive_last, arrival.cuh); the group's last arrival merges the group's tile partials in
  // tile order; which CTA that is varies, the order does not.
  // smem: the kernel's (dead) pipeline memory; the flag after merge_rows' 3 * BN_ doubles (a static
  // __shared__ int would take the 48 KiB kernels over the static limit)
  double* const s_dbl = reinterpret_cast<double*>(smem);
  int* const s_last = reinterpret_cast<int*>(smem + 3 * BN_ * sizeof(double));
  const int cl = tid % BN_;
  const int col = n0 + cl;
  const bool okc = col < a.Cout;
  const int grp = tile_m / a.group_tiles;
  const int g0 = grp * a.group_tiles;
  const int g1 = min(g0 + a.group_tiles, a.m_tiles);
  // n0 / BN_: tile.n (one register fewer in the kernel)
  if (!arrive_last(a.counters + grp * a.n_tiles + n0 / BN_, g1 - g0, s_last)) return;
  const int Mrows = a.M, Cout = a.Cout;
  const float* const pmean = a.part_mean;
  const float* const pm2 = a.part_m2;
  auto tile_part = [=](int t, double& rn, double& rmu, double& rm2) {
    const long long o = static_cast<long long>(t) * Cout + col;
    rn = static_cast<double>(min(BM, Mrows - t * BM));
    rmu = static_cast<double>(__ldcg(pmean + o));
    rm2 = static_cast<double>(__ldcg(pm2 + o));
  };
  double n, mu, m2;
  merge_rows<BN_>(tile_part, g0, g1, okc, tid, s_dbl, n, mu, m2);
  if (a.groups == 1) {
    if (tid < BN_ && okc) {
      a.mean[col] = static_cast<float>(mu);
      a.var[col] = static_cast<float>(m2 / n);
    }
    return;
  }
  // several groups: the group partial, then the arrival on the column tile's counter (the same
  // release / acquire); its last arrival merges the group partials in group order
  if (tid < BN_ && okc) {
    const long long o = static_cast<long long>(grp) * Cout + col;
    a.grp_mean[o] = mu;
    a.grp_m2[o] = m2;
  }
  if (!arrive_last(a.counters + a.groups * a.n_tiles + n0 / BN_, a.groups, s_last)) return;
  const long long rows_per_group = static_cast<long long>(a.group_tiles) * BM;
  const double* const gmean = a.grp_mean;
  const double* const gm2 = a.grp_m2;
  auto group_part = [=](int g, double& rn, double& rmu, double& rm2) {
    const long long o = static_cast<long long>(g) * Cout + col;
    const long long end = min(static_cast<long long>(Mrows), (g + 1) * rows_per_group);
    rn = static_cast<double>(end - g * rows_per_group);
    rmu = __ldcg(gmean + o);
    rm2 = __ldcg(gm2 + o);
  };
  merge_rows<BN_>(group_part, 0, a.groups, okc, tid, s_dbl, n, mu, m2);
  if (tid < BN_ && okc) {
    a.mean[col] = static_cast<float>(mu);
    a.var[col] = static_cast<float>(m2 / n);
  }
}

// ---- the convolution kernel --------------------------------------------------------------
// K runs over (r, s, c) with c < Cp = Cin rounded up to a multiple of VEC = 16/sizeof(T) (the
// packed weight's zero channels): every 16-byte chunk of an A tile row lies in one filter tap.
// VEC_A: x has unit channel stride, Cin and the other strides are multiples of VEC, x is 16-byte
// aligned: each chunk is copied with cp.async (zero-filled outside the image and past K).
// Otherwise (NCHW, Cin % VEC != 0 such as the stem's 3 channels, odd strides) each chunk is
// gathered element by element (stride x_stride[1], channels >= Cin zero) into registers, the
// loads issued before the tile's math and the chunks stored to shared memory after it: the same
// chunk/tap bookkeeping as the vector path, one tap per chunk.
// Occupancy: 4 CTAs of 128 threads per SM (<= 128 registers) for the 16-bit vector path; 3 for
// fp32, whose TF32 conversions (emulated cvt.rna.tf32 on sm_8x; 3xTF32's big/small split
// fragments) would spill at 128 registers, and for the gather path (its chunks' element loads in
// flight across the tile's math); the 3xTF32 gather path would spill even at 168 on sm_80 and
// gets up to 255 (198 with nvcc 13.0: 2 CTAs per SM).
// The wide tile (BN_ = 128, 256 threads): 2 CTAs per SM at <= 128 registers; with 128-byte K tiles
// (BKB = 128, 16-bit vector path only) its ST stages take 96 / 128 KiB of dynamic shared memory, so
// one CTA per SM on every GPU: up to 255 registers (196 with nvcc 13.0).
// PRO (operand prologue, 128 x 64 tile only): A is x = y_prev and the MMA consumes
// h = relu(x * scale[c] + shift[c]) rounded to T (batch_norm_act's arithmetic, bn_affine.cuh), zero
// for padding taps and channels >= Cin. Its A chunks are register-staged on both paths (the vector
// path's chunks become one 16-byte __ldg each instead of a cp.async): loaded before the tile's
// math, transformed and stored to shared memory after it (store_a), like the gather path; the
// per-channel (scale, shift) table of all Cp channels is computed once per CTA into shared memory
// (after the pipeline buffers: Cp <= kConvPrologueMaxChannels). Occupancy as the gather path's.
template <typename T, int MATH, bool VEC_A, int BN_, bool PRO = false, int BKB = BK_BYTES, int ST = STAGES>
__global__ void __launch_bounds__(TileCfg<BN_>::THREADS, BN_ == 128 && BKB == 128                ? 1
                                                          : BN_ == 128                            ? 2
                                                          : MATH == kMma16 && VEC_A && !PRO       ? 4
                                                          : MATH == k3xTf32 && (!VEC_A || PRO) ? 2
                                                                                                 : 3)
    conv2d_igemm_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int EB = sizeof(T);
  using C = TileCfg<BN_, BKB, ST>;
  constexpr int BKE = C::BK_BYTES / EB;  // K elements per tile
  constexpr int VEC = vec_elems(EB);  // elements per 16-byte chunk
  static_assert(MATH == kMma16 ? EB == 2 : EB == 4, "math mode / element type mismatch");
  static_assert(!PRO || BN_ == 64, "the operand prologue runs on the 128 x 64 tile");
  constexpr bool REG_A = !VEC_A || PRO;  // A chunks staged through registers (gather_a / store_a)

  static_assert(BKB == BK_BYTES || (MATH == kMma16 && VEC_A && !PRO), "128-byte K tiles: the 16-bit vector path");
  constexpr int A_STAGE_BYTES = C::A_STAGE_BYTES;
  constexpr int B_STAGE_BYTES = C::B_STAGE_BYTES;
  constexpr int ROW_STEP = C::ROW_STEP;
  constexpr int BK_BYTES = C::BK_BYTES;
  // pipeline stages; after the main loop the epilogue's staging tile, then the statistics. Up to
  // 48 KiB static; the 128-byte K tiles' 96 / 128 KiB are dynamic (the launch's C::SMEM_BYTES,
  // after launch_wide128's cudaFuncSetAttribute opt-in)
  unsigned char* smem;
  if constexpr (C::DYNAMIC) {
    RK_DYNAMIC_SHARED(smem_dyn);
    smem = smem_dyn;
  } else {
    __shared__ __align__(128) unsigned char smem_static[C::SMEM_BYTES + (PRO ? PRO_TABLE_BYTES : 0)];
    smem = smem_static;
  }
  unsigned char* const smem_a = smem;
  unsigned char* const smem_b = smem + C::STAGES * A_STAGE_BYTES;
  const uint32_t a_base = smem_addr(smem_a);
  const uint32_t b_base = smem_addr(smem_b);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = C::warp_m(warp), wn = C::warp_n(warp);
  const TileCoord tile = tile_of(static_cast<int>(blockIdx.x), p.m_tiles, p.n_tiles);
  const int m0 = tile.m * BM;
  const int n0 = tile.n * BN_;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);

  // ---- per-thread A-row bookkeeping (fixed over the K loop): the input offset of each row's
  // pixel origin (n, p*sh - ph, q*sw - pw); a row past M gets an origin far outside the image, so
  // the in-image test alone masks it.
  constexpr int AROWS = C::A_VEC_ROWS;
  long long a_off[AROWS];
  int a_h0[AROWS], a_w0[AROWS];
#pragma unroll
  for (int i = 0; i < AROWS; ++i) {
    const int row = C::vec_row(tid, i);
    const int m = m0 + row;
    const Pixel px = decompose_m(m < p.M ? m : 0, p.OH, p.OW);
    a_h0[i] = m < p.M ? px.p * p.sh - p.ph : -(1 << 30);
    a_w0[i] = px.q * p.sw - p.pw;
    a_off[i] = px.n * p.xs[0] + static_cast<long long>(a_h0[i]) * p.xs[2] + static_cast<long long>(a_w0[i]) * p.xs[3];
  }
  // ---- filter-tap iterator of the next tile to load (this thread's chunk column on the
  // vectorised path, the tile's first column on the gather path) and the weight rows: advanced by
  // one tile per load with precomputed deltas, no division in the main loop.
  const int chunk = C::vec_chunk(tid);
  const TapDeltas& td = p.td;
  TapIter tap = tap_iter_at(chunk * VEC, td, p.xs[2], p.xs[3]);
  // weight rows n0 + vec_row(tid, i) = row0 + ROW_STEP * i: one pointer, per-row validity
  const int w_n = n0 + C::vec_row(tid, 0);
  const T* const w_row = w + static_cast<long long>(w_n < p.Cout ? w_n : 0) * p.ldw;
  const long long w_row_step = static_cast<long long>(ROW_STEP) * p.ldw;
  int w_k = chunk * VEC;  // weight column of this thread's chunk in the next tile to load
  // shared-memory destinations of this thread's chunks in stage 0: rows ROW_STEP apart keep the
  // swizzle phase ((row >> 1) & 3; row & 7 for 128-byte rows), so chunk i is ROW_STEP rows after
  // chunk 0
  const uint32_t a_dst = a_base + C::swizzle(C::vec_row(tid, 0), chunk);
  const uint32_t b_dst = b_base + C::swizzle(C::vec_row(tid, 0), chunk);

  // the next tile's B chunks (stage st), then step the weight column on
  auto load_b = [&](int st) {
#pragma unroll
    for (int i = 0; i < C::B_VEC_ROWS; ++i) {
      const bool ok = w_n + ROW_STEP * i < p.Cout && w_k < p.ldw;
      cp_async16(b_dst + st * B_STAGE_BYTES + i * ROW_STEP * BK_BYTES, ok ? w_row + (i * w_row_step + w_k) : w,
                 ok ? 16 : 0);
    }
    w_k += BKE;
  };
  // the next tile's A chunks (stage st): one filter tap per chunk (Cin % VEC == 0), zero-filled
  // outside the image and past K; then step the tap on
  auto load_a_vec = [&](int st) {
    const bool k_ok = tap.r < p.KH;  // column < K; K is a multiple of VEC: the chunk is all in or out
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
      const bool ok = k_ok && in_image(a_h0[i] + tap.r, a_w0[i] + tap.s, p.H, p.W);
      cp_async16(a_dst + st * A_STAGE_BYTES + i * ROW_STEP * BK_BYTES, ok ? x + (a_off[i] + tap.off) : x, ok ? 16 : 0);
    }
    tap_advance(tap, BKE, p.tile_dc, td);
  };
  // generic path: this thread's chunks of the next tile, element by element into registers
  // (channels c..c+VEC-1 of the chunk's tap, those >= Cin zero), then step the tap on
  uint32_t g[AROWS][4];  // unused (optimised away) on the VEC_A path without PRO
  int g_c = 0;           // PRO: the chunk's first channel
  uint32_t g_ok = 0;     // PRO: bit i: row i's tap is in the image and in K
  auto gather_a = [&]() {
    const bool k_ok = tap.r < p.KH;
    const int nc = p.Cin - tap.c;  // valid channels in the chunk (>= VEC: all)
    if constexpr (PRO) {
      g_c = tap.c;
      g_ok = 0;
    }
    if constexpr (VEC_A) {  // PRO on the vector path: one 16-byte load per chunk
#pragma unroll
      for (int i = 0; i < AROWS; ++i) {
        const bool ok = k_ok && in_image(a_h0[i] + tap.r, a_w0[i] + tap.s, p.H, p.W);
        g_ok |= static_cast<uint32_t>(ok) << i;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (ok) v = __ldg(reinterpret_cast<const uint4*>(x + (a_off[i] + tap.off)));
        g[i][0] = v.x;
        g[i][1] = v.y;
        g[i][2] = v.z;
        g[i][3] = v.w;
      }
    } else {
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
      const bool ok = k_ok && in_image(a_h0[i] + tap.r, a_w0[i] + tap.s, p.H, p.W);
      const T* src = x + (a_off[i] + tap.off);
      if constexpr (PRO) g_ok |= static_cast<uint32_t>(ok) << i;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        uint32_t bits = 0;
        if (ok && e < nc) {
          if constexpr (EB == 4) {
            bits = __ldg(reinterpret_cast<const unsigned int*>(src + e * p.xs[1]));
          } else {
            bits = __ldg(reinterpret_cast<const unsigned short*>(src + e * p.xs[1]));
          }
        }
        if constexpr (EB == 4) {
          g[i][e] = bits;
        } else {
          if (e & 1)
            g[i][e >> 1] |= bits << 16;
          else
            g[i][e >> 1] = bits;
        }
      }
    }
    }
    tap_advance(tap, BKE, p.tile_dc, td);
  };
  // PRO: h = relu(x * scale[c] + shift[c]) rounded to T (bn_act_fwd_kernel's operations), 0 for
  // a padding tap (the convolution pads h, not x)
  auto prologue = [&]() {
    const uint4* const tab = reinterpret_cast<const uint4*>(smem + C::SMEM_BYTES);
    float sc[VEC], sh[VEC];  // the chunk's channels g_c.. (g_c a multiple of VEC: 16-byte aligned)
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const uint4 a = tab[g_c / 4 + q], b = tab[(kConvPrologueMaxChannels + g_c) / 4 + q];
      const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sc[4 * q + j] = __uint_as_float(av[j]);
        sh[4 * q + j] = __uint_as_float(bv[j]);
      }
    }
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
      const bool ok = (g_ok >> i) & 1u;
      uint32_t o[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        T v;
        if constexpr (EB == 4) {
          v = __uint_as_float(g[i][e]);
        } else {
          const unsigned short b = static_cast<unsigned short>(g[i][e >> 1] >> ((e & 1) * 16));
          v = *reinterpret_cast<const T*>(&b);
        }
        float z = __fmul_rn(to_acc(v), sc[e]) + sh[e];
        z = z < 0.f ? 0.f : z;  // NaN propagates, like batch_norm_act
        const T h = from_acc<T>(z);
        if constexpr (EB == 4) {
          o[e] = __float_as_uint(h);
        } else {
          o[e >> 1] |= static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&h)) << ((e & 1) * 16);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) g[i][j] = ok ? o[j] : 0u;
    }
  };
  auto store_a = [&](int st) {
    if constexpr (PRO) prologue();
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
      if constexpr (REG_A) {
        *reinterpret_cast<uint4*>(smem_a + st * A_STAGE_BYTES + C::swizzle(C::vec_row(tid, i), chunk)) =
            make_uint4(g[i][0], g[i][1], g[i][2], g[i][3]);
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  auto compute = [&](int st) {
    const uint32_t a_st = a_base + st * A_STAGE_BYTES;
    const uint32_t b_st = b_base + st * B_STAGE_BYTES;
#pragma unroll
    for (int ks = 0; ks < C::KSTEPS; ++ks) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldsm_x4(af[mi], a_st + C::swizzle(wm * WARP_M + mi * 16 + a_ldsm_row(lane), a_ldsm_chunk(lane, ks)));
#pragma unroll
      for (int np = 0; np < NI / 2; ++np) {
        uint32_t r[4];
        ldsm_x4(r, b_st + C::swizzle(wn * WARP_N + np * 16 + b_ldsm_row(lane), b_ldsm_chunk(lane, ks)));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
      if constexpr (MATH == kMma16) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma16<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      } else if constexpr (MATH == kTf32) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int i = 0; i < 4; ++i) af[mi][i] = to_tf32(af[mi][i]);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          bf[ni][0] = to_tf32(bf[ni][0]);
          bf[ni][1] = to_tf32(bf[ni][1]);
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma_tf32(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      } else {
        // 3xTF32: v = big + small with big = tf32(v), small = tf32(v - big); the small*small
        // term (relative size 2^-22) is dropped. Small products first.
        uint32_t as[MI][4], bs[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t big = to_tf32(af[mi][i]);
            as[mi][i] = to_tf32(__float_as_uint(__uint_as_float(af[mi][i]) - __uint_as_float(big)));
            af[mi][i] = big;
          }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint32_t big = to_tf32(bf[ni][i]);
            bs[ni][i] = to_tf32(__float_as_uint(__uint_as_float(bf[ni][i]) - __uint_as_float(big)));
            bf[ni][i] = big;
          }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            mma_tf32(acc[mi][ni], as[mi], bf[ni][0], bf[ni][1]);
            mma_tf32(acc[mi][ni], af[mi], bs[ni][0], bs[ni][1]);
            mma_tf32(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
          }
      }
    }
  };

  // ---- main loop: C::STAGES-deep pipeline; stage indices advance by compare-and-wrap (no modulo).
  // (C::STAGES itself: a local constexpr copy renumbered the 64-byte-K kernels' PTX registers and
  // changed their SASS.)
  const int KT = p.num_k_tiles;
  if constexpr (PRO) {  // the (scale, shift) table of channels [0, Cp): zero past Cin
    float* const tab = reinterpret_cast<float*>(smem + C::SMEM_BYTES);
    for (int c = tid; c < p.Cp; c += C::THREADS) {
      float sc = 0.f, sh = 0.f;
      if (c < p.Cin) bnk::bn_affine(p.bn, c, sc, sh);
      tab[c] = sc;
      tab[kConvPrologueMaxChannels + c] = sh;
    }
    __syncthreads();
  }
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < KT) {
      load_b(s);
      if constexpr (!REG_A) {
        load_a_vec(s);
      } else {
        gather_a();
        store_a(s);
      }
    }
    cp_async_commit();
  }
  int st_read = 0, st_write = C::STAGES - 1;
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with the stage refilled below
    const bool more = kt + C::STAGES - 1 < KT;
    if (more) {
      load_b(st_write);
      if constexpr (!REG_A) {
        load_a_vec(st_write);
      } else {
        gather_a();
      }
    }
    cp_async_commit();
    compute(st_read);
    if constexpr (REG_A) {
      if (more) store_a(st_write);  // read after the __syncthreads of iteration nt
    }
    st_read = st_read == C::STAGES - 1 ? 0 : st_read + 1;
    st_write = st_write == C::STAGES - 1 ? 0 : st_write + 1;
  }
  // ---- epilogue: v = acc * scale + bias (fp32) staged through shared memory (the pipeline
  // buffers), then written with 16-byte vectors along out's contiguous dimension: channels when
  // out's channel stride is 1 (channels_last; staged [BM][EP_LD_C]), else pixels (NCHW; staged
  // [BN][EP_LD_P]), the residual read the same way. A vector that would be misaligned, cross an
  // image or hang over the tile's edge is done element by element.
  const int g_row = wm * WARP_M;  // warp tile origin in the CTA tile
  const int g_col = wn * WARP_N;
  T* __restrict__ out = static_cast<T*>(p.out);
  const T* __restrict__ res = static_cast<const T*>(p.res);
  constexpr int VO = 16 / EB;  // elements per 16-byte vector
  // residual (when present), ReLU, rounding and the store of one vector v[0..nv) of consecutive
  // elements along out's contiguous dimension, element 0 at offsets o0 (out) / r0 (residual).
  // vec_r / vec_o: one 16-byte access is possible. Element by element, element e is at
  // o0 + e (channels: out's channel stride is 1) / r0 + e * rs[1], or (pix) at the pixel e steps
  // after px (walked, no division) in channel col.
  auto finish = [&](float(&v)[VO], int nv, bool vec_r, bool vec_o, long long o0, long long r0, bool pix, Pixel px,
                    int col) {
    if (res != nullptr) {
      if (vec_r) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(res + r0));
        const uint32_t w4[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int e = 0; e < VO; ++e) {
          if constexpr (EB == 4) {
            v[e] += __uint_as_float(w4[e]);
          } else {
            const unsigned short b = static_cast<unsigned short>(w4[e >> 1] >> ((e & 1) * 16));
            v[e] += Elem<T>::to_f(*reinterpret_cast<const T*>(&b));
          }
        }
      } else {
        Pixel w = px;
#pragma unroll
        for (int e = 0; e < VO; ++e) {
          if (e < nv) {
            const long long ro = pix ? w.n * p.rs[0] + col * p.rs[1] + w.p * p.rs[2] + w.q * p.rs[3] : r0 + e * p.rs[1];
            v[e] += Elem<T>::to_f(res[ro]);
            if (pix) next_pixel(w, p.OH, p.OW);
          }
        }
      }
    }
    if (p.relu) {
#pragma unroll
      for (int e = 0; e < VO; ++e) v[e] = fmaxf(v[e], 0.f);
    }
    if (vec_o) {
      uint32_t w4[4];
#pragma unroll
      for (int e = 0; e < VO; ++e) {
        if constexpr (EB == 4) {
          w4[e] = __float_as_uint(v[e]);
        } else {
          const T h = Elem<T>::from_f(v[e]);
          const uint32_t b = *reinterpret_cast<const unsigned short*>(&h);
          w4[e >> 1] = (e & 1) ? (w4[e >> 1] | (b << 16)) : b;
        }
      }
      *reinterpret_cast<uint4*>(out + o0) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
    } else {
      Pixel w = px;
#pragma unroll
      for (int e = 0; e < VO; ++e) {
        if (e < nv) {
          const long long oo = pix ? w.n * p.os[0] + col * p.os[1] + w.p * p.os[2] + w.q * p.os[3] : o0 + e;
          out[oo] = Elem<T>::from_f(v[e]);
          if (pix) next_pixel(w, p.OH, p.OW);
        }
      }
    }
  };
  cp_async_wait<0>();
  float* const s_ep = reinterpret_cast<float*>(smem);
  const bool ch_major = p.out_cvec != 0;
#pragma unroll
  for (int half = 0; half < BN_ / BN; ++half) {  // 64 output channels at a time
    __syncthreads();  // every warp is done with the pipeline stages / the previous half's tile
    const int nh = n0 + half * BN;
    if (g_col / BN == half) {
      float sc[NI][2], bi[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = n0 + g_col + ni * 8 + c_col(lane, j);
          const bool ok = col < p.Cout;
          sc[ni][j] = (p.scale != nullptr && ok) ? __ldg(p.scale + col) : 1.f;
          bi[ni][j] = (p.bias != nullptr && ok) ? __ldg(p.bias + col) : 0.f;
        }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = g_row + mi * 16 + c_row(lane, i);
            const int col = g_col - half * BN + ni * 8 + c_col(lane, i);
            s_ep[ch_major ? row * EP_LD_C + col : col * EP_LD_P + row] = acc[mi][ni][i] * sc[ni][i & 1] + bi[ni][i & 1];
          }
    }
    __syncthreads();
    if (ch_major) {
      // vectors of VO channels of one pixel; consecutive threads take consecutive vectors of a row
      constexpr int VPR = BN / VO;
#pragma unroll 1
      for (int j = tid; j < BM * VPR; j += C::THREADS) {
        const int r = j / VPR, cv = j % VPR;
        const int m = m0 + r;
        const int col0 = nh + cv * VO;
        if (m >= p.M) continue;
        if (col0 >= p.Cout) continue;
        const int nv = min(VO, p.Cout - col0);
        const Pixel px = decompose_m(m, p.OH, p.OW);
        const long long o = px.n * p.os[0] + px.p * p.os[2] + px.q * p.os[3] + col0;  // os[1] == 1
        const long long rr = px.n * p.rs[0] + px.p * p.rs[2] + px.q * p.rs[3] + col0 * p.rs[1];
        float v[VO];
#pragma unroll
        for (int e = 0; e < VO; ++e) v[e] = s_ep[r * EP_LD_C + cv * VO + e];
        finish(v, nv, p.res_cvec && nv == VO && rr % VO == 0, p.out_al16 && nv == VO && o % VO == 0, o, rr, false,
               px, col0);
      }
    } else {
      // vectors of VO consecutive GEMM rows (pixels) of one channel; consecutive threads take
      // consecutive vectors of a channel
      constexpr int GPC = BM / VO;
      const int ohw = p.OH * p.OW;
#pragma unroll 1
      for (int j = tid; j < BN * GPC; j += C::THREADS) {
        const int cl = j / GPC, rg = j % GPC;
        const int col = nh + cl;
        const int m = m0 + rg * VO;
        if (m >= p.M || col >= p.Cout) continue;
        const int nv = min(VO, p.M - m);
        const Pixel px = decompose_m(m, p.OH, p.OW);
        const bool full = nv == VO && px.p * p.OW + px.q + VO <= ohw;  // all in one image
        const long long o = px.n * p.os[0] + col * p.os[1] + px.p * p.os[2] + px.q * p.os[3];
        const long long rr = px.n * p.rs[0] + col * p.rs[1] + px.p * p.rs[2] + px.q * p.rs[3];
        float v[VO];
#pragma unroll
        for (int e = 0; e < VO; ++e) v[e] = s_ep[cl * EP_LD_P + rg * VO + e];
        finish(v, nv, p.res_pvec && full && rr % VO == 0, p.out_pvec && full && o % VO == 0, o, rr, true, px, col);
      }
    }
  }

  // ---- per-tile channel statistics of y = acc: (mean, M2) over this tile's valid rows, two
  // passes in a fixed order (lane shuffles, then warp row wm = 0 plus wm = 1): deterministic.
  if (p.part_mean != nullptr) {
    __syncthreads();  // the staging tile is read: the partial sums reuse its memory
    float(*const s_sum)[BN_] = reinterpret_cast<float(*)[BN_]>(smem);
    float(*const s_m2)[BN_] = reinterpret_cast<float(*)[BN_]>(smem + 2 * BN_ * sizeof(float));
    const int cnt = min(BM, p.M - m0);
    const float inv_cnt = 1.f / static_cast<float>(cnt);
    float mean[NI][2];
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      float part[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) part[ni][j] = 0.f;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (m0 + g_row + mi * 16 + c_row(lane, i) < p.M) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
              const float v = acc[mi][ni][i];
              if (pass == 0) {
                part[ni][i & 1] += v;
              } else {
                const float d = v - mean[ni][i & 1];
                part[ni][i & 1] += d * d;
              }
            }
          }
        }
      float(*dst)[BN_] = pass == 0 ? s_sum : s_m2;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = part[ni][j];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (lane < 4) dst[wm][g_col + ni * 8 + c_col(lane, j)] = v;
        }
      __syncthreads();
      if (pass == 0) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int c = g_col + ni * 8 + c_col(lane, j);
            mean[ni][j] = (s_sum[0][c] + s_sum[1][c]) * inv_cnt;
          }
      }
    }
    if (tid < BN_ && n0 + tid < p.Cout) {
      const long long o = static_cast<long long>(tile.m) * p.Cout + n0 + tid;
      p.part_mean[o] = (s_sum[0][tid] + s_sum[1][tid]) * inv_cnt;
      p.part_m2[o] = s_m2[0][tid] + s_m2[1][tid];
    }

    static_assert(3 * BN_ * sizeof(double) + sizeof(int) <= C::SMEM_BYTES, "stats_arrive_merge's shared memory");
    static_assert(C::THREADS == 2 * BN_, "merge_rows: two threads per channel");
    stats_arrive_merge<BN_>(StatsMerge{p.part_mean, p.part_m2, p.grp_mean, p.grp_m2, p.mean_out, p.var_out,
                                       p.counters, p.M, p.Cout, p.m_tiles, p.n_tiles, p.stat_group_tiles,
                                       p.stat_groups},
                            smem, tid, tile.m, n0);
  }
#else
  __trap();
#endif
}

// The 128 x 128 tile with 128-byte K tiles in ST stages of dynamic shared memory (Cfg::SMEM_BYTES:
// 96 / 128 KiB): the kernel instance's opt-in above 48 KiB (cudaFuncSetAttribute) once per device,
// then the launch.
template <int ST>
using Wide128 = TileCfg<128, 128, ST>;
template <typename Kernel>
void opt_in_dynamic_smem(Kernel kernel, int dev, int bytes, std::atomic<unsigned long long>& done) {
  const unsigned long long bit = dev >= 0 && dev < 64 ? 1ull << dev : 0ull;  // other devices: every launch
  unsigned long long seen = done.load();
  if (bit != 0 && (seen & bit) != 0) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "conv2d_forward: cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) of the 128 x 128 "
             "tile with 128-byte K tiles");
  while (bit != 0 && !done.compare_exchange_strong(seen, seen | bit)) {
  }
}
template <typename T>
void launch_wide128(const Params& p, int stages, int dev, dim3 grid, cudaStream_t stream) {
  if (stages == 4) {
    static std::atomic<unsigned long long> opted{0};
    opt_in_dynamic_smem(conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 4>, dev, Wide128<4>::SMEM_BYTES,
                        opted);
    conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 4><<<grid, Wide128<4>::THREADS, Wide128<4>::SMEM_BYTES,
                                                                stream>>>(p);
    check_launch("conv2d_forward: conv2d_igemm_kernel (128 x 128 tile, 128-byte K tiles, 4 stages)");
  } else {
    static std::atomic<unsigned long long> opted{0};
    opt_in_dynamic_smem(conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 3>, dev, Wide128<3>::SMEM_BYTES,
                        opted);
    conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 3><<<grid, Wide128<3>::THREADS, Wide128<3>::SMEM_BYTES,
                                                                stream>>>(p);
    check_launch("conv2d_forward: conv2d_igemm_kernel (128 x 128 tile, 128-byte K tiles, 3 stages)");
  }
}

// wide: the 128 x 128 tile (16-bit types on the vector path only: two more instances), with
// wide_stages > 0 its 128-byte-K-tile version in that many stages (two more per stage count);
// pro: the operand prologue (128 x 64 tile, both A paths: two more instances per math mode)
template <typename T, int MATH>
void launch_conv(const Params& p, bool vec_a, bool wide, int wide_stages, bool pro, int dev, dim3 grid,
                 cudaStream_t stream) {
  if (pro) {
    if (vec_a) {
      conv2d_igemm_kernel<T, MATH, true, 64, true><<<grid, TileCfg<64>::THREADS, 0, stream>>>(p);
      check_launch("conv2d_forward: conv2d_igemm_kernel (BN + ReLU operand prologue, vector A loads)");
    } else {
      conv2d_igemm_kernel<T, MATH, false, 64, true><<<grid, TileCfg<64>::THREADS, 0, stream>>>(p);
      check_launch("conv2d_forward: conv2d_igemm_kernel (BN + ReLU operand prologue, generic A gather)");
    }
    return;
  }
  if constexpr (MATH == kMma16) {
    if (wide && wide_stages > 0) {
      launch_wide128<T>(p, wide_stages, dev, grid, stream);
      return;
    }
    if (wide) {
      conv2d_igemm_kernel<T, MATH, true, 128><<<grid, TileCfg<128>::THREADS, 0, stream>>>(p);
      check_launch("conv2d_forward: conv2d_igemm_kernel (128 x 128 tile, vectorised A loads)");
      return;
    }
  }
  if (vec_a) {
    conv2d_igemm_kernel<T, MATH, true, 64><<<grid, TileCfg<64>::THREADS, 0, stream>>>(p);
    check_launch("conv2d_forward: conv2d_igemm_kernel (vectorised A loads)");
  } else {
    conv2d_igemm_kernel<T, MATH, false, 64><<<grid, TileCfg<64>::THREADS, 0, stream>>>(p);
    check_launch("conv2d_forward: conv2d_igemm_kernel (generic A gather)");
  }
}

constexpr int64_t kIntMax = 2147483647;

// m-tiles per statistics group: about sqrt(m_tiles), at least 16 (so both merge levels of the last
// arrivals read about sqrt(m_tiles) partials per channel)
int64_t stat_group_tiles(int64_t m_tiles) {
  int64_t g = 1;
  while (g * g < m_tiles) ++g;
  return g < 16 ? 16 : g;
}

void check_int32(int64_t v, const char* fn, const char* what) {
  if (v > kIntMax) throw ArgError(cat(fn, ": ", what, " = ", v, " exceeds the 32-bit index range of the kernel"));
}

// dims/strides describe a tensor whose elements are all distinct and fill a dense block
// (any dimension order): what out must be, since every element is written exactly once.
bool non_overlapping_dense(const int64_t (&size)[4], const int64_t (&stride)[4]) {
  int order[4] = {0, 1, 2, 3};
  for (int i = 1; i < 4; ++i)  // insertion sort by stride (ties: keep order)
    for (int j = i; j > 0 && stride[order[j]] < stride[order[j - 1]]; --j) {
      int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  int64_t expect = 1;
  for (int i = 0; i < 4; ++i) {
    const int d = order[i];
    if (size[d] == 1) continue;
    if (stride[d] != expect) return false;
    expect *= size[d];
  }
  return true;
}

}  // namespace
}  // namespace conv

namespace conv {
namespace {
// The statistics' m-tiles and merge groups of an (N, Cout, OH, OW) output (the sizes checked, as `fn`'s).
void stat_tiles(const char* fn, int64_t N, int64_t OH, int64_t OW, int64_t Cout, int64_t& m_tiles, int64_t& groups) {
  check_nonneg(N, fn, "N");
  check_nonneg(OH, fn, "OH");
  check_nonneg(OW, fn, "OW");
  check_nonneg(Cout, fn, "Cout");
  m_tiles = ceil_div(N * OH * OW, BM);
  groups = ceil_div(m_tiles, stat_group_tiles(m_tiles));
}
}  // namespace
}  // namespace conv

int64_t conv2d_workspace_bytes(int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats) {
  int64_t m_tiles, groups;
  conv::stat_tiles("conv2d_workspace_bytes", N, OH, OW, Cout, m_tiles, groups);
  if (!compute_stats) return 0;
  return 2 * groups * Cout * static_cast<int64_t>(sizeof(double)) +
         2 * m_tiles * Cout * static_cast<int64_t>(sizeof(float));
}

int64_t conv2d_stats_counters(int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats) {
  int64_t m_tiles, groups;
  conv::stat_tiles("conv2d_stats_counters", N, OH, OW, Cout, m_tiles, groups);
  if (!compute_stats) return 0;
  // per (group, column tile of the narrowest tile, 64 channels), then per column tile
  return (groups + (groups > 1 ? 1 : 0)) * ceil_div(Cout, conv::BN);
}

void conv2d_forward(const Conv2dArgs& a) {
  using namespace conv;
  const char* fn = "conv2d_forward";
  // ---- dtype
  int eb = 0;
  switch (a.dtype) {
    case DType::F32: eb = 4; break;
    case DType::F16:
    case DType::BF16: eb = 2; break;
    case DType::F64:
      throw ArgError(cat(fn, ": dtype float64 is not supported by the CUDA convolution kernel "
                         "(use the torch backend)"));
  }
  // ---- sizes
  check_conv_sizes(a, fn, kZeroN | kZeroH | kZeroW | kZeroCout);
  for (auto [v, name] : {std::pair<int64_t, const char*>{a.N, "N"}, {a.Cin, "Cin"}, {a.H, "H"}, {a.W, "W"},
                         {a.Cout, "Cout"}, {a.KH, "KH"}, {a.KW, "KW"}, {a.stride_h, "stride_h"},
                         {a.stride_w, "stride_w"}, {a.pad_h, "pad_h"}, {a.pad_w, "pad_w"}})
    check_int32(v, fn, name);
  if (a.H + 2 * a.pad_h < a.KH || a.W + 2 * a.pad_w < a.KW)
    throw ArgError(cat(fn, ": the padded input (", a.H + 2 * a.pad_h, " x ", a.W + 2 * a.pad_w,
                       ") is smaller than the kernel (", a.KH, " x ", a.KW, ")"));
  const int64_t OH = (a.H + 2 * a.pad_h - a.KH) / a.stride_h + 1;
  const int64_t OW = (a.W + 2 * a.pad_w - a.KW) / a.stride_w + 1;
  if (a.OH != OH) throw ArgError(cat(fn, ": OH = ", a.OH, " but the convolution gives ", OH));
  if (a.OW != OW) throw ArgError(cat(fn, ": OW = ", a.OW, " but the convolution gives ", OW));
  const int64_t M = a.N * OH * OW;
  const int vec = 16 / eb;
  const int64_t Cp = ceil_div(a.Cin, vec) * vec;  // channels per tap in the packed weight and in K
  const int64_t K = a.KH * a.KW * Cp;
  check_int32(M + BM, fn, "N*OH*OW (+ one tile)");
  check_int32(K + 64, fn, "K = KH*KW*Cp (+ one tile)");
  if (ceil_div(M, BM) * ceil_div(a.Cout, BN) > kIntMax)  // the 128 x 64 tile: the most tiles
    throw ArgError(cat(fn, ": N*OH*OW = ", M, " and Cout = ", a.Cout, " make more than 2^31 - 1 tiles of ", BM,
                       " x ", BN));
  if (a.ldw < K)
    throw ArgError(cat(fn, ": ldw = ", a.ldw, " must be >= K = KH*KW*Cp = ", K,
                       " (Cp = Cin rounded up to a multiple of ", vec, ")"));
  if (a.ldw % 8 != 0) throw ArgError(cat(fn, ": ldw = ", a.ldw, " must be a multiple of 8"));
  check_int32(a.ldw + 64, fn, "ldw");
  // ---- pointers, alignment, strides
  // empty tensors may have null data pointers: only tensors with elements must be non-null
  if (a.N * a.Cin * a.H * a.W > 0) check_ptr(a.x, fn, "x");
  if (a.Cout > 0) check_ptr(a.w, fn, "w");
  if (M * a.Cout > 0) check_ptr(a.out, fn, "out");
  if (a.w % 16 != 0) throw ArgError(cat(fn, ": w must be 16-byte aligned"));
  if (a.x % eb != 0) throw ArgError(cat(fn, ": x is not aligned to its element size"));
  if (a.out % eb != 0) throw ArgError(cat(fn, ": out is not aligned to its element size"));
  if (a.residual % eb != 0) throw ArgError(cat(fn, ": residual is not aligned to its element size"));
  if (a.scale % 4 != 0) throw ArgError(cat(fn, ": scale is not 4-byte aligned"));
  if (a.bias % 4 != 0) throw ArgError(cat(fn, ": bias is not 4-byte aligned"));
  // ---- operand prologue: x is y_prev, the MMA consumes relu(batch_norm(x)) (bn_affine.cuh)
  const bool pro = a.bn_mean != 0;
  if (pro) {
    check_ptr(a.bn_var, fn, "bn_var (bn_mean was given)");
    if (a.bn_mean % 4 != 0 || a.bn_var % 4 != 0) throw ArgError(cat(fn, ": bn_mean and bn_var must be 4-byte aligned"));
    const std::pair<DType, const char*> pd[2] = {{a.bn_weight_dtype, "bn_weight_dtype"}, {a.bn_bias_dtype, "bn_bias_dtype"}};
    const std::uintptr_t pp[2] = {a.bn_weight, a.bn_bias};
    for (int i = 0; i < 2; ++i) {
      if (pp[i] == 0) continue;
      if (pd[i].first == DType::F64)
        throw ArgError(cat(fn, ": ", pd[i].second, " is float64 (expected float32, float16 or bfloat16)"));
      if (pp[i] % (pd[i].first == DType::F32 ? 4 : 2) != 0)
        throw ArgError(cat(fn, ": ", i == 0 ? "bn_weight" : "bn_bias", " is not aligned to its element size"));
    }
    if (!(a.bn_eps >= 0.0)) throw ArgError(cat(fn, ": bn_eps = ", a.bn_eps, " must be >= 0"));
    if (Cp > kConvPrologueMaxChannels)
      throw ArgError(cat(fn, ": Cin = ", a.Cin, " (Cp = ", Cp, ") exceeds the operand prologue's ",
                         kConvPrologueMaxChannels, " channels (its shared-memory table)"));
    if (a.scale || a.bias || a.residual || a.relu)
      throw ArgError(cat(fn, ": the operand prologue (bn_mean given) takes no scale, bias, residual or relu"));
  } else if (a.bn_var || a.bn_weight || a.bn_bias) {
    throw ArgError(cat(fn, ": bn_var/bn_weight/bn_bias were given without bn_mean"));
  }
  for (int i = 0; i < 4; ++i) {
    static const char* xn[4] = {"x_stride[0]", "x_stride[1]", "x_stride[2]", "x_stride[3]"};
    static const char* on[4] = {"out_stride[0]", "out_stride[1]", "out_stride[2]", "out_stride[3]"};
    static const char* rn[4] = {"res_stride[0]", "res_stride[1]", "res_stride[2]", "res_stride[3]"};
    check_nonneg(a.x_stride[i], fn, xn[i]);
    check_nonneg(a.out_stride[i], fn, on[i]);
    if (a.residual) check_nonneg(a.res_stride[i], fn, rn[i]);
  }
  const int64_t out_size[4] = {a.N, a.Cout, OH, OW};
  if (!non_overlapping_dense(out_size, a.out_stride))
    throw ArgError(cat(fn, ": out_stride = (", a.out_stride[0], ", ", a.out_stride[1], ", ", a.out_stride[2], ", ",
                       a.out_stride[3], ") does not describe a dense non-overlapping (N, Cout, OH, OW) tensor"));
  const bool stats = a.mean != 0 || a.var != 0;
  if (stats) {
    check_ptr(a.mean, fn, "mean (var was given)");
    check_ptr(a.var, fn, "var (mean was given)");
    if (M * a.Cout > 0) {
      check_ptr(a.workspace, fn, "workspace (statistics requested)");
      check_ptr(a.counters, fn, "counters (statistics requested)");
    }
    if (a.mean % 4 != 0 || a.var % 4 != 0 || a.counters % 4 != 0)
      throw ArgError(cat(fn, ": mean, var and counters must be 4-byte aligned"));
    if (a.workspace % 8 != 0) throw ArgError(cat(fn, ": workspace must be 8-byte aligned"));
    const int64_t need = conv2d_workspace_bytes(a.N, OH, OW, a.Cout, true);
    if (a.workspace_bytes < need)
      throw ArgError(cat(fn, ": workspace_bytes = ", a.workspace_bytes, " < ", need, " required"));
    const int64_t need_cnt = conv2d_stats_counters(a.N, OH, OW, a.Cout, true);
    if (a.counters_count < need_cnt)
      throw ArgError(cat(fn, ": counters_count = ", a.counters_count, " < ", need_cnt, " required"));
  }
  // ---- device
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "conv2d_forward: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
             "conv2d_forward: cudaDeviceGetAttribute");
  if (major < 8)
    throw ArgError(cat(fn, ": needs a GPU of compute capability >= 8.0 (tensor-core mma.sync, cp.async); device ",
                       dev, " is ", major, ".x"));
  cudaStream_t stream = as_stream(a.stream);
  if (a.Cout == 0) return;
  if (M == 0) {
    if (stats) {  // statistics of an empty set: NaN (all-ones bit pattern), like torch.mean
      check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.mean), 0xFF, a.Cout * sizeof(float), stream),
                 "conv2d_forward: cudaMemsetAsync(mean)");
      check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(a.var), 0xFF, a.Cout * sizeof(float), stream),
                 "conv2d_forward: cudaMemsetAsync(var)");
    }
    return;
  }

  Params p{};
  p.x = reinterpret_cast<const void*>(a.x);
  p.w = reinterpret_cast<const void*>(a.w);
  p.scale = reinterpret_cast<const float*>(a.scale);
  p.bias = reinterpret_cast<const float*>(a.bias);
  p.res = reinterpret_cast<const void*>(a.residual);
  p.out = reinterpret_cast<void*>(a.out);
  const int64_t m_tiles = ceil_div(M, BM);
  const int64_t group_tiles = stat_group_tiles(m_tiles);
  const int64_t groups = ceil_div(m_tiles, group_tiles);
  if (stats) {  // workspace: [groups][Cout] float64 mean, M2; then [m_tiles][Cout] float32 mean, M2
    p.grp_mean = reinterpret_cast<double*>(a.workspace);
    p.grp_m2 = p.grp_mean + groups * a.Cout;
    p.part_mean = reinterpret_cast<float*>(p.grp_m2 + groups * a.Cout);
    p.part_m2 = p.part_mean + m_tiles * a.Cout;
    p.mean_out = reinterpret_cast<float*>(a.mean);
    p.var_out = reinterpret_cast<float*>(a.var);
    p.counters = reinterpret_cast<int*>(a.counters);
  }
  p.stat_group_tiles = static_cast<int>(group_tiles);
  p.stat_groups = static_cast<int>(groups);
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
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.ldw = static_cast<int>(a.ldw);
  for (int i = 0; i < 4; ++i) {
    p.xs[i] = a.x_stride[i];
    p.os[i] = a.out_stride[i];
    p.rs[i] = a.residual ? a.res_stride[i] : 0;
  }
  p.td = tap_deltas(static_cast<int>(Cp), p.KW, p.xs[1], p.xs[2], p.xs[3]);
  p.relu = a.relu ? 1 : 0;
  p.out_cvec = a.out_stride[1] == 1 ? 1 : 0;
  p.out_al16 = a.out % 16 == 0 ? 1 : 0;
  p.out_pvec = (p.out_al16 && a.out_stride[3] == 1 && a.out_stride[2] == OW) ? 1 : 0;
  p.res_cvec = (a.residual && a.residual % 16 == 0 && a.res_stride[1] == 1) ? 1 : 0;
  p.res_pvec = (a.residual && a.residual % 16 == 0 && a.res_stride[3] == 1 && a.res_stride[2] == OW) ? 1 : 0;
  p.Cp = static_cast<int>(Cp);
  if (pro) p.bn = bnk::bn_params(a.bn_mean, a.bn_var, a.bn_weight, a.bn_weight_dtype, a.bn_bias, a.bn_bias_dtype, a.bn_eps);

  const bool vec_a = a.x_stride[1] == 1 && a.Cin % vec == 0 && a.x_stride[0] % vec == 0 &&
                     a.x_stride[2] % vec == 0 && a.x_stride[3] % vec == 0 && a.x % 16 == 0;
  // the 128 x 128 tile where it helps: 16-bit, vector path, at least 128 output channels (half
  // the shared-memory and L2 traffic per MAC of the 128 x 64 tile); layers narrower than 128
  // would waste half of it
  const bool wide = eb == 2 && vec_a && a.Cout >= 128 && !pro;
  // ... with K tiles of 128 bytes (64 channels: Cin % 64 == 0, so a tile never straddles a filter
  // tap and K has no partial tile) in as many stages as the device's opt-in shared memory per
  // block holds: 4 (128 KiB) on sm_80/87/90/100 (163 / 227 KiB), 3 (96 KiB) on sm_86/89/120
  // (99 KiB); below 96 KiB (no such sm_80+ GPU) the 64-byte-K tile above. Only for K >= 4 such
  // tiles: a 1x1 conv on 64 or 128 channels has 1 or 2, its whole K is the pipeline's prologue, and
  // one CTA per SM (the 128-byte tile's shared memory) would overlap nothing, where the 48 KiB tile
  // runs 2 CTAs per SM (one's loads and epilogue under the other's math).
  int wide_stages = 0;
  if (wide && a.Cin % 64 == 0 && K >= 4 * 64) {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "conv2d_forward: cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)");
    wide_stages = optin >= Wide128<4>::SMEM_BYTES ? 4 : optin >= Wide128<3>::SMEM_BYTES ? 3 : 0;
  }
  const int bke = (wide_stages > 0 ? Wide128<4>::BK_BYTES : BK_BYTES) / eb;  // K elements per tile
  p.num_k_tiles = static_cast<int>(ceil_div(K, bke));
  p.tile_dc = static_cast<long long>(bke) * p.xs[1];
  p.m_tiles = static_cast<int>(m_tiles);
  p.n_tiles = static_cast<int>(ceil_div(a.Cout, wide ? 128 : BN));
  const dim3 grid(static_cast<unsigned>(m_tiles * p.n_tiles));  // grouped order: tile_of
  switch (a.dtype) {
    case DType::F32:
      if (a.allow_tf32)
        launch_conv<float, kTf32>(p, vec_a, false, 0, pro, dev, grid, stream);
      else
        launch_conv<float, k3xTf32>(p, vec_a, false, 0, pro, dev, grid, stream);
      break;
    case DType::F16: launch_conv<__half, kMma16>(p, vec_a, wide, wide_stages, pro, dev, grid, stream); break;
    case DType::BF16: launch_conv<__nv_bfloat16, kMma16>(p, vec_a, wide, wide_stages, pro, dev, grid, stream); break;
    case DType::F64: break;  // rejected above
  }
}

}  // namespace rk
