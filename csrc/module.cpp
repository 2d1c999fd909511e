// pybind11 module resnet_kernels._C. No torch headers: arguments are integers (device pointers
// from tensor.data_ptr(), sizes, dtype codes, the raw cudaStream_t of torch's current stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include "batch_norm.h"
#include "bn_add_relu.h"
#include "common.h"
#include "conv2d.h"
#include "conv2d_dgrad.h"
#include "conv2d_wgrad.h"
#include "maxpool.h"
#include "nhwc_stats.h"
#if RK_WITH_SM90
#include "sm90/conv2d_sm90.h"
#include "sm90/conv2d_sm90_bwd.h"
#endif

namespace py = pybind11;
using rk::DType;

#ifndef RK_SM90_NOTE
#define RK_SM90_NOTE "not configured"
#endif
#ifndef RK_CUDA_ARCHS
#define RK_CUDA_ARCHS ""
#endif

namespace {

py::dict runtime_info() {
  py::dict d;
  int rt = 0;
  d["runtime_version"] = cudaRuntimeGetVersion(&rt) == cudaSuccess ? rt : -1;
  int drv = 0;
  d["driver_version"] = cudaDriverGetVersion(&drv) == cudaSuccess ? drv : 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  d["device_count"] = err == cudaSuccess ? n : 0;
  d["device_error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
  cudaGetLastError();
  return d;
}

// One def_readwrite per field, each field named once: RK_FIELD(cls, x) binds S::x of the struct S of
// py::class_<S> cls as attribute "x" and records the name in the class's `fields` tuple.
#define RK_FIELD(cls, f) bind_field(cls, #f, &std::decay_t<decltype(cls)>::type::f)

// The names bound so far, kept on the class as `fields` (a tuple) by finish().
template <typename C>
py::list& field_names(C&) {
  static py::list* names = new py::list();  // one per struct type; leaked on purpose (module lifetime)
  return *names;
}

template <typename C>
void finish(C& cls) {
  cls.attr("fields") = py::tuple(field_names(cls));
  cls.def("__repr__", [](py::object self) {
    std::string s = py::str(py::type::handle_of(self).attr("__name__"));
    s += "(";
    bool first = true;
    for (auto name : self.attr("fields")) {
      if (!first) s += ", ";
      first = false;
      s += std::string(py::str(name)) + "=" + std::string(py::repr(self.attr(name)));
    }
    return s + ")";
  });
}

// dtype as the integer code shared with Python (cuda_common.DTYPE_CODES), checked on assignment.
template <typename C>
void def_dtype(C& cls, const char* what) {
  using S = typename C::type;
  cls.def_property(
      "dtype", [](const S& a) { return static_cast<int>(a.dtype); },
      [what](S& a, int code) { a.dtype = rk::check_dtype(code, what, "dtype"); });
  field_names(cls).append("dtype");
}

// The bound struct's Python name ("Conv2dDgradArgs"): its fields' errors name it.
template <typename C>
std::string struct_name(C& cls) {
  return std::string(py::str(cls.attr("__name__")));
}

// Any other DType member as its integer code, checked on assignment (batch_norm.h's per-tensor codes).
template <auto Member, typename C>
void def_dtype_field(C& cls, const char* name) {
  using S = typename C::type;
  cls.def_property(
      name, [](const S& a) { return static_cast<int>(a.*Member); },
      [sname = struct_name(cls), name](S& a, int code) { a.*Member = rk::check_dtype(code, sname.c_str(), name); });
  field_names(cls).append(name);
}

template <typename C, typename M>
void bind_field(C& cls, const char* name, M member) {
  cls.def_readwrite(name, member);
  field_names(cls).append(name);
}

// int64_t[4] element strides as a list of 4 ints.
template <auto Member, typename C>
void def_strides(C& cls, const char* name) {
  using S = typename C::type;
  cls.def_property(
      name, [](const S& a) { return std::vector<int64_t>(std::begin(a.*Member), std::end(a.*Member)); },
      [what = struct_name(cls) + "." + name](S& a, const std::vector<int64_t>& v) {
        if (v.size() != 4) throw rk::ArgError(rk::cat(what, " must have 4 entries, got ", v.size()));
        for (int i = 0; i < 4; ++i) (a.*Member)[i] = v[i];
      });
  field_names(cls).append(name);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "resnet_kernels CUDA kernels (torch-free API: device pointers, sizes, streams)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rk::ArgError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const rk::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.attr("built_archs") = std::string(RK_CUDA_ARCHS);
  m.attr("cuda_version_built") = CUDART_VERSION;
  m.def("runtime_info", &runtime_info,
        "CUDA runtime/driver versions and visible device count (initialises the CUDA runtime: "
        "never called at import time)");

  // ---- argument structs: bound once, field by field (def_readwrite). Python fills one and calls
  // the entry point with it (resnet_kernels/backends/cuda_common.py fill_args checks that every
  // field is set). Assigning an unknown attribute raises AttributeError; a wrong type TypeError.
  // module_local: the test-only host runner (tests/host_runner.py) binds the same structs.
  py::class_<rk::BnAddReluArgs> fwd(m, "BnAddReluArgs", py::module_local(),
                                    "arguments of bn_add_relu_forward (csrc/bn_add_relu.h); pointer 0 = absent");
  fwd.def(py::init<>());
  def_dtype(fwd, "BnAddReluArgs.dtype");
  RK_FIELD(fwd, x); RK_FIELD(fwd, scale); RK_FIELD(fwd, shift); RK_FIELD(fwd, identity); RK_FIELD(fwd, id_scale);
  RK_FIELD(fwd, id_shift); RK_FIELD(fwd, out); RK_FIELD(fwd, numel); RK_FIELD(fwd, C); RK_FIELD(fwd, inner);
  RK_FIELD(fwd, relu); RK_FIELD(fwd, stream);
  finish(fwd);

  py::class_<rk::BnAddReluBackwardArgs> bwd(m, "BnAddReluBackwardArgs", py::module_local(),
                                            "arguments of bn_add_relu_backward (csrc/bn_add_relu.h); "
                                            "pointer 0 = absent");
  bwd.def(py::init<>());
  def_dtype(bwd, "BnAddReluBackwardArgs.dtype");
  RK_FIELD(bwd, grad_out); RK_FIELD(bwd, out); RK_FIELD(bwd, x); RK_FIELD(bwd, scale); RK_FIELD(bwd, identity);
  RK_FIELD(bwd, id_scale); RK_FIELD(bwd, grad_x); RK_FIELD(bwd, grad_identity); RK_FIELD(bwd, grad_scale);
  RK_FIELD(bwd, grad_shift); RK_FIELD(bwd, grad_id_scale); RK_FIELD(bwd, workspace); RK_FIELD(bwd, workspace_bytes);
  RK_FIELD(bwd, numel); RK_FIELD(bwd, C); RK_FIELD(bwd, inner); RK_FIELD(bwd, relu); RK_FIELD(bwd, stream);
  finish(bwd);

  py::class_<rk::Conv2dArgs> conv(m, "Conv2dArgs", py::module_local(),
                                  "arguments of conv2d_forward (csrc/conv2d.h); pointer 0 = absent");
  conv.def(py::init<>());
  def_dtype(conv, "Conv2dArgs.dtype");
  RK_FIELD(conv, x); RK_FIELD(conv, w); RK_FIELD(conv, scale); RK_FIELD(conv, bias); RK_FIELD(conv, residual);
  RK_FIELD(conv, out); RK_FIELD(conv, mean); RK_FIELD(conv, var); RK_FIELD(conv, workspace);
  RK_FIELD(conv, workspace_bytes); RK_FIELD(conv, counters); RK_FIELD(conv, counters_count);
  RK_FIELD(conv, N); RK_FIELD(conv, Cin); RK_FIELD(conv, H); RK_FIELD(conv, W);
  RK_FIELD(conv, Cout); RK_FIELD(conv, KH); RK_FIELD(conv, KW); RK_FIELD(conv, stride_h); RK_FIELD(conv, stride_w);
  RK_FIELD(conv, pad_h); RK_FIELD(conv, pad_w); RK_FIELD(conv, OH); RK_FIELD(conv, OW); RK_FIELD(conv, ldw);
  RK_FIELD(conv, relu); RK_FIELD(conv, allow_tf32); RK_FIELD(conv, stream);
  RK_FIELD(conv, bn_mean); RK_FIELD(conv, bn_var); RK_FIELD(conv, bn_weight); RK_FIELD(conv, bn_bias);
  def_dtype_field<&rk::Conv2dArgs::bn_weight_dtype>(conv, "bn_weight_dtype");
  def_dtype_field<&rk::Conv2dArgs::bn_bias_dtype>(conv, "bn_bias_dtype");
  RK_FIELD(conv, bn_eps);
  def_strides<&rk::Conv2dArgs::x_stride>(conv, "x_stride");
  def_strides<&rk::Conv2dArgs::out_stride>(conv, "out_stride");
  def_strides<&rk::Conv2dArgs::res_stride>(conv, "res_stride");
  finish(conv);

  py::class_<rk::Conv2dDgradArgs> dg(m, "Conv2dDgradArgs", py::module_local(),
                                     "arguments of conv2d_dgrad (csrc/conv2d_dgrad.h); pointer 0 = absent");
  dg.def(py::init<>());
  def_dtype(dg, "Conv2dDgradArgs.dtype");
  RK_FIELD(dg, g); RK_FIELD(dg, mask); RK_FIELD(dg, mask_bits); RK_FIELD(dg, y); RK_FIELD(dg, coef); RK_FIELD(dg, mean);
  RK_FIELD(dg, w); RK_FIELD(dg, grad_x); RK_FIELD(dg, residual); RK_FIELD(dg, res_mask); RK_FIELD(dg, res_bits);
  RK_FIELD(dg, up_out); RK_FIELD(dg, up_y); RK_FIELD(dg, up_mean); RK_FIELD(dg, up_var); RK_FIELD(dg, up_weight);
  RK_FIELD(dg, up_bias);
  RK_FIELD(dg, up_coef); RK_FIELD(dg, up_grad_weight); RK_FIELD(dg, up_grad_bias); RK_FIELD(dg, workspace);
  RK_FIELD(dg, workspace_bytes); RK_FIELD(dg, counters); RK_FIELD(dg, counters_count);
  RK_FIELD(dg, up_eps); RK_FIELD(dg, N); RK_FIELD(dg, Cin); RK_FIELD(dg, H);
  RK_FIELD(dg, W); RK_FIELD(dg, Cout); RK_FIELD(dg, KH); RK_FIELD(dg, KW); RK_FIELD(dg, stride_h);
  RK_FIELD(dg, stride_w); RK_FIELD(dg, pad_h); RK_FIELD(dg, pad_w); RK_FIELD(dg, OH); RK_FIELD(dg, OW);
  RK_FIELD(dg, stream);
  def_dtype_field<&rk::Conv2dDgradArgs::up_w_dtype>(dg, "up_w_dtype");
  def_dtype_field<&rk::Conv2dDgradArgs::up_gw_dtype>(dg, "up_gw_dtype");
  def_strides<&rk::Conv2dDgradArgs::w_stride>(dg, "w_stride");
  finish(dg);

  py::class_<rk::Conv2dWgradArgs> wg(m, "Conv2dWgradArgs", py::module_local(),
                                     "arguments of conv2d_wgrad (csrc/conv2d_wgrad.h); pointer 0 = absent");
  wg.def(py::init<>());
  def_dtype(wg, "Conv2dWgradArgs.dtype");
  RK_FIELD(wg, g); RK_FIELD(wg, mask); RK_FIELD(wg, mask_bits); RK_FIELD(wg, y); RK_FIELD(wg, coef); RK_FIELD(wg, mean);
  RK_FIELD(wg, x); RK_FIELD(wg, up_y); RK_FIELD(wg, up_mean); RK_FIELD(wg, up_var); RK_FIELD(wg, up_weight);
  RK_FIELD(wg, up_bias); RK_FIELD(wg, up_eps); RK_FIELD(wg, grad_weight); RK_FIELD(wg, workspace);
  RK_FIELD(wg, workspace_bytes); RK_FIELD(wg, counters); RK_FIELD(wg, counters_count);
  RK_FIELD(wg, splits); RK_FIELD(wg, N); RK_FIELD(wg, Cin); RK_FIELD(wg, H);
  RK_FIELD(wg, W); RK_FIELD(wg, Cout); RK_FIELD(wg, KH); RK_FIELD(wg, KW); RK_FIELD(wg, stride_h);
  RK_FIELD(wg, stride_w); RK_FIELD(wg, pad_h); RK_FIELD(wg, pad_w); RK_FIELD(wg, OH); RK_FIELD(wg, OW);
  RK_FIELD(wg, stream);
  def_dtype_field<&rk::Conv2dWgradArgs::up_w_dtype>(wg, "up_w_dtype");
  def_strides<&rk::Conv2dWgradArgs::gw_stride>(wg, "gw_stride");
  finish(wg);

  py::class_<rk::MaxPool2dArgs> pool(m, "MaxPool2dArgs", py::module_local(),
                                     "arguments of maxpool2d_forward (csrc/maxpool.h); pointer 0 = absent");
  pool.def(py::init<>());
  def_dtype(pool, "MaxPool2dArgs.dtype");
  RK_FIELD(pool, x); RK_FIELD(pool, out); RK_FIELD(pool, argmax); RK_FIELD(pool, N); RK_FIELD(pool, C);
  RK_FIELD(pool, H); RK_FIELD(pool, W); RK_FIELD(pool, OH); RK_FIELD(pool, OW); RK_FIELD(pool, kh); RK_FIELD(pool, kw);
  RK_FIELD(pool, sh); RK_FIELD(pool, sw); RK_FIELD(pool, ph); RK_FIELD(pool, pw); RK_FIELD(pool, nhwc);
  RK_FIELD(pool, stream);
  finish(pool);

  py::class_<rk::MaxPool2dBackwardArgs> poolb(m, "MaxPool2dBackwardArgs", py::module_local(),
                                              "arguments of maxpool2d_backward (csrc/maxpool.h)");
  poolb.def(py::init<>());
  def_dtype(poolb, "MaxPool2dBackwardArgs.dtype");
  RK_FIELD(poolb, grad_out); RK_FIELD(poolb, argmax); RK_FIELD(poolb, grad_x); RK_FIELD(poolb, N); RK_FIELD(poolb, C);
  RK_FIELD(poolb, H); RK_FIELD(poolb, W); RK_FIELD(poolb, OH); RK_FIELD(poolb, OW); RK_FIELD(poolb, kh);
  RK_FIELD(poolb, kw); RK_FIELD(poolb, sh); RK_FIELD(poolb, sw); RK_FIELD(poolb, ph); RK_FIELD(poolb, pw);
  RK_FIELD(poolb, nhwc); RK_FIELD(poolb, stream);
  finish(poolb);

  m.def(
      "maxpool2d_forward",
      [](const rk::MaxPool2dArgs& a) {
        py::gil_scoped_release nogil;
        rk::maxpool2d_forward(a);
      },
      py::arg("args"), "out = max_pool2d(x) and its one-byte argmax (MaxPool2dArgs)");

  m.def(
      "maxpool2d_backward",
      [](const rk::MaxPool2dBackwardArgs& a) {
        py::gil_scoped_release nogil;
        rk::maxpool2d_backward(a);
      },
      py::arg("args"), "grad_x of maxpool2d_forward, gathered through the argmax (MaxPool2dBackwardArgs)");

  // ---- training-mode BatchNorm (csrc/batch_norm.h)
  py::class_<rk::BatchNormActArgs> bna(m, "BatchNormActArgs", py::module_local(),
                                       "arguments of batch_norm_act_forward (csrc/batch_norm.h); pointer 0 = absent");
  bna.def(py::init<>());
  def_dtype(bna, "BatchNormActArgs.dtype");
  RK_FIELD(bna, y); RK_FIELD(bna, mean); RK_FIELD(bna, var); RK_FIELD(bna, weight); RK_FIELD(bna, bias);
  RK_FIELD(bna, identity); RK_FIELD(bna, id_mean); RK_FIELD(bna, id_var); RK_FIELD(bna, id_weight);
  RK_FIELD(bna, id_bias); RK_FIELD(bna, out); RK_FIELD(bna, bits);
  def_dtype_field<&rk::BatchNormActArgs::weight_dtype>(bna, "weight_dtype");
  def_dtype_field<&rk::BatchNormActArgs::bias_dtype>(bna, "bias_dtype");
  def_dtype_field<&rk::BatchNormActArgs::id_weight_dtype>(bna, "id_weight_dtype");
  def_dtype_field<&rk::BatchNormActArgs::id_bias_dtype>(bna, "id_bias_dtype");
  RK_FIELD(bna, eps); RK_FIELD(bna, id_eps); RK_FIELD(bna, numel); RK_FIELD(bna, C); RK_FIELD(bna, inner);
  RK_FIELD(bna, relu); RK_FIELD(bna, stream);
  finish(bna);

  py::class_<rk::BatchNormActBackwardArgs> bnb(m, "BatchNormActBackwardArgs", py::module_local(),
                                               "arguments of batch_norm_act_backward (csrc/batch_norm.h); "
                                               "pointer 0 = absent");
  bnb.def(py::init<>());
  def_dtype(bnb, "BatchNormActBackwardArgs.dtype");
  RK_FIELD(bnb, grad_out); RK_FIELD(bnb, out); RK_FIELD(bnb, out_bits); RK_FIELD(bnb, y); RK_FIELD(bnb, mean); RK_FIELD(bnb, var);
  RK_FIELD(bnb, weight); RK_FIELD(bnb, identity); RK_FIELD(bnb, id_mean); RK_FIELD(bnb, id_var);
  RK_FIELD(bnb, id_weight); RK_FIELD(bnb, grad_y); RK_FIELD(bnb, grad_identity); RK_FIELD(bnb, grad_weight);
  RK_FIELD(bnb, grad_bias); RK_FIELD(bnb, grad_id_weight); RK_FIELD(bnb, grad_id_bias);
  RK_FIELD(bnb, coef); RK_FIELD(bnb, id_coef); RK_FIELD(bnb, counters); RK_FIELD(bnb, counters_count);
  def_dtype_field<&rk::BatchNormActBackwardArgs::weight_dtype>(bnb, "weight_dtype");
  def_dtype_field<&rk::BatchNormActBackwardArgs::id_weight_dtype>(bnb, "id_weight_dtype");
  def_dtype_field<&rk::BatchNormActBackwardArgs::grad_weight_dtype>(bnb, "grad_weight_dtype");
  def_dtype_field<&rk::BatchNormActBackwardArgs::grad_bias_dtype>(bnb, "grad_bias_dtype");
  def_dtype_field<&rk::BatchNormActBackwardArgs::grad_id_weight_dtype>(bnb, "grad_id_weight_dtype");
  def_dtype_field<&rk::BatchNormActBackwardArgs::grad_id_bias_dtype>(bnb, "grad_id_bias_dtype");
  RK_FIELD(bnb, workspace); RK_FIELD(bnb, workspace_bytes); RK_FIELD(bnb, eps); RK_FIELD(bnb, id_eps);
  RK_FIELD(bnb, numel); RK_FIELD(bnb, C); RK_FIELD(bnb, inner); RK_FIELD(bnb, relu); RK_FIELD(bnb, stream);
  finish(bnb);

  py::class_<rk::BnRunningUpdateArgs> bnr(m, "BnRunningUpdateArgs", py::module_local(),
                                          "arguments of bn_running_update (csrc/batch_norm.h); pointer 0 = absent");
  bnr.def(py::init<>());
  RK_FIELD(bnr, mean); RK_FIELD(bnr, var); RK_FIELD(bnr, running_mean); RK_FIELD(bnr, running_var);
  RK_FIELD(bnr, num_batches_tracked);
  def_dtype_field<&rk::BnRunningUpdateArgs::running_mean_dtype>(bnr, "running_mean_dtype");
  def_dtype_field<&rk::BnRunningUpdateArgs::running_var_dtype>(bnr, "running_var_dtype");
  RK_FIELD(bnr, factor); RK_FIELD(bnr, unbias); RK_FIELD(bnr, C); RK_FIELD(bnr, stream);
  finish(bnr);

  m.def(
      "batch_norm_act_forward",
      [](const rk::BatchNormActArgs& a) {
        py::gil_scoped_release nogil;
        rk::batch_norm_act_forward(a);
      },
      py::arg("args"), "out = act(BN(y) + identity or BN(identity)) from given batch statistics (BatchNormActArgs)");
  m.def(
      "batch_norm_act_forward_running",
      [](const rk::BatchNormActArgs& a, const std::vector<rk::BnRunningUpdateArgs>& running) {
        py::gil_scoped_release nogil;
        rk::batch_norm_act_forward_running(a, running);
      },
      py::arg("args"), py::arg("running"),
      "batch_norm_act_forward plus up to bn_running_update_slots running-statistics updates in its launch");
  m.def(
      "batch_norm_act_backward_workspace_bytes",
      [](int dtype, int64_t numel, int64_t C, int64_t inner) {
        return rk::batch_norm_act_backward_workspace_bytes(
            rk::check_dtype(dtype, "batch_norm_act_backward_workspace_bytes", "dtype"), numel, C, inner);
      },
      py::arg("dtype"), py::arg("numel"), py::arg("C"), py::arg("inner"));
  m.def(
      "batch_norm_act_backward",
      [](const rk::BatchNormActBackwardArgs& a) {
        py::gil_scoped_release nogil;
        rk::batch_norm_act_backward(a);
      },
      py::arg("args"), "gradients of batch_norm_act_forward through the batch statistics (BatchNormActBackwardArgs)");
  m.def(
      "bn_running_update",
      [](const rk::BnRunningUpdateArgs& a) {
        py::gil_scoped_release nogil;
        rk::bn_running_update(a);
      },
      py::arg("args"), "running mean/var and num_batches_tracked update, in place (BnRunningUpdateArgs)");
  m.def(
      "bn_running_update_many",
      [](const std::vector<rk::BnRunningUpdateArgs>& a) {
        py::gil_scoped_release nogil;
        rk::bn_running_update_many(a);
      },
      py::arg("args"),
      "up to bn_running_update_slots running-statistics updates (a list of BnRunningUpdateArgs, one stream) in one launch");
  m.attr("bn_running_update_slots") = rk::kBnRunningUpdateSlots;

  m.def(
      "bn_add_relu_forward",
      [](const rk::BnAddReluArgs& a) {
        py::gil_scoped_release nogil;
        rk::bn_add_relu_forward(a);
      },
      py::arg("args"), "out = act(x*scale[c] + shift[c] + identity*id_scale[c] + id_shift[c]) (BnAddReluArgs)");

  m.def(
      "bn_add_relu_backward_workspace_bytes",
      [](int dtype, int64_t numel, int64_t C, int64_t inner) {
        return rk::bn_add_relu_backward_workspace_bytes(
            rk::check_dtype(dtype, "bn_add_relu_backward_workspace_bytes", "dtype"), numel, C, inner);
      },
      py::arg("dtype"), py::arg("numel"), py::arg("C"), py::arg("inner"));

  m.def(
      "bn_add_relu_backward",
      [](const rk::BnAddReluBackwardArgs& a) {
        py::gil_scoped_release nogil;
        rk::bn_add_relu_backward(a);
      },
      py::arg("args"), "gradients of bn_add_relu_forward (BnAddReluBackwardArgs)");

  m.def(
      "conv2d_workspace_bytes",
      [](int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats) {
        return rk::conv2d_workspace_bytes(N, OH, OW, Cout, compute_stats);
      },
      py::arg("N"), py::arg("OH"), py::arg("OW"), py::arg("Cout"), py::arg("compute_stats"),
      "bytes of device workspace conv2d_forward needs (0 without statistics)");
  m.def(
      "conv2d_stats_counters",
      [](int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats) {
        return rk::conv2d_stats_counters(N, OH, OW, Cout, compute_stats);
      },
      py::arg("N"), py::arg("OH"), py::arg("OW"), py::arg("Cout"), py::arg("compute_stats"),
      "int32 arrival counters (all zero at launch) conv2d_forward's statistics need (0 without statistics)");

  m.def(
      "conv2d_forward",
      [](const rk::Conv2dArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_forward(a);
      },
      py::arg("args"),
      "implicit-GEMM conv2d with fused epilogue out = act(conv(x, w)*scale + bias + residual) and optional "
      "per-channel (mean, biased var) of conv(x, w) (Conv2dArgs); w is (Cout, ldw) with columns "
      "(r*KW+s)*Cin+c, zero padded to ldw");

  m.def(
      "conv2d_dgrad_workspace_bytes",
      [](int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w, bool upstream) {
        return rk::conv2d_dgrad_workspace_bytes(N, Cin, H, W, stride_h, stride_w, upstream);
      },
      py::arg("N"), py::arg("Cin"), py::arg("H"), py::arg("W"), py::arg("stride_h"), py::arg("stride_w"),
      py::arg("upstream"), "bytes of device workspace conv2d_dgrad needs (0 without the upstream reductions)");
  m.def(
      "conv2d_dgrad_counters",
      [](int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w, bool upstream) {
        return rk::conv2d_dgrad_counters(N, Cin, H, W, stride_h, stride_w, upstream);
      },
      py::arg("N"), py::arg("Cin"), py::arg("H"), py::arg("W"), py::arg("stride_h"), py::arg("stride_w"),
      py::arg("upstream"), "int32 arrival counters (all zero at launch) conv2d_dgrad needs (0 without up_y)");
  m.def(
      "conv2d_dgrad",
      [](const rk::Conv2dDgradArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_dgrad(a);
      },
      py::arg("args"),
      "implicit-GEMM convolution data gradient with the BN-backward operand computed as it is loaded, the "
      "residual / upstream-ReLU epilogue and the upstream BN-backward reductions (Conv2dDgradArgs)");

  m.def(
      "conv2d_wgrad_splits",
      [](int64_t N, int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t OH, int64_t OW) {
        return rk::conv2d_wgrad_splits(N, Cin, Cout, KH, KW, OH, OW);
      },
      py::arg("N"), py::arg("Cin"), py::arg("Cout"), py::arg("KH"), py::arg("KW"), py::arg("OH"), py::arg("OW"),
      "the split-K count conv2d_wgrad is tuned for (from the shape only)");
  m.def(
      "conv2d_wgrad_workspace_bytes",
      [](int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits) {
        return rk::conv2d_wgrad_workspace_bytes(Cin, Cout, KH, KW, splits);
      },
      py::arg("Cin"), py::arg("Cout"), py::arg("KH"), py::arg("KW"), py::arg("splits"),
      "bytes of device workspace conv2d_wgrad needs (0 for one split)");
  m.def(
      "conv2d_wgrad_counters",
      [](int64_t Cin, int64_t Cout, int64_t KH, int64_t KW, int64_t splits) {
        return rk::conv2d_wgrad_counters(Cin, Cout, KH, KW, splits);
      },
      py::arg("Cin"), py::arg("Cout"), py::arg("KH"), py::arg("KW"), py::arg("splits"),
      "int32 arrival counters (all zero at launch) conv2d_wgrad needs (0 for one split)");
  m.def(
      "conv2d_wgrad",
      [](const rk::Conv2dWgradArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_wgrad(a);
      },
      py::arg("args"),
      "implicit-GEMM convolution weight gradient with the BN-backward operand computed as it is loaded and x "
      "optionally recomputed from the upstream unit (Conv2dWgradArgs); deterministic split-K");

  // ---- per-channel statistics of an fp32 NHWC matrix (csrc/nhwc_stats.h; the sm_90a conv's)
  py::class_<rk::NhwcStatsArgs> nst(m, "NhwcStatsArgs", py::module_local(),
                                    "arguments of nhwc_stats_forward (csrc/nhwc_stats.h); pointer 0 = absent");
  nst.def(py::init<>());
  def_dtype(nst, "NhwcStatsArgs.dtype");
  RK_FIELD(nst, yf); RK_FIELD(nst, y); RK_FIELD(nst, mean); RK_FIELD(nst, var); RK_FIELD(nst, workspace);
  RK_FIELD(nst, workspace_bytes); RK_FIELD(nst, M); RK_FIELD(nst, C); RK_FIELD(nst, stream);
  finish(nst);
  m.def(
      "nhwc_stats_workspace_bytes", [](int64_t M, int64_t C) { return rk::nhwc_stats_workspace_bytes(M, C); },
      py::arg("M"), py::arg("C"));
  m.def(
      "nhwc_stats_forward",
      [](const rk::NhwcStatsArgs& a) {
        py::gil_scoped_release nogil;
        rk::nhwc_stats_forward(a);
      },
      py::arg("args"), "per-column (mean, biased var) of a float32 (M, C) matrix, and y = its rounding to dtype");

  // ---- the CUTLASS sm_90a convolution (csrc/sm90/): present only when the build found CUTLASS
#if RK_WITH_SM90
  m.attr("sm90_kernels") = true;
  m.attr("sm90_note") = std::string();
  m.def(
      "conv2d_sm90_workspace_bytes", [](const rk::Conv2dArgs& a) { return rk::conv2d_sm90_workspace_bytes(a); },
      py::arg("args"), "bytes of device workspace conv2d_sm90_forward needs for these arguments");
  m.def(
      "conv2d_sm90_forward",
      [](const rk::Conv2dArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_sm90_forward(a);
      },
      py::arg("args"),
      "sm_90a CUTLASS implicit-GEMM conv2d (Conv2dArgs; csrc/sm90/conv2d_sm90.h): channels_last bf16/fp16, "
      "out = act(conv(x, w)*scale + bias + residual) or per-channel (mean, biased var) of conv(x, w)");

  py::class_<rk::Conv2dSm90BwdArgs> sbw(m, "Conv2dSm90BwdArgs", py::module_local(),
                                        "arguments of conv2d_sm90_dgrad / conv2d_sm90_wgrad "
                                        "(csrc/sm90/conv2d_sm90_bwd.h); pointer 0 = absent");
  sbw.def(py::init<>());
  def_dtype(sbw, "Conv2dSm90BwdArgs.dtype");
  RK_FIELD(sbw, dy); RK_FIELD(sbw, w); RK_FIELD(sbw, x); RK_FIELD(sbw, residual); RK_FIELD(sbw, grad_x);
  RK_FIELD(sbw, grad_w); RK_FIELD(sbw, workspace); RK_FIELD(sbw, workspace_bytes); RK_FIELD(sbw, N);
  RK_FIELD(sbw, Cin); RK_FIELD(sbw, H); RK_FIELD(sbw, W); RK_FIELD(sbw, Cout); RK_FIELD(sbw, KH); RK_FIELD(sbw, KW);
  RK_FIELD(sbw, stride_h); RK_FIELD(sbw, stride_w); RK_FIELD(sbw, pad_h); RK_FIELD(sbw, pad_w); RK_FIELD(sbw, OH);
  RK_FIELD(sbw, OW); RK_FIELD(sbw, stream);
  finish(sbw);
  m.def(
      "conv2d_sm90_dgrad_workspace_bytes",
      [](const rk::Conv2dSm90BwdArgs& a) { return rk::conv2d_sm90_dgrad_workspace_bytes(a); }, py::arg("args"),
      "bytes of device workspace conv2d_sm90_dgrad needs for these arguments");
  m.def(
      "conv2d_sm90_wgrad_workspace_bytes",
      [](const rk::Conv2dSm90BwdArgs& a) { return rk::conv2d_sm90_wgrad_workspace_bytes(a); }, py::arg("args"),
      "bytes of device workspace conv2d_sm90_wgrad needs for these arguments");
  m.def(
      "conv2d_sm90_dgrad",
      [](const rk::Conv2dSm90BwdArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_sm90_dgrad(a);
      },
      py::arg("args"),
      "sm_90a CUTLASS dgrad (Conv2dSm90BwdArgs; csrc/sm90/conv2d_sm90_bwd.h): grad_x = conv_transpose(dy, w) "
      "(+ residual), channels_last bf16/fp16, stride 1");
  m.def(
      "conv2d_sm90_wgrad",
      [](const rk::Conv2dSm90BwdArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_sm90_wgrad(a);
      },
      py::arg("args"),
      "sm_90a CUTLASS wgrad (Conv2dSm90BwdArgs; csrc/sm90/conv2d_sm90_bwd.h): KRSC grad_w from dy and x, "
      "channels_last bf16/fp16, deterministic (no split-K)");
#else
  m.attr("sm90_kernels") = false;
  m.attr("sm90_note") = std::string(RK_SM90_NOTE);
#endif
}
