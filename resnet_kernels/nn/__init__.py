"""Fused modules, drop-in for the unfused PyTorch layers."""

from .conv_bn import ConvBN, ConvBNReLU
from .pool import MaxPool2d
from .residual import AddReLU, BNAddReLU

__all__ = ["AddReLU", "BNAddReLU", "ConvBN", "ConvBNReLU", "MaxPool2d"]
