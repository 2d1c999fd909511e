// Host-only check of the index math of the bn_add_relu CUDA kernels (no GPU needed): compiled by
// nvcc as host code and run by tests/test_bn_add_relu_index.py. Uses the very helpers the kernels
// use (FastDivU64, FwdGeom, make_bwd_plan, NchwGeom, pick_vec from csrc/bn_add_relu_impl.cuh) and
// walks every thread of every block of the launch grids the launchers would use, checking that
// every vector is visited exactly once with the right channel and every partial-sum slot of the
// workspace is written exactly once. The channels_last backward loop is trivial and restated here.
#include <cstdio>
#include <random>
#include <vector>

#include "bn_add_relu_impl.cuh"

using namespace rk;
using namespace rk::bar;

static int fails = 0;
#define CHECK(cond, ...)                                                \
  do {                                                                  \
    if (!(cond)) {                                                      \
      if (fails++ < 20) {                                               \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond);             \
        std::printf(__VA_ARGS__);                                       \
        std::printf("\n");                                              \
      }                                                                 \
    }                                                                   \
  } while (0)
using ll = long long;

static void test_fastdiv() {
  std::mt19937_64 rng(1);
  std::vector<uint64_t> ds = {1, 2, 3, 5, 7, 8, 49, 64, 196, 392, 3136, 12544, 65535, 65536, 1000003,
                              (1ull << 31) - 1, (1ull << 32) + 1, (1ull << 63) + 5, ~0ull};
  for (int i = 0; i < 300; ++i) ds.push_back(rng() >> (rng() % 64));
  for (uint64_t d : ds) {
    if (d == 0) continue;
    const FastDivU64 f(d);
    for (int i = 0; i < 3000; ++i) {
      uint64_t n = rng() >> (rng() % 64);
      if (i < 4) n = i;
      if (i == 4) n = ~0ull;
      if (i == 5) n = d * 7 - 1;
      if (i == 6) n = d * 7;
      CHECK(f.div(n) == n / d, "%llu / %llu", (unsigned long long)n, (unsigned long long)d);
    }
  }
}

// forward: grid of `blocks` x kThreads threads, grid-stride loop
static void test_fwd(int64_t numel, int64_t C, int64_t inner, int vec, int64_t blocks) {
  const bool chv = inner == 1;  // channels_last: a vector holds vec channels
  const int64_t nvec = numel / vec, inner_v = chv ? 1 : inner / vec, Cg = chv ? C / vec : C;
  blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kThreads), blocks));
  const FwdGeom g(nvec, inner_v, Cg, blocks * kThreads);
  std::vector<int> seen(nvec, 0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t) {
      int64_t v = b * kThreads + t;
      if (v >= g.nvec) continue;
      int64_t q, c;
      g.start(v, q, c);
      for (; v < g.nvec; v += g.stride) {
        seen[v]++;
        for (int k = 0; k < vec; ++k) {
          const int64_t e = v * vec + k, want = (e / inner) % C, got = chv ? c * vec + k : c;
          CHECK(want == got, "fwd numel=%lld C=%lld inner=%lld vec=%d element %lld: channel %lld, got %lld",
                (ll)numel, (ll)C, (ll)inner, vec, (ll)e, (ll)want, (ll)got);
        }
        g.advance(q, c);
      }
    }
  for (int64_t v = 0; v < nvec; ++v)
    CHECK(seen[v] == 1, "fwd numel=%lld C=%lld inner=%lld vec=%d: vector %lld visited %d times", (ll)numel, (ll)C,
          (ll)inner, vec, (ll)v, seen[v]);
}

static void test_bwd(int64_t numel, int64_t C, int64_t inner, int vec) {
  const BwdPlan p = make_bwd_plan(numel, C, inner, vec, "check");
  const int64_t nvec = numel / vec;
  std::vector<int> seen(nvec, 0), slot(p.P * C, 0);
  CHECK(p.P >= 1 && p.P <= kBwdMaxPartials, "P=%lld", (ll)p.P);
  if (p.nhwc) {
    const int64_t Cv = C / vec;
    const int bx = p.bx, by = p.by;
    CHECK(bx >= 1 && by >= 1 && bx * by <= kThreads, "block %d x %d", bx, by);
    for (int64_t gy = 0; gy < p.col_tiles; ++gy)
      for (int64_t gx = 0; gx < p.P; ++gx) {
        for (int t = 0; t < bx * by; ++t) {  // loop of bn_add_relu_bwd_nhwc_kernel
          const int tx = t % bx, ty = t / bx;
          const int64_t cv = gy * bx + tx;
          if (cv >= Cv || ty >= by) continue;
          for (int64_t r = gx * by + ty; r < p.rows; r += p.P * by) {
            const int64_t vi = r * Cv + cv;
            seen[vi]++;
            for (int k = 0; k < vec; ++k)
              CHECK(((vi * vec + k) / inner) % C == cv * vec + k, "nhwc channel of vector %lld", (ll)vi);
          }
        }
        for (int col = 0; col < bx * vec; ++col) {  // nhwc_block_partial
          const int64_t ch = gy * bx * vec + col;
          if (ch < C) slot[gx * C + ch]++;
        }
      }
  } else {
    const NchwGeom g = nchw_geom(p, C);
    for (int64_t b = 0; b < C * p.P; ++b) {
      int64_t c, pp, j0, j1;
      g.block_range(static_cast<uint32_t>(b), c, pp, j0, j1);
      for (int t = 0; t < kThreads; ++t) {
        int64_t j = j0 + t;
        if (j >= j1) continue;
        int64_t n, q;
        g.start(j, n, q);
        for (; j < j1; j += kThreads) {
          const int64_t vi = g.vector_index(n, c, q);
          CHECK(vi >= 0 && vi < nvec, "nchw vector %lld out of range", (ll)vi);
          if (vi < 0 || vi >= nvec) break;
          seen[vi]++;
          for (int k = 0; k < vec; ++k)
            CHECK(((vi * vec + k) / inner) % C == c, "nchw channel of vector %lld", (ll)vi);
          g.advance(n, q);
        }
      }
      slot[pp * C + c]++;
    }
  }
  for (int64_t v = 0; v < nvec; ++v)
    CHECK(seen[v] == 1, "bwd numel=%lld C=%lld inner=%lld vec=%d: vector %lld visited %d times", (ll)numel, (ll)C,
          (ll)inner, vec, (ll)v, seen[v]);
  for (int64_t s = 0; s < p.P * C; ++s) CHECK(slot[s] == 1, "partial slot %lld written %d times", (ll)s, slot[s]);
}

static void test_pick_vec() {
  auto all = [](int64_t) { return true; };
  auto only8 = [](int64_t b) { return b <= 8; };
  CHECK(pick_vec(DType::F16, 64, 1, all) == 8, "fp16 C=64");
  CHECK(pick_vec(DType::F16, 12, 1, all) == 4, "fp16 C=12");
  CHECK(pick_vec(DType::F16, 3, 1, all) == 1, "fp16 C=3");
  CHECK(pick_vec(DType::F16, 64, 196, all) == 4, "fp16 14x14");
  CHECK(pick_vec(DType::F16, 64, 49, all) == 1, "fp16 7x7");
  CHECK(pick_vec(DType::F16, 64, 3136, only8) == 4, "fp16 8-byte aligned");
  CHECK(pick_vec(DType::F32, 64, 196, all) == 4, "fp32 14x14");
  CHECK(pick_vec(DType::F32, 64, 3136, only8) == 1, "fp32 8-byte aligned");
  CHECK(pick_vec(DType::F64, 6, 1, all) == 2, "fp64 C=6");
  CHECK(pick_vec(DType::BF16, 8, 1, all) == 8, "bf16 C=8");
}

int main() {
  test_fastdiv();
  test_pick_vec();
  struct S {
    int64_t N, C, H, W;
  };
  const std::vector<S> shapes = {{1, 3, 7, 7},   {2, 3, 5, 5},  {1, 64, 56, 56}, {2, 64, 56, 56}, {3, 5, 3, 3},
                                 {1, 1, 1, 1},   {4, 8, 1, 1},  {2, 16, 2, 2},   {5, 24, 7, 7},   {1, 2048, 1, 1},
                                 {3, 80, 4, 4},  {2, 513, 3, 3}, {32, 512, 7, 7}, {8, 72, 9, 9},  {64, 3, 2, 2},
                                 {2, 12, 14, 14}, {300, 4, 1, 1}, {3, 8, 29, 29}, {7, 16, 33, 35}};
  for (const S& s : shapes) {
    const int64_t numel = s.N * s.C * s.H * s.W, hw = s.H * s.W;
    for (int vec : {1, 2, 4, 8}) {
      for (int64_t blocks : {1, 3, 7, 1056}) {
        if (s.C % vec == 0) test_fwd(numel, s.C, 1, vec, blocks);
        if (hw > 1 && hw % vec == 0) test_fwd(numel, s.C, hw, vec, blocks);
      }
      if (s.C % vec == 0) test_bwd(numel, s.C, 1, vec);
      if (hw > 1 && hw % vec == 0) test_bwd(numel, s.C, hw, vec);
    }
  }
  std::printf("%s (%d failures)\n", fails ? "FAILED" : "OK", fails);
  return fails != 0;
}
