"""Triton implementations (kernels and launchers live in ``triton_ops/``, one file per fused
op, installed as ``resnet_kernels.triton_ops``). Imported only when the triton backend runs."""

from __future__ import annotations

from . import lazy_launchers

# launcher name -> module in triton_ops that defines it
_LAUNCHERS = {
    "bn_add_relu_forward": "bn_add_relu",
    "bn_add_relu_backward": "bn_add_relu",
    "conv2d_forward": "conv2d",
}

__getattr__ = lazy_launchers("triton", "resnet_kernels.triton_ops", _LAUNCHERS)
