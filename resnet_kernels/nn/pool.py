"""``MaxPool2d``: drop-in ``nn.MaxPool2d`` on :func:`resnet_kernels.ops.max_pool2d` (a one-byte
argmax saved for the backward instead of PyTorch's int64 indices), and the helpers the fused
ResNets use to route their stem's ``maxpool`` through the same op; :func:`head_pool`, their
``avgpool`` + ``flatten`` with a backward that writes the gradient in the input's memory layout.

A pooling layer runs the op only when the op computes exactly what ``nn.MaxPool2d`` would
(:func:`pool_reason`): dilation 1, ``ceil_mode=False``, ``return_indices=False``, a window of at
most 256 elements, padding at most half the window, a 4-D input, no module hooks. Otherwise, and
with ``backend='auto'`` on CPU (meta) tensors, where 'auto' runs the user's own layers
(``resnet_kernels/_tune.py``: ``plain_layers``), it is ``nn.MaxPool2d``'s own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn

from .. import _backend, _tune
from .._script import no_script
from ..ops.maxpool import MAX_WINDOW, max_pool2d


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def config_reason(m: nn.MaxPool2d) -> Optional[str]:
    """None when the op covers this nn.MaxPool2d's settings, else why not."""
    k, p = _pair(m.kernel_size), _pair(m.padding)
    if _pair(m.dilation) != (1, 1):
        return f"dilation {m.dilation}"
    if m.ceil_mode:
        return "ceil_mode=True"
    if m.return_indices:
        return "return_indices=True (the op saves a one-byte argmax, not int64 indices)"
    if len(k) != 2 or k[0] * k[1] > MAX_WINDOW:
        return f"kernel_size {m.kernel_size} (the op takes windows of at most {MAX_WINDOW} elements)"
    if len(p) != 2 or p[0] > k[0] // 2 or p[1] > k[1] // 2:
        return f"padding {m.padding} larger than half of kernel_size {m.kernel_size}"
    return None


def pool_reason(m: nn.Module) -> Optional[str]:
    """None when ``m`` can run through the op (what ``fuse`` reports for a ResNet's ``maxpool``)."""
    if type(m) not in (nn.MaxPool2d, MaxPool2d):
        return f"{type(m).__name__} is not an nn.MaxPool2d"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return "the MaxPool2d has hooks"
    return config_reason(m)


def _pool(x: Tensor, m: nn.MaxPool2d, backend: Optional[str]) -> Tensor:
    """``m(x)`` for a covered nn.MaxPool2d ``m`` (``config_reason(m)`` is None), through the op."""
    if isinstance(x, torch.fx.Proxy):
        # torch.fx symbolic tracing: one node calling this function (m as a get_attr node), so the
        # traced graph still runs the op
        return x.tracer.create_proxy("call_function", _pool, (x, m, backend), {})
    if not (isinstance(x, Tensor) and x.dim() == 4) or _tune.plain_layers(x, _backend.op_arg(backend), "maxpool2d"):
        return nn.MaxPool2d.forward(m, x)
    return max_pool2d(x, m.kernel_size, m.stride, m.padding, backend=backend)


def stem_pool(m: nn.Module, x: Tensor, backend: Optional[str]) -> Tensor:
    """A fused ResNet's ``maxpool``: through the op when :func:`pool_reason` allows, else the
    module itself (a MaxPool2d of this package runs with its own backend)."""
    if type(m) is MaxPool2d or pool_reason(m) is not None:
        return m(x)
    return _pool(x, m, backend)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, same results and gradients) whose forward runs
    :func:`resnet_kernels.ops.max_pool2d`: the backward reads a one-byte argmax instead of
    PyTorch's int64 indices. Settings the op does not cover (dilation, ``ceil_mode``,
    ``return_indices``, see :func:`config_reason`) and 'auto' on CPU tensors run
    ``nn.MaxPool2d.forward``. ``backend``: None (the one in force), 'auto' or a backend name."""

    backend: Optional[str] = None

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False, backend: Optional[str] = None):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        from .conv_bn import _check_backend

        self.backend = _check_backend("MaxPool2d", backend)

    def forward(self, x: Tensor) -> Tensor:
        if config_reason(self) is not None:
            return super().forward(x)
        return _pool(x, self, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    __prepare_scriptable__ = no_script


__all__ = ["MaxPool2d", "pool_reason", "config_reason", "stem_pool", "head_pool"]


class _MeanHW(torch.autograd.Function):
    """``flatten(adaptive_avg_pool2d(x, 1), 1)`` = x.mean((H, W)) -> (N, C): the forward is the
    reduction aten's pool runs for a (1, 1) output (``x.mean((-1, -2), keepdim=True)``), the same
    values. The backward is aten's (grad / (H * W), broadcast over H, W: the same values, bitwise) in
    one kernel whose output has x's memory layout: for a channels_last x it divides a (N, 1, 1, C)
    broadcast into a dense (N, H, W, C) tensor, returned as the (N, C, H, W) channels_last view of
    it. aten's pool instead records an ``as_strided_`` view on a channels_last x (its backward:
    new_zeros + copy_) and returns an NCHW gradient, which the last residual block's backward
    (``_block._BlockFn``: every consumer of its incoming gradient takes the layout of its
    activations) had to copy into channels_last (counted: 3 launches and 0.10 GB of a ResNet-50
    training step at batch 256, bf16)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = tuple(x.shape)
        ctx.cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return x.mean((-1, -2))

    @staticmethod
    def backward(ctx, g):
        N, C, H, W = ctx.shape
        if ctx.cl:
            return g.reshape(N, 1, 1, C).expand(N, H, W, C).div(H * W).permute(0, 3, 1, 2)
        return g.reshape(N, C, 1, 1).expand(N, C, H, W).div(H * W)


def _global_pool(m: nn.Module) -> bool:
    return (type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == (1, 1)
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks))


def head_pool(m: nn.Module, x: Tensor) -> Tensor:
    """A fused ResNet's ``torch.flatten(avgpool(x), 1)``: through ``_MeanHW`` when ``m`` is a plain
    ``nn.AdaptiveAvgPool2d((1, 1))`` without hooks, x a 4-D tensor needing a gradient in plain
    eager autograd (not FX tracing, torch.compile or a functorch transform: those see aten's
    pool); else the module itself. The same output and gradient values either way."""
    if (not _global_pool(m) or isinstance(x, torch.fx.Proxy) or not isinstance(x, Tensor) or x.dim() != 4
            or not (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return torch.flatten(m(x), 1)
    return _MeanHW.apply(x)
