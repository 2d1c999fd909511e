"""The conv2d_epilogue / conv2d_stats ops: forward against float64 references on every backend,
float64 gradchecks, torch.library.opcheck, argument validation and backend resolution.

Tolerances: the rule of tests/conv_ref.py (resnet_kernels.testing: max of 2x PyTorch's own error in
the same dtype vs float64 and a floor from the dtype's unit roundoff and the reduction length)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conv_ref import (ASYM, CFG_IDS, CONFIGS, DTYPES, LAYOUTS, assert_close_to_ref, is_layout, rand_input,
                      to_layout)
from rk_testing import ALL_BACKENDS, DEVICE, HAS_GPU

import resnet_kernels
from resnet_kernels import _registry
from resnet_kernels import BackendUnavailableError
from resnet_kernels.ops import conv2d_epilogue, conv2d_stats
from resnet_kernels.ops.conv2d import conv2d_epilogue_op, conv2d_stats_op

# tensors/modules created without a device go to rk_testing.DEVICE (the GPU when there is one)
pytestmark = pytest.mark.usefixtures("on_device")


def _weight(cfg, dtype, layout):
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k) / (cfg.cin * cfg.k * cfg.k) ** 0.5
    return to_layout(w.to(dtype), layout)


def _out_shape(cfg, n):
    return (n, cfg.cout) + cfg.out_hw()


# ------------------------------------------------------------------------------------------------
# forward: every backend x dtype x layout x ResNet conv configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS + [ASYM], ids=CFG_IDS + [ASYM.name])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_epilogue_forward(backend, dtype, layout, cfg):
    x = rand_input((2, cfg.cin, cfg.hw, cfg.hw), dtype, layout)
    w = _weight(cfg, dtype, layout)
    scale = torch.rand(cfg.cout) + 0.5
    bias = torch.randn(cfg.cout)
    res = rand_input(_out_shape(cfg, 2), dtype, layout, 0.0)
    out = conv2d_epilogue(x, w, scale, bias, res, stride=cfg.stride, padding=cfg.padding, relu=True,
                          backend=backend)
    assert out.dtype == dtype and tuple(out.shape) == _out_shape(cfg, 2) and is_layout(out, layout)
    c = (1, -1, 1, 1)
    ref = torch.relu(F.conv2d(x.double(), w.double(), stride=cfg.stride, padding=cfg.padding)
                     * scale.double().view(c) + bias.double().view(c) + res.double())
    # PyTorch unfused in the same dtype: conv, then BN-as-affine, add, ReLU, each rounding.
    pt = torch.relu(F.conv2d(x, w, stride=cfg.stride, padding=cfg.padding) * scale.to(dtype).view(c)
                    + bias.to(dtype).view(c) + res)
    assert_close_to_ref("conv2d_epilogue", out, pt, ref, dtype)

    # No per-channel terms, no residual, no ReLU: the bare convolution.
    out = conv2d_epilogue(x, w, stride=cfg.stride, padding=cfg.padding, backend=backend)
    ref = F.conv2d(x.double(), w.double(), stride=cfg.stride, padding=cfg.padding)
    assert_close_to_ref("conv2d_epilogue (bare)", out, F.conv2d(x, w, stride=cfg.stride, padding=cfg.padding),
                        ref, dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_stats_forward(backend, dtype, layout, cfg):
    x = rand_input((2, cfg.cin, cfg.hw, cfg.hw), dtype, layout)
    w = _weight(cfg, dtype, layout)
    y, mean, var = conv2d_stats(x, w, stride=cfg.stride, padding=cfg.padding, backend=backend)
    assert y.dtype == dtype and is_layout(y, layout) and tuple(y.shape) == _out_shape(cfg, 2)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (cfg.cout,)
    y64 = F.conv2d(x.double(), w.double(), stride=cfg.stride, padding=cfg.padding)
    y_pt = F.conv2d(x, w, stride=cfg.stride, padding=cfg.padding)
    assert_close_to_ref("conv2d_stats y", y, y_pt, y64, dtype)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    # PyTorch's BN takes the statistics of the rounded conv output, in fp32.
    var_pt, mean_pt = torch.var_mean(y_pt.float(), dim=(0, 2, 3), correction=0)
    # the statistics are float32 whatever the activations' dtype: float32's floor (a 1 % error,
    # a biased/unbiased mix-up over these N*OH*OW <= 72 rows, fails in every dtype)
    assert_close_to_ref("conv2d_stats mean", mean, mean_pt, mean64, torch.float32)
    assert_close_to_ref("conv2d_stats var", var, var_pt, var64, torch.float32)
    assert (var >= 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_layout, w_layout", [("channels_last", "nchw"), ("nchw", "channels_last")])
def test_weight_layout_and_half_per_channel(backend, x_layout, w_layout):
    """The weight may have either dense layout whatever x's is; per-channel vectors may be in the
    activation dtype (a model.half() BatchNorm) and are used in fp32."""
    cfg, dtype = CONFIGS[2], torch.float16
    x = rand_input((2, cfg.cin, cfg.hw, cfg.hw), dtype, x_layout)
    w = _weight(cfg, dtype, w_layout)
    scale, bias = (torch.rand(cfg.cout) + 0.5).to(dtype), torch.randn(cfg.cout).to(dtype)
    out = conv2d_epilogue(x, w, scale, bias, stride=2, padding=1, relu=True, backend=backend)
    assert is_layout(out, x_layout)
    c = (1, -1, 1, 1)
    ref = torch.relu(F.conv2d(x.double(), w.double(), stride=2, padding=1) * scale.double().view(c)
                     + bias.double().view(c))
    pt = torch.relu(F.conv2d(x, w, stride=2, padding=1) * scale.view(c) + bias.view(c))
    assert_close_to_ref("conv2d_epilogue", out, pt, ref, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_forward_torch(layout):
    cfg = CONFIGS[2]
    x = rand_input((2, cfg.cin, cfg.hw, cfg.hw), torch.float64, layout)
    w = _weight(cfg, torch.float64, layout)
    scale, bias = torch.rand(cfg.cout, dtype=torch.float64), torch.randn(cfg.cout, dtype=torch.float64)
    out = conv2d_epilogue(x, w, scale, bias, stride=2, padding=1, relu=True, backend="auto")
    ref = torch.relu(F.conv2d(x, w, stride=2, padding=1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    y, mean, var = conv2d_stats(x, w, stride=2, padding=1)
    assert mean.dtype == torch.float64
    v, m = torch.var_mean(F.conv2d(x, w, stride=2, padding=1), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, m, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(var, v, atol=1e-12, rtol=1e-12)


def test_groups_and_dilation_auto_runs_torch():
    x = torch.randn(2, 4, 7, 7)
    w = torch.randn(6, 2, 3, 3)
    b = torch.randn(6)
    out = conv2d_epilogue(x, w, None, b, stride=1, padding=2, dilation=2, groups=2, relu=True, backend="auto")
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, w, b, 1, 2, 2, 2)), atol=1e-5, rtol=1e-5)
    y, mean, var = conv2d_stats(x, w, padding=2, dilation=2, groups=2)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 2, 2, 2), atol=1e-5, rtol=1e-5)
    v, m = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, v, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# gradients (float64, torch backend)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_epilogue_gradcheck(layout, relu):
    d = dict(dtype=torch.float64)
    x = to_layout(torch.randn(2, 3, 5, 5, **d), layout).requires_grad_()
    w = to_layout(torch.randn(4, 3, 3, 3, **d), layout).requires_grad_()
    scale = (torch.rand(4, **d) + 0.5).requires_grad_()
    bias = torch.randn(4, **d).requires_grad_()
    res = to_layout(torch.randn(2, 4, 3, 3, **d), layout).requires_grad_()

    def f(x, w, scale, bias, res):
        return conv2d_epilogue(x, w, scale, bias, res, stride=2, padding=1, relu=relu, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, scale, bias, res), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_gradcheck(layout):
    d = dict(dtype=torch.float64)
    x = to_layout(torch.randn(2, 3, 5, 5, **d), layout).requires_grad_()
    w = to_layout(torch.randn(4, 3, 3, 3, **d), layout).requires_grad_()
    cy, cm, cv = torch.randn(2, 4, 5, 5, **d), torch.randn(4, **d), torch.randn(4, **d)

    def f(x, w):
        y, mean, var = conv2d_stats(x, w, padding=1, backend="torch")
        return (y * cy).sum() + (mean * cm).sum() + (var * cv).sum(), y, mean, var

    assert torch.autograd.gradcheck(f, (x, w), fast_mode=True)


def test_epilogue_backward_only_some_inputs():
    """Gradients requested for a subset of the inputs (e.g. frozen weights) are correct."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    out = conv2d_epilogue(x, w, scale, None, padding=1, relu=True)
    ref = torch.relu(F.conv2d(x, w, padding=1) * scale.view(1, -1, 1, 1))
    g = torch.randn_like(ref)
    gx, gs = torch.autograd.grad(out, (x, scale), g)
    rx, rs = torch.autograd.grad(ref, (x, scale), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck
# ------------------------------------------------------------------------------------------------
def _opcheck_samples(dtype, backend):
    d = dict(dtype=dtype)
    x = torch.randn(2, 3, 6, 6, **d)
    w = torch.randn(5, 3, 3, 3, **d)
    xc, wc = to_layout(x, "channels_last"), to_layout(w, "channels_last")
    s, b = torch.rand(5) + 0.5, torch.randn(5)
    r = torch.randn(2, 5, 3, 3, **d)
    epi = [
        (x, w, s, b, r, [2, 2], [1, 1], [1, 1], 1, True, backend),
        (xc.clone().requires_grad_(), wc.clone().requires_grad_(), s.clone().requires_grad_(),
         b.clone().requires_grad_(), to_layout(r, "channels_last").requires_grad_(), [2, 2], [1, 1], [1, 1], 1,
         True, backend),
        (x.clone().requires_grad_(), w.clone().requires_grad_(), None, None, None, [1, 1], [0, 0], [1, 1], 1,
         False, backend),
    ]
    stats = [
        (x.clone().requires_grad_(), w.clone().requires_grad_(), [1, 1], [1, 1], [1, 1], 1, backend),
        (xc, wc, [2, 2], [0, 0], [1, 1], 1, backend),
    ]
    return epi, stats


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    epi, stats = _opcheck_samples(torch.float32, backend)
    if backend != "torch":
        epi, stats = epi[1:2], stats[:1]  # the interpreter is slow: one sample each
    for args in epi:
        torch.library.opcheck(conv2d_epilogue_op, args)
    for args in stats:
        torch.library.opcheck(conv2d_stats_op, args)


def test_opcheck_float64_groups():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(conv2d_epilogue_op, (x, w, None, torch.randn(6), None, [1, 1], [2, 2], [2, 2], 2, True,
                                               "auto"))
    torch.library.opcheck(conv2d_stats_op, (x, w, [1, 1], [2, 2], [2, 2], 2, "auto"))


# ------------------------------------------------------------------------------------------------
# validation: every bad argument is named
# ------------------------------------------------------------------------------------------------
def _good():
    return dict(x=torch.randn(2, 3, 6, 6), w=torch.randn(4, 3, 3, 3), scale=torch.rand(4), bias=torch.randn(4),
                res=torch.randn(2, 4, 6, 6))


_BAD = [
    ("x", lambda g: g.update(x=g["x"][0]), ValueError, "x must be a 4-D"),
    ("x dtype", lambda g: g.update(x=g["x"].to(torch.int32)), TypeError, "x must be float"),
    ("x non-dense", lambda g: g.update(x=g["x"][:, :, ::2]), ValueError, "x must be contiguous"),
    ("x not a tensor", lambda g: g.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("weight dtype", lambda g: g.update(w=g["w"].double()), TypeError, "weight must have the dtype"),
    ("weight 3-D", lambda g: g.update(w=g["w"][0]), ValueError, "weight must be a 4-D"),
    ("weight Cin", lambda g: g.update(w=torch.randn(4, 2, 3, 3)), ValueError, r"weight.shape\[1\]"),
    ("scale shape", lambda g: g.update(scale=torch.rand(5)), ValueError, "scale must be a 1-D"),
    ("bias shape", lambda g: g.update(bias=torch.rand(4, 1)), ValueError, "bias must be a 1-D"),
    ("scale dtype", lambda g: g.update(scale=torch.ones(4, dtype=torch.int64)), TypeError, "scale must be float"),
    ("residual shape", lambda g: g.update(res=torch.randn(2, 4, 5, 5)), ValueError, "residual must have the output"),
    ("residual dtype", lambda g: g.update(res=g["res"].half()), TypeError, "residual must have the dtype"),
    ("residual layout", lambda g: g.update(res=to_layout(g["res"], "channels_last")), ValueError,
     "residual must have the output's memory layout"),
    ("too small", lambda g: g.update(x=torch.randn(2, 3, 1, 1), w=torch.randn(4, 3, 5, 5)), ValueError,
     "x's spatial size .* is smaller than the 5x5 kernel"),
]


@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_arguments_are_named(case):
    _, mutate, exc, msg = case
    g = _good()
    mutate(g)
    with pytest.raises(exc, match=msg):
        conv2d_epilogue(g["x"], g["w"], g["scale"], g["bias"], g["res"], padding=1, relu=True, backend="torch")


@pytest.mark.parametrize("kw, msg", [
    (dict(stride=0), "stride must be >= 1"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(dilation=0), "dilation must be >= 1"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
    (dict(groups=2), "groups=2 must divide"),
    (dict(groups=0), "groups must be a positive int"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_geometry_is_named(kw, msg):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises((ValueError, TypeError), match=msg):
        conv2d_epilogue(x, w, **kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        conv2d_stats(x, w, **kw)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_raises():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        conv2d_epilogue(x, w, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        conv2d_stats(x, w, backend="cuda")
    with resnet_kernels.use_backend("cuda"), pytest.raises(BackendUnavailableError):
        conv2d_stats(x, w)


@pytest.mark.parametrize("what, x, w, kw, msg", [
    ("float64", torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64), {},
     "float64"),
    ("groups", torch.randn(2, 4, 6, 6), torch.randn(4, 2, 3, 3), dict(groups=2), "groups=2"),
    ("dilation", torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), dict(dilation=2), "dilation"),
])
def test_kernel_backends_refuse_unsupported_configs(what, x, w, kw, msg):
    x, w = x.to(DEVICE), w.to(DEVICE)  # made at collection time, outside the on_device fixture
    # the implementations that declare what they support (the kernels): from the registry
    kernels = [i.backend for i in _registry.implementations("conv2d_epilogue")
               if i.supports is not None and i.backend in ALL_BACKENDS]
    assert kernels
    for backend in kernels:
        with pytest.raises(BackendUnavailableError, match=f"does not support this call: .*{msg}"):
            conv2d_epilogue(x, w, backend=backend, **kw)
        with pytest.raises(BackendUnavailableError, match=msg):
            conv2d_stats(x, w, backend=backend, **kw)
    # auto runs them (on an implementation that supports them)
    out = conv2d_epilogue(x, w, backend="auto", **kw)
    torch.testing.assert_close(out, F.conv2d(x, w, **kw))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = conv2d_epilogue(x, w, torch.ones(4), torch.zeros(4), padding=1, relu=True, backend=backend)
    assert out.shape == (0, 4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()
    y, mean, var = conv2d_stats(x, w, padding=1, backend=backend)
    assert y.shape == (0, 4, 6, 6) and torch.isnan(mean).all() and torch.isnan(var).all()


def test_allow_tf32_is_passed_from_cudnn_flag(monkeypatch):
    from resnet_kernels.backends import torch_conv2d
    seen = []
    real = torch_conv2d.conv2d_forward

    def spy(*args, **kw):
        seen.append(args[10])
        return real(*args, **kw)

    monkeypatch.setattr(torch_conv2d, "conv2d_forward", spy)
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1)
    old = torch.backends.cudnn.conv.fp32_precision
    try:
        for prec in ("ieee", "tf32"):  # the new per-operator API (the legacy getter raises here)
            torch.backends.cudnn.conv.fp32_precision = prec
            conv2d_epilogue(x, w, backend="torch")
            conv2d_stats(x, w, backend="torch")
        torch.backends.cudnn.conv.fp32_precision = "none"
        for flag in (False, True):  # the legacy switch
            torch.backends.cudnn.allow_tf32 = flag
            conv2d_epilogue(x, w, backend="torch")
    finally:
        torch.backends.cudnn.conv.fp32_precision = old
    assert seen == [False, False, True, True, False, True]
