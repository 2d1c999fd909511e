"""The ``aten`` maxpool2d: PyTorch's own ``max_pool2d_with_indices`` and its backward (the
floor), with the int64 indices converted to and from the op's one-byte argmax. It moves more
bytes than PyTorch's plain max_pool2d (the int64 indices plus the conversions): it exists as the
measured floor and the CPU path, not to save traffic. Declared ``returns_output``. Launcher
contract: ``resnet_kernels/ops/maxpool.py``."""

from __future__ import annotations

import torch

_TABLES: dict = {}  # (OH, OW, W, k, s, p, device) -> the index tables of _tables


def _tables(OH, OW, W, k, s, p, device):
    """(base, to_argmax, to_index, base_a) for one geometry: ``base`` (OH, OW) int64, the flat input
    index of each window's (0, 0) corner; ``to_argmax`` (uint8) maps an offset ``idx - base`` =
    dh * W + dw inside a window to its argmax dh * kw + dw (None when kw > W: offsets of different
    (dh, dw) then coincide); ``to_index`` (int64) maps an argmax back to that offset; ``base_a``
    the corner as oh0 * kw + ow0 (the division formula's). Small lookups instead of integer
    divisions (an int64 division is the slowest elementwise op there is on a CPU)."""
    key = (OH, OW, W, k, s, p, device)
    t = _TABLES.get(key)
    if t is None:
        oh0 = torch.arange(OH, device=device).view(OH, 1) * s[0] - p[0]
        ow0 = torch.arange(OW, device=device).view(1, OW) * s[1] - p[1]
        dh = torch.arange(k[0], device=device).view(k[0], 1)
        dw = torch.arange(k[1], device=device).view(1, k[1])
        offset = (dh * W + dw).reshape(-1)  # in argmax order
        to_argmax = None
        if k[1] <= W:
            to_argmax = torch.zeros(((k[0] - 1) * W + k[1],), dtype=torch.uint8, device=device)
            to_argmax[offset] = torch.arange(k[0] * k[1], device=device).to(torch.uint8)
        t = _TABLES[key] = (oh0 * W + ow0, to_argmax, offset, oh0 * k[1] + ow0)
        if len(_TABLES) > 64:
            _TABLES.pop(next(iter(_TABLES)))
    return t


def _flat(t, layout):
    """``t`` (N, C, H, W) dense in ``layout`` as a 1-D view in memory order."""
    return t.permute(0, 2, 3, 1).reshape(-1) if layout == "nhwc" else t.reshape(-1)


def _unflat(v, shape, layout):
    """The inverse of ``_flat``: a 1-D tensor in memory order as (N, C, H, W) in ``layout``."""
    N, C, H, W = shape
    return v.view(N, H, W, C).permute(0, 3, 1, 2) if layout == "nhwc" else v.view(shape)


def maxpool2d_forward(x, out, argmax, k, s, p, layout, need_argmax):
    """Returns (out, argmax or None)."""
    if not need_argmax:
        return torch.nn.functional.max_pool2d(x, k, s, p), None
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, list(k), list(s), list(p), [1, 1], False)
    W = x.shape[3]
    base, to_argmax, _, base_a = _tables(y.shape[2], y.shape[3], W, k, s, p, x.device)
    if to_argmax is None:  # a window wider than the input: argmax = (ih - oh0) * kw + (iw - ow0), ih = idx // W
        a = torch.add(idx, idx.div(W, rounding_mode="floor"), alpha=k[1] - W)
        a.sub_(base_a)
        return y, a.to(torch.uint8)
    # argmax = to_argmax[idx - base]: the offset of the maximum inside its window, as dh * kw + dw
    off = torch.sub(idx, base)
    a = to_argmax.index_select(0, _flat(off, layout))
    return y, _unflat(a, off.shape, layout)


def maxpool2d_backward(grad_out, argmax, grad_x, k, s, p, layout, input_hw):
    """Returns grad_x."""
    N, C, OH, OW = grad_out.shape
    H, W = input_hw
    base, _, to_index, _ = _tables(OH, OW, W, k, s, p, grad_out.device)
    # idx = base + to_index[argmax] (index_select takes int32 indices: a quarter of int64's bytes)
    idx = _unflat(to_index.index_select(0, _flat(argmax, layout).int()), argmax.shape, layout)
    idx.add_(base)
    mf = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    shape_of_x = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=mf)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, shape_of_x, list(k), list(s), list(p), [1, 1],
                                                           False, idx)
