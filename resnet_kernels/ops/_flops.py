"""FLOP formulas for the ``resnet_kernels::`` ops (``torch.utils.flop_counter.FlopCounterMode``).

They follow PyTorch's own counting so a fused model counts the same FLOPs as the unfused one:
a convolution counts ``2 * N * Cout * OH * OW * (Cin / groups) * KH * KW`` (what the counter
gives ``aten.convolution``; its backward, ``aten.convolution_backward``, which the fused ops'
backward call, is counted by PyTorch itself), and elementwise work counts 0, as PyTorch counts
BatchNorm, add and ReLU. So:

* ``conv2d_epilogue``, ``conv2d_stats``, ``conv2d_bn_stats``: the convolution (of h for the
  last: its BN + ReLU prologue counts 0) (the fp32 epilogue: BN affine,
  residual add, ReLU, batch statistics: 0);
* ``conv2d_backward`` (the fused block backward): what PyTorch counts for the
  ``aten.convolution_backward`` it replaces, the convolution's FLOPs once per requested gradient
  (dgrad, wgrad); the BN-backward operand and the epilogue's sums: 0;
* ``bn_add_relu``, ``bn_add_relu_backward``, ``batch_norm_act_coef``, ``maxpool2d``,
  ``maxpool2d_backward``: 0 (registered, so the counter lists them).
"""

from __future__ import annotations

from math import prod

import torch

try:
    from torch.utils.flop_counter import register_flop_formula
except ImportError:  # pragma: no cover - torch without flop formulas for custom ops
    register_flop_formula = None


def _conv_flops(x_shape, w_shape, out_shape) -> int:
    # torch.utils.flop_counter.conv_flop_count for a non-transposed convolution
    N = x_shape[0]
    c_out, c_in_per_group, *kernel = w_shape
    return 2 * N * c_out * c_in_per_group * prod(out_shape[2:]) * prod(kernel)


def conv2d_epilogue_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, w_shape, out_shape)


def conv2d_stats_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, w_shape, out_shape[0])  # out: (y, mean, var)


def conv2d_backward_flop(g_shape, mask_shape, y_shape, mean_shape, coef_shape, x_shape, w_shape, stride, padding,
                         *args, out_shape=None, **kwargs) -> int:
    need_x, need_w = args[-5], args[-4]  # (..., need_x, need_weight, need_up_weight, need_up_bias, backend)
    if x_shape is None:  # x recomputed from up_y (args: residual, res_mask, up_y, ...): its shape
        x_shape = args[2]
    return (int(bool(need_x)) + int(bool(need_w))) * _conv_flops(x_shape, w_shape, g_shape)


def conv2d_bn_stats_flop(x_shape, mean_shape, var_shape, bnw_shape, bnb_shape, eps, w_shape, *args, out_shape=None,
                         **kwargs) -> int:
    return _conv_flops(x_shape, w_shape, out_shape[0])  # the convolution of h (the BN + ReLU prologue: 0)


def elementwise_flop(*args, out_shape=None, **kwargs) -> int:
    return 0


FORMULAS = {
    "conv2d_epilogue": conv2d_epilogue_flop,
    "conv2d_stats": conv2d_stats_flop,
    "bn_add_relu": elementwise_flop,
    "bn_add_relu_backward": elementwise_flop,
    "maxpool2d": elementwise_flop,  # PyTorch counts no FLOPs for max_pool2d either
    "maxpool2d_backward": elementwise_flop,
    "conv2d_backward": conv2d_backward_flop,
    "batch_norm_act_coef": elementwise_flop,
    "batch_norm_act_bits": elementwise_flop,
    "conv2d_bn_stats": conv2d_bn_stats_flop,
}


def register() -> None:
    if register_flop_formula is None:
        return
    from torch.utils.flop_counter import flop_registry

    for name, fn in FORMULAS.items():
        target = getattr(torch.ops.resnet_kernels, name)
        if target not in flop_registry:  # importing twice (reload) must not raise "duplicate"
            register_flop_formula(target)(fn)
