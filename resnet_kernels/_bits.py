"""A 1-bit ReLU mask: the training block's ``out > 0`` packed 8 channels to a byte.

Representation (every producer and consumer follows it): a contiguous uint8 tensor of shape
(N, H, W, ceil(C / 8)) for an activation of shape (N, C, H, W), whatever that activation's memory
layout (NCHW-contiguous or channels_last): bit ``c % 8`` of byte ``[n, h, w, c // 8]`` is
``t[n, c, h, w] > 0`` (the bits past C in the last byte are 0). The block's backward reads its
output only as this mask (``resnet_kernels/_block.py``): 1/8 byte per element instead of the
activation's 2-4 bytes, up to five times per block.

``pack`` is the reference (torch ops); ``unpack`` gives the bool mask back shaped and laid out like
a given tensor (the torch/aten/cuda consumers use it before their elementwise ops); ``is_bits`` is
the type test; ``check_mask`` is the op-layer validation of an argument that accepts either a
tensor like ``ref`` (compared > 0) or the bits of a tensor shaped like ``ref``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

DTYPE = torch.uint8


def bits_shape(shape: Sequence[int]) -> tuple:
    """The bits tensor's shape for an activation of shape (N, C, H, W)."""
    N, C, H, W = (int(s) for s in shape)
    return (N, H, W, (C + 7) // 8)


def is_bits(t) -> bool:
    """Whether ``t`` is a packed mask (a 4-D uint8 tensor): an activation is never uint8."""
    return isinstance(t, Tensor) and t.dtype == DTYPE and t.dim() == 4


def empty_like_bits(ref: Tensor) -> Tensor:
    """An uninitialised bits tensor for ``ref`` (N, C, H, W)."""
    return torch.empty(bits_shape(ref.shape), dtype=DTYPE, device=ref.device)


def pack(t: Tensor, out: Tensor = None) -> Tensor:
    """The bits of ``t > 0`` (the reference; torch ops: a compare, a pad when C % 8 != 0, a
    weighted sum over the 8 channels of a byte)."""
    N, C, H, W = t.shape
    CB = (C + 7) // 8
    pos = (t > 0).permute(0, 2, 3, 1)  # (N, H, W, C), a view
    if C != CB * 8:
        pos = torch.nn.functional.pad(pos.to(DTYPE), (0, CB * 8 - C))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=t.device)
    b = (pos.reshape(N, H, W, CB, 8).to(torch.int32) * weights).sum(-1).to(DTYPE)
    if out is None:
        return b.contiguous()
    out.copy_(b)
    return out


def pack_cost(like: Tensor):
    """(launches, bytes) of ``pack`` of an activation shaped like ``like`` on a GPU (the accountant):
    the compare (read E s, write E bools), with C % 8 != 0 a cast and a pad (read E, write E; read
    E, write 8 B), the int32 cast, the product, the sum (8 B int32 each: read and write), the cast to
    uint8 (read 4 B, write B) and the copy into the output (read B, write B); B = the bits' bytes."""
    N, C, H, W = like.shape
    E = like.numel()
    B = N * H * W * ((C + 7) // 8)
    launches, b = 1, E * like.element_size() + E
    if C % 8:
        launches, b = launches + 2, b + 2 * E + E + 8 * B
    launches, b = launches + 3, b + (8 * B + 32 * B) + (32 * B + 32 * B) + (32 * B + 4 * B)
    launches, b = launches + 2, b + (4 * B + B) + 2 * B
    return launches, b


def unpack(bits: Tensor, like: Tensor) -> Tensor:
    """The bool mask ``like > 0`` from its bits: shape and memory layout of ``like`` (N, C, H, W).
    Launches (``unpack_cost``): a bitwise and against the 8 bit masks, a compare, and a copy when
    the (N, C, H, W) view of the (N, H, W, C) result is not already in like's layout."""
    N, C, H, W = like.shape
    masks = torch.tensor([1 << j for j in range(8)], dtype=DTYPE, device=bits.device)
    m = ((bits.unsqueeze(-1) & masks) != 0).reshape(N, H, W, -1)[..., :C].permute(0, 3, 1, 2)
    if _channels_last(like):
        return m.contiguous(memory_format=torch.channels_last)
    return m.contiguous()


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def unpack_cost(bits: Tensor, like: Tensor):
    """(launches, bytes) of ``unpack`` on a GPU (the accountant): read the bits, write 8 bytes per
    byte, read them, write the bool mask per byte bit; a copy (read + write E bools) unless the
    result is already in like's layout (channels_last with C % 8 == 0)."""
    B = bits.numel()
    E = like.numel()
    launches, b = 2, B + 8 * B + 8 * B + 8 * B
    if not (_channels_last(like) and like.shape[1] % 8 == 0):
        launches, b = launches + 1, b + 8 * B + E
    return launches, b


def as_mask(m, like: Tensor):
    """``m`` as something ``> 0`` works on elementwise, shaped like ``like``: the bits unpacked, a
    tensor (or None) as it is."""
    return unpack(m, like) if is_bits(m) else m


def check_mask(op: str, name: str, m, ref: Tensor, ref_name: str, ref_layout: str) -> None:
    """``m`` must be a tensor like ``ref`` (shape, dtype, device, layout) or the uint8 bits of one
    (shape (N, H, W, ceil(C/8)), contiguous, on ref's device)."""
    from ._checks import check_like

    if isinstance(m, Tensor) and m.dtype == DTYPE:
        want = bits_shape(ref.shape)
        if tuple(m.shape) != want or not m.is_contiguous() or m.device != ref.device:
            raise ValueError(f"{op}: {name} as a packed ReLU mask must be a contiguous uint8 tensor of shape "
                             f"{want} (N, H, W, ceil(C/8)) on {ref.device} for {ref_name} {tuple(ref.shape)}, got "
                             f"shape {tuple(m.shape)}{'' if m.is_contiguous() else ' (not contiguous)'} on {m.device}")
        return
    if isinstance(m, Tensor) and m.dtype != ref.dtype and not m.is_floating_point():
        raise TypeError(f"{op}: {name} must be a tensor like {ref_name} ({ref.dtype}) or a uint8 packed ReLU mask "
                        f"(resnet_kernels._bits), got {m.dtype}")
    check_like(op, name, m, ref, ref_name, ref_layout)


__all__ = ["bits_shape", "is_bits", "empty_like_bits", "pack", "pack_cost", "unpack", "unpack_cost", "as_mask",
           "check_mask"]
