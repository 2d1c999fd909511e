"""Fused ops (each defined once with torch.library; backends in resnet_kernels.backends)."""

from .batch_norm import (batch_norm_act, batch_norm_act_bits, batch_norm_act_coef, bn_running_update,
                         bn_running_update_many)
from .bn_add_relu import add_relu, bn_add_relu
from .conv2d import conv2d_epilogue, conv2d_stats
from .conv2d_bn import conv2d_bn_stats
from .maxpool import max_pool2d
from .conv_backward import conv2d_backward
from . import _flops

_flops.register()  # FLOP formulas for torch.utils.flop_counter

__all__ = ["add_relu", "batch_norm_act", "batch_norm_act_bits", "batch_norm_act_coef", "bn_add_relu", "bn_running_update",
           "bn_running_update_many",
           "conv2d_backward",
           "conv2d_bn_stats", "conv2d_epilogue", "conv2d_stats", "max_pool2d"]
