// Fused residual epilogue, backward (forward in bn_add_relu.cu):
//   g = grad_out * (out > 0)   (relu)   or grad_out
//   grad_x = g * scale[c], grad_identity = g * id_scale[c]          (elementwise)
//   grad_shift[c] = sum g, grad_scale[c] = sum g*x, grad_id_scale[c] = sum g*identity
//
// Deterministic two-stage reduction, no atomics: the first kernel writes one partial sum per
// (block slab, channel) into the workspace (Acc[3][P][C]) in a fixed order; the second kernel
// reduces the P partials of each channel in a fixed order. The tiling (hence the summation
// order) depends only on the shape and dtype, never on the device.
//
// Two tilings of the first pass:
//   * channels_last (inner == 1): rows of C channels. A block is bx vector columns (VEC
//     channels each) x by rows; it walks a grid-strided set of rows, each thread keeping its
//     channels' sums in registers, then the block reduces over its rows through shared memory.
//     Grid = (P row slabs, column tiles).
//   * NCHW (inner > 1): grid = C * P blocks; block (c, p) walks its contiguous share of the
//     N * inner / VEC vectors of channel c (crossing (n, c) planes without divisions), then a
//     warp-shuffle + shared-memory block reduction.
//
// Every optional input and output is a template flag (no loads, stores or registers when absent),
// except the ReLU: a runtime flag, uniform over the grid, guarding the load of the saved output
// and the mask select. As a template flag it doubled the instances (800 -> 400 per architecture)
// while the ReLU-off variants used no fewer registers than their ReLU-on twins need anyway.
#include "bn_add_relu_impl.cuh"

namespace rk {
namespace bar {

enum BwdFlag : int { kBRelu = 1, kGX = 2, kGI = 4, kS0 = 8, kSX = 16, kSI = 32 };  // kBRelu: runtime
// sum g*x / sum g*identity need the g partial slot too (kS0 = "any reduction")
constexpr bool bwd_flags_valid(int f) { return (f & kS0) || !(f & (kSX | kSI)); }

// One VEC-element vector: elementwise gradients and the running per-channel sums.
// NCH = VEC (channels_last: a vector holds VEC channels) or 1 (NCHW: one channel).
template <typename T, int VEC, int F, int NCH>
__device__ __forceinline__ void bwd_vector(int64_t vi, const bool relu, const T* __restrict__ grad_out,
                                           const T* __restrict__ out,
                                           const T* __restrict__ x, const T* __restrict__ identity,
                                           T* __restrict__ grad_x, T* __restrict__ grad_identity,
                                           const acc_t<T> (&sc)[NCH], const acc_t<T> (&isc)[NCH], acc_t<T> (&a0)[NCH],
                                           acc_t<T> (&a1)[NCH], acc_t<T> (&a2)[NCH]) {
  using Acc = acc_t<T>;
  constexpr bool GX = F & kGX, GI = F & kGI, S0 = F & kS0, SX = F & kSX, SI = F & kSI;
  const Pack<T, VEC> gv = load_pack<T, VEC>(grad_out, vi);
  Pack<T, VEC> ov, xv, iv, gxv, giv;
  if (relu) ov = load_pack<T, VEC>(out, vi);
  if constexpr (SX) xv = load_pack<T, VEC>(x, vi);
  if constexpr (SI) iv = load_pack<T, VEC>(identity, vi);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int ck = NCH == 1 ? 0 : k;
    Acc g = to_acc(gv.v[k]);
    if (relu) g = to_acc(ov.v[k]) > Acc(0) ? g : Acc(0);
    if constexpr (GX) gxv.v[k] = from_acc<T>(mul_rn(g, sc[ck]));
    if constexpr (GI) giv.v[k] = from_acc<T>(mul_rn(g, isc[ck]));
    if constexpr (S0) a0[ck] += g;
    if constexpr (SX) a1[ck] += g * to_acc(xv.v[k]);
    if constexpr (SI) a2[ck] += g * to_acc(iv.v[k]);
  }
  if constexpr (GX) store_pack<T, VEC>(grad_x, vi, gxv);
  if constexpr (GI) store_pack<T, VEC>(grad_identity, vi, giv);
}

// ---------------------------------------------------------------------------------------------
// channels_last first pass (nhwc_block_partial: bn_add_relu_impl.cuh)
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, int F>
__global__ void __launch_bounds__(kThreads, 2)
    bn_add_relu_bwd_nhwc_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ identity, const acc_t<T>* __restrict__ scale,
                                const acc_t<T>* __restrict__ id_scale, T* __restrict__ grad_x,
                                T* __restrict__ grad_identity, acc_t<T>* __restrict__ ws, int64_t rows, int64_t C,
                                int bx, int by, const bool relu) {
  using Acc = acc_t<T>;
  constexpr bool GX = F & kGX, GI = F & kGI, S0 = F & kS0, SX = F & kSX, SI = F & kSI;
  __shared__ Acc red[S0 ? kThreads * VEC : 1];

  const int tx = static_cast<int>(threadIdx.x) % bx;
  const int ty = static_cast<int>(threadIdx.x) / bx;
  const int64_t Cv = C / VEC;
  const int64_t cv = static_cast<int64_t>(blockIdx.y) * bx + tx;  // this thread's vector column
  Acc a0[VEC], a1[VEC], a2[VEC], sc[VEC], isc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    a0[k] = a1[k] = a2[k] = Acc(0);
    sc[k] = isc[k] = Acc(1);
  }
  if (cv < Cv && ty < by) {
    if constexpr (GX) {
      if (scale != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sc[k] = scale[cv * VEC + k];
      }
    }
    if constexpr (GI) {
      if (id_scale != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) isc[k] = id_scale[cv * VEC + k];
      }
    }
    const int64_t rstep = static_cast<int64_t>(gridDim.x) * by;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * by + ty; r < rows; r += rstep)
      bwd_vector<T, VEC, F, VEC>(r * Cv + cv, relu, grad_out, out, x, identity, grad_x, grad_identity, sc, isc, a0,
                                 a1, a2);
  }
  if constexpr (S0) {
    const int64_t PC = static_cast<int64_t>(gridDim.x) * C;  // one sum's [P][C] block
    nhwc_block_partial<Acc, VEC>(a0, red, bx, by, C, ws);
    if constexpr (SX) nhwc_block_partial<Acc, VEC>(a1, red, bx, by, C, ws + PC);
    if constexpr (SI) nhwc_block_partial<Acc, VEC>(a2, red, bx, by, C, ws + 2 * PC);
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW first pass (block_sum: bn_add_relu_impl.cuh)
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, int F>
__global__ void __launch_bounds__(kThreads, 2)
    bn_add_relu_bwd_nchw_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ identity, const acc_t<T>* __restrict__ scale,
                                const acc_t<T>* __restrict__ id_scale, T* __restrict__ grad_x,
                                T* __restrict__ grad_identity, acc_t<T>* __restrict__ ws, const NchwGeom geom,
                                const bool relu) {
  using Acc = acc_t<T>;
  constexpr bool GX = F & kGX, GI = F & kGI, S0 = F & kS0, SX = F & kSX, SI = F & kSI;
  __shared__ Acc sm[kThreads / 32];

  int64_t c, p, j0, j1;
  geom.block_range(blockIdx.x, c, p, j0, j1);
  Acc sc[1] = {Acc(1)}, isc[1] = {Acc(1)}, a0[1] = {Acc(0)}, a1[1] = {Acc(0)}, a2[1] = {Acc(0)};
  if constexpr (GX) {
    if (scale != nullptr) sc[0] = scale[c];
  }
  if constexpr (GI) {
    if (id_scale != nullptr) isc[0] = id_scale[c];
  }
  int64_t j = j0 + threadIdx.x;  // vector index within channel c: j = n * inner_v + q
  if (j < j1) {
    int64_t n, q;
    geom.start(j, n, q);
    for (; j < j1; j += kThreads) {
      bwd_vector<T, VEC, F, 1>(geom.vector_index(n, c, q), relu, grad_out, out, x, identity, grad_x, grad_identity,
                               sc, isc, a0, a1, a2);
      geom.advance(n, q);
    }
  }
  if constexpr (S0) {
    const int64_t PC = geom.P * geom.C;
    const int64_t slot = p * geom.C + c;
    Acc t = block_sum<Acc>(a0[0], sm);
    if (threadIdx.x == 0) ws[slot] = t;
    if constexpr (SX) {
      t = block_sum<Acc>(a1[0], sm);
      if (threadIdx.x == 0) ws[PC + slot] = t;
    }
    if constexpr (SI) {
      t = block_sum<Acc>(a2[0], sm);
      if (threadIdx.x == 0) ws[2 * PC + slot] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// second pass: out_s[c] = sum_p ws[s][p][c], fixed order. Block = 32 channels x 8 partial lanes.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
__global__ void __launch_bounds__(kThreads, 2)
    bn_add_relu_bwd_reduce_kernel(const Acc* __restrict__ ws, Acc* __restrict__ sum_g, Acc* __restrict__ sum_gx,
                                  Acc* __restrict__ sum_gi, int64_t C, int64_t P) {
  constexpr int kLanes = kThreads / 32;
  __shared__ Acc sm[kLanes][32];
  const int s = blockIdx.y;
  Acc* dst = s == 0 ? sum_g : (s == 1 ? sum_gx : sum_gi);
  if (dst == nullptr) return;  // uniform over the block
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const Acc* src = ws + static_cast<int64_t>(s) * P * C;
  Acc t = Acc(0);
  if (c < C) {
    for (int64_t p = ty; p < P; p += kLanes) t += src[p * C + c];
  }
  sm[ty][tx] = t;
  __syncthreads();
  if (ty == 0 && c < C) {
    Acc r = sm[0][tx];
#pragma unroll
    for (int y = 1; y < kLanes; ++y) r += sm[y][tx];
    dst[c] = r;
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
void launch_bwd(const BnAddReluBackwardArgs& a, const BwdPlan& plan, int flags) {
  using Acc = acc_t<T>;
  cudaStream_t st = as_stream(a.stream);
  const T* go = reinterpret_cast<const T*>(a.grad_out);
  const T* o = reinterpret_cast<const T*>(a.out);
  const T* xx = reinterpret_cast<const T*>(a.x);
  const T* id = reinterpret_cast<const T*>(a.identity);
  const Acc* sc = reinterpret_cast<const Acc*>(a.scale);
  const Acc* isc = reinterpret_cast<const Acc*>(a.id_scale);
  T* gx = reinterpret_cast<T*>(a.grad_x);
  T* gi = reinterpret_cast<T*>(a.grad_identity);
  Acc* ws = reinterpret_cast<Acc*>(a.workspace);
  const bool relu = flags & kBRelu;
  // dispatch on the template flags only (even values: kBRelu is bit 0)
  const bool ok = dispatch_int(flags & ~kBRelu, [&](auto fc) {
    constexpr int F = decltype(fc)::value;
    if constexpr ((F & kBRelu) == 0 && bwd_flags_valid(F)) {
      if (plan.nhwc) {
        const dim3 grid(static_cast<unsigned>(plan.P), static_cast<unsigned>(plan.col_tiles));
        bn_add_relu_bwd_nhwc_kernel<T, VEC, F><<<grid, plan.bx * plan.by, 0, st>>>(
            go, o, xx, id, sc, isc, gx, gi, ws, plan.rows, a.C, plan.bx, plan.by, relu);
        check_launch("bn_add_relu_bwd_nhwc_kernel");
      } else {
        bn_add_relu_bwd_nchw_kernel<T, VEC, F><<<static_cast<unsigned>(a.C * plan.P), kThreads, 0, st>>>(
            go, o, xx, id, sc, isc, gx, gi, ws, nchw_geom(plan, a.C), relu);
        check_launch("bn_add_relu_bwd_nchw_kernel");
      }
    } else {
      throw ArgError("bn_add_relu_backward: internal error: inconsistent reduction flags");
    }
  }, std::make_integer_sequence<int, 64>{});
  if (!ok) throw ArgError(cat("bn_add_relu_backward: internal error: bad flag set ", flags));

  if (flags & kS0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(a.C, 32)), 3);
    bn_add_relu_bwd_reduce_kernel<Acc><<<grid, kThreads, 0, st>>>(
        ws, reinterpret_cast<Acc*>(a.grad_shift), reinterpret_cast<Acc*>(a.grad_scale),
        reinterpret_cast<Acc*>(a.grad_id_scale), a.C, plan.P);
    check_launch("bn_add_relu_bwd_reduce_kernel");
  }
}

template <typename T>
void backward_typed(const BnAddReluBackwardArgs& a, int flags) {
  constexpr int VEC = vec_of<T>();
  constexpr int HALF = sizeof(T) == 2 ? VEC / 2 : 1;
  const char* fn = "bn_add_relu_backward";
  const std::uintptr_t acts[] = {a.grad_out, a.out, a.x, a.identity, a.grad_x, a.grad_identity};
  const int vec = pick_vec(a.dtype, a.C, a.inner, [&](int64_t bytes) {
    for (std::uintptr_t p : acts)
      if (p % static_cast<std::uintptr_t>(bytes) != 0) return false;  // absent (0) counts as aligned
    return true;
  });
  const BwdPlan plan = make_bwd_plan(a.numel, a.C, a.inner, vec, fn);
  if (flags & kS0) {
    const int64_t need = plan.workspace_bytes(a.C, sizeof(acc_t<T>));
    check_ptr(a.workspace, fn, "workspace");
    if (a.workspace_bytes < need)
      throw ArgError(cat(fn, ": workspace is too small: ", a.workspace_bytes, " bytes given, ", need,
                         " needed (use bn_add_relu_backward_workspace_bytes)"));
  }
  if (vec == VEC) {
    launch_bwd<T, VEC>(a, plan, flags);
  } else if (HALF > 1 && vec == HALF) {
    if constexpr (HALF > 1) launch_bwd<T, HALF>(a, plan, flags);
  } else {
    launch_bwd<T, 1>(a, plan, flags);
  }
}

}  // namespace bar

int64_t bn_add_relu_backward_workspace_bytes(DType dtype, int64_t numel, int64_t C, int64_t inner) {
  using namespace bar;
  const char* fn = "bn_add_relu_backward_workspace_bytes";
  if (elem_size(dtype) == 0) throw ArgError(cat(fn, ": unsupported dtype code ", static_cast<int>(dtype)));
  if (!check_geometry(fn, numel, C, inner)) return 0;
  // The launch picks the vector width from the pointers' alignment too: cover every candidate.
  int64_t bytes = 0;
  for (int64_t v : {int64_t(1), static_cast<int64_t>(half_vec_width(dtype)), vec_width(dtype)})
    if (v >= 1 && run_allows(C, inner, v))
      bytes = std::max(bytes, make_bwd_plan(numel, C, inner, static_cast<int>(v), fn).workspace_bytes(C, acc_size(dtype)));
  return bytes;
}

void bn_add_relu_backward(const BnAddReluBackwardArgs& a) {
  using namespace bar;
  const char* fn = "bn_add_relu_backward";
  const int64_t es = elem_size(a.dtype), as = acc_size(a.dtype);
  if (es == 0) throw ArgError(cat(fn, ": unsupported dtype code ", static_cast<int>(a.dtype)));
  const bool any_sum = a.grad_scale || a.grad_shift || a.grad_id_scale;

  check_nonneg(a.numel, fn, "numel");
  if (a.numel == 0) {
    // A sum over an empty batch is 0: zero the requested per-channel gradients (C of them).
    check_nonneg(a.C, fn, "C");
    if (any_sum && a.C > 0) {
      cudaStream_t st = as_stream(a.stream);
      const std::uintptr_t dsts[3] = {a.grad_scale, a.grad_shift, a.grad_id_scale};
      for (std::uintptr_t d : dsts)
        if (d)
          check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(d), 0, static_cast<size_t>(a.C * as), st),
                     "bn_add_relu_backward: cudaMemsetAsync (zero per-channel gradients of an empty batch)");
    }
    return;
  }
  check_geometry(fn, a.numel, a.C, a.inner);
  check_ptr(a.grad_out, fn, "grad_out");
  if (a.relu && a.out == 0)
    throw ArgError(cat(fn, ": out (the saved forward output, the ReLU mask) is required when relu=true"));
  if (!a.relu && a.out != 0)
    throw ArgError(cat(fn, ": out was given but relu=false (out is only read as the ReLU mask)"));
  if (a.grad_scale && a.x == 0) throw ArgError(cat(fn, ": x is required to compute grad_scale"));
  if (!a.grad_scale && a.x != 0) throw ArgError(cat(fn, ": x was given but grad_scale was not requested"));
  if (a.grad_id_scale && a.identity == 0)
    throw ArgError(cat(fn, ": identity is required to compute grad_id_scale"));
  if (!a.grad_id_scale && a.identity != 0)
    throw ArgError(cat(fn, ": identity was given but grad_id_scale was not requested"));
  const char* ename = dtype_name(a.dtype);
  const char* aname = a.dtype == DType::F64 ? "float64" : "float32";
  check_aligned(a.grad_out, es, fn, "grad_out", ename);
  check_aligned(a.out, es, fn, "out", ename);
  check_aligned(a.x, es, fn, "x", ename);
  check_aligned(a.identity, es, fn, "identity", ename);
  check_aligned(a.grad_x, es, fn, "grad_x", ename);
  check_aligned(a.grad_identity, es, fn, "grad_identity", ename);
  check_aligned(a.scale, as, fn, "scale", aname);
  check_aligned(a.id_scale, as, fn, "id_scale", aname);
  check_aligned(a.grad_scale, as, fn, "grad_scale", aname);
  check_aligned(a.grad_shift, as, fn, "grad_shift", aname);
  check_aligned(a.grad_id_scale, as, fn, "grad_id_scale", aname);
  check_aligned(a.workspace, as, fn, "workspace", aname);

  const int flags = (a.relu ? kBRelu : 0) | (a.grad_x ? kGX : 0) | (a.grad_identity ? kGI : 0) |
                    (any_sum ? kS0 : 0) | (a.grad_scale ? kSX : 0) | (a.grad_id_scale ? kSI : 0);
  if ((flags & (kGX | kGI | kS0)) == 0) return;  // nothing requested
  switch (a.dtype) {
    case DType::F32: backward_typed<float>(a, flags); break;
    case DType::F16: backward_typed<__half>(a, flags); break;
    case DType::BF16: backward_typed<__nv_bfloat16>(a, flags); break;
    case DType::F64: backward_typed<double>(a, flags); break;
  }
}

}  // namespace rk
