"""Plain PyTorch implementations: the test oracle and the CPU fallback.

Computes in the accumulation dtype (float32, or float64 for float64 activations) and rounds
once at the end, like the fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype


def _per_channel(v: Tensor, C: int, inner: int) -> Tensor:
    # NCHW (inner = H*W): broadcast over (C, 1, 1); channels_last (inner = 1): same logical view.
    return v.view(1, C, 1, 1)


def bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner) -> None:
    acc = scale.dtype if scale is not None else acc_dtype(x.dtype)
    y = x.to(acc)
    if scale is not None:
        y = y * _per_channel(scale, C, inner)
    if shift is not None:
        y = y + _per_channel(shift, C, inner)
    if identity is not None:
        r = identity.to(acc)
        if id_scale is not None:
            r = r * _per_channel(id_scale, C, inner)
        if id_shift is not None:
            r = r + _per_channel(id_shift, C, inner)
        y = y + r
    if relu:
        y = torch.relu(y)
    out.copy_(y)


def bn_add_relu_backward(grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity, grad_scale,
                         grad_shift, grad_id_scale, relu, C, inner) -> None:
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out > 0, g, torch.zeros((), dtype=acc, device=g.device))
    dims = (0, 2, 3)
    if grad_x is not None:
        grad_x.copy_(g * _per_channel(scale, C, inner) if scale is not None else g)
    if grad_identity is not None:
        grad_identity.copy_(g * _per_channel(id_scale, C, inner) if id_scale is not None else g)
    if grad_scale is not None:
        grad_scale.copy_((g * x.to(acc)).sum(dims))
    if grad_shift is not None:
        grad_shift.copy_(g.sum(dims))
    if grad_id_scale is not None:
        grad_id_scale.copy_((g * identity.to(acc)).sum(dims))
