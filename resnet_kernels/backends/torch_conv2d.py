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

This torch launcher additionally takes keyword ``dilation`` and ``groups``: the ``nn.Conv2d``
configurations the kernels do not implement are routed here.

Numerics, like the kernels: the convolution runs in the accumulation dtype (float32; float64 for
float64 inputs) on operands upcast exactly from float16/bfloat16, so the products are exact and
the sums fp32; the epilogue runs in that dtype and the result is rounded once. On CUDA the
upcast float16/bfloat16 convolution may use TF32 tensor cores (it is exact for such operands:
TF32 holds every float16/bfloat16 value); float32 inputs use TF32 only when ``allow_tf32``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import acc_dtype


def cudnn_conv_tf32_enabled() -> bool:
    """Whether PyTorch's own (cuDNN) convolutions may use TF32 for float32 right now.

    Reads the per-operator setting (``torch.backends.cudnn.conv.fp32_precision``, falling back to
    the cuDNN-wide and the global ``fp32_precision`` when it is 'none', as ATen does) rather than
    the legacy ``torch.backends.cudnn.allow_tf32``, whose getter raises once the new API has given
    conv and RNN different settings (setting the legacy flag updates these too); the legacy flag
    is read only on torch versions without the new API."""
    try:
        levels = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                  torch.backends.fp32_precision)
    except AttributeError:
        return bool(torch.backends.cudnn.allow_tf32)
    for prec in levels:  # ATen's resolution order; 'none' everywhere means IEEE fp32
        if prec != "none":
            return prec == "tf32"
    return False


@contextlib.contextmanager
def _cudnn_tf32(enabled: bool) -> Iterator[None]:
    """Let cuDNN convolutions use TF32 (or not) for the duration; only touched when it differs."""
    if cudnn_conv_tf32_enabled() == enabled:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def conv_acc(x: Tensor, weight: Tensor, stride, padding, dilation=(1, 1), groups: int = 1,
             allow_tf32: bool = False) -> Tensor:
    """conv(x, weight) in the accumulation dtype (see the module docstring)."""
    acc = acc_dtype(x.dtype)
    xa, wa = x.to(acc), weight.to(acc)
    if x.device.type == "cuda" and acc == torch.float32:
        with _cudnn_tf32(allow_tf32 or x.dtype != torch.float32):
            return F.conv2d(xa, wa, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    return F.conv2d(xa, wa, None, tuple(stride), tuple(padding), tuple(dilation), groups)


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
