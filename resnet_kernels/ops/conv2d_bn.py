"""The next convolution of a training unit with the previous unit's BatchNorm + ReLU in its operand
prologue, defined once with ``torch.library``:

    conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, stride, padding) = (y, mean_out, var_out)
        = conv2d_stats(h, weight, stride, padding),  h = relu(batch_norm(y_prev; mean, var, bn_weight, bn_bias, eps))

``mean``/``var`` are y_prev's batch statistics (biased variance, e.g. from the previous
``conv2d_stats``); bn_weight/bn_bias may be None (1 / 0). Per input channel c, in the accumulation
dtype: scale = bn_weight[c] * rsqrt(var[c] + eps), h = relu((y_prev - mean[c]) * scale + bn_bias[c])
(what ``batch_norm_act`` computes), rounded to y_prev's dtype **exactly as ``batch_norm_act`` of the
same backend rounds its output** before the convolution consumes it; then the convolution's zero
padding applies to h (an out-of-bounds tap is 0, not relu(shift)). So the result is the two-op path
``conv2d_stats(batch_norm_act(y_prev, ..., relu=True), weight)`` of the same backend: bitwise for
torch and aten (they materialise h with that backend's batch_norm_act launcher, then run its
conv2d_stats launcher), for cuda, whose csrc conv kernel computes h in its A-operand prologue with
the very function csrc's batch_norm_act forward uses (csrc/bn_affine.cuh, the product rounded on its
own: no FMA contraction), and for triton, whose conv kernel computes h in its A-tile prologue with the
operations of triton's batch_norm_act kernel in the same order, bitwise under the interpreter (tested)
and on a GPU up to the compiler contracting (y - mean) * scale + bias into an FMA differently in the
two kernels (h then differs by at most one rounding of h's dtype in some elements: the same
distribution).

The triton and cuda implementations never write h (their cost: conv2d_stats' with the (Cin,) vectors
read; cuda up to Cp = 1536 input channels, beyond which it materialises h first); aten materialises
it (counted: its batch_norm_act passes plus the convolution).
dilation 1, groups 1; float64 on torch and aten. Used inside the training block's forward
(``resnet_kernels/_block.py``), whose own backward computes the gradients: not differentiable, like
``batch_norm_act_bits``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend, _tune
from .._checks import acc_dtype, check_tensor_args
from .._eager import Eager
from .batch_norm import _check_float, _param, _stat, check_bn_vectors
from .conv2d import _FORMATS, ConvCall, _new_out, _pair, _validate_conv
from ._nodiff import register_not_differentiable

OP = "conv2d_bn_stats"


def _validate(y_prev, mean, var, bn_weight, bn_bias, weight, stride, padding):
    layout, shape = _validate_conv(OP, y_prev, weight, stride, padding, (1, 1), 1, xn="y_prev")
    check_bn_vectors(OP, "y_prev", y_prev, mean, var, bn_weight, bn_bias, "bn_weight", "bn_bias")
    return layout, shape


class BnConvCall(ConvCall):
    """One validated conv2d_bn_stats call: a conv2d_stats ConvCall of (y_prev, weight) (``x`` is
    y_prev: the same bytes read) plus the BN's (Cin,) vectors and eps."""

    def __init__(self, y_prev, mean, var, bn_weight, bn_bias, eps, weight, stride, padding, layout, shape):
        super().__init__(OP, y_prev, weight, None, None, None, stride, padding, (1, 1), 1, False, True, layout, shape)
        self.mean, self.var, self.bn_weight, self.bn_bias, self.eps = mean, var, bn_weight, bn_bias, float(eps)

    def bn_vectors(self):
        return (self.mean, self.var, self.bn_weight, self.bn_bias)

    def key(self) -> str:
        flags = "".join("1" if t is not None else "0" for t in (self.bn_weight, self.bn_bias))
        pdt = str(self.bn_weight.dtype if self.bn_weight is not None else None).replace("torch.", "")
        return super().key() + f"|bn{flags}|p{pdt}"

    def describe(self) -> str:
        return "y_prev" + super().describe()[1:] + " (BN + ReLU prologue)"

    def run(self, impl, fresh: bool = True):
        """Fresh outputs (out, mean, var)."""
        out = None if impl.returns_output else _new_out(self.shape, self.x, self.layout)
        res = impl.load()(self.x, self.mean, self.var, self.bn_weight, self.bn_bias, self.eps, self.weight, out,
                          self.stride, self.padding, self.allow_tf32)
        return self._finish(impl, out, res)


def bn_conv_call(y_prev, mean, var, bn_weight, bn_bias, eps, weight, stride, padding) -> BnConvCall:
    """The validated call of the op's arguments (also what the accountant costs)."""
    layout, shape = _validate(y_prev, mean, var, bn_weight, bn_bias, weight, stride, padding)
    return BnConvCall(y_prev, _stat(mean, y_prev), _stat(var, y_prev), _param(bn_weight, y_prev),
                      _param(bn_bias, y_prev), eps, weight, stride, padding, layout, shape)


@torch.library.custom_op("resnet_kernels::conv2d_bn_stats", mutates_args=())
def conv2d_bn_stats_op(y_prev: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], eps: float, weight: Tensor, stride: List[int], padding: List[int],
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    call = bn_conv_call(y_prev, mean, var, bn_weight, bn_bias, eps, weight, stride, padding)
    shape = call.shape
    if math.prod(shape) == 0:
        _tune.check_requested(OP, backend, call)
        # as conv2d_stats: statistics of an empty batch are undefined (NaN)
        nan = torch.full((shape[1],), float("nan"), dtype=acc_dtype(y_prev.dtype), device=y_prev.device)
        return _new_out(shape, y_prev, call.layout), nan, nan.clone()
    return _tune.dispatch(OP, backend, call)


@conv2d_bn_stats_op.register_fake
def _(y_prev, mean, var, bn_weight, bn_bias, eps, weight, stride, padding, backend):
    layout, shape = _validate(y_prev, mean, var, bn_weight, bn_bias, weight, stride, padding)
    acc = acc_dtype(y_prev.dtype)
    y = torch.empty(shape, dtype=y_prev.dtype, device=y_prev.device, memory_format=_FORMATS[layout])
    return y, y_prev.new_empty((shape[1],), dtype=acc), y_prev.new_empty((shape[1],), dtype=acc)


register_not_differentiable(conv2d_bn_stats_op,
                            f"{OP} is not differentiable: it is a forward of the training block "
                            f"(resnet_kernels/_block.py), whose own backward computes the gradients")
_conv2d_bn_stats = Eager(conv2d_bn_stats_op)

CALLS = {OP: bn_conv_call}

IntOrPair = Union[int, Sequence[int]]


def conv2d_bn_stats(y_prev: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    weight: Tensor, *, eps: float = 1e-5, stride: IntOrPair = 1, padding: IntOrPair = 0,
                    backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean_out, var_out) = conv2d_stats(relu(batch_norm(y_prev)), weight): see the module
    docstring. y_prev (N, Cin, H, W) float32/float16/bfloat16/float64, NCHW-contiguous or
    channels_last; mean/var y_prev's batch statistics (Cin,); bn_weight/bn_bias (Cin,) or None;
    weight (Cout, Cin, KH, KW) in y_prev's dtype. y has y_prev's layout and dtype; mean_out/var_out
    (Cout,) in the accumulation dtype. Not differentiable."""
    check_tensor_args(OP, ("bn_weight", "bn_bias"), y_prev=y_prev, mean=mean, var=var, bn_weight=bn_weight,
                      bn_bias=bn_bias, weight=weight)
    tensors = (y_prev, mean, var, bn_weight, bn_bias, weight)
    args = (y_prev, mean, var, bn_weight, bn_bias, _check_float(OP, "eps", eps), weight,
            list(_pair(OP, "stride", stride, 1)), list(_pair(OP, "padding", padding, 0)), _backend.op_arg(backend))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # through the dispatcher: the op's autograd (a backward that raises) is attached to the outputs
        return conv2d_bn_stats_op(*args)
    return _conv2d_bn_stats(*args)


__all__ = ["conv2d_bn_stats", "BnConvCall", "bn_conv_call", "CALLS"]
