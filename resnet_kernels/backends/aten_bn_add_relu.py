"""The ``aten`` residual epilogue: PyTorch's native elementwise and reduction ops, arranged for
few passes (``addcmul`` into the output, in-place ReLU, reductions with an fp32 accumulator).
Computes in the accumulation dtype and rounds once, like the kernels; what 'auto' uses on CPU
tensors, and a measured candidate on a GPU. Launcher contract: ``torch_bn_add_relu.py``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype

_F32, _F64 = torch.float32, torch.float64


# what torch.backends.cudnn.enabled reads (that module property costs ~1 us a call)
_cudnn_enabled = torch._C._get_cudnn_enabled


def _v(t, C):
    return None if t is None else t.view(1, C, 1, 1)


_UNIT: dict = {}  # (C, dtype, device) -> (zeros, ones): the identity statistics of an eval batch_norm


def _unit_stats(C: int, dtype: torch.dtype, device: torch.device):
    key = (C, dtype, device)
    got = _UNIT.get(key)
    if got is None:
        got = _UNIT[key] = (torch.zeros(C, dtype=dtype, device=device), torch.ones(C, dtype=dtype, device=device))
    return got


def _add_identity(dst: Tensor, identity, si, bi) -> None:
    """dst += identity * id_scale + id_shift (in place, in dst's dtype)."""
    if identity is None:
        return
    if si is not None:
        dst.addcmul_(identity, si)
    else:
        dst.add_(identity)
    if bi is not None:
        dst.add_(bi)


def bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner):
    """Declared ``returns_output``: ``out`` is None and the result is returned (x's layout)."""
    dt = x.dtype
    acc = _F64 if dt is _F64 else _F32  # (acc_dtype, inline)
    if scale is not None and shift is not None and (identity is None or dt == acc):
        # x * scale + shift as PyTorch's eval-mode batch_norm with mean 0, variance 1, eps 0
        # (invstd is exactly 1, so its per-channel affine is exactly (scale, shift)): one native,
        # vectorised pass computed in fp32 and rounded once to x's dtype (mixed-dtype BN)
        stats = _UNIT.get((C, scale.dtype, x.device))
        zeros, ones = stats if stats is not None else _unit_stats(C, scale.dtype, x.device)
        y = torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, _cudnn_enabled())
        if identity is not None:  # y has the accumulation dtype here: no double rounding
            _add_identity(y, identity, _v(id_scale, C), _v(id_shift, C))
        return y.relu_() if relu else y
    si, bi = _v(id_scale, C), _v(id_shift, C)
    # fp32 (fp64) math in a temporary of the accumulation dtype, rounded once at the end
    s, b = _v(scale, C), _v(shift, C)
    dst = torch.empty_like(x, dtype=acc)
    if s is not None and b is not None:
        torch.addcmul(b, x, s, out=dst)
    elif s is not None:
        torch.mul(x, s, out=dst)
    elif b is not None:
        torch.add(x, b, out=dst)
    else:
        dst.copy_(x)
    _add_identity(dst, identity, si, bi)
    if relu:
        dst.relu_()
    return dst if dst.dtype == x.dtype else dst.to(x.dtype)


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
