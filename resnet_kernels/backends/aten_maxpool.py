"""The ``aten`` maxpool2d: PyTorch's own ``max_pool2d_with_indices`` and its backward (the
floor), with the int64 indices converted to and from the op's one-byte argmax. It moves more
bytes than PyTorch's plain max_pool2d (the int64 indices plus the conversions): it exists as the
measured floor and the CPU path, not to save traffic. Declared ``returns_output``. Launcher
contract: ``resnet_kernels/ops/maxpool.py``."""

from __future__ import annotations

import torch

_BASE: dict = {}  # (OH, OW, W, k, s, p, device) -> (OH, OW) int64 flat index of each window's (0, 0)


def _base(OH, OW, W, k, s, p, device):
    key = (OH, OW, W, k, s, p, device)
    b = _BASE.get(key)
    if b is None:
        oh0 = torch.arange(OH, device=device).view(OH, 1) * s[0] - p[0]
        ow0 = torch.arange(OW, device=device).view(1, OW) * s[1] - p[1]
        b = _BASE[key] = (oh0 * W + ow0, oh0 * k[1] + ow0)
        if len(_BASE) > 64:
            _BASE.pop(next(iter(_BASE)))
    return b


def maxpool2d_forward(x, out, argmax, k, s, p, layout, need_argmax):
    """Returns (out, argmax or None)."""
    if not need_argmax:
        return torch.nn.functional.max_pool2d(x, k, s, p), None
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, list(k), list(s), list(p), [1, 1], False)
    W = x.shape[3]
    _, base_a = _base(y.shape[2], y.shape[3], W, k, s, p, x.device)
    # argmax = (ih - oh0) * kw + (iw - ow0) with ih = idx // W, iw = idx - ih * W
    #        = idx + ih * (kw - W) - (oh0 * kw + ow0)
    ih = idx.div(W, rounding_mode="floor")
    a = torch.add(idx, ih, alpha=k[1] - W)
    a.sub_(base_a)
    return y, a.to(torch.uint8)


def maxpool2d_backward(grad_out, argmax, grad_x, k, s, p, layout, input_hw):
    """Returns grad_x."""
    N, C, OH, OW = grad_out.shape
    H, W = input_hw
    base_i, _ = _base(OH, OW, W, k, s, p, grad_out.device)
    # idx = (oh0 + a // kw) * W + ow0 + a % kw = base + a + (a // kw) * (W - kw)
    a = argmax.long()
    idx = torch.add(a, base_i)
    idx.add_(a.div(k[1], rounding_mode="floor"), alpha=W - k[1])
    mf = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    shape_of_x = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=mf)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, shape_of_x, list(k), list(s), list(p), [1, 1],
                                                           False, idx)
