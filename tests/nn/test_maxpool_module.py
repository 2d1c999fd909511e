"""resnet_kernels.nn.MaxPool2d (drop-in nn.MaxPool2d on the one-byte-argmax op) and the fused
ResNets' stem routing (models/resnet.py ``stem_pool``, reported by ``fuse``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels.nn import MaxPool2d
from resnet_kernels.nn import pool as rk_pool


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the op's public function ran (through resnet_kernels.nn.pool)."""
    calls = []
    orig = rk_pool.max_pool2d

    def wrapped(*a, **k):
        calls.append(k.get("backend"))
        return orig(*a, **k)

    monkeypatch.setattr(rk_pool, "max_pool2d", wrapped)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_is_nn_maxpool2d(backend, layout, op_calls):
    m = MaxPool2d(3, 2, 1, backend=backend)
    ref = nn.MaxPool2d(3, 2, 1)
    assert isinstance(m, nn.MaxPool2d) and m.state_dict() == {} and "backend='" + backend + "'" in repr(m)
    x = rt.layouts(torch.randn(2, 3, 9, 7), layout).to(rt.DEVICE if backend == "triton" else "cpu")
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    out, want = m(x), ref(xr)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, xr, g)[0])
    assert op_calls == [backend]


def test_module_settings_the_op_does_not_cover_run_nn_maxpool2d(op_calls):
    x = torch.randn(1, 2, 9, 9)
    for kw in (dict(dilation=2), dict(ceil_mode=True)):
        m = MaxPool2d(3, 2, 1, backend="torch", **kw)
        assert rk_pool.config_reason(m) is not None
        torch.testing.assert_close(m(x), nn.MaxPool2d(3, 2, 1, **kw)(x))
    out, idx = MaxPool2d(3, 2, 1, return_indices=True, backend="torch")(x)
    assert idx.dtype == torch.int64
    assert op_calls == []
    with pytest.raises(ValueError, match="MaxPool2d: .*backend"):
        MaxPool2d(3, backend="nope")


def test_module_auto_on_cpu_runs_the_plain_layer(op_calls):
    m = MaxPool2d(3, 2, 1, backend="auto")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x), F.max_pool2d(x, 3, 2, 1))
    assert op_calls == []  # 'auto' on CPU tensors: the user's own layer, like the fused units
    assert rk_pool.pool_reason(m) is None


def _pair_models(**tv_kwargs):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10, **tv_kwargs).double()
    return tv, copy.deepcopy(tv)


def _fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad


def test_fuse_routes_the_torchvision_stem_maxpool(op_calls):
    model, twin = _pair_models()
    _, report = rk.fuse(model, backend="torch", report=True)
    assert ("", "ResNet: conv1+bn1+relu, maxpool") in report.changed
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    out, gx = _fwd_bwd(model, x)
    ref, gref = _fwd_bwd(twin, x)
    assert op_calls == ["torch"]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, gref, rtol=1e-9, atol=1e-9)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=lambda m, n=n: f"{n}: {m}")
    rk.unfuse(model)
    model(x)
    assert op_calls == ["torch"]  # unfused: torchvision's own forward
    assert type(model.maxpool) is nn.MaxPool2d  # fuse never changed the pooling module


def test_fuse_auto_on_cpu_and_uncovered_maxpools_run_the_module(op_calls):
    model, _ = _pair_models()
    rk.fuse(model)  # backend None: 'auto' in force, CPU tensors
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert op_calls == []
    model, twin = _pair_models()
    model.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    twin.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    _, report = rk.fuse(model, backend="torch", report=True)
    assert ("maxpool", "ceil_mode=True; runs as the plain module") in report.skipped
    x = torch.randn(2, 3, 36, 36, dtype=torch.float64)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-9, atol=1e-9)
    assert op_calls == []
    model.maxpool = nn.Identity()  # replaced after fuse: still runs, as the module
    assert model(x).shape == (2, 10)


def test_own_resnet_routes_its_maxpool_and_fx_trace_keeps_the_op(op_calls):
    model = rk.models.resnet18(num_classes=4, backend="torch").double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    want = model(x)
    assert op_calls == ["torch"]
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_function" and n.target is rk_pool._pool for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), want)
    assert op_calls == ["torch", "torch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_head_pool_is_avgpool_and_flatten_with_its_gradient_in_the_input_layout(dtype, channels_last):
    """The fused ResNets' ``torch.flatten(avgpool(x), 1)`` (nn/pool.py ``head_pool``): bitwise the
    output and the input gradient of nn.AdaptiveAvgPool2d((1, 1)) + flatten, odd shapes, every dtype;
    the gradient dense in x's layout (channels_last for a channels_last x: what the last residual
    block's backward consumes without a copy); double backward through it as through aten's pool."""
    m = nn.AdaptiveAvgPool2d((1, 1))
    x0 = torch.randn(3, 5, 7, 6, dtype=torch.float64).to(dtype)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    a, b = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out_a, out_b = rk_pool.head_pool(m, a), torch.flatten(m(b), 1)
    assert out_a.grad_fn is not None and "MeanHW" in type(out_a.grad_fn).__name__
    assert torch.equal(out_a, out_b)
    g = torch.randn(out_b.shape, dtype=torch.float64).to(dtype)
    out_a.backward(g)
    out_b.backward(g)
    assert torch.equal(a.grad, b.grad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert a.grad.is_contiguous(memory_format=fmt)
    if dtype == torch.float64:
        xg = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(rk_pool.head_pool(m, xg).pow(2).sum(), xg, create_graph=True)
        xr = x0.clone().requires_grad_()
        (gr,) = torch.autograd.grad(torch.flatten(m(xr), 1).pow(2).sum(), xr, create_graph=True)
        assert torch.equal(gx, gr)
        gx.sum().backward()
        gr.sum().backward()
        assert torch.equal(xg.grad, xr.grad)


def test_head_pool_runs_the_module_where_it_does_not_apply():
    """Another output size, hooks, no gradient needed: the module itself (same values)."""
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    for m in (nn.AdaptiveAvgPool2d((2, 2)), nn.AdaptiveMaxPool2d((1, 1))):
        out = rk_pool.head_pool(m, x)
        assert torch.equal(out, torch.flatten(m(x), 1)) and "MeanHW" not in type(out.grad_fn).__name__
    hooked = nn.AdaptiveAvgPool2d(1)
    seen = []
    hooked.register_forward_hook(lambda mod, i, o: seen.append(1))
    rk_pool.head_pool(hooked, x)
    assert seen == [1]
    with torch.no_grad():
        assert torch.equal(rk_pool.head_pool(nn.AdaptiveAvgPool2d(1), x), x.mean((2, 3)))
