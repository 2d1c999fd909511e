"""Plain PyTorch implementations: the test oracle and the CPU fallback (one file per op:
``torch_<op>.py``)."""

from __future__ import annotations

from . import lazy_launchers

# launcher name -> module resnet_kernels.backends.torch_<op> that defines it
_LAUNCHERS = {
    "bn_add_relu_forward": "torch_bn_add_relu",
    "bn_add_relu_backward": "torch_bn_add_relu",
    "conv2d_forward": "torch_conv2d",
}

__getattr__ = lazy_launchers("torch", "resnet_kernels.backends", _LAUNCHERS)
