// Fused residual epilogue, forward:
//   out = act(x * scale[c] + shift[c] + identity * id_scale[c] + id_shift[c])
// (backward in bn_add_relu_backward.cu, shared helpers in bn_add_relu_impl.cuh).
//
// Memory-bound elementwise kernel. Each thread handles one VEC-element vector per iteration of
// a grid-stride loop over the flat tensor (64-bit indices). The channel of vector v is
// (v / inner_v) % Cg; it is computed once per thread (multiply-high division by invariants)
// and then advanced incrementally (no division in the loop). VEC is 16 bytes of elements, or 8
// bytes for 16-bit types when the run length or alignment only allows that. Modes:
//   * CH_IN_VEC (channels_last, C % VEC == 0): a vector holds VEC consecutive channels;
//     inner_v = 1, Cg = C / VEC;
//   * !CH_IN_VEC, VEC > 1 (NCHW, inner % VEC == 0): a vector lies in one (n, c) plane;
//     inner_v = inner / VEC, Cg = C;
//   * VEC == 1 (scalar fallback: C = 3, odd H*W, misaligned pointers): inner_v = inner, Cg = C.
// Absent operands are compile-time flags, so they cost neither loads nor arithmetic. The ReLU is
// a runtime flag, uniform over the grid (one predicated select per element, no memory traffic):
// as a template flag it doubled the instances (640 -> 320 per architecture) for nothing.
#include "bn_add_relu_impl.cuh"

#include <atomic>

namespace rk {
namespace bar {

enum FwdFlag : int { kScale = 1, kShift = 2, kId = 4, kIdScale = 8, kIdShift = 16, kRelu = 32 };
constexpr int kFwdStatic = kRelu - 1;  // the template flags; kRelu is a kernel argument
constexpr bool fwd_flags_valid(int f) { return (f & kId) || !(f & (kIdScale | kIdShift)); }

int sm_count() {
  static std::atomic<int> cache[128];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "bn_add_relu: cudaGetDevice");
  if (dev >= 0 && dev < 128) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev),
             "bn_add_relu: cudaDeviceGetAttribute(MultiProcessorCount)");
  if (n <= 0) n = 1;
  if (dev >= 0 && dev < 128) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// VEC per-channel values starting at channel c0 (16-byte aligned loads when VEC*sizeof(Acc) is a
// multiple of 16: the launcher only picks CH_IN_VEC with 16-byte aligned per-channel pointers).
template <typename Acc, int VEC>
__device__ __forceinline__ void load_channels(const Acc* __restrict__ p, int64_t c0, Acc (&dst)[VEC]) {
  if constexpr ((VEC * sizeof(Acc)) % 16 == 0) {
    constexpr int kPer = static_cast<int>(16 / sizeof(Acc));
    using V = Pack<Acc, kPer>;
#pragma unroll
    for (int j = 0; j < VEC / kPer; ++j) {
      const V v = reinterpret_cast<const V*>(p + c0)[j];
#pragma unroll
      for (int k = 0; k < kPer; ++k) dst[j * kPer + k] = v.v[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = p[c0 + k];
  }
}

template <typename T, int VEC, bool CH_IN_VEC, int F>
__global__ void __launch_bounds__(kThreads, 2)
    bn_add_relu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ identity, T* __restrict__ out,
                           const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift,
                           const acc_t<T>* __restrict__ id_scale, const acc_t<T>* __restrict__ id_shift,
                           const FwdGeom geom, const bool relu) {
  using Acc = acc_t<T>;
  constexpr bool HS = F & kScale, HB = F & kShift, HI = F & kId, HIS = F & kIdScale, HIB = F & kIdShift;
  // A vector's channels: VEC consecutive ones (CH_IN_VEC) or a single one.
  constexpr int NCH = CH_IN_VEC ? VEC : 1;

  int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= geom.nvec) return;
  int64_t q, c;  // position in the run of vectors sharing a channel group, channel group
  geom.start(v, q, c);

  for (; v < geom.nvec; v += geom.stride) {
    const int64_t c0 = c * NCH;
    Acc s[NCH], b[NCH], is[NCH], ib[NCH];
    if constexpr (HS) load_channels<Acc, NCH>(scale, c0, s);
    if constexpr (HB) load_channels<Acc, NCH>(shift, c0, b);
    if constexpr (HIS) load_channels<Acc, NCH>(id_scale, c0, is);
    if constexpr (HIB) load_channels<Acc, NCH>(id_shift, c0, ib);

    const Pack<T, VEC> xv = load_pack<T, VEC>(x, v);
    Pack<T, VEC> iv;
    if constexpr (HI) iv = load_pack<T, VEC>(identity, v);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = CH_IN_VEC ? k : 0;
      Acc y = to_acc(xv.v[k]);
      if constexpr (HS) y = mul_rn(y, s[ck]);
      if constexpr (HB) y = y + b[ck];
      if constexpr (HI) {
        Acc r = to_acc(iv.v[k]);
        if constexpr (HIS) r = mul_rn(r, is[ck]);
        if constexpr (HIB) r = r + ib[ck];
        y = y + r;
      }
      if (relu) y = y < Acc(0) ? Acc(0) : y;  // NaN propagates, like torch.relu
      ov.v[k] = from_acc<T>(y);
    }
    store_pack<T, VEC>(out, v, ov);

    geom.advance(q, c);
  }
}

// Resident blocks per SM of one instantiation (cached: all devices of a process are assumed to
// share an architecture; a wrong guess only changes the grid size, never the results).
template <typename T, int VEC, bool CH_IN_VEC, int F>
int fwd_blocks_per_sm() {
  static std::atomic<int> cached{0};
  int n = cached.load(std::memory_order_relaxed);
  if (n <= 0) {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, bn_add_relu_fwd_kernel<T, VEC, CH_IN_VEC, F>,
                                                             kThreads, 0),
               "bn_add_relu_forward: cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (n <= 0) n = 1;
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, int VEC, bool CH_IN_VEC>
void launch_fwd(const BnAddReluArgs& a, int flags) {
  using Acc = acc_t<T>;
  const int64_t nvec = a.numel / VEC;
  const int64_t inner_v = CH_IN_VEC ? 1 : a.inner / VEC;
  const int64_t Cg = CH_IN_VEC ? a.C / VEC : a.C;
  const int64_t sms = sm_count();
  cudaStream_t st = as_stream(a.stream);
  const bool relu = flags & kRelu;
  const bool ok = dispatch_int(flags & kFwdStatic, [&](auto fc) {
    constexpr int F = decltype(fc)::value;
    if constexpr (fwd_flags_valid(F)) {
      // One resident wave of grid-stride blocks (fewer when the tensor is small).
      const int64_t max_blocks = sms * fwd_blocks_per_sm<T, VEC, CH_IN_VEC, F>();
      const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kThreads), max_blocks));
      const FwdGeom geom(nvec, inner_v, Cg, blocks * kThreads);
      bn_add_relu_fwd_kernel<T, VEC, CH_IN_VEC, F><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(
          reinterpret_cast<const T*>(a.x), reinterpret_cast<const T*>(a.identity), reinterpret_cast<T*>(a.out),
          reinterpret_cast<const Acc*>(a.scale), reinterpret_cast<const Acc*>(a.shift),
          reinterpret_cast<const Acc*>(a.id_scale), reinterpret_cast<const Acc*>(a.id_shift), geom, relu);
      check_launch("bn_add_relu_fwd_kernel");
    } else {
      throw ArgError("bn_add_relu_forward: id_scale/id_shift given without identity");
    }
  }, std::make_integer_sequence<int, kFwdStatic + 1>{});
  if (!ok || (flags & ~(kFwdStatic | kRelu)) != 0)
    throw ArgError(cat("bn_add_relu_forward: internal error: bad flag set ", flags));
}

template <typename T>
void forward_typed(const BnAddReluArgs& a, int flags) {
  constexpr int VEC = vec_of<T>();
  constexpr int HALF = sizeof(T) == 2 ? VEC / 2 : 1;
  const std::uintptr_t acts[] = {a.x, a.identity, a.out};
  const int vec = pick_vec(a.dtype, a.C, a.inner, [&](int64_t bytes) {
    for (std::uintptr_t p : acts)
      if (p % static_cast<std::uintptr_t>(bytes) != 0) return false;  // absent (0) counts as aligned
    return true;
  });
  // channels_last vectors also read VEC consecutive per-channel values with 16-byte loads
  const bool params_aligned = aligned16(a.scale) && aligned16(a.shift) && aligned16(a.id_scale) &&
                              aligned16(a.id_shift);  // absent (0) counts as aligned
  const bool nhwc = a.inner == 1;
  if (vec == VEC && (!nhwc || params_aligned)) {
    if (nhwc)
      launch_fwd<T, VEC, true>(a, flags);
    else
      launch_fwd<T, VEC, false>(a, flags);
  } else if (HALF > 1 && vec == HALF && (!nhwc || params_aligned)) {
    if constexpr (HALF > 1) {
      if (nhwc)
        launch_fwd<T, HALF, true>(a, flags);
      else
        launch_fwd<T, HALF, false>(a, flags);
    }
  } else {
    launch_fwd<T, 1, false>(a, flags);
  }
}

}  // namespace bar

void bn_add_relu_forward(const BnAddReluArgs& a) {
  using namespace bar;
  const char* fn = "bn_add_relu_forward";
  if (!check_geometry(fn, a.numel, a.C, a.inner)) return;
  check_ptr(a.x, fn, "x");
  check_ptr(a.out, fn, "out");
  if (a.identity == 0 && (a.id_scale != 0 || a.id_shift != 0))
    throw ArgError(cat(fn, ": id_scale/id_shift were given without identity"));
  const int64_t es = elem_size(a.dtype), as = acc_size(a.dtype);
  if (es == 0) throw ArgError(cat(fn, ": unsupported dtype code ", static_cast<int>(a.dtype)));
  const char* ename = dtype_name(a.dtype);
  const char* aname = a.dtype == DType::F64 ? "float64" : "float32";
  check_aligned(a.x, es, fn, "x", ename);
  check_aligned(a.identity, es, fn, "identity", ename);
  check_aligned(a.out, es, fn, "out", ename);
  check_aligned(a.scale, as, fn, "scale", aname);
  check_aligned(a.shift, as, fn, "shift", aname);
  check_aligned(a.id_scale, as, fn, "id_scale", aname);
  check_aligned(a.id_shift, as, fn, "id_shift", aname);

  const int flags = (a.scale ? kScale : 0) | (a.shift ? kShift : 0) | (a.identity ? kId : 0) |
                    (a.id_scale ? kIdScale : 0) | (a.id_shift ? kIdShift : 0) | (a.relu ? kRelu : 0);
  switch (a.dtype) {
    case DType::F32: forward_typed<float>(a, flags); break;
    case DType::F16: forward_typed<__half>(a, flags); break;
    case DType::BF16: forward_typed<__nv_bfloat16>(a, flags); break;
    case DType::F64: forward_typed<double>(a, flags); break;
  }
}

}  // namespace rk
