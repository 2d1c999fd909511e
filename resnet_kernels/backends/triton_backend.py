"""Triton implementations (kernels and launchers live in ``triton_ops/``, installed as
``resnet_kernels.triton_ops``). Imported only when the triton backend is used."""

from __future__ import annotations

from ..triton_ops.bn_add_relu import bn_add_relu_backward, bn_add_relu_forward  # noqa: F401
