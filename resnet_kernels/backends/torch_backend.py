"""Plain PyTorch implementations: the test oracle and the CPU fallback (one file per op:
``torch_<op>.py``)."""

from __future__ import annotations

import importlib

# launcher name -> module resnet_kernels.backends.torch_<op> that defines it
_LAUNCHERS = {
    "bn_add_relu_forward": "torch_bn_add_relu",
    "bn_add_relu_backward": "torch_bn_add_relu",
    "conv2d_forward": "torch_conv2d",
}


def __getattr__(name: str):
    try:
        mod = _LAUNCHERS[name]
    except KeyError:
        raise AttributeError(f"the torch backend has no launcher {name!r}") from None
    return getattr(importlib.import_module(f"resnet_kernels.backends.{mod}"), name)
