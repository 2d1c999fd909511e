// pybind11 module resnet_kernels._C. No torch headers: arguments are integers (device pointers
// from tensor.data_ptr(), sizes, dtype codes, the raw cudaStream_t of torch's current stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include "bn_add_relu.h"
#include "common.h"
#include "conv2d.h"

namespace py = pybind11;
using rk::DType;

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

// One def_readwrite per field, each field named once: RK_FIELDS(cls, Struct, a, b, c) ->
// cls.def_readwrite("a", &Struct::a) ... and the names recorded in the class's `fields` tuple.
#define RK_FIELD_1(cls, S, f) (cls.def_readwrite(#f, &S::f), field_names(cls).append(#f));
#define RK_EXPAND(x) x
#define RK_FE_1(cls, S, f) RK_FIELD_1(cls, S, f)
#define RK_FE_2(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_1(cls, S, __VA_ARGS__))
#define RK_FE_3(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_2(cls, S, __VA_ARGS__))
#define RK_FE_4(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_3(cls, S, __VA_ARGS__))
#define RK_FE_5(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_4(cls, S, __VA_ARGS__))
#define RK_FE_6(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_5(cls, S, __VA_ARGS__))
#define RK_FE_7(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_6(cls, S, __VA_ARGS__))
#define RK_FE_8(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_7(cls, S, __VA_ARGS__))
#define RK_FE_9(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_8(cls, S, __VA_ARGS__))
#define RK_FE_10(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_9(cls, S, __VA_ARGS__))
#define RK_FE_11(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_10(cls, S, __VA_ARGS__))
#define RK_FE_12(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_11(cls, S, __VA_ARGS__))
#define RK_FE_13(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_12(cls, S, __VA_ARGS__))
#define RK_FE_14(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_13(cls, S, __VA_ARGS__))
#define RK_FE_15(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_14(cls, S, __VA_ARGS__))
#define RK_FE_16(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_15(cls, S, __VA_ARGS__))
#define RK_FE_17(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_16(cls, S, __VA_ARGS__))
#define RK_FE_18(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_17(cls, S, __VA_ARGS__))
#define RK_FE_19(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_18(cls, S, __VA_ARGS__))
#define RK_FE_20(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_19(cls, S, __VA_ARGS__))
#define RK_FE_21(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_20(cls, S, __VA_ARGS__))
#define RK_FE_22(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_21(cls, S, __VA_ARGS__))
#define RK_FE_23(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_22(cls, S, __VA_ARGS__))
#define RK_FE_24(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_23(cls, S, __VA_ARGS__))
#define RK_FE_25(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_24(cls, S, __VA_ARGS__))
#define RK_FE_26(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_25(cls, S, __VA_ARGS__))
#define RK_FE_27(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_26(cls, S, __VA_ARGS__))
#define RK_FE_28(cls, S, f, ...) RK_FIELD_1(cls, S, f) RK_EXPAND(RK_FE_27(cls, S, __VA_ARGS__))
#define RK_NARGS(...) RK_EXPAND(RK_NARGS_(__VA_ARGS__, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, \
                                          12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1))
#define RK_NARGS_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, _17, _18, _19, _20, _21, \
                  _22, _23, _24, _25, _26, _27, _28, N, ...) N
#define RK_CAT(a, b) RK_CAT_(a, b)
#define RK_CAT_(a, b) a##b
#define RK_FIELDS(cls, S, ...) RK_EXPAND(RK_CAT(RK_FE_, RK_NARGS(__VA_ARGS__))(cls, S, __VA_ARGS__))

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

// int64_t[4] element strides as a list of 4 ints.
template <auto Member, typename C>
void def_strides(C& cls, const char* name) {
  using S = typename C::type;
  cls.def_property(
      name, [](const S& a) { return std::vector<int64_t>(std::begin(a.*Member), std::end(a.*Member)); },
      [name](S& a, const std::vector<int64_t>& v) {
        if (v.size() != 4)
          throw rk::ArgError(rk::cat("Conv2dArgs.", name, " must have 4 entries, got ", v.size()));
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
  RK_FIELDS(fwd, rk::BnAddReluArgs, x, scale, shift, identity, id_scale, id_shift, out, numel, C, inner, relu, stream);
  finish(fwd);

  py::class_<rk::BnAddReluBackwardArgs> bwd(m, "BnAddReluBackwardArgs", py::module_local(),
                                            "arguments of bn_add_relu_backward (csrc/bn_add_relu.h); pointer 0 = absent");
  bwd.def(py::init<>());
  def_dtype(bwd, "BnAddReluBackwardArgs.dtype");
  RK_FIELDS(bwd, rk::BnAddReluBackwardArgs, grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity,
            grad_scale, grad_shift, grad_id_scale, workspace, workspace_bytes, numel, C, inner, relu, stream);
  finish(bwd);

  py::class_<rk::Conv2dArgs> conv(m, "Conv2dArgs", py::module_local(),
                                  "arguments of conv2d_forward (csrc/conv2d.h); pointer 0 = absent");
  conv.def(py::init<>());
  def_dtype(conv, "Conv2dArgs.dtype");
  RK_FIELDS(conv, rk::Conv2dArgs, x, w, scale, bias, residual, out, mean, var, workspace, workspace_bytes, N, Cin, H,
            W, Cout, KH, KW, stride_h, stride_w, pad_h, pad_w, OH, OW, ldw, relu, allow_tf32, stream);
  def_strides<&rk::Conv2dArgs::x_stride>(conv, "x_stride");
  def_strides<&rk::Conv2dArgs::out_stride>(conv, "out_stride");
  def_strides<&rk::Conv2dArgs::res_stride>(conv, "res_stride");
  finish(conv);

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
      "conv2d_forward",
      [](const rk::Conv2dArgs& a) {
        py::gil_scoped_release nogil;
        rk::conv2d_forward(a);
      },
      py::arg("args"),
      "implicit-GEMM conv2d with fused epilogue out = act(conv(x, w)*scale + bias + residual) and optional "
      "per-channel (mean, biased var) of conv(x, w) (Conv2dArgs); w is (Cout, ldw) with columns "
      "(r*KW+s)*Cin+c, zero padded to ldw");
}
