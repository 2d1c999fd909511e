// Host-only check of the convolution's shared-memory swizzles (csrc/conv2d_layout.h), no GPU
// needed: compiled by the host C++ compiler and run by tests/test_conv_swizzle.py. For every CTA
// tile configuration of csrc/conv2d.cu (TileCfg<64>, TileCfg<128> with 64-byte K tiles,
// TileCfg<128, 128, ST> with 128-byte ones) it walks the addresses the kernel computes:
// * every ldmatrix.x4 of the main loop (A: each warp, m16 tile and k-step; B: each n16 pair): an
//   8x8 matrix is one shared-memory phase (8 row addresses of 16 bytes); bank-conflict free iff
//   the 8 rows fall in 8 different 16-byte bank groups (address / 16 mod 8);
// * the 16-byte stores of the loads (cp.async / st.shared: thread tid -> rows vec_row(tid, i),
//   chunk vec_chunk(tid)): a warp's 16-byte accesses are 4 phases of 8 consecutive lanes, each
//   conflict free under the same rule;
// * the swizzle is a bijection of a stage's (row, chunk) slots;
// and, as a control that the check can fail, counts the conflicts of the unswizzled layout.
#include <cstdio>
#include <set>
#include <vector>

#include "conv2d_layout.h"

using namespace rk::conv;

static int fails = 0;
#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (!(cond)) {                                          \
      if (fails++ < 20) {                                   \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond); \
        std::printf(__VA_ARGS__);                           \
        std::printf("\n");                                  \
      }                                                     \
    }                                                       \
  } while (0)

// extra 16-byte wavefronts of one phase of 8 addresses (0: conflict free)
static int conflicts(const int (&addr)[8]) {
  int per_group[8] = {};
  for (int a : addr) ++per_group[(a / 16) % 8];
  int worst = 0;
  for (int g : per_group) worst = g > worst ? g : worst;
  return worst - 1;
}

template <typename C, bool SWIZZLED>
static int walk(const char* name) {
  auto off = [](int row, int chunk) { return SWIZZLED ? C::swizzle(row, chunk) : row * C::BK_BYTES + chunk * 16; };
  int total = 0, phases = 0;
  // ldmatrix A: warps (wm), m16 tiles, k-steps; matrices = lanes 8i..8i+7
  for (int wm = 0; wm < 2; ++wm)
    for (int mi = 0; mi < MI; ++mi)
      for (int ks = 0; ks < C::KSTEPS; ++ks)
        for (int m = 0; m < 4; ++m) {
          int a[8];
          for (int j = 0; j < 8; ++j) {
            const int lane = 8 * m + j;
            a[j] = off(wm * WARP_M + mi * 16 + a_ldsm_row(lane), a_ldsm_chunk(lane, ks));
          }
          total += conflicts(a);
          ++phases;
        }
  // ldmatrix B: warps (wn), n16 pairs, k-steps
  for (int wn = 0; wn < C::WARPS_N; ++wn)
    for (int np = 0; np < NI / 2; ++np)
      for (int ks = 0; ks < C::KSTEPS; ++ks)
        for (int m = 0; m < 4; ++m) {
          int a[8];
          for (int j = 0; j < 8; ++j) {
            const int lane = 8 * m + j;
            a[j] = off(wn * WARP_N + np * 16 + b_ldsm_row(lane), b_ldsm_chunk(lane, ks));
          }
          total += conflicts(a);
          ++phases;
        }
  // the loads' 16-byte stores: A rows (A_VEC_ROWS per thread) and B rows (B_VEC_ROWS)
  for (int rows_per_thread : {C::A_VEC_ROWS, C::B_VEC_ROWS})
    for (int i = 0; i < rows_per_thread; ++i)
      for (int t0 = 0; t0 < C::THREADS; t0 += 8) {
        int a[8];
        for (int j = 0; j < 8; ++j) a[j] = off(C::vec_row(t0 + j, i), C::vec_chunk(t0 + j));
        total += conflicts(a);
        ++phases;
      }
  // bijection: every (row, chunk) of the larger (A) stage lands on its own 16-byte slot
  if (SWIZZLED) {
    std::set<int> seen;
    for (int row = 0; row < BM; ++row)
      for (int c = 0; c < C::CHUNKS; ++c) {
        const int o = off(row, c);
        CHECK(o % 16 == 0 && o >= 0 && o < C::A_STAGE_BYTES, "%s: row %d chunk %d -> %d", name, row, c, o);
        seen.insert(o);
      }
    CHECK(static_cast<int>(seen.size()) == BM * C::CHUNKS, "%s: swizzle not a bijection", name);
    // every (row, chunk) is loaded by exactly one thread (A stage)
    std::set<int> stored;
    for (int t = 0; t < C::THREADS; ++t)
      for (int i = 0; i < C::A_VEC_ROWS; ++i) stored.insert(off(C::vec_row(t, i), C::vec_chunk(t)));
    CHECK(static_cast<int>(stored.size()) == BM * C::CHUNKS, "%s: the loads do not cover the A stage", name);
  }
  std::printf("%-28s %s: %d phases, %d extra wavefronts\n", name, SWIZZLED ? "swizzled  " : "unswizzled", phases,
              total);
  return total;
}

template <typename C>
static void check(const char* name) {
  const int swizzled = walk<C, true>(name), plain = walk<C, false>(name);
  CHECK(swizzled == 0, "%s: bank conflicts", name);
  CHECK(plain > 0, "%s: the control (no swizzle) shows no conflicts: the check cannot fail", name);
}

int main() {
  check<TileCfg<64>>("128x64, 64-byte K tiles");
  check<TileCfg<128>>("128x128, 64-byte K tiles");
  check<TileCfg<128, 128, 3>>("128x128, 128-byte K, 3 st");
  check<TileCfg<128, 128, 4>>("128x128, 128-byte K, 4 st");
  std::printf("%s (%d failures)\n", fails ? "FAILED" : "OK", fails);
  return fails ? 1 : 0;
}
