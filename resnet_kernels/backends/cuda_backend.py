"""CUDA implementations: thin wrappers (one file per op: ``cuda_<op>.py``) turning tensors
into the torch-free ``_C`` API (device pointers, sizes, dtype codes, torch's current stream)."""

from __future__ import annotations

from . import lazy_launchers

# launcher name -> module resnet_kernels.backends.cuda_<op> that defines it
_LAUNCHERS = {
    "bn_add_relu_forward": "cuda_bn_add_relu",
    "bn_add_relu_backward": "cuda_bn_add_relu",
    "conv2d_forward": "cuda_conv2d",
}

__getattr__ = lazy_launchers("cuda", "resnet_kernels.backends", _LAUNCHERS)
