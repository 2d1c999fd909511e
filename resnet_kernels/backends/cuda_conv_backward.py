"""conv2d_backward (resnet_kernels/ops/conv_backward.py) on the cuda backend: csrc's elementwise
and BatchNorm kernels around cuDNN's dgrad and wgrad (``aten.convolution_backward``, as the cuda
backend's other convolution backwards). The separate-pass variant of the fused backward: the
operand dy is materialised once in the activation dtype, then both convolutions read it.
Contract: ``backends/torch_conv_backward.py``.

Kernels per call:
* operand, with coef: ``bn_add_relu`` forward with x = g, scale = A, shift = K mean - B,
  identity = y, id_scale = -K (dy = A g + (K mean - B) - K y, 1 pass, one rounding), preceded by one
  ``bn_add_relu`` backward pass (g * (mask > 0), exact) when a mask is given; without coef: that
  masking pass or nothing (dy = g);
* ``aten.convolution_backward``: cuDNN dgrad and/or wgrad;
* epilogue: the residual (masked by one ``bn_add_relu`` backward pass when res_mask is given) added
  by one ``bn_add_relu`` forward pass (x = gx, identity = residual); with upstream reductions
  ``batch_norm_act_backward``'s reduce + finalize (relu: out = x, y = up_y: sum_g and
  sum_g (up_y - up_mean), the parameter gradients), one masking pass writing grad_x, and the
  coefficients (A, B, K) from those sums by 4 tiny per-channel ops.
"""

from __future__ import annotations

import torch

from .._bits import is_bits, unpack
from .._checks import acc_dtype
from .cuda_batch_norm import batch_norm_act_backward
from .cuda_bn_add_relu import bn_add_relu_backward, bn_add_relu_forward
from .torch_conv_backward import _tf32, upstream_input


def _inner(t) -> int:
    return 1 if (t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()) else t.shape[2] * t.shape[3]


def _masked(g, mask):
    """g * (mask > 0) in g's dtype (one csrc pass, exact). A 1-bit mask (resnet_kernels/_bits.py) is
    unpacked by torch ops and applied by torch.where instead (the csrc pass reads an activation)."""
    if is_bits(mask):
        return torch.where(unpack(mask, g), g, torch.zeros((), dtype=g.dtype, device=g.device))
    out = torch.empty_like(g)
    bn_add_relu_backward(g, mask, None, None, None, None, out, None, None, None, None, True, g.shape[1], _inner(g))
    return out


def _operand(g, mask, y, mean, coef):
    if coef is None:
        return g if mask is None else _masked(g, mask)
    a, b, k = coef[0], coef[1], coef[2]
    x = g if mask is None else _masked(g, mask)  # exact (no scale: the one rounding is dy's)
    dy = torch.empty_like(g)
    bn_add_relu_forward(x, a, (k * mean - b).contiguous(), y, (-k).contiguous(), None, dy, False, g.shape[1],
                        _inner(g))
    return dy


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    if x is None:  # recomputed from the upstream unit (the contract's ``upstream_input``: torch ops, counted)
        x = upstream_input(up_y, up_mean, up_var, up_weight, up_bias, up_eps)
    dy = _operand(g, mask, y, mean, coef)
    with _tf32(allow_tf32):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [grad_x is not None, grad_weight is not None, False])
    if grad_weight is not None:
        grad_weight.copy_(gw)
    if grad_x is None:
        return
    C, inner = x.shape[1], _inner(x)
    if residual is not None:
        r = residual if res_mask is None else _masked(residual, res_mask)
        summed = grad_x if up_y is None else torch.empty_like(gx)
        bn_add_relu_forward(gx, None, None, r, None, None, summed, False, C, inner)
        gx = summed
    if up_y is None:
        if residual is None:
            grad_x.copy_(gx)
        return
    acc = acc_dtype(g.dtype)
    sum_g = torch.empty((C,), dtype=acc, device=g.device)
    sum_gd_inv = torch.empty((C,), dtype=acc, device=g.device)  # sum_g (up_y - up_mean) * invstd
    batch_norm_act_backward(gx, x, up_y, up_mean, up_var, None, None, None, None, None, None, None, sum_gd_inv, sum_g,
                            None, None, up_eps, 0.0, True, C, inner)
    bn_add_relu_backward(gx, x, None, None, None, None, grad_x, None, None, None, None, True, C, inner)
    m = gx.numel() // C
    invstd = torch.rsqrt(up_var + up_eps)
    a = invstd if up_weight is None else up_weight.to(acc) * invstd
    up_coef[0].copy_(a)
    up_coef[1].copy_(a * sum_g / m)
    up_coef[2].copy_(a * invstd * sum_gd_inv / m)
    if up_grad_weight is not None:
        up_grad_weight.copy_(sum_gd_inv)
    if up_grad_bias is not None:
        up_grad_bias.copy_(sum_g)
