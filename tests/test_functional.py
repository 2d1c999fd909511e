"""resnet_kernels.functional.conv_bn_act / conv_bn_add_act against the unfused layers
(nn.Conv2d -> nn.BatchNorm2d, + shortcut (identity, or 1x1 conv -> BN), -> ReLU), in train and
eval and in mixed modes, on every backend, dtype and layout. Tolerance rule: tests/conv_ref.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conv_ref import (DTYPES, LAYOUTS, assert_close_to_ref, is_layout, rand_input, randomize_bn, relu_band,
                      running_stat_roundings)
from rk_testing import ALL_BACKENDS
from torch import nn

from resnet_kernels.functional import conv_bn_act, conv_bn_add_act

# tensors/modules created without a device go to rk_testing.DEVICE (the GPU when there is one)
pytestmark = pytest.mark.usefixtures("on_device")

# A downsampling basic block's second half: h (output of conv1, already strided) goes through
# conv2 3x3 s1 p1; the block input s through the 1x1 s2 projection.
C_IN, C_OUT, S_HW, H_HW = 6, 10, 7, 4


def _world(dtype, layout, projection, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(C_OUT, C_OUT, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(C_OUT)
    randomize_bn(bn)
    w = dict(conv=conv, bn=bn)
    if projection:
        w["sconv"] = nn.Conv2d(C_IN, C_OUT, 1, stride=2, bias=False)
        w["sbn"] = nn.BatchNorm2d(C_OUT)
        randomize_bn(w["sbn"])
    for m in w.values():
        m.to(dtype)
        if layout == "channels_last":
            m.to(memory_format=torch.channels_last)
    return w


def _copy(world, dtype=None):
    out = {k: copy.deepcopy(m) for k, m in world.items()}
    if dtype is not None:
        for m in out.values():
            m.to(dtype)
    return out


def _pre_activation(w, h, s):
    z = w["bn"](w["conv"](h))
    return z + (w["sbn"](w["sconv"](s)) if "sconv" in w else s)


def _set_modes(worlds, main_train, short_train):
    for w in worlds:
        w["conv"].train(main_train)
        w["bn"].train(main_train)
        if "sconv" in w:
            w["sconv"].train(short_train)
            w["sbn"].train(short_train)


def _step(worlds, n, dtype, layout, backend, relu, what):
    fused, pt, ref = worlds
    proj = "sconv" in fused
    h = rand_input((n, C_OUT, H_HW, H_HW), dtype, layout)
    s = rand_input((n, C_IN, S_HW, S_HW) if proj else (n, C_OUT, H_HW, H_HW), dtype, layout, 0.0)
    hs = [h.clone().requires_grad_(), h.clone().requires_grad_(), h.double().requires_grad_()]
    ss = [s.clone().requires_grad_(), s.clone().requires_grad_(), s.double().requires_grad_()]
    out_f = conv_bn_add_act(hs[0], fused["conv"], fused["bn"], ss[0], fused.get("sconv"), fused.get("sbn"),
                            relu=relu, backend=backend)
    z_p, z_r = _pre_activation(pt, hs[1], ss[1]), _pre_activation(ref, hs[2], ss[2])
    out_p, out_r = (torch.relu(z_p), torch.relu(z_r)) if relu else (z_p, z_r)
    assert out_f.dtype == dtype and is_layout(out_f, layout)
    assert_close_to_ref(f"{what} output", out_f, out_p, out_r, dtype)
    g = torch.randn(out_r.shape, dtype=torch.float64)
    if relu:  # see tests/nn/test_conv_bn.py::relu_band_grad
        g = torch.where(z_r.abs() <= relu_band(z_p, z_r, dtype), torch.zeros_like(g), g)
    for o in (out_f, out_p, out_r):
        o.backward(g.to(o.dtype))
    assert_close_to_ref(f"{what} grad x", hs[0].grad, hs[1].grad, hs[2].grad, dtype)
    assert_close_to_ref(f"{what} grad shortcut_input", ss[0].grad, ss[1].grad, ss[2].grad, dtype)
    for key in fused:
        for pname, pf in fused[key].named_parameters():
            pp, pr = getattr(pt[key], pname), getattr(ref[key], pname)
            assert_close_to_ref(f"{what} grad {key}.{pname}", pf.grad, pp.grad, pr.grad, dtype)
            pf.grad = pp.grad = pr.grad = None


def _run(dtype, layout, backend, projection, main_train=True, short_train=True, relu=True):
    fused = _world(dtype, layout, projection, 0)
    worlds = (fused, _copy(fused), _copy(fused, torch.float64))
    _set_modes(worlds, main_train, short_train)
    for step in range(3):
        _step(worlds, 2, dtype, layout, backend, relu, f"step {step}")
    for key in ("bn", "sbn"):
        if key in fused:
            bf, bp, br = (w[key] for w in worlds)
            assert_close_to_ref(f"{key}.running_mean", bf.running_mean, bp.running_mean, br.running_mean, dtype,
                                roundings=running_stat_roundings(3))
            assert_close_to_ref(f"{key}.running_var", bf.running_var, bp.running_var, br.running_var, dtype,
                                roundings=running_stat_roundings(3))
            assert bf.num_batches_tracked.item() == bp.num_batches_tracked.item()
    _set_modes(worlds, False, False)
    _step(worlds, 1, dtype, layout, backend, relu, "eval")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_conv_bn_add_act_matches_unfused(projection, backend, dtype, layout):
    _run(dtype, layout, backend, projection)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("modes", [(True, False), (False, True)], ids=["main_train-shortcut_eval",
                                                                        "main_eval-shortcut_train"])
def test_conv_bn_add_act_mixed_modes(backend, modes):
    _run(torch.float32, "nchw", backend, True, *modes)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_bn_add_act_no_relu(backend):
    _run(torch.float32, "channels_last", backend, True, relu=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_torch(layout):
    _run(torch.float64, layout, "torch", True)


class _Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        for k, m in w.items():
            self.add_module(k, m)

    def forward(self, h, s):
        return conv_bn_add_act(h, self.conv, self.bn, s, self.sconv, self.sbn, backend="torch")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_projection_float64(mode):
    block = _Block(_world(torch.float64, "nchw", True, 0))
    block.train(mode == "train")
    h = torch.randn(2, C_OUT, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, C_IN, 5, 5, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def f(h, s, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (h, s))

    assert torch.autograd.gradcheck(f, (h, s, *params), fast_mode=True)


def test_conv_bn_act_residual_and_layout_mismatch():
    """A residual in the other memory layout is brought to the output's layout (no error)."""
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    randomize_bn(bn)
    x = rand_input((2, 4, 5, 5), torch.float32, "channels_last")
    r = torch.randn(2, 4, 5, 5)  # NCHW
    for train in (True, False):
        conv.train(train)
        bn.train(train)
        ref_bn = copy.deepcopy(bn)
        out = conv_bn_act(x, conv, bn, residual=r)
        torch.testing.assert_close(out, torch.relu(ref_bn(conv(x)) + r), atol=1e-5, rtol=1e-5)


def test_argument_errors():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        conv_bn_act(x, nn.Linear(4, 4), bn)
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        conv_bn_act(x, conv, nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        conv_bn_act(x, conv, nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="give both shortcut_conv and shortcut_bn"):
        conv_bn_add_act(x, conv, bn, x, shortcut_conv=conv)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        conv_bn_act(x, conv, bn.eval(), residual=torch.randn(2, 4, 4, 4))
    # the fused ops name it 'identity' in training (bn_add_relu's argument); 'auto' on CPU tensors
    # runs the plain layers, which check it as 'residual' before the BatchNorm changes state
    before = bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="identity must have the shape|residual must have the output's shape"):
        conv_bn_act(x, conv, bn.train(), residual=torch.randn(2, 4, 4, 4))
    assert torch.equal(bn.num_batches_tracked, before)
    with pytest.raises(ValueError, match="identity must have the shape"):
        conv_bn_act(x, conv, bn.train(), residual=torch.randn(2, 4, 4, 4), backend="torch")
    assert torch.equal(bn.num_batches_tracked, before)

    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="overrides nn.Conv2d.forward"):
        conv_bn_act(x, MyConv(4, 4, 3), bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        conv_bn_act(torch.randn(1, 4, 1, 1), nn.Conv2d(4, 4, 1), bn.train())
