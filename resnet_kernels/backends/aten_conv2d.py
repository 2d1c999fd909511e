"""The ``aten`` convolution: PyTorch's own convolution (cuDNN on CUDA tensors, oneDNN/native on
CPU) in the activation dtype, exactly what ``nn.Conv2d`` runs, plus

* ``conv2d_epilogue``: the per-channel affine (folded BN), residual and ReLU applied to the
  convolution's output in place by the ``bn_add_relu`` op's implementation that 'auto' chooses
  (our fused kernels on a GPU), computed in fp32 and rounded once;
* ``conv2d_stats``: the per-channel batch mean and biased variance in one read pass of the output
  (``torch.batch_norm_update_stats`` without running buffers on CUDA and CPU: PyTorch's own
  batch-statistics kernels; ``torch.var_mean`` elsewhere; in the accumulation dtype).

The floor the measured 'auto' can always fall back to on a GPU, and what 'auto' uses on CPU
tensors. It allocates its output (``returns_output`` in the registry): an aten convolution has no
out= variant that avoids a copy. Launcher contract: ``resnet_kernels/backends/torch_conv2d.py``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import acc_dtype


def batch_mean_var(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of y over (N, H, W), in the accumulation dtype."""
    dt = y.dtype
    acc = acc_dtype(dt)
    if y.is_cuda:
        # PyTorch's own batch-statistics pass (batch_norm_mean_var, what its native CUDA batch norm
        # computes its statistics with; Welford, NCHW or channels_last) with no running buffers: mean
        # and biased variance in the accumulation dtype, one launch (batch_norm_stats gives invstd
        # instead, whose pow(-2) was a second launch and two more roundings)
        mean, var = torch.batch_norm_update_stats(y, None, None, 0.0)
        return (mean if mean.dtype == acc else mean.to(acc)), (var if var.dtype == acc else var.to(acc))
    ya = y if dt == acc else y.to(acc)
    if y.is_cpu:
        # PyTorch's CPU batch-norm statistics kernel (biased variance, one pass): 3-10x less time
        # than var_mean over (0, 2, 3) at ResNet's shapes (measured: batch 2, 64x8x8 177 -> 60 us,
        # 512x1x1 255 -> 21 us); the same edge cases (NaN, inf, a constant channel: var 0)
        return torch.batch_norm_update_stats(ya, None, None, 0.0)
    var, mean = torch.var_mean(ya, dim=(0, 2, 3), correction=0)
    return mean, var


def conv2d_forward(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32, *,
                   dilation=(1, 1), groups: int = 1):
    # allow_tf32 is PyTorch's own setting, which F.conv2d follows by itself
    y = F.conv2d(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    if compute_stats:
        mean, var = batch_mean_var(y)
        return y, (mean.contiguous(), var.contiguous())
    if scale is not None or bias is not None or residual is not None or relu:
        y = (_apply_in_place or _load_apply())(y, scale, bias, residual, relu)
    return y, None


_apply_in_place = None


def _load_apply():
    global _apply_in_place
    from ..ops.bn_add_relu import apply_in_place  # imported on first use (the op module imports the backends)
    _apply_in_place = apply_in_place
    return apply_in_place


def conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, out, stride, padding, allow_tf32):
    """``conv2d_bn_stats``: h materialised by aten_batch_norm.batch_norm_act_forward (native_batch_norm
    with the batch statistics, relu_), then ``conv2d_forward`` with statistics (returns_output:
    (out, (mean, var))). Contract: resnet_kernels/backends/torch_conv2d.py."""
    from .aten_batch_norm import batch_norm_act_forward
    from .torch_conv2d import _bn_geometry

    C, inner = _bn_geometry(y_prev)
    h = batch_norm_act_forward(y_prev, mean, var, bn_weight, bn_bias, None, None, None, None, None, None, eps, 0.0,
                               True, C, inner)
    return conv2d_forward(h, weight, None, None, None, None, stride, padding, False, True, allow_tf32)
