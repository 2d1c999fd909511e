"""conv2d_backward (resnet_kernels/ops/conv_backward.py) on PyTorch's own kernels: the BN-backward
operand dy materialised once in the activation dtype by elementwise ops, one
``aten.convolution_backward`` for both gradients (cuDNN's dgrad and wgrad on a GPU), the epilogue
(residual sum, the upstream ReLU mask and BN reductions) by elementwise ops and reductions. What
'auto' falls back to, and what it measures the fused kernels against. Contract:
``backends/torch_conv_backward.py`` (this follows it with the convolution in the activation dtype
instead of the accumulation dtype, as cuDNN computes it).

Launches per call (the accountant's declaration, ``_aten_conv_bwd_cost``): the operand: where (with
a mask), addcmul + addcmul_ (with coef: dy = A g' + (K mean - B) - K y, in acc) and the cast to the
activation dtype, plus 3 tiny per-channel ops for (K mean - B); convolution_backward (1 kernel per
gradient); the epilogue: add (residual; where for res_mask), where (upstream mask), the two
per-channel sums (sum g, sum g (up_y - up_mean): sub, mul, two reductions) and ~8 per-channel ops.
"""

from __future__ import annotations

import torch

from .._bits import as_mask
from .._checks import acc_dtype
from .torch_conv_backward import _col, _tf32, upstream_input, upstream_outputs

_DIMS = (0, 2, 3)


def _zero(t):
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _operand(g, mask, y, mean, coef):
    if mask is not None:
        g = torch.where(mask > 0, g, _zero(g))
    if coef is None:
        return g
    acc = acc_dtype(g.dtype)
    a, b, k = (_col(coef[i], acc) for i in range(3))
    c0 = k * _col(mean, acc) - b  # (1, C, 1, 1)
    dy = torch.addcmul(c0, g, a)  # acc (type promotion: g in its own dtype is read once)
    dy.addcmul_(y, k, value=-1.0)
    return dy.to(g.dtype)


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    if x is None:  # recomputed from the upstream unit (the contract's ``upstream_input``: torch ops, counted)
        x = upstream_input(up_y, up_mean, up_var, up_weight, up_bias, up_eps)
    # a 1-bit mask / res_mask (resnet_kernels/_bits.py) unpacked first (extra ops, counted)
    mask, res_mask = as_mask(mask, g), (as_mask(res_mask, x) if grad_x is not None else None)
    dy = _operand(g, mask, y, mean, coef)
    with _tf32(allow_tf32):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [grad_x is not None, grad_weight is not None, False])
    if grad_weight is not None:
        grad_weight.copy_(gw)
    if grad_x is None:
        return
    if residual is not None:
        r = residual if res_mask is None else torch.where(res_mask > 0, residual, _zero(residual))
        gx = gx + r  # (in the activation dtype, as autograd's accumulate would)
    if up_y is not None:
        gx = torch.where(x > 0, gx, _zero(gx))
    grad_x.copy_(gx)
    if up_y is None:
        return
    acc = acc_dtype(g.dtype)
    sum_g = grad_x.sum(_DIMS, dtype=acc)
    sum_gd = (grad_x * (up_y - _col(up_mean, acc))).sum(_DIMS)
    upstream_outputs(sum_g, sum_gd, grad_x.numel() // grad_x.shape[1], up_var, up_weight, up_eps, up_coef,
                     up_grad_weight, up_grad_bias)
