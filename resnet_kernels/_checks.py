"""Argument checks shared by the ops: every message names the argument and what was expected."""

from __future__ import annotations

import torch

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / per-channel dtype for an activation dtype."""
    return _F64 if dtype is _F64 else _F32


_F32, _F64 = torch.float32, torch.float64


class _DeviceTypes(dict):
    """torch.device -> its type (``"cpu"``, ``"cuda"``...). ``device.type`` builds a new string
    through a C++ stream on every read (~0.2 us; a few us where a step's Python runs cache-cold
    between kernels), so the per-call paths read it here: a dict hit. Keys are devices (equal by
    type and index), so the table stays as small as the set of devices seen."""

    def __missing__(self, device: torch.device) -> str:
        t = self[device] = device.type
        return t


DEVICE_TYPE = _DeviceTypes()


def check_tensor_args(op: str, optional, **named) -> None:
    """Named TypeErrors before the dispatcher sees a non-tensor (it would raise an anonymous one);
    the arguments named in ``optional`` may also be None."""
    for name, t in named.items():
        if isinstance(t, _Tensor):
            continue
        opt = name in optional
        if not (opt and t is None):
            raise TypeError(f"{op}: {name} must be a torch.Tensor{' or None' if opt else ''}, got {type(t).__name__}")


def check_bool(op: str, name: str, v) -> bool:
    """A flag must be a real bool: ``relu="no"`` would otherwise be truthy and silently mean True."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool (True or False), got {v!r}")
    return v


def check_activation(op: str, name: str, t, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be a {ndim}-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")


def layout_of(t: torch.Tensor) -> str | None:
    """'nchw' (contiguous), 'nhwc' (channels_last) or None (other strides). A tensor that is
    both (C == 1 or H == W == 1) reports 'nchw'."""
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a 4-D tensor) dense in ``ref``'s memory layout: channels_last when ``ref`` is
    'nhwc', else NCHW-contiguous (a no-op when it already is)."""
    if layout_of(ref) == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def check_layout(op: str, name: str, t: torch.Tensor) -> str:
    lay = layout_of(t)
    if lay is None:
        raise ValueError(f"{op}: {name} must be contiguous in NCHW or channels_last memory format, "
                         f"got shape {tuple(t.shape)} with strides {t.stride()} "
                         f"(call .contiguous() or .contiguous(memory_format=torch.channels_last))")
    return lay


def same_order(a: torch.Tensor, la: str, b: torch.Tensor) -> bool:
    """True when dense ``b`` stores its elements in the same order as ``a`` with layout ``la``."""
    if la == "nchw":
        return b.is_contiguous()
    return b.is_contiguous(memory_format=torch.channels_last)


def check_like(op: str, name: str, t, ref: torch.Tensor, ref_name: str, ref_layout: str) -> None:
    """``t`` must match ``ref`` in shape, dtype, device and memory layout."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device ({ref.device}), got {t.device}")
    if not same_order(ref, ref_layout, t):
        want = "NCHW-contiguous" if ref_layout == "nchw" else "channels_last"
        raise ValueError(f"{op}: {name} must have the same memory layout as {ref_name} ({want}), "
                         f"got strides {t.stride()} for shape {tuple(t.shape)}")


def check_channel_vector(op: str, name: str, t, C: int, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    shape = t.shape
    if len(shape) != 1 or shape[0] != C:
        raise ValueError(f"{op}: {name} must be a 1-D tensor of C={C} per-channel values, got shape {tuple(t.shape)}")
    dt = t.dtype
    if not (dt is _F32 or dt is _F64) and (dt is not ref.dtype or not t.is_floating_point()):
        raise TypeError(f"{op}: {name} must be float32 (or {ref.dtype}, like the activations), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the activations' device ({ref.device}), got {t.device}")


def channel_vector(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """Per-channel tensor converted to the accumulation dtype, contiguous (a no-op when it already is)."""
    if t is None:
        return None
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()  # (both no-ops, skipped: they cost a dispatch each)
