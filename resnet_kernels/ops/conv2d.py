"""Fused 2-D convolution ops, defined once with ``torch.library``:

    conv2d_epilogue(x, weight, scale, bias, residual) = act(conv(x, weight) * scale[k] + bias[k] + residual)
        the inference path of conv + BN (+ add) (+ ReLU): BN folded into a per-output-channel
        affine applied in the fp32 epilogue of the convolution (scale/bias are computed by the
        caller from the current parameters and running statistics on every call, so they are
        never stale); an optional residual of the output's shape is added before the ReLU.
    conv2d_stats(x, weight) = (y, mean, var)
        the training path: y = conv(x, weight) in the activation dtype plus the per-channel batch
        mean and biased variance of y over N*OH*OW, taken from the fp32 accumulators (one pass).

The forward runs on the backend in force (``cuda``/``triton`` kernels, or ``torch``); the
backward uses PyTorch's ``aten.convolution_backward`` (cuDNN on GPU) for the input and weight
gradients, and elementwise torch ops / per-channel reductions for the epilogue's gradients:

    conv2d_epilogue: g_m = g * (out > 0) (relu) ; d residual = g_m ; d bias = sum g_m ;
                     d scale = sum g_m * conv(x, w) (recomputed only when scale needs a grad) ;
                     d x, d weight = convolution_backward(g_m * scale)
    conv2d_stats:    d x, d weight = convolution_backward(g_y + g_mean/m + g_var * 2 (y - mean)/m),
                     m = N*OH*OW.

Which implementations can run a call is declared in the registry (``resnet_kernels/backends``):
float64, groups != 1 and dilation != 1 run on ``aten`` and ``torch`` only (``auto`` picks among
those; an explicit ``cuda``/``triton`` request raises ``BackendUnavailableError`` saying why).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _alloc, _backend, _tune
from .._checks import (acc_dtype, channel_vector, check_activation, check_bool, check_channel_vector,
                       check_layout, check_tensor_args, in_layout_of, layout_of, same_order)
from .._numerics import conv_acc, cudnn_conv_tf32_enabled, mismatch, verify_rtol
from .._eager import Eager
from .bn_add_relu import bn_add_relu_eager

OP_EPILOGUE = "conv2d_epilogue"
OP_STATS = "conv2d_stats"

_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    tv = type(v)
    if (tv is tuple or tv is list) and len(v) == 2:  # the common case, checked exactly as below
        a, b = v
        if type(a) is int and type(b) is int and a >= minimum and b >= minimum:
            return a, b
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        pair = (v, v)
    else:
        try:
            pair = tuple(v)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}") from None
        if len(pair) == 1:
            pair = (pair[0], pair[0])
        if len(pair) != 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in pair):
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return int(pair[0]), int(pair[1])


def _validate_conv(op: str, x, weight, stride, padding, dilation, groups,
                   xn: str = "x") -> Tuple[str, Tuple[int, int, int, int]]:
    """Checks x/weight/geometry (``xn``: x's name in the messages); returns (x's layout, output shape)."""
    check_activation(op, xn, x)
    layout = check_layout(op, xn, x)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-D (Cout, Cin/groups, KH, KW) tensor, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of {xn} ({x.dtype}), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight must be on {xn}'s device ({x.device}), got {weight.device}")
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    dh, dw = _pair(op, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    N, Cin, H, W = x.shape
    Cout, Cin_g, KH, KW = weight.shape
    if Cin < 1:
        raise ValueError(f"{op}: {xn} must have at least one channel, got shape {tuple(x.shape)}")
    if Cin % groups != 0 or Cout % groups != 0:
        raise ValueError(f"{op}: groups={groups} must divide {xn}'s channels ({Cin}) and weight's output "
                         f"channels ({Cout})")
    if Cin_g * groups != Cin:
        raise ValueError(f"{op}: weight.shape[1] must be {xn}'s channels / groups = {Cin // groups}, got weight shape "
                         f"{tuple(weight.shape)} for {xn} shape {tuple(x.shape)}")
    if KH < 1 or KW < 1:
        raise ValueError(f"{op}: weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: {xn}'s spatial size {(H, W)} with padding {(ph, pw)} is smaller than the "
                         f"{KH}x{KW} kernel (dilation {(dh, dw)}): no output pixel")
    return layout, (N, Cout, OH, OW)


def _validate_epilogue(x, weight, scale, bias, residual, stride, padding, dilation, groups):
    op = OP_EPILOGUE
    layout, shape = _validate_conv(op, x, weight, stride, padding, dilation, groups)
    Cout = shape[1]
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None:
            check_channel_vector(op, name, t, Cout, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{op}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"{op}: residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual must be on x's device ({x.device}), got {residual.device}")
        if not same_order(x, layout, residual):
            want = "NCHW-contiguous" if layout == "nchw" else "channels_last"
            raise ValueError(f"{op}: residual must have the output's memory layout ({want}, like x), got strides "
                             f"{residual.stride()} for shape {tuple(residual.shape)}")
    return layout, shape


def _dense_weight(w: Tensor) -> Tensor:
    return w if layout_of(w) is not None else w.contiguous()


def _dense_strides(shape, layout: str) -> Tuple[int, ...]:
    N, C, H, W = shape
    return (C * H * W, H * W, W, 1) if layout == "nchw" else (H * W * C, 1, W * C, C)


def _new_out(shape, x: Tensor, layout: str) -> Tensor:
    return _alloc._fill(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_FORMATS[layout]))


class ConvCall:
    """One validated conv2d_epilogue / conv2d_stats call, as the registry and the measured 'auto'
    see it (resnet_kernels/_tune.py). Launcher contract: resnet_kernels/backends/torch_conv2d.py."""

    def __init__(self, op, x, weight, scale, bias, residual, stride, padding, dilation, groups, relu, compute_stats,
                 layout, shape):
        self.op = op
        self.x, self.weight, self.scale, self.bias, self.residual = x, _dense_weight(weight), scale, bias, residual
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.relu, self.compute_stats = int(groups), bool(relu), bool(compute_stats)
        self.layout, self.shape = layout, tuple(shape)
        self.allow_tf32 = x.dtype == torch.float32 and cudnn_conv_tf32_enabled()
        self.device = x.device

    def key(self) -> str:
        flags = "".join("1" if t is not None else "0" for t in (self.scale, self.bias, self.residual))
        return (f"x{tuple(self.x.shape)}|{self.layout}|{self.x.dtype}|w{tuple(self.weight.shape)}|s{self.stride}"
                f"|p{self.padding}|d{self.dilation}|g{self.groups}|{flags}|relu{int(self.relu)}"
                f"|tf32{int(self.allow_tf32)}")

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {str(self.x.dtype).replace('torch.', '')} {self.layout}, weight "
                f"{tuple(self.weight.shape)}, stride {self.stride}, padding {self.padding}")

    def run(self, impl, fresh: bool = True):
        """Fresh outputs: (out,) or (out, mean, var)."""
        out = None if impl.returns_output else _new_out(self.shape, self.x, self.layout)
        res = impl.load()(self.x, self.weight, self.scale, self.bias, self.residual, out, self.stride, self.padding,
                          self.relu, self.compute_stats, self.allow_tf32, dilation=self.dilation, groups=self.groups)
        return self._finish(impl, out, res)

    def _finish(self, impl, out, res):
        """(out,) or (out, mean, var) from a launcher's result (``run``; also ops/conv2d_bn.py)."""
        if impl.returns_output:
            out, res = res
            if out.stride() != _dense_strides(self.shape, self.layout) or out.dtype != self.x.dtype:
                # the op's outputs have x's layout (its fake says so): copy the rare ambiguous case
                dense = _new_out(self.shape, self.x, self.layout)
                dense.copy_(out)
                out = dense
        if not self.compute_stats:
            return (out,)
        if not (isinstance(res, tuple) and len(res) == 2):
            raise RuntimeError(f"{self.op}: the {impl.backend} implementation returned {type(res).__name__}, "
                               f"expected (mean, var)")
        acc = acc_dtype(self.x.dtype)
        Cout = self.shape[1]
        mean, var = res
        for what, t in (("mean", mean), ("var", var)):
            if tuple(t.shape) != (Cout,) or t.dtype != acc:
                raise RuntimeError(f"{self.op}: the {impl.backend} implementation returned {what} of shape "
                                   f"{tuple(t.shape)} and dtype {t.dtype}, expected ({Cout},) {acc}")
        mean = mean.contiguous()
        var = var.contiguous()
        if var.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr():
            var = var.clone()  # op outputs must not alias each other
        return out, mean, var

    def compare(self, got, ref):
        rtol = verify_rtol(self.x.dtype, self.allow_tf32)
        err = mismatch("out", got[0], ref[0], rtol)
        if err is None and self.compute_stats:
            spread = float((ref[2].float().clamp_min(0).sqrt() + ref[1].float().abs()).max())
            err = (mismatch("mean", got[1], ref[1], rtol, scale=spread)
                   or mismatch("var", got[2], ref[2], 2 * rtol))
        return err


# --------------------------------------------------------------------------------------------
# conv2d_epilogue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_kernels::conv2d_epilogue", mutates_args=())
def conv2d_epilogue_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
                       residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                       groups: int, relu: bool, backend: str) -> Tensor:
    layout, shape = _validate_epilogue(x, weight, scale, bias, residual, stride, padding, dilation, groups)
    acc = acc_dtype(x.dtype)
    call = ConvCall(OP_EPILOGUE, x, weight, channel_vector(scale, acc), channel_vector(bias, acc), residual, stride,
                    padding, dilation, groups, relu, False, layout, shape)
    if math.prod(shape) == 0:
        # an explicit backend is still checked, so an unusable one always raises
        _tune.check_requested(OP_EPILOGUE, backend, call)
        return _new_out(shape, x, layout)
    return _tune.dispatch(OP_EPILOGUE, backend, call)[0]


@conv2d_epilogue_op.register_fake
def _(x, weight, scale, bias, residual, stride, padding, dilation, groups, relu, backend):
    layout, shape = _validate_epilogue(x, weight, scale, bias, residual, stride, padding, dilation, groups)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_FORMATS[layout])


# the operator's C entry behind torch.ops.aten.convolution_backward.default (what OpOverload.__call__
# calls), without that Python frame; the overload where a torch version has no such attribute
_convolution_backward = getattr(torch.ops.aten.convolution_backward.default, "_op",
                                torch.ops.aten.convolution_backward.default)


def _conv_input_grads(ctx, grad_y: Optional[Tensor], x: Tensor, weight: Tensor, need_x: bool, need_w: bool):
    if not (need_x or need_w) or grad_y is None:
        return None, None
    gx, gw, _ = _convolution_backward(grad_y, x, weight, None, ctx.stride, ctx.padding, ctx.dilation, False, [0, 0],
                                      ctx.groups, [need_x, need_w, False])
    return (gx if need_x else None), (gw if need_w else None)


def _epilogue_setup_context(ctx, inputs, output):
    x, weight, scale, bias, residual, stride, padding, dilation, groups, relu, backend = inputs
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups
    ctx.relu = relu
    ctx.has_scale, ctx.has_bias = scale is not None, bias is not None
    ctx.dtypes = (scale.dtype if scale is not None else None, bias.dtype if bias is not None else None)
    need_scale = scale is not None and scale.requires_grad
    # convolution_backward wants both x and weight (like PyTorch's own conv, which saves both).
    keep = x.requires_grad or weight.requires_grad or need_scale
    ctx.save_for_backward(x if keep else None, weight if keep else None, scale, output if relu else None)


def _epilogue_backward(ctx, grad):
    x, weight, scale, out = ctx.saved_tensors
    nx, nw, ns, nb, nr = ctx.needs_input_grad[:5]
    if out is not None:
        grad = in_layout_of(grad, out)
        g = torch.where(out > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    else:
        g = grad
    acc = acc_dtype(g.dtype)
    grad_residual = g if nr else None
    grad_bias = g.sum((0, 2, 3), dtype=acc).to(ctx.dtypes[1]) if (nb and ctx.has_bias) else None
    grad_scale = None
    if ns and ctx.has_scale:
        y = conv_acc(x, weight, ctx.stride, ctx.padding, ctx.dilation, ctx.groups, cudnn_conv_tf32_enabled())
        grad_scale = (g.to(acc) * y).sum((0, 2, 3)).to(ctx.dtypes[0])
    grad_x = grad_w = None
    if nx or nw:
        if scale is not None:
            C = g.shape[1]
            gy = (g.to(acc) * scale.to(acc).view(1, C, 1, 1)).to(g.dtype)
        else:
            gy = g
        grad_x, grad_w = _conv_input_grads(ctx, in_layout_of(gy, x), x, weight, bool(nx), bool(nw))
    return grad_x, grad_w, grad_scale, grad_bias, grad_residual, None, None, None, None, None, None


conv2d_epilogue_op.register_autograd(_epilogue_backward, setup_context=_epilogue_setup_context)
_conv2d_epilogue = Eager(conv2d_epilogue_op, _epilogue_setup_context, _epilogue_backward)


# --------------------------------------------------------------------------------------------
# conv2d_stats
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_kernels::conv2d_stats", mutates_args=())
def conv2d_stats_op(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                    groups: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    layout, shape = _validate_conv(OP_STATS, x, weight, stride, padding, dilation, groups)
    acc = acc_dtype(x.dtype)
    call = ConvCall(OP_STATS, x, weight, None, None, None, stride, padding, dilation, groups, False, True, layout,
                    shape)
    if math.prod(shape) == 0:
        _tune.check_requested(OP_STATS, backend, call)
        # Statistics of an empty batch are undefined (torch.var_mean gives NaN too).
        nan = torch.full((shape[1],), float("nan"), dtype=acc, device=x.device)
        return _new_out(shape, x, layout), nan, nan.clone()
    return _tune.dispatch(OP_STATS, backend, call)


@conv2d_stats_op.register_fake
def _(x, weight, stride, padding, dilation, groups, backend):
    layout, shape = _validate_conv(OP_STATS, x, weight, stride, padding, dilation, groups)
    acc = acc_dtype(x.dtype)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_FORMATS[layout])
    return y, x.new_empty((shape[1],), dtype=acc), x.new_empty((shape[1],), dtype=acc)


def _stats_setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups, backend = inputs
    y, mean, _ = output
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups
    ctx.backend = backend
    # unused outputs get None, not zeros: mean/var consumed by batch_norm_act (whose backward covers
    # the path through the statistics) need no statistics pass here
    ctx.set_materialize_grads(False)
    keep = x.requires_grad or weight.requires_grad
    ctx.save_for_backward(x if keep else None, weight if keep else None, y, mean)


def _stats_backward(ctx, g_y, g_mean, g_var):
    x, weight, y, mean = ctx.saved_tensors
    nx, nw = ctx.needs_input_grad[:2]
    if not (nx or nw):
        return None, None, None, None, None, None, None
    if g_mean is None and g_var is None:
        if g_y is None:
            return None, None, None, None, None, None, None
        grad_x, grad_w = _conv_input_grads(ctx, in_layout_of(g_y.to(y.dtype), x), x, weight, bool(nx), bool(nw))
        return grad_x, grad_w, None, None, None, None, None
    acc = acc_dtype(y.dtype)
    N, C, OH, OW = y.shape
    m = N * OH * OW
    # g_total = g_y + g_mean[c] / m + g_var[c] * 2 (y - mean[c]) / m
    #         = g_y * 1 + (g_mean/m - b*mean)[c] + y * b[c],   b = 2 g_var / m
    # which is exactly one fused bn_add_relu pass (x = g_y, shift, identity = y, identity_scale = b,
    # no ReLU): computed in fp32 per element and rounded once, on the same backend as the forward.
    zeros = torch.zeros(C, dtype=acc, device=y.device)
    gm = zeros if g_mean is None else g_mean.to(acc)
    b = zeros if g_var is None else (g_var.to(acc) * 2) / m  # (t * 2) / m keeps m symbolic-friendly
    shift = gm / m - b * mean.to(acc)
    if g_y is None:
        g_y = torch.zeros_like(y)
    g_y = in_layout_of(g_y.to(y.dtype), y)
    if y.numel() == 0:
        # (empty, but keeps the statistics' gradients in the traced graph: under torch.compile a
        # process with an empty batch must trace the same dependencies as the others, which order
        # the fused SyncBatchNorm's backward all_reduces; see nn/_sync.py)
        gy = g_y + (shift.view(1, -1, 1, 1) * 0).to(g_y.dtype)
    else:
        gy = bn_add_relu_eager(g_y, None, shift, y, b, None, False, ctx.backend)
    grad_x, grad_w = _conv_input_grads(ctx, in_layout_of(gy, x), x, weight, bool(nx), bool(nw))
    return grad_x, grad_w, None, None, None, None, None


conv2d_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)
_conv2d_stats = Eager(conv2d_stats_op, _stats_setup_context, _stats_backward)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
IntOrPair = Union[int, Sequence[int]]


def conv2d_epilogue(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                    dilation: IntOrPair = 1, groups: int = 1, relu: bool = False,
                    backend: Optional[str] = None) -> Tensor:
    """act(conv2d(x, weight) * scale[k] + bias[k] + residual), one pass, fp32 epilogue.

    x: (N, Cin, H, W) float32/float16/bfloat16/float64, NCHW-contiguous or channels_last; weight:
    (Cout, Cin/groups, KH, KW), x's dtype and device. scale/bias: (Cout,) per-channel (float32 or
    x's dtype), None = 1 / 0. residual: None or the output's shape, dtype and layout (the output
    has x's layout). Zero padding only (pad the input yourself for other modes). backend: None
    (the one in force), 'auto', 'cuda', 'triton' or 'torch'.
    """
    op = OP_EPILOGUE
    check_tensor_args(op, ("scale", "bias", "residual"), x=x, weight=weight, scale=scale, bias=bias, residual=residual)
    return _conv2d_epilogue(x, weight, scale, bias, residual, list(_pair(op, "stride", stride, 1)),
                              list(_pair(op, "padding", padding, 0)), list(_pair(op, "dilation", dilation, 1)),
                              groups, check_bool(op, "relu", relu), _backend.op_arg(backend))


def conv2d_stats(x: Tensor, weight: Tensor, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, groups: int = 1, backend: Optional[str] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv2d(x, weight) in x's dtype and layout, and the per-channel mean and
    biased variance of y over N*OH*OW from the fp32 (float64 for float64) accumulators."""
    op = OP_STATS
    check_tensor_args(op, (), x=x, weight=weight)
    return _conv2d_stats(x, weight, list(_pair(op, "stride", stride, 1)), list(_pair(op, "padding", padding, 0)),
                           list(_pair(op, "dilation", dilation, 1)), groups, _backend.op_arg(backend))


__all__ = ["conv2d_epilogue", "conv2d_stats"]
