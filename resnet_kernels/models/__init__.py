"""torchvision-compatible ResNets built on the fused functional API, and ``fuse``/``unfuse`` to
convert existing models in place (see docs/MODELS.md)."""

from .fuse import FusedSequential, FuseReport, fuse, unfuse
from .resnet import (BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3, resnet18, resnet34, resnet50, resnet101,
                     resnet152)

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "conv1x1", "conv3x3", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152", "fuse", "unfuse", "FuseReport", "FusedSequential"]
