"""Plain PyTorch implementations of the fused convolution-backward ops
(``resnet_kernels/ops/conv_backward.py``): the test oracle and the CPU fallback; the same code is the
'aten' implementation (PyTorch's elementwise kernels around ``aten.convolution_backward``, i.e.
cuDNN's dgrad and wgrad on a GPU, with the BN-backward operand materialised once).

These launchers are the **contract** every other implementation follows (same arguments, same
outputs). Notation: a convolution x (N, Cin, H, W) -> y (N, Cout, OH, OW) with weight
(Cout, Cin, KH, KW), zero padding, dilation 1, groups 1; acc the accumulation dtype (float32, or
float64 for float64 activations); every output rounded once.

The gradient operand (both ops), per output element of channel c (``bn_dy``):

    g'  = g * (mask > 0)              when mask is given (the ReLU of a BN(-add)-ReLU tail, whose
                                      saved output is the mask), else g
    dy  = A[c] * g' - (B[c] + K[c] * (y - mean[c]))   when coef (3, Cout) is given (the BN backward
                                      of the unit whose convolution this is: coef rows (A, B, K) as
                                      written by ``batch_norm_act_coef``/``conv2d_dgrad``'s upstream
                                      finalize), else dy = g'
    computed in acc, rounded to the activation dtype: the operand a cuDNN dgrad/wgrad would read.

``conv2d_dgrad`` -> grad_x (N, Cin, H, W), x's layout and dtype:

    gx  = sum over (co, kh, kw) of dy[n, co, oh, ow] * weight[co, ci, kh, kw]
          (oh*sh - ph + kh = h, ow*sw - pw + kw = w), accumulated in acc (tf32 where allow_tf32)
    gx += residual * (res_mask > 0 when res_mask is given)     (residual given: the other branch's
                                      gradient of the block input, summed here, not by autograd)
    gx  = gx * (up_out > 0)           when up_out is given: the upstream unit's ReLU (up_out is its
                                      saved output, i.e. this convolution's input x)
    grad_x = round(gx)
    upstream BN-backward reductions (up_out given; from the rounded grad_x, per input channel ci,
    over N, H, W; m = N*H*W):
        sum_g = sum(grad_x), sum_gd = sum(grad_x * (up_y - up_mean[ci]))
        invstd = 1/sqrt(up_var + up_eps); A = up_weight * invstd (up_weight None: invstd)
        up_coef = (A, A * sum_g / m, A * invstd^2 * sum_gd / m)   (3, Cin) acc
        up_grad_weight = sum_gd * invstd, up_grad_bias = sum_g    (each optional)
    i.e. the upstream unit's whole BN backward except its own operand, which its own dgrad/wgrad
    compute on the fly from grad_x, up_y and up_coef.

``conv2d_wgrad`` -> grad_weight (Cout, Cin, KH, KW), weight's dtype:

    gw[co, ci, kh, kw] = sum over (n, oh, ow) of dy[n, co, oh, ow] * x[n, ci, oh*sh - ph + kh, ow*sw - pw + kw]
    accumulated in acc (tf32 where allow_tf32), rounded once. Reductions in a fixed order in every
    implementation (deterministic).

x None (the op's ``x = None`` with up_y given: the forward convolved the upstream unit's output
without writing it): x is that output recomputed (``upstream_input``), per element of channel ci

    s   = up_weight[ci] * rsqrt(up_var[ci] + up_eps)    (up_weight None: 1)
    t   = up_bias[ci] - up_mean[ci] * s                 (up_bias None: 0)
    x   = round(relu(up_y * s + t))                     in acc, rounded to the activation dtype

exactly what ``batch_norm_act`` (backends/torch_batch_norm.py, relu, no identity) writes; then
everything above reads that x (the wgrad's input, the dgrad's upstream mask up_out = x).

mask and res_mask may also be 1-bit masks (``resnet_kernels/_bits.py``: uint8 (N, H, W, ceil(C/8)),
bit c % 8 = the activation > 0), which mean the same.

Tensors: g, mask, y, residual, res_mask, up_out, up_y are dense (NCHW-contiguous or channels_last;
g, mask, y share one layout, the x-side tensors x's); mean/up_mean/up_var (C,) acc; coef (3, Cout)
acc; up_weight (Cin,) acc or activation dtype; up_coef (3, Cin) acc, up_grad_weight/up_grad_bias
(Cin,) in up_weight's dtype (float32 when up_weight is None). Nothing is empty (the op layer returns
early).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._bits import as_mask
from .._checks import acc_dtype
from .torch_batch_norm import batch_norm_act_forward, coefficients

_DIMS = (0, 2, 3)


def _col(v: Tensor, acc: torch.dtype) -> Tensor:
    return v.to(acc).view(1, -1, 1, 1)


def bn_dy(g: Tensor, mask: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor], coef: Optional[Tensor],
          acc: torch.dtype) -> Tensor:
    """The gradient operand dy in acc (not rounded)."""
    gp = g.to(acc)
    if mask is not None:
        mask = as_mask(mask, g)  # a 1-bit mask (resnet_kernels/_bits.py) unpacked
        gp = torch.where(mask > 0, gp, torch.zeros((), dtype=acc, device=g.device))
    if coef is None:
        return gp
    a, b, k = (_col(coef[i], acc) for i in range(3))
    return a * gp - (b + k * (y.to(acc) - _col(mean, acc)))


def _operand(g, mask, y, mean, coef):
    acc = acc_dtype(g.dtype)
    return bn_dy(g, mask, y, mean, coef, acc).to(g.dtype), acc


def _tf32(allow_tf32: bool):
    """cuDNN's TF32 switch for the duration (the 'aten' implementation on a GPU)."""
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=bool(allow_tf32))


def conv2d_dgrad(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, up_out, up_y, up_mean,
                 up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                 conv_dtype: Optional[torch.dtype] = None) -> None:
    dy, acc = _operand(g, mask, y, mean, coef)
    cd = conv_dtype or acc  # the reference convolves in acc; 'aten' in the activation dtype (cuDNN)
    with _tf32(allow_tf32):
        gx = torch.nn.grad.conv2d_input(tuple(grad_x.shape), weight.to(cd), dy.to(cd), stride=tuple(stride),
                                        padding=tuple(padding)).to(acc)
    if residual is not None:
        r = residual.to(acc)
        if res_mask is not None:
            r = torch.where(as_mask(res_mask, r) > 0, r, torch.zeros((), dtype=acc, device=r.device))
        gx = gx + r
    if up_out is not None:
        gx = torch.where(up_out > 0, gx, torch.zeros((), dtype=acc, device=gx.device))
    grad_x.copy_(gx)
    if up_out is None:
        return
    gr = grad_x.to(acc)
    sum_g = gr.sum(_DIMS)
    sum_gd = (gr * (up_y.to(acc) - _col(up_mean, acc))).sum(_DIMS)
    upstream_outputs(sum_g, sum_gd, gr.numel() // gr.shape[1], up_var, up_weight, up_eps, up_coef, up_grad_weight,
                     up_grad_bias)


def upstream_outputs(sum_g, sum_gd, m, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias) -> None:
    """The upstream unit's BN-backward outputs from its two per-channel sums (batch_norm_act_backward's
    finalize: ``torch_batch_norm.coefficients``): up_coef rows (A, B, K), up_grad_weight = sum_gd *
    invstd, up_grad_bias = sum_g."""
    coefficients(up_coef, up_var, up_weight, up_eps, sum_g / m, sum_gd / m)
    if up_grad_weight is not None:
        up_grad_weight.copy_(sum_gd * torch.rsqrt(up_var.to(sum_gd.dtype) + up_eps))
    if up_grad_bias is not None:
        up_grad_bias.copy_(sum_g)


def conv2d_wgrad(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32, *,
                 conv_dtype: Optional[torch.dtype] = None) -> None:
    dy, acc = _operand(g, mask, y, mean, coef)
    cd = conv_dtype or acc
    with _tf32(allow_tf32):
        gw = torch.nn.grad.conv2d_weight(x.to(cd), tuple(grad_weight.shape), dy.to(cd), stride=tuple(stride),
                                         padding=tuple(padding))
    grad_weight.copy_(gw)


def upstream_input(up_y: Tensor, up_mean: Tensor, up_var: Tensor, up_weight: Optional[Tensor],
                   up_bias: Optional[Tensor], up_eps: float) -> Tensor:
    """x recomputed from the upstream unit (x None): round(relu(up_y * s + t)) in up_y's dtype and
    layout, s = up_weight * rsqrt(up_var + up_eps), t = up_bias - up_mean * s, in acc: the
    reference ``batch_norm_act_forward`` itself (relu, no identity), so bitwise what it writes."""
    h = torch.empty_like(up_y)
    batch_norm_act_forward(up_y, up_mean, up_var, up_weight, up_bias, None, None, None, None, None, h, up_eps, 0.0,
                           True, up_y.shape[1], 0)
    return h


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    """The op's launcher (resnet_kernels/ops/conv_backward.py): ``conv2d_dgrad`` into grad_x (with
    the upstream reductions, x being the upstream unit's output, when up_y is given) and
    ``conv2d_wgrad`` into grad_weight; None outputs are not computed. A 1-bit mask / res_mask
    (resnet_kernels/_bits.py) is unpacked once first (extra ops: counted by the aten cost). x None:
    recomputed from up_y first (``upstream_input``)."""
    if x is None:
        x = upstream_input(up_y, up_mean, up_var, up_weight, up_bias, up_eps)
    mask, res_mask = as_mask(mask, g), as_mask(res_mask, x)
    if grad_weight is not None:
        conv2d_wgrad(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32)
    if grad_x is not None:
        up = up_y is not None
        conv2d_dgrad(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, x if up else None,
                     up_y, up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32)
