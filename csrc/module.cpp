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

  m.def(
      "bn_add_relu_forward",
      [](int dtype, std::uintptr_t x, std::uintptr_t scale, std::uintptr_t shift, std::uintptr_t identity,
         std::uintptr_t id_scale, std::uintptr_t id_shift, std::uintptr_t out, int64_t numel, int64_t C,
         int64_t inner, bool relu, std::uintptr_t stream) {
        rk::BnAddReluArgs a{rk::check_dtype(dtype, "bn_add_relu_forward", "dtype"),
                            x, scale, shift, identity, id_scale, id_shift, out, numel, C, inner, relu, stream};
        py::gil_scoped_release nogil;
        rk::bn_add_relu_forward(a);
      },
      py::arg("dtype"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("identity"),
      py::arg("id_scale"), py::arg("id_shift"), py::arg("out"), py::arg("numel"), py::arg("C"),
      py::arg("inner"), py::arg("relu"), py::arg("stream"),
      "out = act(x*scale[c] + shift[c] + identity*id_scale[c] + id_shift[c]); pointer 0 = absent");

  m.def(
      "bn_add_relu_backward_workspace_bytes",
      [](int dtype, int64_t numel, int64_t C, int64_t inner) {
        return rk::bn_add_relu_backward_workspace_bytes(
            rk::check_dtype(dtype, "bn_add_relu_backward_workspace_bytes", "dtype"), numel, C, inner);
      },
      py::arg("dtype"), py::arg("numel"), py::arg("C"), py::arg("inner"));

  m.def(
      "bn_add_relu_backward",
      [](int dtype, std::uintptr_t grad_out, std::uintptr_t out, std::uintptr_t x, std::uintptr_t scale,
         std::uintptr_t identity, std::uintptr_t id_scale, std::uintptr_t grad_x, std::uintptr_t grad_identity,
         std::uintptr_t grad_scale, std::uintptr_t grad_shift, std::uintptr_t grad_id_scale,
         std::uintptr_t workspace, int64_t workspace_bytes, int64_t numel, int64_t C, int64_t inner, bool relu,
         std::uintptr_t stream) {
        rk::BnAddReluBackwardArgs a{rk::check_dtype(dtype, "bn_add_relu_backward", "dtype"),
                                    grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity,
                                    grad_scale, grad_shift, grad_id_scale, workspace, workspace_bytes,
                                    numel, C, inner, relu, stream};
        py::gil_scoped_release nogil;
        rk::bn_add_relu_backward(a);
      },
      py::arg("dtype"), py::arg("grad_out"), py::arg("out"), py::arg("x"), py::arg("scale"),
      py::arg("identity"), py::arg("id_scale"), py::arg("grad_x"), py::arg("grad_identity"),
      py::arg("grad_scale"), py::arg("grad_shift"), py::arg("grad_id_scale"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("numel"), py::arg("C"), py::arg("inner"), py::arg("relu"),
      py::arg("stream"));

  m.def(
      "conv2d_workspace_bytes",
      [](int64_t N, int64_t OH, int64_t OW, int64_t Cout, bool compute_stats) {
        return rk::conv2d_workspace_bytes(N, OH, OW, Cout, compute_stats);
      },
      py::arg("N"), py::arg("OH"), py::arg("OW"), py::arg("Cout"), py::arg("compute_stats"),
      "bytes of device workspace conv2d_forward needs (0 without statistics)");

  m.def(
      "conv2d_forward",
      [](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t scale, std::uintptr_t bias,
         std::uintptr_t residual, std::uintptr_t out, std::uintptr_t mean, std::uintptr_t var,
         std::uintptr_t workspace, int64_t workspace_bytes, int64_t N, int64_t Cin, int64_t H, int64_t W,
         int64_t Cout, int64_t KH, int64_t KW, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
         int64_t OH, int64_t OW, int64_t ldw, std::vector<int64_t> x_stride, std::vector<int64_t> out_stride,
         std::vector<int64_t> res_stride, bool relu, bool allow_tf32, std::uintptr_t stream) {
        const char* fn = "conv2d_forward";
        auto strides = [fn](const std::vector<int64_t>& v, const char* name, int64_t (&dst)[4]) {
          if (v.size() != 4) throw rk::ArgError(rk::cat(fn, ": ", name, " must have 4 entries, got ", v.size()));
          for (int i = 0; i < 4; ++i) dst[i] = v[i];
        };
        rk::Conv2dArgs a{};
        a.dtype = rk::check_dtype(dtype, fn, "dtype");
        a.x = x; a.w = w; a.scale = scale; a.bias = bias; a.residual = residual; a.out = out;
        a.mean = mean; a.var = var; a.workspace = workspace; a.workspace_bytes = workspace_bytes;
        a.N = N; a.Cin = Cin; a.H = H; a.W = W; a.Cout = Cout; a.KH = KH; a.KW = KW;
        a.stride_h = stride_h; a.stride_w = stride_w; a.pad_h = pad_h; a.pad_w = pad_w;
        a.OH = OH; a.OW = OW; a.ldw = ldw;
        strides(x_stride, "x_stride", a.x_stride);
        strides(out_stride, "out_stride", a.out_stride);
        if (residual != 0 || !res_stride.empty()) strides(res_stride, "res_stride", a.res_stride);
        a.relu = relu; a.allow_tf32 = allow_tf32; a.stream = stream;
        py::gil_scoped_release nogil;
        rk::conv2d_forward(a);
      },
      py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bias"), py::arg("residual"),
      py::arg("out"), py::arg("mean"), py::arg("var"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("N"), py::arg("Cin"), py::arg("H"), py::arg("W"), py::arg("Cout"), py::arg("KH"), py::arg("KW"),
      py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("OH"), py::arg("OW"),
      py::arg("ldw"), py::arg("x_stride"), py::arg("out_stride"), py::arg("res_stride"), py::arg("relu"),
      py::arg("allow_tf32"), py::arg("stream"),
      "implicit-GEMM conv2d with fused epilogue out = act(conv(x, w)*scale + bias + residual) and optional "
      "per-channel (mean, biased var) of conv(x, w); w is (Cout, ldw) with columns (r*KW+s)*Cin+c, zero "
      "padded to ldw; pointer 0 = absent");
}
