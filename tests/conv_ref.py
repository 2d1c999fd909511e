"""Shared helpers for the fused conv + BN (+ add) + ReLU tests (tests/ is on sys.path).

Tolerance rule. Every fused result is compared with a float64 reference; its error may be at most
about twice PyTorch's own error in the same dtype (PyTorch's unfused layers run in that dtype on
the same inputs and their error is measured against the same float64 reference) plus a floor:

    max|fused - ref64| <= 2 * max|pytorch_dtype - ref64| + FLOOR[dtype] * max|ref64|

The floor covers what makes the fused result legitimately differ from PyTorch's rounding
pattern: the fused epilogue rounds once after BN/add/ReLU where PyTorch rounds the conv output
and every later layer's output (so the two errors are not the same rounding), and the fp32 sums run
in another order. (Stores round to nearest, also under the Triton interpreter: see
triton_ops/_common.py cast_for_store.) Two units in the last place at the tensor's largest
magnitude for the 16-bit types (one per rounding pattern); for float32,
1e-5 relative (reassociation of sums over up to ~10^3 terms, ~100 fp32 ulps); for float64 (torch
backend only, where the reference itself is the float64 computation) 1e-10.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 2 * 2.0 ** -10,
    torch.bfloat16: 2 * 2.0 ** -7,
    torch.float64: 1e-10,
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]


@dataclass(frozen=True)
class ConvCfg:
    """A ResNet convolution configuration with tiny spatial sizes (a few dozen Triton programs
    under the interpreter: M = N*OH*OW <= ~100 rows, BLOCK_M = 32)."""
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    hw: int

    def __str__(self):
        return self.name


CONFIGS = [
    ConvCfg("stem7x7s2p3", cin=3, cout=8, k=7, stride=2, padding=3, hw=11),
    ConvCfg("3x3s1p1", cin=6, cout=12, k=3, stride=1, padding=1, hw=6),
    ConvCfg("3x3s2p1", cin=8, cout=10, k=3, stride=2, padding=1, hw=9),
    ConvCfg("1x1s1p0", cin=12, cout=6, k=1, stride=1, padding=0, hw=5),
    ConvCfg("1x1s2p0", cin=7, cout=16, k=1, stride=2, padding=0, hw=9),
]
CFG_IDS = [c.name for c in CONFIGS]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def is_layout(t: torch.Tensor, layout: str) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.is_contiguous()


def rand_input(shape, dtype, layout, offset=0.5) -> torch.Tensor:
    """Random activations with a non-zero mean (so batch means matter), exactly representable
    in ``dtype`` (the float64 reference gets the very same values)."""
    return to_layout((torch.randn(shape) + offset).to(dtype), layout)


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features) * 0.5)
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.num_features) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)


def make_conv_bn(cfg: ConvCfg, dtype, layout="nchw", bias=False, **bn_kw):
    """(conv, bn) in ``dtype`` with random parameters (and weights in ``layout``)."""
    conv = nn.Conv2d(cfg.cin, cfg.cout, cfg.k, stride=cfg.stride, padding=cfg.padding, bias=bias)
    bn = nn.BatchNorm2d(cfg.cout, **bn_kw)
    randomize_bn(bn)
    conv.to(dtype)
    bn.to(dtype)
    if layout == "channels_last":
        conv.to(memory_format=torch.channels_last)
    return conv, bn


def clone64(m: nn.Module) -> nn.Module:
    """A float64 copy of a module (the reference): every parameter and buffer upcast exactly."""
    return copy.deepcopy(m).to(torch.float64)


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.detach().to(torch.float64) - ref64.detach()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(what: str, got: torch.Tensor, pt: torch.Tensor, ref64: torch.Tensor, dtype,
                        scale: float | None = None) -> None:
    """The tolerance rule of the module docstring. ``scale`` replaces max|ref64| as the floor's
    magnitude where the reference itself is ~0 by cancellation (e.g. a conv bias gradient
    through training-mode BN)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == pt.dtype, f"{what}: dtype {got.dtype} != PyTorch's {pt.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    e_got = max_err(got, ref64)
    e_pt = max_err(pt, ref64)
    mag = ref64.abs().max().item() if scale is None else scale
    bound = 2 * e_pt + FLOOR[dtype] * mag
    assert e_got <= bound, (f"{what} ({dtype}): error vs float64 {e_got:.3g} > bound {bound:.3g} "
                            f"(PyTorch's own error {e_pt:.3g}, max|ref| {mag:.3g})")
