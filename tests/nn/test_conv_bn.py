"""ConvBNReLU / ConvBN against nn.Conv2d -> nn.BatchNorm2d (-> nn.ReLU).

Protocol (``_check_train_eval``): three training steps on fresh random inputs (N=2), each
comparing the forward output and the gradients of the input, the conv weight (and bias), gamma
and beta; then the running statistics; then eval mode on a fresh N=1 input (outputs and
gradients). Every comparison follows the tolerance rule of tests/conv_ref.py: error vs a float64
copy of the unfused layers at most 2x PyTorch's own unfused error in the same dtype + a floor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conv_ref import (CFG_IDS, CONFIGS, DTYPES, LAYOUTS, ConvCfg, assert_close_to_ref, clone64, is_layout,
                      make_conv_bn, rand_input, randomize_bn, relu_band, running_stat_roundings, to_layout)
from rk_testing import ALL_BACKENDS, HAS_GPU
from torch import nn

import resnet_kernels
from resnet_kernels.nn import ConvBN, ConvBNReLU

# tensors/modules created without a device go to rk_testing.DEVICE (the GPU when there is one)
pytestmark = pytest.mark.usefixtures("on_device")


def _models(conv, bn, relu, backend):
    """(fused, PyTorch unfused conv -> bn in the same dtype, its float64 copy: the reference);
    the ReLU (``fused._RELU``) and the residual add are applied by ``_unfused``."""
    pt = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    ref = clone64(pt)
    fused = (ConvBNReLU if relu else ConvBN).from_modules(conv, bn, backend=backend)
    return fused, pt, ref


def _params(fused, pt, ref):
    """(name, fused param, pytorch param, reference param) for every parameter."""
    out = []
    for name, p in fused.named_parameters():
        mod, attr = name.split(".")
        idx = 0 if mod == "conv" else 1
        out.append((name, p, getattr(pt[idx], attr), getattr(ref[idx], attr)))
    return out


def _unfused(seq, x, residual):
    """conv -> bn (+ residual): the pre-activation."""
    z = seq[1](seq[0](x))
    return z if residual is None else z + residual


def relu_band_grad(g, z_pt, z_ref, dtype):
    """The upstream gradient with zeros where the float64 pre-activation is within the forward
    tolerance of 0: there a correct low-precision result may land on the other side of the ReLU
    kink (a mask flip changes that element's gradient by the whole of g, a discontinuity no
    tolerance on the gradients can absorb). PyTorch's own unfused layers flip such elements too."""
    return torch.where(z_ref.abs() <= relu_band(z_pt, z_ref, dtype), torch.zeros_like(g), g)


def _step(fused, pt, ref, shape, dtype, layout, what, residual=False):
    relu = fused._RELU
    x = rand_input(shape, dtype, layout)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.to(torch.float64).requires_grad_()]
    rs = [None] * 3
    if residual:
        res = rand_input((shape[0], fused.conv.out_channels) + _out_hw(fused.conv, shape), dtype, layout, 0.0)
        rs = [res.clone().requires_grad_(), res.clone().requires_grad_(), res.to(torch.float64).requires_grad_()]
    out_f = fused(xs[0], rs[0]) if residual else fused(xs[0])
    z_p, z_r = _unfused(pt, xs[1], rs[1]), _unfused(ref, xs[2], rs[2])
    out_p, out_r = (torch.relu(z_p), torch.relu(z_r)) if relu else (z_p, z_r)
    assert out_f.dtype == dtype and out_f.shape == out_r.shape
    if layout == "channels_last":
        assert is_layout(out_f, layout), f"{what}: output lost channels_last"
    assert_close_to_ref(f"{what} output", out_f, out_p, out_r, dtype)
    g = torch.randn(out_r.shape, dtype=torch.float64)
    if relu:
        g = relu_band_grad(g, z_p, z_r, dtype)
    g = g.to(dtype)
    for o in (out_f, out_p, out_r):
        o.backward(g.to(o.dtype))
    assert_close_to_ref(f"{what} grad x", xs[0].grad, xs[1].grad, xs[2].grad, dtype)
    if residual:
        assert_close_to_ref(f"{what} grad residual", rs[0].grad, rs[1].grad, rs[2].grad, dtype)
    for name, pf, pp, pr in _params(fused, pt, ref):
        scale = None
        if name == "conv.bias" and fused.bn.training:
            # ~0 by cancellation (training-mode BN removes a per-channel constant): floor at the
            # size of the terms that cancel, |d beta| times the largest BN scale gamma/std.
            scale = (ref[1].bias.grad.abs().max() * _bn_scale64(ref, xs[2]).abs().max()).item()
        assert_close_to_ref(f"{what} grad {name}", pf.grad, pp.grad, pr.grad, dtype, scale=scale)
        pf.grad = pp.grad = pr.grad = None


def _bn_scale64(ref, x64):
    with torch.no_grad():
        y = ref[0](x64)
        var = y.var(dim=(0, 2, 3), unbiased=False)
        gamma = ref[1].weight if ref[1].weight is not None else torch.ones_like(var)
        return gamma / (var + ref[1].eps).sqrt()


def _out_hw(conv, shape):
    H, W = shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def _check_train_eval(fused, pt, ref, shape, dtype, layout, residual=False):
    for m in (fused, pt, ref):
        m.train()
    for step in range(3):
        _step(fused, pt, ref, shape, dtype, layout, f"train step {step}", residual)
    bf, bp, br = fused.bn, pt[1], ref[1]
    if br.running_mean is not None:
        assert_close_to_ref("running_mean", bf.running_mean, bp.running_mean, br.running_mean, dtype,
                                roundings=running_stat_roundings(3))
        assert_close_to_ref("running_var", bf.running_var, bp.running_var, br.running_var, dtype,
                                roundings=running_stat_roundings(3))
        # (buffers kept after track_running_stats was turned off: neither updated nor counted)
        steps = 3 if br.track_running_stats else 0
        assert bf.num_batches_tracked.item() == bp.num_batches_tracked.item() == steps
    for m in (fused, pt, ref):
        m.eval()
    _step(fused, pt, ref, (1,) + tuple(shape[1:]), dtype, layout, "eval", residual)


def _shape(cfg: ConvCfg, n=2):
    return (n, cfg.cin, cfg.hw, cfg.hw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_running_stats_every_dtype(backend, dtype):
    """momentum=1: after one training step the running statistics ARE the batch mean and the
    unbiased batch variance, m / (m - 1) = 1.0204 times the biased one over m = N*OH*OW = 50 rows.
    A biased/unbiased mix-up (or a momentum bug) is then a 2 % error, above the bound in every
    dtype (bf16: 3 roundings of 2**-8 = 1.2 % of max|running_var|); with the default momentum 0.1
    the same bug is a 0.2 % change, below one bf16 rounding."""
    cfg = CONFIGS[3]  # 1x1s1p0, 5x5: m = 2 * 25
    conv, bn = make_conv_bn(cfg, dtype, momentum=1.0)
    fused, pt, ref = _models(conv, bn, True, backend)
    for mod in (fused, pt, ref):
        mod.train()
    x = rand_input(_shape(cfg), dtype, "nchw")
    with torch.no_grad():
        fused(x), pt(x), ref(x.double())
    assert fused.bn.num_batches_tracked.item() == pt[1].num_batches_tracked.item() == 1
    assert_close_to_ref("running_mean", fused.bn.running_mean, pt[1].running_mean, ref[1].running_mean, dtype,
                        roundings=running_stat_roundings(1))
    assert_close_to_ref("running_var", fused.bn.running_var, pt[1].running_var, ref[1].running_var, dtype,
                        roundings=running_stat_roundings(1))


# ------------------------------------------------------------------------------------------------
# the main matrix: every backend x dtype x layout x ResNet conv configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_bn_relu_matches_unfused(backend, dtype, layout, cfg):
    conv, bn = make_conv_bn(cfg, dtype, layout)
    fused, pt, ref = _models(conv, bn, True, backend)
    _check_train_eval(fused, pt, ref, _shape(cfg), dtype, layout)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_bn_relu_float64_torch_backend(layout, cfg):
    conv, bn = make_conv_bn(cfg, torch.float64, layout)
    fused, pt, ref = _models(conv, bn, True, "torch")
    _check_train_eval(fused, pt, ref, _shape(cfg), torch.float64, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_bn_no_relu_with_conv_bias_and_residual(backend, dtype):
    cfg = CONFIGS[2]  # 3x3 s2
    conv, bn = make_conv_bn(cfg, dtype, "channels_last", bias=True)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(cfg.cout).to(dtype))
    fused, pt, ref = _models(conv, bn, False, backend)
    _check_train_eval(fused, pt, ref, _shape(cfg), dtype, "channels_last", residual=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_bn_relu_with_residual(backend):
    cfg = CONFIGS[1]
    conv, bn = make_conv_bn(cfg, torch.float32, "nchw")
    fused, pt, ref = _models(conv, bn, True, backend)
    _check_train_eval(fused, pt, ref, _shape(cfg), torch.float32, "nchw", residual=True)


# ------------------------------------------------------------------------------------------------
# nn.Conv2d / nn.BatchNorm2d options outside the kernels' support still work (auto -> torch)
# ------------------------------------------------------------------------------------------------
_OPTIONS = {
    "groups2": dict(conv=dict(groups=2)),
    "dilation2": dict(conv=dict(dilation=2, padding=2)),
    "reflect": dict(conv=dict(padding_mode="reflect")),
    "circular": dict(conv=dict(padding_mode="circular")),
    "same_even_kernel": dict(conv=dict(padding="same", kernel_size=4)),
    "valid": dict(conv=dict(padding="valid")),
    "bias": dict(conv=dict(bias=True)),
    "momentum_none": dict(bn=dict(momentum=None)),
    "no_affine": dict(bn=dict(affine=False)),
    "no_running_stats": dict(bn=dict(track_running_stats=False)),
    # turned off after construction: the buffers stay, training leaves them alone, eval uses them
    "running_stats_off_later": dict(after=lambda m: setattr(m.bn, "track_running_stats", False)),
}


@pytest.mark.parametrize("option", list(_OPTIONS))
def test_module_options_match_unfused(option):
    kw = dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1)
    kw.update(_OPTIONS[option].get("conv", {}))
    m = ConvBNReLU(**kw, **_OPTIONS[option].get("bn", {}))
    randomize_bn(m.bn)
    _OPTIONS[option].get("after", lambda m: None)(m)
    if m.conv.bias is not None:
        with torch.no_grad():
            m.conv.bias.normal_()
    fused, pt, ref = _models(m.conv, m.bn, True, None)
    _check_train_eval(fused, pt, ref, (2, 4, 7, 7), torch.float32, "nchw")


@pytest.mark.parametrize("backend", sorted({"aten", *ALL_BACKENDS}))
def test_running_stats_turned_off_later_on_every_backend(backend):
    """nn.BatchNorm2d with track_running_stats turned off after construction keeps its buffers:
    training uses batch statistics and updates neither the buffers nor the count; eval uses them."""
    m = ConvBNReLU(4, 6, 3, padding=1)
    randomize_bn(m.bn)
    m.bn.track_running_stats = False
    before = [b.clone() for b in m.bn.buffers()]
    fused, pt, ref = _models(m.conv, m.bn, True, backend)
    _check_train_eval(fused, pt, ref, (2, 4, 7, 7), torch.float32, "nchw")
    for b, b0 in zip(fused.bn.buffers(), before):
        assert torch.equal(b, b0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("option", ["reflect", "same_even_kernel"])
def test_explicit_padding_runs_on_kernel_backends(option, layout):
    """Other padding modes / asymmetric 'same' pad the input first (as nn.Conv2d does) and then
    run the zero-padding kernels; no fallback involved."""
    kw = dict(in_channels=3, out_channels=5, kernel_size=3, stride=1, padding=1)
    kw.update(_OPTIONS[option]["conv"])
    conv = nn.Conv2d(**kw)
    bn = nn.BatchNorm2d(5)
    randomize_bn(bn)
    fused, pt, ref = _models(conv, bn, True, "triton")
    _check_train_eval(fused, pt, ref, (2, 3, 6, 6), torch.float32, layout)


def test_unsupported_config_on_explicit_kernel_backend_raises():
    m = ConvBNReLU(4, 6, 3, padding=1, groups=2, backend="triton")
    with pytest.raises(resnet_kernels.BackendUnavailableError, match="groups=2"):
        m(torch.randn(2, 4, 5, 5))
    m = ConvBNReLU(4, 6, 3, padding=2, dilation=2, backend="triton").eval()
    with pytest.raises(resnet_kernels.BackendUnavailableError, match="dilation"):
        m(torch.randn(1, 4, 5, 5))
    m = ConvBNReLU(4, 6, 3, padding=1, dtype=torch.float64, backend="triton")
    with pytest.raises(resnet_kernels.BackendUnavailableError, match="float64"):
        m(torch.randn(2, 4, 5, 5, dtype=torch.float64))


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_raises():
    m = ConvBNReLU(3, 4, 3, padding=1, backend="cuda")
    with pytest.raises(resnet_kernels.BackendUnavailableError, match="cuda"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(resnet_kernels.BackendUnavailableError, match="cuda"):
        m.eval()(torch.randn(1, 3, 5, 5))


# ------------------------------------------------------------------------------------------------
# float64 gradcheck of the module in both modes (torch backend)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=str)
def test_gradcheck_float64(mode, cfg):
    m = ConvBNReLU(cfg.cin, 3, cfg.k, stride=cfg.stride, padding=cfg.padding, bias=True, dtype=torch.float64,
                   backend="torch")
    randomize_bn(m.bn)
    m.train(mode == "train")
    x = torch.randn(2, cfg.cin, 5, 5, dtype=torch.float64, requires_grad=True)
    names = ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# module API: constructor, from_modules, state_dict, torch.compile
# ------------------------------------------------------------------------------------------------
def test_constructor_mirrors_conv2d_and_batchnorm2d():
    m = ConvBNReLU(3, 8, 7, stride=2, padding=3, eps=1e-3, momentum=0.2)
    assert type(m.conv) is nn.Conv2d and type(m.bn) is nn.BatchNorm2d
    assert m.conv.bias is None and m.conv.kernel_size == (7, 7) and m.conv.stride == (2, 2)
    assert m.bn.eps == 1e-3 and m.bn.momentum == 0.2
    ref = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8))
    assert [k.replace("conv.", "0.").replace("bn.", "1.") for k in m.state_dict()] == list(ref.state_dict())
    m2 = ConvBN(4, 4, 1, bias=True, dtype=torch.float16)
    assert m2.conv.weight.dtype == torch.float16 and m2.conv.bias is not None
    assert "relu=False" in repr(m2) and "relu=True" in repr(m)


def test_from_modules_shares_parameters():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    m = ConvBNReLU.from_modules(conv, bn)
    assert m.conv is conv and m.bn is bn and m.conv.weight is conv.weight
    assert type(ConvBNReLU.from_modules(conv, bn, relu=False)) is ConvBN
    assert type(ConvBN.from_modules(conv, bn)) is ConvBN
    m(torch.randn(2, 3, 5, 5))
    assert bn.num_batches_tracked.item() == 1  # the shared buffer was updated
    with pytest.raises(TypeError, match="bn"):
        ConvBNReLU.from_modules(conv, nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="conv"):
        ConvBNReLU.from_modules(nn.Linear(3, 4), bn)
    with pytest.raises(ValueError, match="num_features"):
        ConvBNReLU.from_modules(conv, nn.BatchNorm2d(5))


def test_state_dict_round_trip_with_unfused():
    m = ConvBNReLU(3, 4, 3, padding=1)
    randomize_bn(m.bn)
    sd = m.state_dict()
    assert list(sd) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                        "bn.num_batches_tracked"]
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(3, 4, 3, padding=1, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(4))
    seq.load_state_dict(sd)
    m2 = ConvBNReLU(3, 4, 3, padding=1)
    m2.load_state_dict(seq.state_dict())
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(m2.eval()(x), torch.relu(seq.eval()(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_compile_fullgraph_matches_eager(mode):
    torch._dynamo.reset()
    m = ConvBNReLU(3, 6, 3, stride=2, padding=1, backend="torch")
    randomize_bn(m.bn)
    m.train(mode == "train")
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
        for (n, pe), pc in zip(eager.named_parameters(), m.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-4, msg=n)
    for (n, be), bc in zip(eager.named_buffers(), m.buffers()):
        torch.testing.assert_close(bc, be, atol=1e-6, rtol=1e-5, msg=n)


def test_channels_last_ambiguous_input_keeps_working():
    """A 1-channel channels_last input is also NCHW-contiguous: the output is NCHW, a
    channels_last residual is brought to it, and the result matches."""
    m = ConvBNReLU(1, 4, 3, padding=1).eval()
    randomize_bn(m.bn)
    x = to_layout(torch.randn(1, 1, 6, 6), "channels_last")
    res = to_layout(torch.randn(1, 4, 6, 6), "channels_last")
    ref = torch.relu(m.bn(m.conv(x)) + res)
    torch.testing.assert_close(m(x, res), ref, atol=1e-5, rtol=1e-5)
