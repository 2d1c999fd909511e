// Host emulation of csrc/conv2d.cu's implicit GEMM, run by tests/test_conv_emulation.py (no GPU
// needed): the kernel's index helpers (csrc/conv2d_layout.h) and loop structure (prologue, stage
// ring, vectorised cp.async-style loads with zero fill, generic gather, 2 k-steps per tile), a
// byte-level shared memory, ldmatrix.x4 semantics, and the mma.m16n8k16 / m16n8k8 fragment
// layouts written independently from the PTX ISA "Matrix Fragments" tables. Small integer data,
// so the result must equal a direct convolution exactly; the per-tile (mean, M2) statistics and
// their Chan combination are checked against a two-pass float64 reference.
// Shared-memory hazards: cp.async copies land only at the cp.async.wait_group that retires their
// commit group, and every 16-byte chunk remembers the barrier interval (__syncthreads epoch) of
// its last write and read, so a read of an in-flight or same-interval write, or a write to a
// chunk read in the same interval (a stage refilled while another warp may still read it), is
// reported as a race. Built with -DEMU_BUG=1/2/3 the loop carries a typical pipeline bug
// (wait_group too shallow / no barrier / refill issued before the barrier), which must be caught.
#include <algorithm>
#include <array>
#include <deque>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "conv2d_layout.h"
#ifndef EMU_BUG
#define EMU_BUG 0
#endif
using namespace rk::conv;

struct Cfg {
  int EB;  // 2 or 4
  int N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw;
  bool nhwc;
};

static int fails = 0;

// --- PTX-spec fragment layouts (from the PTX ISA "Matrix Fragments" sections) ---------------
// m16n8k16 f16/bf16 A: a_i, i=0..7; row = g for i<2 || 4<=i<6 else g+8; col = t*2+(i&1) (+8 for i>=4)
static void specA16(int lane, int i, int& row, int& col) {
  int g = lane >> 2, t = lane & 3;
  row = ((i < 2) || (i >= 4 && i < 6)) ? g : g + 8;
  col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
// B: b_i, i=0..3: row(k) = t*2+(i&1) (+8 for i>=2), col(n) = g
static void specB16(int lane, int i, int& k, int& n) {
  int g = lane >> 2, t = lane & 3;
  k = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  n = g;
}
// m16n8k8 tf32 A: a0:(g,t) a1:(g+8,t) a2:(g,t+4) a3:(g+8,t+4)
static void specA8(int lane, int i, int& row, int& col) {
  int g = lane >> 2, t = lane & 3;
  row = (i == 0 || i == 2) ? g : g + 8;
  col = (i < 2) ? t : t + 4;
}
// B: b0: (k=t, n=g), b1: (k=t+4, n=g)
static void specB8(int lane, int i, int& k, int& n) {
  int g = lane >> 2, t = lane & 3;
  k = i == 0 ? t : t + 4;
  n = g;
}
// C: c_i: row = g (i<2) or g+8, col = t*2 + (i&1)
static void specC(int lane, int i, int& row, int& col) {
  int g = lane >> 2, t = lane & 3;
  row = i < 2 ? g : g + 8;
  col = t * 2 + (i & 1);
}

// ldmatrix.x4 (.b16): lane l supplies the row address for matrix l/8, row l%8; each lane
// receives in reg j the 32 bits at (row address of lane 8j + l/4) + 4*(l%4).
static void ldsm_x4(const unsigned char* smem, const uint32_t addr[32], uint32_t out[32][4]) {
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      uint32_t a = addr[8 * j + (l >> 2)] + 4 * (l & 3);
      memcpy(&out[l][j], smem + a, 4);
    }
}

static int64_t elem_of(uint32_t reg, int EB, int half) {
  if (EB == 4) return (int32_t)reg;
  return (int16_t)((reg >> (16 * half)) & 0xffff);
}

int run(const Cfg& c, int seed) {
  const int EB = c.EB, BKE = bk_elems(EB), VEC = vec_elems(EB);
  const int OH = (c.H + 2 * c.ph - c.KH) / c.sh + 1, OW = (c.W + 2 * c.pw - c.KW) / c.sw + 1;
  const int M = c.N * OH * OW, K = c.KH * c.KW * c.Cin;
  const int ldw = (K + 7) / 8 * 8;
  // logical x values, stored in a strided byte buffer
  long long xs[4];
  if (c.nhwc) {
    xs[1] = 1; xs[3] = c.Cin; xs[2] = (long long)c.W * c.Cin; xs[0] = (long long)c.H * c.W * c.Cin;
  } else {
    xs[3] = 1; xs[2] = c.W; xs[1] = (long long)c.H * c.W; xs[0] = (long long)c.Cin * c.H * c.W;
  }
  unsigned st = seed * 2654435761u + 12345;
  auto rnd = [&]() { st = st * 1664525u + 1013904223u; return (int)((st >> 16) % 7) - 3; };
  std::vector<unsigned char> xb((size_t)c.N * c.Cin * c.H * c.W * EB + 64);
  std::vector<int> xl((size_t)c.N * c.Cin * c.H * c.W);
  for (int n = 0; n < c.N; ++n) for (int ch = 0; ch < c.Cin; ++ch) for (int h = 0; h < c.H; ++h) for (int w = 0; w < c.W; ++w) {
    int v = rnd();
    xl[((size_t)(n * c.Cin + ch) * c.H + h) * c.W + w] = v;
    long long off = n * xs[0] + ch * xs[1] + h * xs[2] + w * xs[3];
    if (EB == 2) { int16_t s = v; memcpy(&xb[off * 2], &s, 2); } else { int32_t s = v; memcpy(&xb[off * 4], &s, 4); }
  }
  // weight (Cout, ldw), column (r*KW+s)*Cin+c, zero padded
  std::vector<unsigned char> wb((size_t)c.Cout * ldw * EB, 0);
  std::vector<int> wl((size_t)c.Cout * c.Cin * c.KH * c.KW);
  for (int k = 0; k < c.Cout; ++k) for (int ch = 0; ch < c.Cin; ++ch) for (int r = 0; r < c.KH; ++r) for (int s = 0; s < c.KW; ++s) {
    int v = rnd();
    wl[((k * c.Cin + ch) * c.KH + r) * c.KW + s] = v;
    long long off = (long long)k * ldw + (r * c.KW + s) * c.Cin + ch;
    if (EB == 2) { int16_t q = v; memcpy(&wb[off * 2], &q, 2); } else { int32_t q = v; memcpy(&wb[off * 4], &q, 4); }
  }
  // reference y[m][k]
  std::vector<long long> ref((size_t)M * c.Cout, 0);
  for (int m = 0; m < M; ++m) {
    int n = m / (OH * OW), p = (m / OW) % OH, q = m % OW;
    for (int k = 0; k < c.Cout; ++k) {
      long long s = 0;
      for (int ch = 0; ch < c.Cin; ++ch) for (int r = 0; r < c.KH; ++r) for (int ss = 0; ss < c.KW; ++ss) {
        int h = p * c.sh - c.ph + r, w = q * c.sw - c.pw + ss;
        if (h < 0 || h >= c.H || w < 0 || w >= c.W) continue;
        s += (long long)xl[((size_t)(n * c.Cin + ch) * c.H + h) * c.W + w] * wl[((k * c.Cin + ch) * c.KH + r) * c.KW + ss];
      }
      ref[(size_t)m * c.Cout + k] = s;
    }
  }
  const bool vec_a = xs[1] == 1 && c.Cin % VEC == 0 && xs[0] % VEC == 0 && xs[2] % VEC == 0 && xs[3] % VEC == 0;
  const int KT = (K + BKE - 1) / BKE;
  const int m_tiles = (M + BM - 1) / BM, n_tiles = (c.Cout + BN - 1) / BN;
  std::vector<long long> got((size_t)M * c.Cout, LLONG_MIN);
  std::vector<double> pmean((size_t)m_tiles * c.Cout), pm2((size_t)m_tiles * c.Cout);
  std::vector<unsigned char> smem(STAGES * (A_STAGE_BYTES + B_STAGE_BYTES));
  const uint32_t a_base = 0, b_base = STAGES * A_STAGE_BYTES;
  int zero_fill_copies = 0, races = 0;

  for (int bx = 0; bx < m_tiles; ++bx) for (int by = 0; by < n_tiles; ++by) {
    const int m0 = bx * BM, n0 = by * BN;
    memset(smem.data(), 0xAB, smem.size());  // garbage: everything read must have been written
    // hazard model, per 16-byte chunk: cp.async copies in flight, barrier interval of the last
    // landed write (-1: never written) and of the last read
    const size_t nchunks = smem.size() / 16;
    std::vector<int> pending(nchunks, 0), landed(nchunks, -1), last_rd(nchunks, -1);
    int iv = 0;  // barrier interval: incremented by every __syncthreads
    using Copy = std::pair<uint32_t, std::array<unsigned char, 16>>;
    std::vector<Copy> open_group;
    std::deque<std::vector<Copy>> groups;  // committed, not yet retired by a wait_group
    auto race = [&](const char* what, uint32_t addr) {
      if (races++ < 3) printf("  race: %s (smem byte %u, barrier interval %d)\n", what, addr, iv);
    };
    auto cp16 = [&](uint32_t dst, const unsigned char* src, int bytes) {
      assert(dst % 16 == 0 && dst + 16 <= smem.size());
      const size_t ci = dst / 16;
      if (last_rd[ci] == iv) race("cp.async into a chunk read in the same barrier interval", dst);
      if (pending[ci]) race("two cp.async in flight to one chunk", dst);
      Copy cpy{dst, {}};
      if (bytes == 16) memcpy(cpy.second.data(), src, 16); else { cpy.second.fill(0); ++zero_fill_copies; }
      open_group.push_back(cpy);
      ++pending[ci];
    };
    auto commit = [&]() { groups.push_back(std::move(open_group)); open_group.clear(); };
    auto wait_group = [&](size_t n) {  // cp.async.wait_group n: all but the newest n groups land
      for (; groups.size() > n; groups.pop_front())
        for (const Copy& cpy : groups.front()) {
          memcpy(&smem[cpy.first], cpy.second.data(), 16);
          --pending[cpy.first / 16];
          landed[cpy.first / 16] = iv;
        }
    };
    auto sync = [&]() { ++iv; };
    auto st16 = [&](uint32_t dst, const void* src) {  // st.shared.v4 (generic gather path)
      const size_t ci = dst / 16;
      if (last_rd[ci] == iv) race("st.shared into a chunk read in the same barrier interval", dst);
      if (pending[ci]) race("st.shared into a chunk with a cp.async in flight", dst);
      memcpy(&smem[dst], src, 16);
      landed[ci] = iv;
    };
    auto rd16 = [&](uint32_t addr) {  // one ldmatrix row (16 bytes, written by other threads)
      const size_t ci = addr / 16;
      if (pending[ci]) race("ldmatrix of a chunk whose cp.async has not landed (wait_group)", addr);
      else if (landed[ci] < 0) race("ldmatrix of a chunk never written", addr);
      else if (landed[ci] == iv) race("ldmatrix of a chunk written in the same barrier interval", addr);
      last_rd[ci] = iv;
    };
    // per-thread row data
    struct RowInfo { long long off; int h0, w0; bool ok; };
    auto row_info = [&](int row) {
      RowInfo ri; int m = m0 + row; ri.ok = m < M;
      Pixel px = decompose_m(ri.ok ? m : 0, OH, OW);
      ri.off = px.n * xs[0]; ri.h0 = px.p * c.sh - c.ph; ri.w0 = px.q * c.sw - c.pw; return ri;
    };
    auto load_b = [&](int kt, int stg) {
      for (int tid = 0; tid < kThreads; ++tid) {
        int chunk = vec_chunk(tid), k = kt * BKE + chunk * VEC;
        for (int i = 0; i < B_VEC_ROWS; ++i) {
          int row = vec_row(tid, i), n = n0 + row;
          bool ok = n < c.Cout && k < ldw;
          const unsigned char* src = ok ? &wb[((long long)n * ldw + k) * EB] : wb.data();
          if (ok) assert(((long long)n * ldw + k) * EB + 16 <= (long long)wb.size());
          cp16(b_base + stg * B_STAGE_BYTES + swz(row, chunk), src, ok ? 16 : 0);
        }
      }
    };
    auto load_a_vec = [&](int kt, int stg) {
      for (int tid = 0; tid < kThreads; ++tid) {
        int chunk = vec_chunk(tid), k = kt * BKE + chunk * VEC;
        bool k_ok = k < K;
        Tap tp = decompose_k(k_ok ? k : 0, c.Cin, c.KW);
        for (int i = 0; i < A_VEC_ROWS; ++i) {
          RowInfo ri = row_info(vec_row(tid, i));
          int h = ri.h0 + tp.r, w = ri.w0 + tp.s;
          bool ok = k_ok && ri.ok && in_image(h, w, c.H, c.W);
          long long off = ok ? ri.off + h * xs[2] + w * xs[3] + tp.c : 0;
          cp16(a_base + stg * A_STAGE_BYTES + swz(vec_row(tid, i), chunk), &xb[off * EB], ok ? 16 : 0);
        }
      }
    };
    std::vector<std::vector<uint32_t>> g(kThreads, std::vector<uint32_t>(BKE * EB / 4));
    auto gather_a = [&](int kt) {
      for (int tid = 0; tid < kThreads; ++tid) {
        RowInfo ri = row_info(tid);
        int k0 = kt * BKE;
        Tap tp = decompose_k(k0 < K ? k0 : 0, c.Cin, c.KW);
        for (int j = 0; j < BKE; ++j) {
          int h = ri.h0 + tp.r, w = ri.w0 + tp.s;
          bool ok = (k0 + j < K) && ri.ok && in_image(h, w, c.H, c.W);
          uint32_t bits = 0;
          if (ok) {
            long long off = ri.off + tp.c * xs[1] + h * xs[2] + w * xs[3];
            if (EB == 4) memcpy(&bits, &xb[off * 4], 4); else { uint16_t b16; memcpy(&b16, &xb[off * 2], 2); bits = b16; }
          }
          if (EB == 4) g[tid][j] = bits; else if (j & 1) g[tid][j >> 1] |= bits << 16; else g[tid][j >> 1] = bits;
          next_tap(tp, c.Cin, c.KW);
        }
      }
    };
    auto store_a = [&](int stg) {
      for (int tid = 0; tid < kThreads; ++tid)
        for (int ch = 0; ch < CHUNKS; ++ch) st16(a_base + stg * A_STAGE_BYTES + swz(tid, ch), &g[tid][4 * ch]);
    };
    // accumulators [warp][lane][mi][ni][4]
    std::vector<long long> acc(4 * 32 * MI * NI * 4, 0);
    auto A = [&](int wp, int l, int mi, int ni, int i) -> long long& { return acc[(((wp * 32 + l) * MI + mi) * NI + ni) * 4 + i]; };
    auto compute = [&](int stg) {
      for (int wp = 0; wp < 4; ++wp) {
        int wm = warp_m(wp), wn = warp_n(wp);
        for (int ks = 0; ks < KSTEPS; ++ks) {
          uint32_t af[MI][32][4], bfr[NI][32][2];
          for (int mi = 0; mi < MI; ++mi) {
            uint32_t addr[32];
            for (int l = 0; l < 32; ++l) addr[l] = a_base + stg * A_STAGE_BYTES + swz(wm * WARP_M + mi * 16 + a_ldsm_row(l), a_ldsm_chunk(l, ks));
            for (int l = 0; l < 32; ++l) rd16(addr[l]);
            ldsm_x4(smem.data(), addr, af[mi]);
          }
          for (int np = 0; np < NI / 2; ++np) {
            uint32_t addr[32], r[32][4];
            for (int l = 0; l < 32; ++l) addr[l] = b_base + stg * B_STAGE_BYTES + swz(wn * WARP_N + np * 16 + b_ldsm_row(l), b_ldsm_chunk(l, ks));
            for (int l = 0; l < 32; ++l) rd16(addr[l]);
            ldsm_x4(smem.data(), addr, r);
            for (int l = 0; l < 32; ++l) {
              bfr[2 * np][l][0] = r[l][0]; bfr[2 * np][l][1] = r[l][1];
              bfr[2 * np + 1][l][0] = r[l][2]; bfr[2 * np + 1][l][1] = r[l][3];
            }
          }
          // mma per spec: assemble A (16 x KK), B (KK x 8) from lanes, multiply, scatter to C
          const int KK = EB == 2 ? 16 : 8;
          for (int mi = 0; mi < MI; ++mi) for (int ni = 0; ni < NI; ++ni) {
            long long Am[16][16], Bm[16][8];
            for (int l = 0; l < 32; ++l) {
              if (EB == 2) {
                for (int i = 0; i < 8; ++i) { int r, cc; specA16(l, i, r, cc); Am[r][cc] = elem_of(af[mi][l][i / 2], 2, i & 1); }
                for (int i = 0; i < 4; ++i) { int k, n; specB16(l, i, k, n); Bm[k][n] = elem_of(bfr[ni][l][i / 2], 2, i & 1); }
              } else {
                for (int i = 0; i < 4; ++i) { int r, cc; specA8(l, i, r, cc); Am[r][cc] = elem_of(af[mi][l][i], 4, 0); }
                for (int i = 0; i < 2; ++i) { int k, n; specB8(l, i, k, n); Bm[k][n] = elem_of(bfr[ni][l][i], 4, 0); }
              }
            }
            for (int l = 0; l < 32; ++l) for (int i = 0; i < 4; ++i) {
              int r, cc; specC(l, i, r, cc);
              long long s = 0;
              for (int k = 0; k < KK; ++k) s += Am[r][k] * Bm[k][cc];
              A(wp, l, mi, ni, i) += s;
            }
          }
        }
      }
    };
    // the kernel's main loop, statement for statement (csrc/conv2d.cu)
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) { load_b(s, s); if (vec_a) load_a_vec(s, s); else { gather_a(s); store_a(s); } }
      commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
      int nt = kt + STAGES - 1; bool more = nt < KT;
      if (EMU_BUG == 3 && more) { load_b(nt, nt % STAGES); if (vec_a) load_a_vec(nt, nt % STAGES); else gather_a(nt); }
      wait_group(EMU_BUG == 1 ? STAGES - 1 : STAGES - 2);
      if (EMU_BUG != 2) sync();
      if (EMU_BUG != 3 && more) { load_b(nt, nt % STAGES); if (vec_a) load_a_vec(nt, nt % STAGES); else gather_a(nt); }
      commit();
      compute(kt % STAGES);
      if (!vec_a && more) store_a(nt % STAGES);
    }
    wait_group(0);
    if (!open_group.empty()) { printf("  cp.async issued but never committed\n"); ++races; }
    // epilogue mapping (as in the kernel) + stats partials (count, mean, M2) in double
    std::vector<double> csum(BN, 0), cm2(BN, 0);
    int cnt = std::min(BM, M - m0);
    for (int wp = 0; wp < 4; ++wp) for (int l = 0; l < 32; ++l) for (int mi = 0; mi < MI; ++mi) for (int ni = 0; ni < NI; ++ni) for (int i = 0; i < 4; ++i) {
      int row = warp_m(wp) * WARP_M + mi * 16 + c_row(l, i), col = warp_n(wp) * WARP_N + ni * 8 + c_col(l, i);
      int m = m0 + row, k = n0 + col;
      if (m < M && k < c.Cout) {
        if (got[(size_t)m * c.Cout + k] != LLONG_MIN) { printf("element (%d,%d) written twice\n", m, k); ++fails; }
        got[(size_t)m * c.Cout + k] = A(wp, l, mi, ni, i);
        csum[col] += A(wp, l, mi, ni, i);
      }
    }
    for (int wp = 0; wp < 4; ++wp) for (int l = 0; l < 32; ++l) for (int mi = 0; mi < MI; ++mi) for (int ni = 0; ni < NI; ++ni) for (int i = 0; i < 4; ++i) {
      int row = warp_m(wp) * WARP_M + mi * 16 + c_row(l, i), col = warp_n(wp) * WARP_N + ni * 8 + c_col(l, i);
      if (m0 + row < M) { double d = A(wp, l, mi, ni, i) - csum[col] / cnt; cm2[col] += d * d; }
    }
    for (int col = 0; col < BN; ++col) if (n0 + col < c.Cout) {
      pmean[(size_t)bx * c.Cout + n0 + col] = csum[col] / cnt; pm2[(size_t)bx * c.Cout + n0 + col] = cm2[col];
    }
  }
  int bad = races;
  for (size_t i = 0; i < got.size(); ++i) if (got[i] != ref[i]) { if (bad < 5) printf("  mismatch at m=%zu k=%zu: got %lld ref %lld\n", i / c.Cout, i % c.Cout, got[i], ref[i]); ++bad; }
  // finalize as in conv2d_stats_finalize_kernel: 256 strided runs then a binary tree
  double worst = 0;
  for (int k = 0; k < c.Cout; ++k) {
    double n[256] = {0}, mu[256] = {0}, q[256] = {0};
    for (int t = 0; t < 256; ++t) for (int tile = t; tile < m_tiles; tile += 256)
      chan_combine(n[t], mu[t], q[t], (double)std::min(BM, M - tile * BM), pmean[(size_t)tile * c.Cout + k], pm2[(size_t)tile * c.Cout + k]);
    for (int half = 128; half > 0; half >>= 1) for (int t = 0; t < half; ++t) chan_combine(n[t], mu[t], q[t], n[t + half], mu[t + half], q[t + half]);
    double rs = 0, rq = 0;
    for (int m = 0; m < M; ++m) rs += ref[(size_t)m * c.Cout + k];
    double rmean = rs / M;
    for (int m = 0; m < M; ++m) { double d = ref[(size_t)m * c.Cout + k] - rmean; rq += d * d; }
    if (n[0] != M) { printf("  stats count %f != %d\n", n[0], M); ++bad; }
    worst = std::max(worst, std::fabs(mu[0] - rmean) + std::fabs(q[0] / n[0] - rq / M) / (1 + rq / M));
  }
  if (worst > 1e-9) { printf("  stats mismatch %g\n", worst); ++bad; }
  printf("%s EB=%d %s N=%d Cin=%d %dx%d Cout=%d k%dx%d s%d,%d p%d,%d -> M=%d K=%d KT=%d path=%s tiles=%dx%d zf=%d races=%d : %s\n",
         bad ? "FAIL" : "ok  ", EB, c.nhwc ? "NHWC" : "NCHW", c.N, c.Cin, c.H, c.W, c.Cout, c.KH, c.KW, c.sh, c.sw, c.ph, c.pw,
         M, K, KT, vec_a ? "vec" : "gather", m_tiles, n_tiles, zero_fill_copies, races, bad ? "MISMATCH" : "exact");
  fails += bad != 0;
  return bad;
}

int main() {
  // swizzle: 8 consecutive rows, same chunk -> 8 distinct 16-byte bank groups; bijective per row
  for (int r0 = 0; r0 < BM; r0 += 8) for (int ch = 0; ch < 4; ++ch) {
    int seen = 0;
    for (int r = r0; r < r0 + 8; ++r) seen |= 1 << ((swz(r, ch) >> 4) & 7);
    if (seen != 0xff) { printf("swizzle bank conflict rows %d chunk %d\n", r0, ch); ++fails; }
  }
  for (int r = 0; r < BM; ++r) { int seen = 0; for (int ch = 0; ch < 4; ++ch) { int o = swz(r, ch) - r * BK_BYTES; seen |= 1 << (o >> 4); } if (seen != 0xf) { printf("swizzle not bijective\n"); ++fails; } }
  int seed = 1;
  for (int EB : {2, 4}) for (bool nhwc : {true, false}) {
    run({EB, 1, 3, 19, 17, 64, 7, 7, 2, 2, 3, 3, nhwc}, seed++);        // stem, Cin=3
    run({EB, 2, 16, 9, 11, 70, 3, 3, 1, 1, 1, 1, nhwc}, seed++);        // 3x3 s1, partial N tile
    run({EB, 2, 8, 13, 13, 32, 3, 3, 2, 2, 1, 1, nhwc}, seed++);        // 3x3 s2, Cin=8
    run({EB, 3, 24, 7, 9, 130, 1, 1, 1, 1, 0, 0, nhwc}, seed++);        // 1x1 s1, 3 N tiles
    run({EB, 2, 40, 11, 11, 64, 1, 1, 2, 2, 0, 0, nhwc}, seed++);       // 1x1 s2
    run({EB, 1, 12, 10, 10, 8, 3, 3, 1, 1, 1, 1, nhwc}, seed++);        // Cin=12 (vec for fp32 only)
    run({EB, 1, 5, 6, 7, 3, 3, 2, 1, 2, 0, 1, nhwc}, seed++);           // odd everything, Cout=3
    run({EB, 2, 64, 8, 8, 64, 3, 3, 1, 1, 1, 1, nhwc}, seed++);         // many k tiles (KT=18/36)
  }
  printf(fails ? "FAILED (%d)\n" : "ALL OK\n", fails);
  return fails != 0;
}
