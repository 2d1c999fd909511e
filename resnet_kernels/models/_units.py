"""When a (conv, bn[, relu]) unit may run through the fused functional API.

A unit is fused only when the fused path computes exactly what the plain modules' forwards would:
plain ``nn.Conv2d`` (zero padding, no dilation, no groups) followed by a plain ``nn.BatchNorm2d``
or ``nn.SyncBatchNorm`` (exactly those classes; SyncBatchNorm's cross-process statistics are
reproduced, see nn/_sync.py) of matching width, on a 4-D input, with no module hooks that the
plain path would have fired. Anything else (dilation, grouped convolutions, other padding modes,
a custom ``norm_layer`` such as GroupNorm, hooks) runs the plain PyTorch modules for that unit,
so a model never breaks; it is just not fused there.
"""

from __future__ import annotations

from typing import Optional

import torch.fx
from torch import Tensor, nn


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def conv_reason(conv: nn.Module) -> Optional[str]:
    """None when ``conv`` can be fused, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if has_hooks(conv):
        return "the Conv2d has hooks"
    return None


def bn_reason(bn: nn.Module, conv: nn.Module) -> Optional[str]:
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"norm layer {type(bn).__name__} is not an nn.BatchNorm2d or nn.SyncBatchNorm"
    if isinstance(conv, nn.Conv2d) and bn.num_features != conv.out_channels:
        return f"{type(bn).__name__}({bn.num_features}) after a Conv2d with {conv.out_channels} output channels"
    if has_hooks(bn):
        return f"the {type(bn).__name__} has hooks"
    return None


def unit_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    return conv_reason(conv) or bn_reason(bn, conv)


def is_4d(x) -> bool:
    """x is a 4-D tensor. Under ``torch.fx`` symbolic tracing x is a Proxy whose rank is unknown:
    taken as 4-D, so the traced graph calls the fused functional ops (wrapped with
    ``torch.fx.wrap``), which check the real tensors when the graph runs."""
    if isinstance(x, torch.fx.Proxy):
        return True
    return isinstance(x, Tensor) and x.dim() == 4


_Conv2d, _BatchNorm2d = nn.Conv2d, nn.BatchNorm2d


def unit_ok(x: Tensor, conv: nn.Module, bn: nn.Module) -> bool:
    # the common case (a plain 4-D tensor, nn.Conv2d -> nn.BatchNorm2d without hooks) decided in one
    # expression: what is_4d and unit_reason check, in their order of conditions; anything else
    # takes them (once per unit per forward: this is on the fused models' hot path)
    if (type(x) is Tensor and type(conv) is _Conv2d and type(bn) is _BatchNorm2d and x.dim() == 4
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and type(conv.padding) is tuple and bn.num_features == conv.out_channels
            and not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks
                     or conv._backward_pre_hooks or bn._forward_hooks or bn._forward_pre_hooks
                     or bn._backward_hooks or bn._backward_pre_hooks)):
        return True
    return is_4d(x) and unit_reason(conv, bn) is None


def relu_ok(relu: nn.Module) -> bool:
    return type(relu) is nn.ReLU and not has_hooks(relu)


def projection_reason(downsample: Optional[nn.Module]) -> Optional[str]:
    """None when ``downsample`` is the torchvision projection ``Sequential(Conv2d 1x1, BatchNorm2d)``
    that conv_bn_add_act can apply itself."""
    if downsample is None:
        return "no projection"
    if type(downsample) is not nn.Sequential or len(downsample) != 2:
        return f"downsample is a {type(downsample).__name__}, not Sequential(Conv2d, BatchNorm2d)"
    if has_hooks(downsample):
        return "the downsample Sequential has hooks"
    return unit_reason(downsample[0], downsample[1])
