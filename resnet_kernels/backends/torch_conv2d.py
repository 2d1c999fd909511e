"""Plain PyTorch convolution with the fused epilogue: the test oracle and the CPU fallback.

The launcher contract shared by every backend (torch here, ``triton_ops/conv2d.py``,
``backends/cuda_conv2d.py``); the op layer (``ops/conv2d.py``) validates everything first::

    conv2d_forward(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32)
      x        (N, Cin, H, W) float32/float16/bfloat16 (float64: torch only), NCHW-contiguous or
               channels_last
      weight   (Cout, Cin, KH, KW), x's dtype, any dense layout (re-laid out by the launcher)
      scale, bias   (Cout,) float32 (float64 for float64 x) or None (= 1 / = 0)
      residual None or (N, Cout, OH, OW), x's dtype, out's memory layout
      out      (N, Cout, OH, OW) preallocated in x's memory layout; N*OH*OW > 0
      stride, padding  (int, int); zero padding, dilation 1, groups 1
      computes out = act(conv(x, weight) * scale[k] + bias[k] + residual) in an fp32 epilogue
      (act = ReLU if relu), written once; returns None, or with compute_stats (then scale, bias,
      residual are None and relu False) the per-channel (mean, biased var) of conv(x, weight) over
      N*OH*OW from the fp32 accumulators, float32 (Cout,) tensors, computed deterministically.
      allow_tf32: fp32 inputs may use TF32 (exactly when PyTorch's cuDNN convolution would).

Every launcher also takes keyword ``dilation`` and ``groups`` (the registry's ``supports`` keeps the
calls a kernel does not implement away from it); ``returns_output`` implementations (see
``resnet_kernels/_registry.py``) get ``out=None`` and return ``(out, stats)``.

Numerics, like the kernels: the convolution runs in the accumulation dtype (float32; float64 for
float64 inputs) on operands upcast exactly from float16/bfloat16, so the products are exact and
the sums fp32; the epilogue runs in that dtype and the result is rounded once. On CUDA the
upcast float16/bfloat16 convolution may use TF32 tensor cores (it is exact for such operands:
TF32 holds every float16/bfloat16 value); float32 inputs use TF32 only when ``allow_tf32``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._numerics import conv_acc


def conv2d_forward(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], out: Tensor, stride, padding, relu: bool, compute_stats: bool,
                   allow_tf32: bool, *, dilation=(1, 1), groups: int = 1) -> Optional[Tuple[Tensor, Tensor]]:
    y = conv_acc(x, weight, stride, padding, dilation, groups, allow_tf32)
    stats = None
    if compute_stats:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        stats = (mean.contiguous(), var.contiguous())
    C = y.shape[1]
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, C, 1, 1)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, C, 1, 1)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if relu:
        y = torch.relu(y)
    out.copy_(y)
    return stats


def _bn_geometry(y: Tensor):
    """(C, inner) of batch_norm_act's launchers for a dense NCHW or channels_last tensor."""
    N, C, H, W = y.shape
    # (a tensor both NCHW-contiguous and channels_last has C == 1 or H*W == 1: either inner works)
    return C, (H * W if y.is_contiguous() else 1)


def conv2d_bn_stats(y_prev: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    eps: float, weight: Tensor, out: Tensor, stride, padding, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    """``conv2d_bn_stats`` (resnet_kernels/ops/conv2d_bn.py), the launcher contract of every backend::

        conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, out, stride, padding, allow_tf32)
          y_prev   (N, Cin, H, W) as conv2d_forward's x; mean, var (Cin,) contiguous in the accumulation
                   dtype (y_prev's batch statistics, biased variance); bn_weight, bn_bias None (= 1 / = 0)
                   or (Cin,) contiguous in the accumulation dtype or y_prev's dtype; eps a float
          computes h = relu(bn(y_prev)) exactly as batch_norm_act's launcher of the same backend
          (rounded to y_prev's dtype), then out = conv2d(h, weight) (zero padding of h) and returns
          its per-channel (mean, biased var) as conv2d_forward with compute_stats.

    Reference: h materialised by torch_batch_norm.batch_norm_act_forward, then conv2d_forward."""
    from .torch_batch_norm import batch_norm_act_forward

    h = torch.empty_like(y_prev)
    C, inner = _bn_geometry(y_prev)
    batch_norm_act_forward(y_prev, mean, var, bn_weight, bn_bias, None, None, None, None, None, h, eps, 0.0, True,
                           C, inner)
    return conv2d_forward(h, weight, None, None, None, out, stride, padding, False, True, allow_tf32)
