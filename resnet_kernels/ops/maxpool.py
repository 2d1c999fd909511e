"""Max pooling with a one-byte argmax, defined once with ``torch.library``:

    maxpool2d(x, kernel_size, stride, padding) -> (out, argmax)
        out[n, c, oh, ow] = max of x over the window rows oh*sh - ph + [0, kh), columns
                            ow*sw - pw + [0, kw) (padding acts as -inf)
        argmax[n, c, oh, ow] = dh * kw + dw, the position of that maximum inside the window
                               (uint8, 0 .. kh*kw - 1)
    maxpool2d_backward(grad_out, argmax, input_size, ...) -> grad_x
        grad_x[n, c, ih, iw] = sum of grad_out over the outputs whose argmax is (ih, iw)

Exactly ``torch.nn.MaxPool2d`` (dilation 1, ``ceil_mode=False``): the first maximum in the
window's row-major scan order wins ties, and a NaN in the window is the maximum (the *last* NaN
in scan order is the argmax, as PyTorch's kernels pick it: they replace the running maximum when
``val > max || isnan(val)``), so outputs and gradients agree with PyTorch's exactly (gradient sums
over the up to ceil(kh/sh) * ceil(kw/sw) outputs containing an input element are done in the
accumulation dtype, in row-major output order, and rounded once).

Why: PyTorch's ``max_pool2d`` saves int64 indices for its backward, 8 bytes per output element
written in the forward and read again in the backward (a ResNet-50 stem at batch 256, 224x224:
411 MB). The argmax here is 1 byte, and the backward gathers (each input element sums the
gradients of the outputs whose windows contain it and chose it): no atomics, deterministic.

Layouts: x NCHW-contiguous or channels_last; out, argmax, grad_out and grad_x share that layout.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._eager import Eager
from .. import _alloc, _backend, _tune
from .._checks import check_activation, check_bool, check_layout
from .._numerics import mismatch, verify_rtol

OP = "maxpool2d"
OP_BACKWARD = OP + "_backward"
MAX_WINDOW = 256  # kh * kw: the argmax is one byte


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt, list, tuple, torch.Size)):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {type(v).__name__}")
    t = (v, v) if isinstance(v, (int, torch.SymInt)) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if t[0] < minimum or t[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return t[0], t[1]  # ints (SymInts for the input size under dynamic shapes)


def _out_size(H: int, W: int, k, s, p) -> Tuple[int, int]:
    return (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1


def _check_window(op: str, k, s, p) -> None:
    if k[0] * k[1] > MAX_WINDOW:
        raise ValueError(f"{op}: kernel_size {k} has {k[0] * k[1]} elements; the one-byte argmax holds windows of "
                         f"at most {MAX_WINDOW}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{op}: padding {p} must be at most half of kernel_size {k} (as torch.nn.MaxPool2d)")


def _validate(x, k, s, p, op: str = OP) -> Tuple[str, Tuple[int, int]]:
    check_activation(op, "x", x)
    layout = check_layout(op, "x", x)
    k, s, p = _pair(op, "kernel_size", k, 1), _pair(op, "stride", s, 1), _pair(op, "padding", p, 0)
    _check_window(op, k, s, p)
    H, W = x.shape[2], x.shape[3]
    OH, OW = _out_size(H, W, k, s, p)
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: x of spatial size {H}x{W} is too small for kernel_size {k}, padding {p} "
                         f"(the output would be {OH}x{OW})")
    return layout, (OH, OW)


def _empty(shape, like: Tensor, layout: str, dtype: torch.dtype, fake: bool) -> Tensor:
    mf = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    t = torch.empty(shape, dtype=dtype, device=like.device, memory_format=mf)
    return t if fake else _alloc._fill(t)


def _outputs(x: Tensor, layout: str, osize, need_argmax: bool, fake: bool) -> Tuple[Tensor, Tensor]:
    shape = (x.shape[0], x.shape[1], osize[0], osize[1])
    out = _empty(shape, x, layout, x.dtype, fake)
    if not need_argmax:
        return out, x.new_empty((0,), dtype=torch.uint8)
    # poisoned with 255: no valid argmax of a window of fewer than 256 elements
    arg = torch.empty(shape, dtype=torch.uint8, device=x.device,
                      memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    if not fake and _alloc.poisoning() and arg.numel():
        arg.fill_(255)
    return out, arg


# --------------------------------------------------------------------------------------------
# what the registry and the measured 'auto' see of a call (resnet_kernels/_tune.py)
# --------------------------------------------------------------------------------------------
class ForwardCall:
    """One validated maxpool2d call. Launchers: ``fn(x, out, argmax, k, s, p, layout)`` with
    ``argmax`` None when it is not needed (no gradient)."""

    op = OP

    def __init__(self, x, k, s, p, layout, osize, need_argmax):
        self.x, self.k, self.s, self.p, self.layout = x, tuple(k), tuple(s), tuple(p), layout
        self.osize, self.need_argmax = tuple(osize), bool(need_argmax)
        self.device = x.device

    def key(self) -> str:
        return (f"{tuple(self.x.shape)}|{self.layout}|{self.x.dtype}|k{self.k}s{self.s}p{self.p}|"
                f"arg{int(self.need_argmax)}")

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {str(self.x.dtype).replace('torch.', '')} {self.layout}, "
                f"kernel {self.k} stride {self.s} padding {self.p}")

    def run(self, impl, fresh: bool = False) -> Tuple[Tensor, Tensor]:
        if impl.returns_output:
            got, got_arg = impl.load()(self.x, None, None, self.k, self.s, self.p, self.layout, self.need_argmax)
            mf = torch.channels_last if self.layout == "nhwc" else torch.contiguous_format
            if not got.is_contiguous(memory_format=mf):  # the op's outputs have x's layout (its fake says so)
                got = got.contiguous(memory_format=mf)
            if not self.need_argmax:
                return got, self.x.new_empty((0,), dtype=torch.uint8)
            return got, got_arg.contiguous(memory_format=mf)
        out, arg = _outputs(self.x, self.layout, self.osize, self.need_argmax, fake=False)
        impl.load()(self.x, out, arg if self.need_argmax else None, self.k, self.s, self.p, self.layout)
        return out, arg

    def compare(self, got, ref):
        if not torch.equal(got[1], ref[1]):
            return "argmax: differs from the reference"
        return mismatch("out", got[0], ref[0], verify_rtol(self.x.dtype))


class BackwardCall:
    """One validated maxpool2d_backward call. Launchers:
    ``fn(grad_out, argmax, grad_x, k, s, p, layout)``."""

    op = OP_BACKWARD

    def __init__(self, grad_out, argmax, input_hw, k, s, p, layout):
        self.grad_out, self.argmax, self.input_hw = grad_out, argmax, tuple(input_hw)
        self.k, self.s, self.p, self.layout = tuple(k), tuple(s), tuple(p), layout
        self.device = grad_out.device

    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.grad_out.shape[0], self.grad_out.shape[1]) + self.input_hw

    def key(self) -> str:
        return (f"{tuple(self.grad_out.shape)}|{self.input_hw}|{self.layout}|{self.grad_out.dtype}|"
                f"k{self.k}s{self.s}p{self.p}")

    def describe(self) -> str:
        g = self.grad_out
        return (f"grad_out {tuple(g.shape)} {str(g.dtype).replace('torch.', '')} {self.layout}, input "
                f"{self.input_hw[0]}x{self.input_hw[1]}, kernel {self.k} stride {self.s} padding {self.p}")

    def run(self, impl, fresh: bool = True) -> Tensor:
        if impl.returns_output:
            got = impl.load()(self.grad_out, self.argmax, None, self.k, self.s, self.p, self.layout, self.input_hw)
            mf = torch.channels_last if self.layout == "nhwc" else torch.contiguous_format
            if (got.shape == self.input_shape() and got.dtype == self.grad_out.dtype
                    and got.is_contiguous(memory_format=mf)):
                return got  # (its own fresh result, already what the op returns)
            gx = _empty(self.input_shape(), self.grad_out, self.layout, self.grad_out.dtype, fake=False)
            gx.copy_(got)
            return gx
        gx = _empty(self.input_shape(), self.grad_out, self.layout, self.grad_out.dtype, fake=False)
        impl.load()(self.grad_out, self.argmax, gx, self.k, self.s, self.p, self.layout)
        return gx

    def compare(self, got, ref):
        return mismatch("grad_x", got, ref, verify_rtol(self.grad_out.dtype))


# --------------------------------------------------------------------------------------------
# forward op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_kernels::maxpool2d", mutates_args=())
def maxpool2d_op(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], need_argmax: bool,
                 backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out, argmax); argmax is an empty uint8 tensor when need_argmax is False."""
    call = forward_call(x, kernel_size, stride, padding, need_argmax)
    if x.numel() == 0:
        _tune.check_requested(OP, backend, call)
        return _outputs(x, call.layout, call.osize, need_argmax, fake=False)
    return _tune.dispatch(OP, backend, call)


@maxpool2d_op.register_fake
def _(x, kernel_size, stride, padding, need_argmax, backend):
    layout, osize = _validate(x, kernel_size, stride, padding)
    return _outputs(x, layout, osize, need_argmax, fake=True)


# --------------------------------------------------------------------------------------------
# backward op
# --------------------------------------------------------------------------------------------
def _validate_backward(grad_out, argmax, input_size, k, s, p) -> str:
    op = OP_BACKWARD
    check_activation(op, "grad_out", grad_out)
    layout = check_layout(op, "grad_out", grad_out)
    if not isinstance(argmax, Tensor):
        raise TypeError(f"{op}: argmax must be a torch.Tensor, got {type(argmax).__name__}")
    if argmax.dtype != torch.uint8:
        raise TypeError(f"{op}: argmax must be uint8 (the forward's one-byte argmax), got {argmax.dtype}")
    if argmax.shape != grad_out.shape:
        raise ValueError(f"{op}: argmax must have the shape of grad_out {tuple(grad_out.shape)}, "
                         f"got {tuple(argmax.shape)}")
    if argmax.device != grad_out.device:
        raise ValueError(f"{op}: argmax must be on grad_out's device ({grad_out.device}), got {argmax.device}")
    want = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    if not argmax.is_contiguous(memory_format=want):
        raise ValueError(f"{op}: argmax must have grad_out's memory layout "
                         f"({'channels_last' if layout == 'nhwc' else 'NCHW-contiguous'}), got strides "
                         f"{argmax.stride()}")
    k, s, p = _pair(op, "kernel_size", k, 1), _pair(op, "stride", s, 1), _pair(op, "padding", p, 0)
    _check_window(op, k, s, p)
    H, W = _pair(op, "input_size", input_size, 1)
    if _out_size(H, W, k, s, p) != tuple(grad_out.shape[2:]):
        raise ValueError(f"{op}: input_size {(H, W)} gives a {_out_size(H, W, k, s, p)} output with kernel_size {k}, "
                         f"stride {s}, padding {p}; grad_out is {tuple(grad_out.shape[2:])}")
    return layout


@torch.library.custom_op("resnet_kernels::maxpool2d_backward", mutates_args=())
def maxpool2d_backward_op(grad_out: Tensor, argmax: Tensor, input_size: List[int], kernel_size: List[int],
                          stride: List[int], padding: List[int], backend: str) -> Tensor:
    call = backward_call(grad_out, argmax, input_size, kernel_size, stride, padding)
    if grad_out.numel() == 0:
        _tune.check_requested(OP_BACKWARD, backend, call)
        return _empty(call.input_shape(), grad_out, call.layout, grad_out.dtype, fake=False).zero_()
    return _tune.dispatch(OP_BACKWARD, backend, call)


@maxpool2d_backward_op.register_fake
def _(grad_out, argmax, input_size, kernel_size, stride, padding, backend):
    layout = _validate_backward(grad_out, argmax, input_size, kernel_size, stride, padding)
    shape = (grad_out.shape[0], grad_out.shape[1], input_size[0], input_size[1])
    return _empty(shape, grad_out, layout, grad_out.dtype, fake=True)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, need_argmax, backend = inputs
    out, argmax = output
    ctx.geometry = (tuple(x.shape[2:]), tuple(kernel_size), tuple(stride), tuple(padding))
    ctx.layout = "nhwc" if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) else "nchw"
    ctx.backend = backend
    ctx.save_for_backward(argmax)
    # the argmax (uint8) has no gradient: autograd must not materialise a zero tensor for it (a
    # launch and a write of the argmax's size on every backward)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, grad_argmax):
    if grad is None:  # out did not reach the loss
        return None, None, None, None, None, None
    (argmax,) = ctx.saved_tensors
    hw, k, s, p = ctx.geometry
    if argmax.numel() == 0 and grad.numel() != 0:
        raise RuntimeError("maxpool2d: the forward ran with need_argmax=False; it has no gradient")
    mf = torch.channels_last if ctx.layout == "nhwc" else torch.contiguous_format
    grad = grad.contiguous(memory_format=mf)  # autograd may hand any strides; a no-op when dense
    if argmax.numel() == 0:  # an empty batch: no argmax was needed to know the gradient is empty
        argmax = torch.empty(grad.shape, dtype=torch.uint8, device=grad.device, memory_format=mf)
    gx = _maxpool2d_backward(grad, argmax, list(hw), list(k), list(s), list(p), ctx.backend)
    return gx, None, None, None, None, None


maxpool2d_op.register_autograd(_backward, setup_context=_setup_context)
_maxpool2d = Eager(maxpool2d_op, _setup_context, _backward)
_maxpool2d_backward = Eager(maxpool2d_backward_op)


def forward_call(x, kernel_size, stride, padding, need_argmax) -> ForwardCall:
    layout, osize = _validate(x, kernel_size, stride, padding)
    return ForwardCall(x, kernel_size, stride, padding, layout, osize, need_argmax)


def backward_call(grad_out, argmax, input_size, kernel_size, stride, padding) -> BackwardCall:
    layout = _validate_backward(grad_out, argmax, input_size, kernel_size, stride, padding)
    return BackwardCall(grad_out, argmax, input_size, kernel_size, stride, padding, layout)


# the op's arguments (without backend) -> its call, for the accountant (resnet_kernels/count.py)
CALLS = {OP: forward_call, OP_BACKWARD: backward_call}


def count_call(name: str, args):
    """(call, backend) of one dispatched op's arguments, for the accountant (resnet_kernels/count.py)."""
    return CALLS[name](*args[:-1]), args[-1]


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, *, backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1,
    ceil_mode False), saving a one-byte argmax for the backward instead of int64 indices (and
    nothing when no gradient is needed).

    x: (N, C, H, W), float32/float16/bfloat16/float64, NCHW-contiguous or channels_last (the
    output has x's layout). kernel_size, stride (None: kernel_size), padding: an int or a pair;
    kh * kw <= 256, padding <= kernel_size // 2. backend: None (the one in force, see
    ``resnet_kernels.use_backend``), 'auto' or a backend name.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{OP}: x must be a torch.Tensor, got {type(x).__name__}")
    k = _pair(OP, "kernel_size", kernel_size, 1)
    s = k if stride is None else _pair(OP, "stride", stride, 1)
    p = _pair(OP, "padding", padding, 0)
    need = torch.is_grad_enabled() and x.requires_grad
    out, _ = _maxpool2d(x, list(k), list(s), list(p), check_bool(OP, "need_argmax", need), _backend.op_arg(backend))
    return out


def argmax_to_indices(argmax: Tensor, input_hw: Sequence[int], kernel_size, stride, padding) -> Tensor:
    """The int64 flat indices (ih * W + iw, as ``max_pool2d_with_indices`` returns them) of a
    one-byte argmax (tests, the aten implementation)."""
    H, W = input_hw
    k, s, p = kernel_size, stride, padding
    OH, OW = argmax.shape[2], argmax.shape[3]
    a = argmax.long()
    oh0 = (torch.arange(OH, device=argmax.device) * s[0] - p[0]).view(OH, 1)
    ow0 = (torch.arange(OW, device=argmax.device) * s[1] - p[1]).view(1, OW)
    return (oh0 + a.div(k[1], rounding_mode="floor")) * W + ow0 + a.remainder(k[1])


__all__ = ["max_pool2d", "argmax_to_indices"]
