"""The ``aten`` residual epilogue: PyTorch's native elementwise and reduction ops, arranged for
few passes (``addcmul`` into the output, in-place ReLU, reductions with an fp32 accumulator).
Computes in the accumulation dtype and rounds once, like the kernels; what 'auto' uses on CPU
tensors, and a measured candidate on a GPU. Launcher contract: ``torch_bn_add_relu.py``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype


def _v(t, C):
    return None if t is None else t.view(1, C, 1, 1)


def bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner) -> None:
    acc = acc_dtype(x.dtype)
    s, b, si, bi = _v(scale, C), _v(shift, C), _v(id_scale, C), _v(id_shift, C)
    # fp32 (fp64) math: written straight into out when out has the accumulation dtype, else into
    # an fp32 temporary rounded once at the end
    dst = out if out.dtype == acc else torch.empty_like(out, dtype=acc)
    if s is not None and b is not None:
        torch.addcmul(b, x, s, out=dst)
    elif s is not None:
        torch.mul(x, s, out=dst)
    elif b is not None:
        torch.add(x, b, out=dst)
    else:
        dst.copy_(x)
    if identity is not None:
        if si is not None:
            dst.addcmul_(identity, si)
        else:
            dst.add_(identity)
        if bi is not None:
            dst.add_(bi)
    if relu:
        dst.relu_()
    if dst is not out:
        out.copy_(dst)


def bn_add_relu_backward(grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity, grad_scale,
                         grad_shift, grad_id_scale, relu, C, inner) -> None:
    acc = acc_dtype(grad_out.dtype)
    g = grad_out
    if relu:
        g = torch.where(out > 0, grad_out, 0.0)  # the mask of the reference: out > 0
    dims = (0, 2, 3)
    for dst, s in ((grad_x, scale), (grad_identity, id_scale)):
        if dst is None:
            continue
        if s is None:
            dst.copy_(g)
        elif dst.dtype == acc:
            torch.mul(g, _v(s, C), out=dst)
        else:
            dst.copy_(g * _v(s, C))  # fp32 product, rounded once
    if grad_shift is not None:
        torch.sum(g, dims, dtype=acc, out=grad_shift)
    if grad_scale is not None:
        grad_scale.copy_(_dot(g, x, acc))
    if grad_id_scale is not None:
        grad_id_scale.copy_(_dot(g, identity, acc))


def _dot(g: Tensor, t: Tensor, acc) -> Tensor:
    """sum over (N, H, W) of g * t per channel, products and sums in the accumulation dtype."""
    if g.dtype == acc:
        return (g * t).sum((0, 2, 3))
    return (g.to(acc) * t.to(acc)).sum((0, 2, 3))
