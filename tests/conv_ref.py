"""Shared helpers for the fused conv + BN (+ add) + ReLU tests (tests/ is on sys.path).

Tolerance rule: ``resnet_kernels.testing`` (the project's one policy). Every fused result is
compared with a float64 reference; its max error may be at most

    max(2 x PyTorch's own error in the same dtype, floor(dtype, n) x max|ref64|)

with PyTorch's unfused layers run in the same dtype on the same inputs and the floor derived from
the dtype's unit roundoff and the longest reduction n (N_TERMS here). Statistics that are computed
and stored in float32 are checked with dtype=float32 whatever the activations' dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import rk_testing
from resnet_kernels import testing

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
    stride: int | tuple
    padding: int | tuple
    hw: int

    def out_hw(self) -> tuple:
        (sh, sw), (ph, pw) = _pair(self.stride), _pair(self.padding)
        return (self.hw + 2 * ph - self.k) // sh + 1, (self.hw + 2 * pw - self.k) // sw + 1

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
# unequal strides and paddings (an H/W mix-up of stride or padding fails only here)
ASYM = ConvCfg("3x3s21p10", cin=6, cout=10, k=3, stride=(2, 1), padding=(1, 0), hw=9)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def n_terms(cin, cout, kh, kw, n, oh, ow) -> int:
    """The longest reduction of a conv + BN forward/backward: the conv's K = Cin*KH*KW, the input
    gradient's Cout*KH*KW and the weight gradient's / batch statistics' N*OH*OW."""
    return max(cin * kh * kw, cout * kh * kw, n * oh * ow)


# The longest reduction over CONFIGS at the largest batch used with them (N = 3): the default.
N_TERMS = max(n_terms(c.cin, c.cout, c.k, c.k, 3, *c.out_hw()) for c in CONFIGS + [ASYM])


to_layout = rk_testing.layouts


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


max_err = testing.max_err


def assert_close_to_ref(what: str, got: torch.Tensor, pt: torch.Tensor, ref64: torch.Tensor, dtype,
                        scale: float | None = None, n: int = N_TERMS, roundings: int = testing.ROUNDINGS) -> None:
    """The tolerance rule of the module docstring (``resnet_kernels.testing.assert_close_to_ref``).
    ``scale`` replaces max|ref64| as the floor's magnitude where the reference itself is ~0 by
    cancellation (e.g. a conv bias gradient through training-mode BN); ``roundings``: see
    ``running_stat_roundings``."""
    testing.assert_close_to_ref(what, got, pt, ref64, dtype, n_terms=n, scale=scale, roundings=roundings)


def running_stat_roundings(steps: int) -> int:
    """Roundings to the module's dtype of a running statistic after ``steps`` momentum updates:
    each update stores (1 - m) * running + m * batch in that dtype (one rounding per step), on top
    of the policy's ROUNDINGS (measured, fp16/bf16 modules after 3 steps: errors up to 2.7 u of
    max|running|, with PyTorch's own at 1.2 u)."""
    return testing.ROUNDINGS + steps


def relu_band(z_pt: torch.Tensor, z_ref: torch.Tensor, dtype, n: int = N_TERMS) -> float:
    """Half-width of the band around 0 where a correct pre-activation may land on either side of
    the ReLU kink: the forward bound for PyTorch's and the floor's rounding patterns together
    (their sum, wider than the bound: both patterns may flip an element)."""
    mag = z_ref.abs().max().item() if z_ref.numel() else 0.0
    return testing.K * max_err(z_pt, z_ref) + testing.floor(dtype, n) * mag
