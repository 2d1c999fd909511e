"""CUDA implementations: thin wrappers (one file per op: ``cuda_<op>.py``) turning tensors
into the torch-free ``_C`` API (device pointers, sizes, dtype codes, torch's current stream)."""

from __future__ import annotations

import importlib

# launcher name -> module resnet_kernels.backends.cuda_<op> that defines it
_LAUNCHERS = {
    "bn_add_relu_forward": "cuda_bn_add_relu",
    "bn_add_relu_backward": "cuda_bn_add_relu",
    "conv2d_forward": "cuda_conv2d",
}


def __getattr__(name: str):
    try:
        mod = _LAUNCHERS[name]
    except KeyError:
        raise AttributeError(f"the cuda backend has no launcher {name!r}") from None
    return getattr(importlib.import_module(f"resnet_kernels.backends.{mod}"), name)
