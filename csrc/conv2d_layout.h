// Index math of the implicit-GEMM convolution (csrc/conv2d.cu): tiling, shared-memory swizzle,
// ldmatrix addressing, mma fragment mapping. (Without a GPU, the whole kernel runs in the test-only
// host runner, tests/host_runner.py.)
//
// GEMM view: M = N*OH*OW output pixels (row m -> (n, p, q)), N_gemm = Cout, K = KH*KW*Cp with
// k -> (r, s, c), c fastest, Cp = Cin rounded up to a multiple of 16 bytes' worth of elements
// (the weight is laid out (Cout, KH, KW, Cp) with zero channels c >= Cin, row stride ldw >= K), so
// every 16-byte chunk of K lies in one filter tap.
//
// CTA tile BM x BN output, K tiles of BK_BYTES bytes per row (32 bf16/fp16 or 16 fp32 values).
// Shared memory per stage: A tile [BM rows][BK_BYTES] and B tile [BN rows (= output channels)]
// [BK_BYTES], both "K-contiguous"; every row is 4 chunks of 16 bytes, chunk index XOR-swizzled
// with (row >> 1) & 3 so that the 8 row addresses of one ldmatrix 8x8 matrix hit 8 different
// 16-byte bank groups.
//
// Two CTA shapes (TileCfg<BN_>): 128 x 64 with 4 warps as 2 (M) x 2 (N), and 128 x 128 with 8 warps
// as 2 x 4; warp tile 64 x 32 = MI (4) m16 tiles x NI (4) n8 tiles in both. The 128 x 128 shape
// also comes with K tiles of 128 bytes (TileCfg<128, 128, ST>: 64 bf16/fp16 values, 8 chunks per
// row swizzled with row & 7, ST = 3 or 4 stages in dynamic shared memory; see TileCfg). One
// "k-step" is 32 bytes of K: a m16n8k16 for 16-bit types, a m16n8k8 for tf32. For both, the A
// fragment of one m16 tile is one ldmatrix.x4 (matrices: rows 0-7/8-15 x chunk 0/1 of the
// k-step), and the B fragments of two n8 tiles are one ldmatrix.x4 (matrices: n 0-7 chunk 0,
// n 0-7 chunk 1, n 8-15 chunk 0, n 8-15 chunk 1).
#pragma once

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rk {
namespace conv {

constexpr int kThreads = 128;
constexpr int BM = 128;
constexpr int BN = 64;
constexpr int BK_BYTES = 64;
constexpr int KSTEP_BYTES = 32;
constexpr int KSTEPS = BK_BYTES / KSTEP_BYTES;  // 2
constexpr int CHUNKS = BK_BYTES / 16;           // 4 16-byte chunks per tile row
constexpr int STAGES = 3;
constexpr int WARP_M = 64;
constexpr int WARP_N = 32;
constexpr int MI = WARP_M / 16;  // 4
constexpr int NI = WARP_N / 8;   // 4
constexpr int A_STAGE_BYTES = BM * BK_BYTES;
constexpr int B_STAGE_BYTES = BN * BK_BYTES;
// Epilogue staging tile (fp32, in the pipeline buffers), 64 output channels at a time (BN = 64
// columns; the wide tile stages its two halves in turn): [BM][EP_LD_C] when out's channels are
// contiguous, else [BN][EP_LD_P]; rows padded by 4 floats (16-byte aligned rows, fewer conflicts).
constexpr int EP_LD_C = BN + 4;
constexpr int EP_LD_P = BM + 4;
static_assert(BM * EP_LD_C * 4 <= STAGES * (A_STAGE_BYTES + B_STAGE_BYTES) &&
                  BN * EP_LD_P * 4 <= STAGES * (A_STAGE_BYTES + B_STAGE_BYTES),
              "the epilogue staging tile fits in the pipeline buffers");
static_assert(2 * WARP_M == BM && 2 * WARP_N == BN, "2 x 2 warps");

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` inside one stage's A or B tile.
RK_HD int swz(int row, int chunk) { return row * BK_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4); }
// The same for 128-byte rows (chunk 0..7): one row is one 128-byte line of the 32 banks, so the
// 8 rows of one ldmatrix 8x8 matrix (consecutive rows, one logical chunk) take the 8 chunk slots
// (chunk ^ (row & 7)): conflict-free, as are 8 threads storing the 8 chunks of one row.
RK_HD int swz128(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// CTA shape by its output-channel width BN_ (64: the default; 128: the wide tile, 16-bit vector
// path): 2 x (BN_ / 32) warps of 64 x 32; vectorised loads: each thread owns one chunk column
// (vec_chunk) and the rows vec_row(tid, i) = tid / CHUNKS + ROW_STEP * i.
// K tile: BKB bytes per row (64: the global BK_BYTES, 4 chunks, STAGES stages in static shared
// memory, swizzle swz; 128: 8 chunks swizzled with row & 7 (swz128), ST stages: 96 KiB (3) or
// 128 KiB (4) per CTA, above the 48 KiB of static shared memory, so DYNAMIC: extern __shared__,
// sized at launch after cudaFuncSetAttribute's opt-in).
template <int BN_, int BKB = BK_BYTES, int ST = STAGES>
struct TileCfg {
  static constexpr int BN = BN_;
  static constexpr int WARPS_N = BN_ / WARP_N;
  static constexpr int THREADS = 32 * 2 * WARPS_N;
  static constexpr int BK_BYTES = BKB;
  static constexpr int CHUNKS = BKB / 16;  // 16-byte chunks per tile row: 4 / 8
  static constexpr int KSTEPS = BKB / KSTEP_BYTES;  // 2 / 4
  static constexpr int STAGES = ST;
  static constexpr int A_STAGE_BYTES = BM * BKB;
  static constexpr int B_STAGE_BYTES = BN_ * BKB;
  static constexpr int SMEM_BYTES = ST * (A_STAGE_BYTES + B_STAGE_BYTES);
  static constexpr bool DYNAMIC = SMEM_BYTES > 48 * 1024;
  static constexpr int ROW_STEP = THREADS / CHUNKS;  // 32 / 64; 32 for 128-byte rows
  static constexpr int A_VEC_ROWS = BM / ROW_STEP;   // 4 / 2; 4
  static constexpr int B_VEC_ROWS = BN_ / ROW_STEP;  // 2 / 2; 4
  static RK_HD int warp_m(int warp) { return warp / WARPS_N; }
  static RK_HD int warp_n(int warp) { return warp % WARPS_N; }
  static RK_HD int vec_row(int tid, int i) { return (tid >> (CHUNKS == 8 ? 3 : 2)) + ROW_STEP * i; }
  static RK_HD int vec_chunk(int tid) { return tid & (CHUNKS - 1); }
  // Byte offset of 16-byte chunk `chunk` of tile row `row` inside one stage's A or B tile.
  static RK_HD int swizzle(int row, int chunk) {
    if constexpr (BKB == 128) {
      return swz128(row, chunk);
    } else {
      return swz(row, chunk);
    }
  }
  static_assert(BKB == 64 || BKB == 128, "K tiles of 64 or 128 bytes");
  static_assert(BKB == 128 || SMEM_BYTES <= 48 * 1024, "static shared memory (48 KiB)");
  static_assert(BKB == 64 || BN_ == 128, "128-byte K tiles: the 128 x 128 tile");
  static_assert(ROW_STEP % 8 == 0, "rows ROW_STEP apart share the swizzle phase");
  static_assert(BM * EP_LD_C * 4 <= SMEM_BYTES && conv::BN * EP_LD_P * 4 <= SMEM_BYTES,
                "the epilogue staging tile fits in the pipeline buffers");
};

// Elements per tile row (one K tile) and per 16-byte chunk for an element of `elem_bytes`.
RK_HD constexpr int bk_elems(int elem_bytes) { return BK_BYTES / elem_bytes; }
RK_HD constexpr int vec_elems(int elem_bytes) { return 16 / elem_bytes; }

// Warp placement: warp w covers rows wm*64.., cols wn*32.. of the CTA tile (TileCfg::warp_m/n).

// ldmatrix.x4 for the A fragment of the m16 tile starting at warp-tile row 16*mi, k-step ks:
// the row (within the CTA tile, relative to the m16 tile start) and chunk this lane points at.
RK_HD int a_ldsm_row(int lane) { return lane & 15; }
RK_HD int a_ldsm_chunk(int lane, int ks) { return ks * 2 + (lane >> 4); }
// ldmatrix.x4 for the B fragments of n8 tiles 2*np and 2*np+1 (16 output channels), k-step ks.
// Result registers: r0 = b-reg0 of tile 2np, r1 = b-reg1 of tile 2np, r2/r3 the same for 2np+1.
RK_HD int b_ldsm_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
RK_HD int b_ldsm_chunk(int lane, int ks) { return ks * 2 + ((lane >> 3) & 1); }

// Accumulator (C/D) fragment of one m16n8 tile: register i (0..3) of `lane` holds this element.
RK_HD int c_row(int lane, int i) { return (lane >> 2) + ((i >> 1) << 3); }
RK_HD int c_col(int lane, int i) { return ((lane & 3) << 1) + (i & 1); }

// Vectorised loads: thread `tid` copies chunk vec_chunk(tid) of rows TileCfg::vec_row(tid, i).
RK_HD int vec_chunk(int tid) { return tid & (CHUNKS - 1); }

// Grouped CTA order (1-D grid, CTA b = blockIdx.x): the m tiles form bands of GROUP_M; a band's
// CTAs are consecutive, m fastest, walking all n tiles (m-band x n tile 0, then n tile 1, ...), so
// a band of output rows (and the input rows it reads) is fetched from DRAM once and reused from L2
// by every output-channel tile, and the weight tile of one n tile by GROUP_M m tiles; the last band
// may be narrower. (Divisions: once per CTA, before the main loop.)
constexpr int GROUP_M = 8;
struct TileCoord {
  int m, n;  // m tile (rows m*BM..), n tile (channels n*BN..)
};
RK_HD TileCoord tile_of(int b, int m_tiles, int n_tiles) {
  const int band = b / (GROUP_M * n_tiles);
  const int first = band * GROUP_M;
  const int width = m_tiles - first < GROUP_M ? m_tiles - first : GROUP_M;
  const int in_band = b - band * GROUP_M * n_tiles;
  TileCoord t;
  t.n = in_band / width;
  t.m = first + (in_band - t.n * width);
  return t;
}

// Output pixel of GEMM row m.
struct Pixel {
  int n, p, q;
};
RK_HD Pixel decompose_m(int m, int OH, int OW) {
  const int ohw = OH * OW;
  Pixel px;
  px.n = m / ohw;
  const int rem = m - px.n * ohw;
  px.p = rem / OW;
  px.q = rem - px.p * OW;
  return px;
}

// The pixel after px in GEMM-row order (q fastest, then p, then n).
RK_HD void next_pixel(Pixel& px, int OH, int OW) {
  if (++px.q == OW) {
    px.q = 0;
    if (++px.p == OH) {
      px.p = 0;
      ++px.n;
    }
  }
}

// Filter tap of GEMM column k (k < K): k = (r * KW + s) * Cin + c.
struct Tap {
  int r, s, c;
};
RK_HD Tap decompose_k(int k, int Cin, int KW) {
  Tap t;
  const int rs = k / Cin;
  t.c = k - rs * Cin;
  t.r = rs / KW;
  t.s = rs - t.r * KW;
  return t;
}
// Advance a tap to k + 1.
RK_HD void next_tap(Tap& t, int Cin, int KW) {
  if (++t.c == Cin) {
    t.c = 0;
    if (++t.s == KW) {
      t.s = 0;
      ++t.r;
    }
  }
}

// Filter-tap iterator of the main loop: the tap (r, s, c) of GEMM column k and its element offset
// off = r * xs_h + s * xs_w + c * xs_c from the output pixel's input origin, advanced with
// precomputed deltas (no division or multiplication): a step of `step` columns adds step to c and
// step * xs_c to off, then every wrap of c past Cin moves one tap on (s + 1: off += ds, with
// ds = xs_w - Cin * xs_c; s past KW: r + 1, off += dr, dr = xs_h - KW * xs_w). A step of at most
// Cin columns wraps at most once; smaller channel counts loop (bounded by step / Cin + 1).
struct TapDeltas {
  int Cin, KW;
  long long dc;      // offset of one channel (xs_c)
  long long ds, dr;  // offset added when c wraps (next s), when s wraps too (next r)
};
RK_HD TapDeltas tap_deltas(int Cin, int KW, long long xs_c, long long xs_h, long long xs_w) {
  TapDeltas d;
  d.Cin = Cin;
  d.KW = KW;
  d.dc = xs_c;
  d.ds = xs_w - static_cast<long long>(Cin) * xs_c;
  d.dr = xs_h - static_cast<long long>(KW) * xs_w;
  return d;
}
// Column k < K exactly while r < KH (c < Cin and s < KW always hold), so the iterator keeps no k.
struct TapIter {
  int r, s, c;
  long long off;  // r * xs_h + s * xs_w + c * xs_c
};
// The iterator at column k (divisions: call it once, before the main loop).
RK_HD TapIter tap_iter_at(int k, const TapDeltas& d, long long xs_h, long long xs_w) {
  const Tap t = decompose_k(k, d.Cin, d.KW);
  TapIter it;
  it.r = t.r;
  it.s = t.s;
  it.c = t.c;
  it.off = t.r * xs_h + t.s * xs_w + t.c * d.dc;
  return it;
}
// Advance by `step` columns; step_off = step * xs_c (precomputed by the caller).
RK_HD void tap_advance(TapIter& it, int step, long long step_off, const TapDeltas& d) {
  it.c += step;
  it.off += step_off;
  while (it.c >= d.Cin) {
    it.c -= d.Cin;
    it.off += d.ds;
    if (++it.s == d.KW) {
      it.s = 0;
      ++it.r;
      it.off += d.dr;
    }
  }
}

// Is input pixel (h, w) inside the image (otherwise it is zero padding)?
RK_HD bool in_image(int h, int w, int H, int W) {
  return static_cast<unsigned>(h) < static_cast<unsigned>(H) && static_cast<unsigned>(w) < static_cast<unsigned>(W);
}

// Chan et al. parallel combination of (count, mean, M2) partial statistics.
template <typename F>
RK_HD void chan_combine(F& n_a, F& mean_a, F& m2_a, F n_b, F mean_b, F m2_b) {
  const F n = n_a + n_b;
  if (n_b == F(0)) return;
  const F delta = mean_b - mean_a;
  const F frac = n_b / n;
  mean_a = mean_a + delta * frac;
  m2_a = m2_a + m2_b + delta * delta * n_a * frac;
  n_a = n;
}

}  // namespace conv
}  // namespace rk
