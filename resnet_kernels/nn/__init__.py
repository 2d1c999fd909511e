"""Fused modules, drop-in for the unfused PyTorch layers."""

from .residual import AddReLU, BNAddReLU

__all__ = ["AddReLU", "BNAddReLU"]
