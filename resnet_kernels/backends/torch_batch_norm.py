"""Plain PyTorch implementations of the training-mode BatchNorm ops (resnet_kernels/ops/batch_norm.py):
the test oracle and the CPU fallback; the same code is the 'aten' implementation (PyTorch's own
native elementwise and reduction kernels).

These launchers are also the **contract** the cuda and triton launchers follow (same arguments,
same outputs). Per channel c, with m = N*H*W elements per channel, acc the accumulation dtype
(float32, float64 for float64 activations), all math in acc and every output rounded once:

forward ``batch_norm_act_forward``
    invstd = 1 / sqrt(var[c] + eps);  scale = weight[c] * invstd (weight None: 1);
    shift = bias[c] - mean[c] * scale (bias None: 0)
    R = identity * id_scale + id_shift   (id_scale/id_shift likewise from id_mean, id_var, id_weight,
                                          id_bias, id_eps) when id_mean is given,
      = identity                         when identity is given without id_mean,
      = 0                                without identity
    out = act(y * scale + shift + R)   (act = ReLU when relu else identity)

backward ``batch_norm_act_backward``
    g = grad_out * (out > 0) when relu else grad_out    (the masked gradient)
    sum_g = sum(g);  sum_gd = sum(g * (y - mean[c]))                          (over N, H, W)
    grad_bias = sum_g;  grad_weight = sum_gd * invstd
    grad_y = weight * invstd * (g - sum_g / m - (y - mean) * invstd^2 * sum_gd / m)
           = A * g - (B + K * (y - mean))   with the per-channel coefficients
      A = weight * invstd (weight None: invstd),  B = A * (sum_g / m),  K = A * invstd^2 * (sum_gd / m)
    the identity side the same with its own statistics when id_mean is given
    (grad_id_bias = sum_g, grad_id_weight = sum(g * (identity - id_mean)) * id_invstd), else
    grad_identity = g.  Every gradient output may be None (not needed); given ones are written.
    The per-channel sums are reductions in a fixed order (deterministic) in every implementation.

coefficients ``batch_norm_act_coef`` (the reduce + finalize half of the backward)
    the same sums; writes coef (3, C) acc = rows (A, B, K) of y's BN and, when id_mean is given,
    id_coef (3, C) = those of the identity's BN (None otherwise), and the parameter gradients as the
    backward does; grad_y / grad_identity are not computed.

running statistics ``bn_running_update`` (and ``batch_norm_act_forward``'s ``running``: the same
updates after the forward, one launch with it where the implementation can)
    running_mean = (1 - factor) * running_mean + factor * mean
    running_var  = (1 - factor) * running_var + factor * var * unbias
    num_batches_tracked += 1 (when given)
    computed in acc and rounded once to the buffers' dtype, in place.

Tensors: activations (y, identity, out, grad_out, grad_y, grad_identity) are (N, C, H, W), all in
one layout (NCHW-contiguous, or channels_last), one dtype; ``inner`` is H*W for NCHW and 1 for
channels_last, so element i's channel is (i // inner) % C. mean/var/id_mean/id_var are (C,)
contiguous in acc; weight/bias/id_weight/id_bias are (C,) contiguous in acc or the activation dtype;
grad_weight/grad_bias/grad_id_weight/grad_id_bias have their parameter's dtype. Nothing is empty
(the op layer returns early for empty batches).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._bits import as_mask, pack
from .._checks import acc_dtype

_DIMS = (0, 2, 3)


def _vec(v: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if v is None else v.to(acc).view(1, -1, 1, 1)


def _affine(mean, var, weight, bias, eps, acc) -> Tuple[Tensor, Tensor, Tensor]:
    """(invstd, scale, shift) as (1, C, 1, 1) tensors in acc."""
    invstd = torch.rsqrt(_vec(var, acc) + eps)
    scale = invstd if weight is None else _vec(weight, acc) * invstd
    shift = -_vec(mean, acc) * scale
    if bias is not None:
        shift = shift + _vec(bias, acc)
    return invstd, scale, shift


def batch_norm_act_forward(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, out,
                           eps, id_eps, relu, C, inner, mask_bits=None, running=None) -> None:
    """``mask_bits`` (optional): the 1-bit mask of out > 0 (resnet_kernels/_bits.py), of the rounded out.
    ``running`` (optional, batch_norm_act_bits): ``bn_running_update``'s updates, applied after."""
    acc = acc_dtype(y.dtype)
    _, scale, shift = _affine(mean, var, weight, bias, eps, acc)
    z = y.to(acc) * scale + shift
    if identity is not None:
        r = identity.to(acc)
        if id_mean is not None:
            _, r_scale, r_shift = _affine(id_mean, id_var, id_weight, id_bias, id_eps, acc)
            r = r * r_scale + r_shift
        z = z + r
    if relu:
        z = torch.relu(z)
    out.copy_(z)
    if mask_bits is not None:
        pack(out, out=mask_bits)
    if running:
        bn_running_update(running)


def coefficients(coef, var, weight, eps, mean_g, mean_gd, acc=None) -> Tuple[Tensor, Tensor, Tensor]:
    """The input gradient's per-channel coefficients (A, B, K) = (weight * invstd, A * mean_g,
    A * invstd^2 * mean_gd) as (C,) tensors in acc (mean_g = sum_g / m, mean_gd = sum_gd / m),
    also written to the rows of ``coef`` (3, C) when given."""
    acc = acc or mean_g.dtype
    invstd = torch.rsqrt(var.to(acc) + eps)
    a = invstd if weight is None else weight.to(acc) * invstd
    b = a * mean_g
    k = a * (invstd * invstd) * mean_gd
    if coef is not None:
        for row, v in zip(coef, (a, b, k)):
            row.copy_(v)
    return a, b, k


def _masked_grad(grad_out, out, relu, acc) -> Tensor:
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out > 0, g, torch.zeros((), dtype=acc, device=g.device))
    return g


def _bn_side(g, x, mean, var, weight, eps, acc, sum_g, m, grad_x, grad_weight, grad_bias, coef=None) -> None:
    """One BN's backward given the masked gradient g and its sum: the parameter gradients, the
    coefficients (into coef when given) and grad_x = A * g - (B + K * (x - mean))."""
    d = x.to(acc) - _vec(mean, acc)
    sum_gd = (g * d).sum(_DIMS)
    if grad_bias is not None:
        grad_bias.copy_(sum_g)
    if grad_weight is not None:
        grad_weight.copy_(sum_gd * torch.rsqrt(var.to(acc) + eps))
    if grad_x is not None or coef is not None:
        a, b, k = coefficients(coef, var, weight, eps, sum_g / m, sum_gd / m, acc)
        if grad_x is not None:
            grad_x.copy_(a.view(1, -1, 1, 1) * g - (b.view(1, -1, 1, 1) + k.view(1, -1, 1, 1) * d))


def _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_y, grad_identity,
              grad_weight, grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C, coef=None,
              id_coef=None) -> None:
    acc = acc_dtype(grad_out.dtype)
    g = _masked_grad(grad_out, out, relu, acc)
    m = grad_out.numel() // C
    sum_g = g.sum(_DIMS)
    if grad_y is not None or grad_weight is not None or grad_bias is not None or coef is not None:
        _bn_side(g, y, mean, var, weight, eps, acc, sum_g, m, grad_y, grad_weight, grad_bias, coef)
    if identity is None:
        return
    if id_mean is None:
        if grad_identity is not None:
            grad_identity.copy_(g)
        return
    if grad_identity is not None or grad_id_weight is not None or grad_id_bias is not None or id_coef is not None:
        _bn_side(g, identity, id_mean, id_var, id_weight, id_eps, acc, sum_g, m, grad_identity, grad_id_weight,
                 grad_id_bias, id_coef)


def batch_norm_act_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight,
                            grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias,
                            eps, id_eps, relu, C, inner) -> None:
    _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_y, grad_identity,
              grad_weight, grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C)


def batch_norm_act_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, coef, id_coef,
                        grad_weight, grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C, inner) -> None:
    """``out`` may be the 1-bit mask of the output (resnet_kernels/_bits.py): unpacked first."""
    out = as_mask(out, grad_out) if relu else out
    _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, None, None, grad_weight,
              grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C, coef, id_coef)


def bn_running_update(updates) -> None:
    """``updates``: (mean, var, running_mean, running_var, num_batches_tracked, factor, unbias) per
    BatchNorm (resnet_kernels/ops/batch_norm.py ``RunningUpdate``), applied one after the other."""
    for mean, var, running_mean, running_var, num_batches_tracked, factor, unbias in updates:
        if running_mean is not None:
            acc = acc_dtype(running_mean.dtype)
            running_mean.copy_(running_mean.to(acc) * (1.0 - factor) + mean.to(acc) * factor)
        if running_var is not None:
            acc = acc_dtype(running_var.dtype)
            running_var.copy_(running_var.to(acc) * (1.0 - factor) + var.to(acc) * (factor * unbias))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
