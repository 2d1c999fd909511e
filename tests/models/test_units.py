"""models/_units.py: ``unit_ok``'s one-expression common case decides exactly what ``is_4d`` and
``unit_reason`` decide, for the units it accepts and for every way a unit is not fusable."""

import pytest
import torch
from torch import nn

from resnet_kernels.models._units import is_4d, unit_ok, unit_reason


class _Conv(nn.Conv2d):
    pass


class _BN(nn.BatchNorm2d):
    pass


def _cases():
    def pair(**kw):
        conv_kw = dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, bias=False)
        conv_kw.update(kw)
        return nn.Conv2d(**conv_kw), nn.BatchNorm2d(8)

    x = torch.randn(2, 4, 6, 6)
    yield "fusable", x, *pair()
    yield "3-D input", torch.randn(4, 6, 6), *pair()
    yield "parameter input", nn.Parameter(torch.randn(2, 4, 6, 6)), *pair()
    yield "dilation", x, *pair(dilation=2)
    yield "groups", x, *pair(groups=2)
    yield "padding mode", x, *pair(padding_mode="reflect")
    yield "string padding", x, *pair(padding="same")
    conv, bn = pair()
    yield "a Conv2d subclass", x, _Conv(4, 8, 3, padding=1, bias=False), bn
    yield "a BatchNorm2d subclass", x, conv, _BN(8)
    yield "SyncBatchNorm", x, conv, nn.SyncBatchNorm(8)
    yield "GroupNorm", x, conv, nn.GroupNorm(2, 8)
    yield "width mismatch", x, conv, nn.BatchNorm2d(6)
    for name in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                 "register_full_backward_pre_hook"):
        for which in ("conv", "bn"):
            c, b = pair()
            m = c if which == "conv" else b
            if "pre" in name and "forward" in name:
                getattr(m, name)(lambda mod, inp: None)
            else:
                getattr(m, name)(lambda mod, a, b: None)
            yield f"{which} {name}", x, c, b


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_unit_ok_is_is_4d_and_unit_reason(case):
    _, x, conv, bn = case
    assert unit_ok(x, conv, bn) == (is_4d(x) and unit_reason(conv, bn) is None)


def test_unit_ok_accepts_the_common_unit_only():
    x = torch.randn(2, 4, 6, 6)
    assert unit_ok(x, nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    assert not unit_ok(x, nn.Conv2d(4, 8, 3, padding=1, dilation=2, bias=False), nn.BatchNorm2d(8))
