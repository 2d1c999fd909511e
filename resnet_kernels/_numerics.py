"""Numerics shared by the op layer and the implementations: the TF32 setting PyTorch's own
convolutions follow, the reference convolution in the accumulation dtype, and the tolerance
rule the measured ``auto`` verifies implementations with."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import acc_dtype


def cudnn_conv_tf32_enabled() -> bool:
    """Whether PyTorch's own (cuDNN) convolutions may use TF32 for float32 right now.

    Reads the per-operator setting (``torch.backends.cudnn.conv.fp32_precision``, falling back to
    the cuDNN-wide and the global ``fp32_precision`` when it is 'none', as ATen does) rather than
    the legacy ``torch.backends.cudnn.allow_tf32``, whose getter raises once the new API has given
    conv and RNN different settings (setting the legacy flag updates these too); the legacy flag
    is read only on torch versions without the new API."""
    if _get_precision is not None:
        # what the properties torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision
        # and torch.backends.fp32_precision read, without their Python property layers (once per op call)
        for level in _PRECISION_LEVELS:  # ATen's resolution order; 'none' everywhere means IEEE fp32
            prec = _get_precision(*level)
            if prec != "none":
                return prec == "tf32"
        return False
    try:
        levels = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                  torch.backends.fp32_precision)
    except AttributeError:
        return bool(torch.backends.cudnn.allow_tf32)
    for prec in levels:  # ATen's resolution order; 'none' everywhere means IEEE fp32
        if prec != "none":
            return prec == "tf32"
    return False


_get_precision = getattr(torch._C, "_get_fp32_precision_getter", None)
_PRECISION_LEVELS = (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))


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


# Verification rule of the measured 'auto' (resnet_kernels/_tune.py): an implementation's output
# must agree with the reference implementation's on the same inputs within
#     max |got - ref| <= rtol * max |ref|        (finite entries; non-finite ones must coincide)
# rtol per dtype: a few units in the last place of the dtype relative to the tensor's largest
# magnitude, loose enough for two correct roundings of the same math (fp32 epilogue vs. an
# activation rounded before its epilogue: at most ~1 ulp of the dtype) and for TF32 (10 mantissa
# bits) when PyTorch lets fp32 convolutions use it; far below what a wrong index, a missing tile,
# a wrong statistic or garbage produces (order 1). This guards against kernels that are wrong on
# this GPU, not against ulp-level differences (the test suite checks those, against float64).
_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}
_RTOL_TF32 = 8e-3


def verify_rtol(dtype: torch.dtype, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return _RTOL_TF32
    return _RTOL.get(dtype, _RTOL[torch.float32])


def mismatch(name: str, got: Optional[Tensor], ref: Optional[Tensor], rtol: float,
             scale: Optional[float] = None) -> Optional[str]:
    """None when ``got`` agrees with ``ref`` under the rule above, else what differs. ``scale``
    replaces max |ref| as the magnitude the error is measured against (e.g. a batch mean is
    measured against mean + standard deviation: the mean of centred data is ~0)."""
    if got is None or ref is None:
        return None if got is None and ref is None else f"{name}: one result is missing"
    if tuple(got.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if got.numel() == 0:
        return None
    g = got.detach().float()
    r = ref.detach().float()
    fin = torch.isfinite(r)
    if not torch.equal(torch.isfinite(g), fin):
        bad = int((torch.isfinite(g) != fin).sum())
        return f"{name}: {bad} non-finite values where the reference is finite (or the reverse)"
    if not bool(fin.any()):
        return None
    if scale is None:
        scale = float(r[fin].abs().max())
    err = float((g[fin] - r[fin]).abs().max())
    if err > rtol * scale + 1e-30:
        return f"{name}: max |error| {err:.3g} > {rtol:g} x reference magnitude {scale:.3g}"
    return None
