"""Fused ops (each defined once with torch.library; backends in resnet_kernels.backends)."""

from .bn_add_relu import add_relu, bn_add_relu

__all__ = ["add_relu", "bn_add_relu"]
