"""BNAddReLU / AddReLU against the unfused PyTorch layers they replace:
relu(nn.BatchNorm2d(x) + identity) and relu(bn(x) + shortcut_bn(identity)), in train and eval
mode: outputs, every gradient (x, identity, weight and bias of both BNs), running statistics and
num_batches_tracked after several steps, momentum=None, track_running_stats=False, affine=False.

Most cases run in float64 so the comparison can be tight (the fused path and nn.BatchNorm2d then
differ only by summation order, ~1e-13 relative); one float32 channels_last case checks the
usual precision with tolerances of a few float32 ulps amplified by the batch-statistics backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rk_testing as rt
from resnet_kernels import testing
from resnet_kernels.nn import AddReLU, BNAddReLU

DEV = rt.DEVICE

# (rtol, atol) for comparing with the unfused modules (both sides in the same dtype). float64:
# summation order only. float32: the batch statistics and their backward are sums over
# M = N*H*W = 100 rows in a different order than ATen's batch norm; each side is within the
# policy's floor (resnet_kernels.testing.floor: 2 roundings + 4 sqrt(M) fp32 unit roundoffs) of the
# exact value, so the two within twice that: 5e-6 (was 2e-4, ~90x the largest error measured).
_F32 = 2 * testing.floor(torch.float32, 4 * 5 * 5)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (_F32, _F32)}


class RefBlock(nn.Module):
    def __init__(self, C, shortcut_bn, **kw):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, **kw)
        self.shortcut_bn = nn.BatchNorm2d(C, **kw) if shortcut_bn else None

    def forward(self, x, identity):
        r = self.shortcut_bn(identity) if self.shortcut_bn is not None else identity
        return torch.relu(self.bn(x) + r)


CASES = {
    "bn": dict(shortcut_bn=False),
    "bn+shortcut_bn": dict(shortcut_bn=True),
    "momentum_none": dict(shortcut_bn=True, momentum=None),
    "no_running_stats": dict(shortcut_bn=False, track_running_stats=False),
    "no_running_stats+shortcut": dict(shortcut_bn=True, track_running_stats=False),
    "affine_false": dict(shortcut_bn=True, affine=False),
    "fp32_channels_last": dict(shortcut_bn=True, dtype=torch.float32, layout="channels_last"),
}


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_bn_add_relu_module_matches_unfused(backend, case):
    kw = dict(CASES[case])
    dtype = kw.pop("dtype", torch.float64)
    layout = kw.pop("layout", "nchw")
    shortcut = kw.pop("shortcut_bn")
    C = 3
    torch.manual_seed(0)
    ref = RefBlock(C, shortcut, **kw).to(DEV, dtype)
    if kw.get("affine", True):
        with torch.no_grad():
            for bn in (ref.bn, ref.shortcut_bn):
                if bn is not None:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
    fused = BNAddReLU(C, shortcut_bn=shortcut, backend=backend, device=DEV, dtype=dtype, **kw)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]

    def step(mode, seed):
        g = torch.Generator().manual_seed(seed)
        x = rt.layouts(torch.randn(4, C, 5, 5, generator=g, dtype=dtype), layout).to(DEV)
        idn = rt.layouts(torch.randn(4, C, 5, 5, generator=g, dtype=dtype), layout).to(DEV)
        go = torch.randn(4, C, 5, 5, generator=g, dtype=dtype).to(DEV)
        outs = []
        for m in (ref, fused):
            getattr(m, mode)()
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            ii = idn.clone().requires_grad_(True)
            y = m(xi, ii)
            y.backward(go)
            outs.append((y, xi.grad, ii.grad))
        (yr, gxr, gir), (yf, gxf, gif) = outs
        tag = f"{backend}/{case}/{mode}{seed}"
        assert yf.dtype == dtype
        _close(yf, yr, dtype, f"{tag} out")
        _close(gxf, gxr, dtype, f"{tag} grad x")
        _close(gif, gir, dtype, f"{tag} grad identity")
        for (n, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
            assert pf.grad is not None, f"{tag}: no gradient for {n}"
            _close(pf.grad, pr.grad, dtype, f"{tag} grad {n}")
        for (n, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
            if br.dtype == torch.long:
                assert torch.equal(bf, br), f"{tag} {n}: {bf} != {br}"
            else:
                _close(bf, br, dtype, f"{tag} {n}")

    for s in range(3):
        step("train", s)
    if kw.get("track_running_stats", True):
        assert int(fused.bn.num_batches_tracked) == 3
        # the running statistics really moved (the comparison above is not between two no-ops)
        assert not torch.allclose(fused.bn.running_var, torch.ones_like(fused.bn.running_var))
    else:
        assert fused.bn.running_mean is None and fused.bn.num_batches_tracked is None
    step("eval", 10)
    step("eval", 11)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_add_relu_module(backend, layout):
    torch.manual_seed(0)
    x = rt.layouts(torch.randn(2, 3, 4, 5, dtype=torch.float64), layout).to(DEV).requires_grad_(True)
    idn = rt.layouts(torch.randn(2, 3, 4, 5, dtype=torch.float64), layout).to(DEV).requires_grad_(True)
    go = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEV)
    y = AddReLU(backend=backend)(x, idn)
    gx, gi = torch.autograd.grad(y, (x, idn), go)
    xr, ir = x.detach().requires_grad_(True), idn.detach().requires_grad_(True)
    yr = torch.relu(xr + ir)
    gxr, gir = torch.autograd.grad(yr, (xr, ir), go)
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    torch.testing.assert_close(gx, gxr, rtol=0, atol=0)
    torch.testing.assert_close(gi, gir, rtol=0, atol=0)


def test_from_modules_shares_parameters():
    bn = nn.BatchNorm2d(3).to(DEV)
    sbn = nn.BatchNorm2d(3).to(DEV)
    fused = BNAddReLU.from_modules(bn, sbn, backend="torch")
    assert fused.bn is bn and fused.shortcut_bn is sbn
    assert {id(p) for p in fused.parameters()} == {id(p) for p in (bn.weight, bn.bias, sbn.weight, sbn.bias)}
    before = bn.running_mean.clone()
    fused.train()
    x = torch.randn(2, 3, 4, 4, device=DEV) + 3.0
    y = fused(x, torch.randn(2, 3, 4, 4, device=DEV))
    assert int(bn.num_batches_tracked) == 1 and int(sbn.num_batches_tracked) == 1
    assert not torch.equal(bn.running_mean, before)  # the shared module's buffers were updated
    y.sum().backward()
    assert bn.weight.grad is not None and sbn.bias.grad is not None
    # a state_dict round trip through the wrapped modules' keys
    clone = BNAddReLU(3, shortcut_bn=True)
    clone.load_state_dict(fused.state_dict())
    no_short = BNAddReLU.from_modules(copy.deepcopy(bn))
    assert no_short.shortcut_bn is None
    with pytest.raises(TypeError, match=r"bn must be an nn.BatchNorm2d or nn.SyncBatchNorm, got BatchNorm1d"):
        BNAddReLU.from_modules(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"shortcut_bn must be an nn.BatchNorm2d"):
        BNAddReLU.from_modules(bn, nn.Identity())


def test_bn_add_relu_module_errors():
    m = BNAddReLU(4, backend="torch")
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) got an input with 3 channels"):
        m(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        m(torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"BNAddReLU: x must be a 4-D"):
        m(torch.randn(4, 4, 4), torch.randn(4, 4, 4))
