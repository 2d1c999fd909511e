"""CUDA maxpool2d (csrc/maxpool.cu): thin wrappers filling ``MaxPool2dArgs`` /
``MaxPool2dBackwardArgs`` of the torch-free ``_C`` API."""

from __future__ import annotations

from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of


def _geometry(N, C, H, W, OH, OW, k, s, p, layout):
    return dict(N=N, C=C, H=H, W=W, OH=OH, OW=OW, kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0], pw=p[1],
                nhwc=layout == "nhwc")


def maxpool2d_forward(x, out, argmax, k, s, p, layout) -> None:
    C_ = C_module()
    N, C, H, W = x.shape
    with device_guard(x):
        args = fill_args(C_.MaxPool2dArgs, dtype=DTYPE_CODES[x.dtype], x=ptr(x), out=ptr(out), argmax=ptr(argmax),
                         stream=stream_of(x), **_geometry(N, C, H, W, out.shape[2], out.shape[3], k, s, p, layout))
        call("maxpool2d_forward", args)


def maxpool2d_backward(grad_out, argmax, grad_x, k, s, p, layout) -> None:
    C_ = C_module()
    N, C, OH, OW = grad_out.shape
    with device_guard(grad_out):
        args = fill_args(C_.MaxPool2dBackwardArgs, dtype=DTYPE_CODES[grad_out.dtype], grad_out=ptr(grad_out),
                         argmax=ptr(argmax), grad_x=ptr(grad_x), stream=stream_of(grad_out),
                         **_geometry(N, C, grad_x.shape[2], grad_x.shape[3], OH, OW, k, s, p, layout))
        call("maxpool2d_backward", args)
