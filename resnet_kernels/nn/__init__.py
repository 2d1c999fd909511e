"""Fused modules, drop-in for the unfused PyTorch layers."""

from .conv_bn import ConvBN, ConvBNReLU
from .residual import AddReLU, BNAddReLU

__all__ = ["AddReLU", "BNAddReLU", "ConvBN", "ConvBNReLU"]
