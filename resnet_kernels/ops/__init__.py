"""Fused ops (each defined once with torch.library; backends in resnet_kernels.backends)."""

from .bn_add_relu import add_relu, bn_add_relu
from .conv2d import conv2d_epilogue, conv2d_stats
from .maxpool import max_pool2d
from . import _flops

_flops.register()  # FLOP formulas for torch.utils.flop_counter

__all__ = ["add_relu", "bn_add_relu", "conv2d_epilogue", "conv2d_stats", "max_pool2d"]
