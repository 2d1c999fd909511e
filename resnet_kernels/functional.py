"""Functional fused ResNet units that take the *existing* ``nn.Conv2d`` / ``nn.BatchNorm2d``
modules (so parameters, buffers and ``state_dict`` stay the user's own):

    conv_bn_act(x, conv, bn, relu=True, residual=None)
        = act(bn(conv(x)) + residual)
    conv_bn_add_act(x, conv, bn, shortcut_input, shortcut_conv=None, shortcut_bn=None, relu=True)
        = act(bn(conv(x)) + shortcut_bn(shortcut_conv(shortcut_input)))   (or + shortcut_input)

Both follow the module's ``train()``/``eval()`` mode exactly like the unfused layers (batch
statistics and running-statistics updates in training, running statistics in eval).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .nn._bn import bn_scale_shift
from .ops.bn_add_relu import bn_add_relu


def _check_pair(fn: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{fn}: conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"{fn}: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"{fn}: bn.num_features ({bn.num_features}) != conv.out_channels ({conv.out_channels})")


def _conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    # nn.Conv2d's own forward: handles padding modes, dilation, groups, bias.
    return conv(x)


def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool = True,
                residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """act(bn(conv(x)) + residual), with bn in its current train/eval mode."""
    _check_pair("conv_bn_act", conv, bn)
    y = _conv(x, conv)
    scale, shift = bn_scale_shift(bn, y)
    return bn_add_relu(y, scale, shift, residual, relu=relu, backend=backend)


def conv_bn_add_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, shortcut_input: Tensor,
                    shortcut_conv: Optional[nn.Conv2d] = None, shortcut_bn: Optional[nn.BatchNorm2d] = None, *,
                    relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """act(bn(conv(x)) + shortcut), shortcut = shortcut_bn(shortcut_conv(shortcut_input)) when a
    projection is given, else shortcut_input. Both BNs, the add and the ReLU run in one pass."""
    _check_pair("conv_bn_add_act", conv, bn)
    if (shortcut_conv is None) != (shortcut_bn is None):
        raise ValueError("conv_bn_add_act: give both shortcut_conv and shortcut_bn, or neither")
    y = _conv(x, conv)
    scale, shift = bn_scale_shift(bn, y)
    if shortcut_conv is None:
        return bn_add_relu(y, scale, shift, shortcut_input, relu=relu, backend=backend)
    _check_pair("conv_bn_add_act (shortcut)", shortcut_conv, shortcut_bn)
    r = _conv(shortcut_input, shortcut_conv)
    r_scale, r_shift = bn_scale_shift(shortcut_bn, r)
    return bn_add_relu(y, scale, shift, r, r_scale, r_shift, relu=relu, backend=backend)


__all__ = ["conv_bn_act", "conv_bn_add_act"]
