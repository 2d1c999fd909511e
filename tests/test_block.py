"""The training residual block as one autograd function (resnet_kernels/_block.py): when it is used,
and that it computes exactly what torchvision's block computes (float64: outputs, the input's and
every parameter's gradient, running statistics, num_batches_tracked, several SGD steps), with
frozen parameters, an input without gradient, BatchNorms without affine parameters, and that a
failing call changes nothing. The whole-model parity tests (tests/models) run through it too:
every fused BasicBlock/Bottleneck in training takes this path.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn

import resnet_kernels as rk
from resnet_kernels import _block
from resnet_kernels.models import resnet as rk_resnet

BACKENDS = ["torch"]


@pytest.fixture
def block_calls(monkeypatch):
    """Counts _BlockFn forwards and backwards."""
    calls = {"forward": 0, "backward": 0}
    fwd, bwd = _block._BlockFn.forward, _block._BlockFn.backward

    def forward(ctx, *a):
        calls["forward"] += 1
        return fwd(ctx, *a)

    def backward(ctx, *a):
        calls["backward"] += 1
        return bwd(ctx, *a)

    monkeypatch.setattr(_block._BlockFn, "forward", staticmethod(forward))
    monkeypatch.setattr(_block._BlockFn, "backward", staticmethod(backward))
    return calls


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))


def _pair(arch, backend, **kw):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(num_classes=7, **kw).double()
    _randomise_bn(ref)
    net = rk.fuse(copy.deepcopy(ref), backend=backend)
    return ref, net


def _close(a, b, what):
    assert a is not None and b is not None, what
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= 1e-9 * scale, f"{what}: {err:.3g} > 1e-9 x {scale:.3g}"


def _compare(ref, net, xr, xo, out_r, out_o):
    _close(out_o, out_r, "output")
    if xr.grad is not None:
        _close(xo.grad, xr.grad, "input gradient")
    for (n, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n
        else:
            _close(q.grad, p.grad, f"{n}.grad")
    for (n, a), (_, b) in zip(ref.named_buffers(), net.named_buffers()):
        if a.is_floating_point():
            _close(b, a, n)
        else:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_training_steps_match_torchvision_in_float64(arch, backend, block_calls):
    ref, net = _pair(arch, backend)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_o = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(2)
    steps = 2 if arch == "resnet18" else 1  # (resnet50 in float64: ~10 s a step here)
    for step in range(steps):
        x = torch.randn(2, 3, 48 if arch == "resnet18" else 40, 48 if arch == "resnet18" else 40,
                        dtype=torch.float64)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_o = ref(xr), net(xo)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_o.backward(g)
        _compare(ref, net, xr, xo, out_r, out_o)
        opt_r.step()
        opt_o.step()
        opt_r.zero_grad()
        opt_o.zero_grad()
    blocks = sum(isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))
                 for m in net.modules())
    blocks += backend in rk_resnet._STEM_BACKENDS  # (the stem: a one-unit block, nothing added)
    assert block_calls == {"forward": steps * blocks, "backward": steps * blocks}
    for p, q in zip(ref.parameters(), net.parameters()):
        _close(q, p, "parameter after SGD")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_and_an_input_without_gradient(backend, block_calls):
    ref, net = _pair("resnet50", backend)
    for model in (ref, net):
        model.layer1[0].bn1.weight.requires_grad_(False)
        model.layer1[0].conv2.weight.requires_grad_(False)
        model.layer1[0].downsample[1].bias.requires_grad_(False)
        model.layer2[0].conv1.weight.requires_grad_(False)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    # the stem's input needs no gradient (as in training): the first block's input does
    xr, xo = x.clone(), x.clone()
    out_r, out_o = ref(xr), net(xo)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    _compare(ref, net, xr, xo, out_r, out_o)
    assert block_calls["backward"] > 0


def test_a_block_whose_input_needs_no_gradient(block_calls):
    torch.manual_seed(0)
    blk = torchvision.models.resnet.BasicBlock(4, 4).double()
    _randomise_bn(blk)
    ours = rk.fuse(copy.deepcopy(blk), backend="torch")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out_r, out_o = blk(x), ours(x)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    _compare(blk, ours, x, x, out_r, out_o)
    assert block_calls["backward"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorms_without_affine_parameters(backend, block_calls):
    ref, net = _pair("resnet18", backend)
    for model in (ref, net):  # (torchvision's init would set the affine parameters, so drop them after)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.affine, m.weight, m.bias = False, None, None
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_o = ref(xr), net(xo)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    _compare(ref, net, xr, xo, out_r, out_o)
    assert block_calls["backward"] > 0


def test_not_used_in_eval_or_without_gradients(block_calls):
    ref, net = _pair("resnet18", "torch")
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    net.eval()
    net(x.requires_grad_())
    assert block_calls["forward"] == 0


def test_not_used_under_torch_compile_tracing(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    blk = rk.fuse(torchvision.models.resnet.BasicBlock(4, 4), backend="torch")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert not _block.applicable(x, [blk.conv1, blk.conv2], [blk.bn1, blk.bn2], "torch")
    monkeypatch.undo()
    assert _block.applicable(x, [blk.conv1, blk.conv2], [blk.bn1, blk.bn2], "torch")
    assert not seen


def test_momentum_none_and_no_running_statistics(block_calls):
    norm = functools.partial(nn.BatchNorm2d, momentum=None)
    ref, net = _pair("resnet18", "torch", norm_layer=norm)
    for step in range(2):
        x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
        out_r, out_o = ref(x), net(x)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_o.backward(g)
        _compare(ref, net, x, x, out_r, out_o)
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    ref, net = _pair("resnet18", "torch", norm_layer=norm)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    out_r, out_o = ref(x), net(x)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    _compare(ref, net, x, x, out_r, out_o)
    assert block_calls["backward"] > 0


def test_a_failing_call_changes_nothing():
    blk = torchvision.models.resnet.BasicBlock(4, 4).double()
    ours = rk.fuse(copy.deepcopy(blk), backend="torch")
    before = copy.deepcopy(ours.state_dict())
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64, requires_grad=True)  # one value per channel: BN refuses
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(x)
    after = ours.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_explicit_backend_without_the_block_ops_keeps_the_per_op_path(monkeypatch, block_calls):
    monkeypatch.setattr(_block, "backend_ok", lambda backend: False)
    ref, net = _pair("resnet18", "torch")
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    out_r, out_o = ref(x), net(x)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    _compare(ref, net, x, x, out_r, out_o)
    assert block_calls == {"forward": 0, "backward": 0}


def test_which_explicit_backends_run_the_block():
    """triton, torch and cuda (its csrc BatchNorm writes and reads the 1-bit mask, its csrc
    dgrad/wgrad compute the BN-backward operand: counted below its per-op graph, tests/test_count.py)
    run the block; aten (separate passes around cuDNN) keeps the per-op graph."""
    assert _block._BLOCK_BACKENDS == ("triton", "torch", "cuda")
    assert all(_block.backend_ok(b) for b in ("auto", "triton", "torch", "cuda"))
    assert not _block.backend_ok("aten")


def _tiny_blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

    torch.manual_seed(3)
    proj = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    return {"basic-proj": (BasicBlock(8, 16, stride=2, downsample=proj), (2, 8, 9, 9)),
            "bottleneck-id": (Bottleneck(16, 4), (2, 16, 6, 6))}


@pytest.mark.parametrize("name", ["basic-proj", "bottleneck-id"])
def test_triton_block_matches_torchvision_in_float32(name, block_calls):
    """The Triton kernels (under the interpreter without a GPU) through the whole block: output,
    input and parameter gradients, running statistics, each within the project's policy (2x
    torchvision's own fp32 error against float64, with the floor of the longest sum)."""
    import rk_testing as rt
    from resnet_kernels import testing

    if not (rt.HAS_GPU or rt.interpreting()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    blk, shape = _tiny_blocks()[name]
    _randomise_bn(blk)
    dev = rt.DEVICE
    ref64 = copy.deepcopy(blk).double().to(dev)
    pt = copy.deepcopy(blk).float().to(dev)
    ours = rk.fuse(copy.deepcopy(blk).float().to(dev), backend="triton")
    x = torch.randn(shape, dtype=torch.float64, device=dev).contiguous(memory_format=torch.channels_last)
    outs = []
    for model, dt in ((ref64, torch.float64), (pt, torch.float32), (ours, torch.float32)):
        xi = x.detach().to(dt).requires_grad_()
        out = model(xi)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.numel(), device=dev,
                                                            dtype=dt).view_as(out))
        outs.append((out, xi.grad, model))
    (r_out, r_gx, r_m), (p_out, p_gx, p_m), (o_out, o_gx, o_m) = outs
    n = shape[0] * shape[2] * shape[3]
    with torch.no_grad():
        testing.assert_close_to_ref("output", o_out, p_out, r_out, torch.float32, n_terms=n)
        testing.assert_close_to_ref("input gradient", o_gx, p_gx, r_gx, torch.float32, n_terms=n,
                                    roundings=2 * testing.ROUNDINGS)
        _assert_params_and_buffers_close(o_m, p_m, r_m, n)
    assert block_calls == {"forward": 1, "backward": 1}


def _assert_params_and_buffers_close(ours, pt, ref, n):
    """Parameter gradients and floating buffers of ``ours`` (float32) against torchvision's in
    float32 and float64, within the project's policy; integer buffers equal."""
    from resnet_kernels import testing

    for (k, a), (_, b), (_, c) in zip(ours.named_parameters(), pt.named_parameters(), ref.named_parameters()):
        testing.assert_close_to_ref(f"{k}.grad", a.grad, b.grad, c.grad, torch.float32, n_terms=n,
                                    roundings=2 * testing.ROUNDINGS)
    for (k, a), (_, b), (_, c) in zip(ours.named_buffers(), pt.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            testing.assert_close_to_ref(k, a, b, c, torch.float32, n_terms=n)
        else:
            assert torch.equal(a, c), k


class _Stem(nn.Module):
    """A ResNet stem's conv + BN + ReLU, run by the fused models as a one-unit block with nothing
    added (``functional.residual_block(..., add_input=False)``)."""

    def __init__(self, cin=3, cout=8):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_the_stem_as_a_one_unit_block(backend, input_grad, block_calls):
    """relu(bn(conv7x7/2(x))) for a 3-channel image through ``residual_block(add_input=False)`` (the
    fused ResNets' stem in training on ``models.resnet._STEM_BACKENDS``): output, gradients (the
    image's too where it needs one) and running statistics against the layers' float64 copy, within
    the project's policy; one block forward and backward, no bn_running_update call (the update is
    in the BatchNorm's forward launch)."""
    import rk_testing as rt
    from resnet_kernels import testing
    from resnet_kernels.functional import residual_block

    if backend == "triton" and not (rt.HAS_GPU or rt.interpreting()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(4)
    stem = _Stem()
    _randomise_bn(stem)
    dev = rt.DEVICE if backend == "triton" else "cpu"
    ref64, pt, ours = (copy.deepcopy(stem).to(dev, dt) for dt in (torch.float64, torch.float32, torch.float32))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=dev).contiguous(memory_format=torch.channels_last)
    outs = []
    for model, dt in ((ref64, torch.float64), (pt, torch.float32), (ours, torch.float32)):
        xi = x.detach().to(dt).requires_grad_(input_grad)
        if model is ours:
            with _UpdateCalls() as calls:
                out = residual_block(xi, [(model.conv, model.bn)], None, backend=backend, add_input=False)
            assert calls.sizes == [] and calls.tail == [1], (calls.sizes, calls.tail)
        else:
            out = model(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), device=dev, dtype=dt).view_as(out))
        outs.append((out, xi.grad, model))
    (r_out, r_gx, r_m), (p_out, p_gx, p_m), (o_out, o_gx, o_m) = outs
    n = 2 * 8 * 8
    with torch.no_grad():
        testing.assert_close_to_ref("output", o_out, p_out, r_out, torch.float32, n_terms=n)
        if input_grad:
            testing.assert_close_to_ref("input gradient", o_gx, p_gx, r_gx, torch.float32, n_terms=n,
                                        roundings=2 * testing.ROUNDINGS)
        else:
            assert o_gx is None
        _assert_params_and_buffers_close(o_m, p_m, r_m, n)
    assert block_calls == {"forward": 1, "backward": 1}


def test_double_backward_raises_instead_of_dropping_terms():
    blk = rk.fuse(torchvision.models.resnet.BasicBlock(4, 4).double(), backend="torch")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(blk(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_prologue_path_saves_no_normalised_activation_and_changes_nothing(backend, monkeypatch):
    """With the operand prologue (``_PROLOGUE_BACKENDS``: inner units' BN + ReLU inside the next
    convolution, ``conv2d_bn_stats``; the backward recomputes that input, ``conv2d_backward`` with
    x=None) a bottleneck saves x, the bits, y_1..y_3 and the weights: no h. Its output, every
    gradient and the running statistics are bitwise those of the path that writes and saves h
    (same implementation: the torch reference in float64; the Triton kernels under the
    interpreter in float32, which recompute h with batch_norm_act's own operations)."""
    import rk_testing as rt

    if backend == "triton" and not (rt.HAS_GPU or rt.interpreting()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    dt = torch.float64 if backend == "torch" else torch.float32
    dev = rt.DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(0)
    blk = torchvision.models.resnet.Bottleneck(16, 4)
    _randomise_bn(blk)
    x0 = torch.randn(2, 16, 6, 6, dtype=dt, device=dev).contiguous(memory_format=torch.channels_last)
    results = []
    for prologue in (True, False):
        monkeypatch.setattr(_block, "_PROLOGUE_BACKENDS", (backend,) if prologue else ())
        m = rk.fuse(copy.deepcopy(blk).to(dt).to(dev), backend=backend)
        x = x0.clone().requires_grad_()
        out = m(x)
        saved = out.grad_fn.saved_tensors
        assert len(saved) == (8 if prologue else 10), len(saved)  # x, bits, 3 y, 3 weights (+ h_1, h_2)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dt, device=dev).view_as(out))
        results.append([out.detach(), x.grad] + [p.grad for p in m.parameters()] + list(m.buffers()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# 'auto' chooses the prologue graph per unit: where the implementation it picks for that unit's
# conv2d_bn_stats applies the BN + ReLU in its loads (Impl.operand_prologue). A fake such
# implementation (the torch reference's launcher, counted when it runs) and a timer that makes it
# the fastest only for 3x3 convolutions: in a bottleneck unit 2 (3x3) takes the prologue, unit 3
# (1x1) convolves a written h_2.
_FAKE_RAN: list = []


def _fake_prologue(y_prev, mean, var, bn_weight, bn_bias, eps, weight, *rest):
    from resnet_kernels.backends import torch_conv2d

    _FAKE_RAN.append(tuple(weight.shape[2:]))
    return torch_conv2d.conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, *rest)


@pytest.mark.parametrize("fast_for", [(), ((3, 3),), ((3, 3), (1, 1))])
def test_auto_takes_the_prologue_per_unit_where_the_chosen_implementation_applies_it(fast_for, tmp_path, monkeypatch,
                                                                                      block_calls):
    import sys

    from resnet_kernels import _registry, _tune
    from resnet_kernels._registry import Backend, Impl

    sys.modules.setdefault(__name__, sys.modules[__name__])
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)

    def timer(fn, device):
        _FAKE_RAN.clear()
        fn()
        return 0.5 if _FAKE_RAN and _FAKE_RAN[-1] in fast_for else (2.0 if _FAKE_RAN else 1.0)

    fake = Backend("fakepro", "a test implementation with the operand prologue", lambda device: None)
    impl = Impl("conv2d_bn_stats", "fakepro", f"{__name__}:_fake_prologue", priority=95, auto_on=("cpu",),
                operand_prologue=True)
    torch.manual_seed(0)
    blk = torchvision.models.resnet.Bottleneck(16, 4).double()
    _randomise_bn(blk)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    with _registry.registered(fake, [impl]), _tune.testing(timer=timer, devices=("cpu",)):
        ours = rk.fuse(copy.deepcopy(blk), backend="auto")
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        with _tune.recording() as decisions:
            out_o = ours(xo)
        out_r = blk(xr)
        chosen = [d.impl for d in decisions if d.op == "conv2d_bn_stats"]
        assert chosen == ["fakepro"] * len(fast_for), decisions
        saved = [t for t in out_o.grad_fn.saved_tensors if t is not None]
        # x, bits, y_1..y_3, 3 weights, and h_1 / h_2 where the next unit did not take the prologue
        assert len(saved) == 8 + (2 - len(fast_for)), len(saved)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_o.backward(g)
    _compare(blk, ours, xr, xo, out_r, out_o)
    assert block_calls == {"forward": 1, "backward": 1}


# The measured choice covers forward + backward of both graphs of a unit (_block._unit_graphs): a
# timer simulating each launcher's cost from what ran (the registry's launchers wrapped: op, backend,
# kernel size, whether conv2d_backward recomputes its input). The fake prologue implementation's
# forward is cheaper than the written graph's batch_norm_act + conv2d_stats for every unit (the
# forward alone picks the prologue everywhere); its backward, conv2d_backward with x=None, is made
# slow for some kernel sizes: there the backward half flips the unit to the written graph.
_RUNS: list = []


def _sim_cost(op, backend, args, slow_recompute_for):
    if op == "conv2d_bn_stats":
        return 1.0 if backend == "fakepro" else 50.0
    if op == "conv2d_backward":
        if backend != "torch":
            return 50.0
        x, k = args[5], tuple(args[6].shape[2:])
        return (10.0 if k in slow_recompute_for else 1.0) if x is None else 1.0
    return 2.0  # batch_norm_act, conv2d_stats, ...: aten and torch alike (ties go to 'aten')


@pytest.mark.parametrize("slow_recompute_for", [(), ((1, 1),), ((3, 3),)])
def test_auto_measures_each_units_graph_forward_and_backward(slow_recompute_for, tmp_path, monkeypatch, block_calls):
    import json
    import sys

    from resnet_kernels import _registry, _tune
    from resnet_kernels._registry import Backend, Impl

    sys.modules.setdefault(__name__, sys.modules[__name__])
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)
    load = _registry.Impl.load

    def logged_load(impl):
        fn = load(impl)

        def run(*a, **k):
            _RUNS.append((impl.op, impl.backend, a))
            return fn(*a, **k)
        return run

    monkeypatch.setattr(_registry.Impl, "load", logged_load)
    timed = []

    def timer(fn, device):
        _RUNS.clear()
        fn()
        timed.append(1)
        return sum(_sim_cost(op, b, a, slow_recompute_for) for op, b, a in _RUNS)

    fake = Backend("fakepro", "a test implementation with the operand prologue", lambda device: None)
    impl = Impl("conv2d_bn_stats", "fakepro", f"{__name__}:_fake_prologue", priority=95, auto_on=("cpu",),
                operand_prologue=True)
    torch.manual_seed(0)
    blk = torchvision.models.resnet.Bottleneck(16, 4).double()
    _randomise_bn(blk)
    # units 2 (3x3) and 3 (1x1) choose their graph; the backward half decides where it is slow
    want = ["written" if k in slow_recompute_for else "prologue" for k in ((3, 3), (1, 1))]
    with _registry.registered(fake, [impl]), _tune.testing(timer=timer, devices=("cpu",)):
        ours = rk.fuse(copy.deepcopy(blk), backend="auto")
        for step in range(2):
            x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            timed.clear()
            with _tune.recording() as decisions:
                out_o = ours(xo)
            graphs = [d for d in decisions if d.op == "block_unit_graph"]
            assert [d.impl for d in graphs] == want, graphs
            assert [d.how for d in graphs] == (["tuned", "tuned"] if step == 0 else ["cached", "cached"])
            if step == 0:
                for d, k in zip(graphs, ((3, 3), (1, 1))):
                    # forward + backward halves: prologue 1 + (1 or 10); written 2 + 2 + 1
                    assert d.detail["times_ms"] == {"prologue": 1.0 + (10.0 if k in slow_recompute_for else 1.0),
                                                    "written": 5.0}, d.detail
                from resnet_kernels.tune import Explanation, _rows

                table = Explanation(_rows(decisions), "cpu").table(times=True)  # what `tune` prints
                rows = [ln for ln in table.splitlines() if "block_unit_graph" in ln and "written 5.0000 ms" in ln]
                assert len(rows) == 2, table
            else:
                assert not timed  # measured once per shape: the second step times nothing
            saved = [t for t in out_o.grad_fn.saved_tensors if t is not None]
            # x, bits, y_1..y_3, 3 weights, and h_1 / h_2 where the next unit took the written graph
            assert len(saved) == 8 + want.count("written"), len(saved)
            out_r = blk(xr)
            g = torch.randn_like(out_r)
            out_r.backward(g)
            out_o.backward(g)
            # the measurement changed no running statistic, parameter or gradient: the block's
            # step matches torchvision's exactly (float64)
            _compare(blk, ours, xr, xo, out_r, out_o)
            for m in (blk, ours):
                m.zero_grad(set_to_none=True)
        doc = json.loads((tmp_path / "cache" / "tuning.json").read_text())
        entries = {k: e for v in doc["entries"].values() for k, e in v.items() if k.startswith("block_unit_graph|")}
        assert sorted(e["choice"] for e in entries.values()) == sorted(want), entries
    assert block_calls == {"forward": 2, "backward": 2}


def test_the_graph_choice_excludes_a_graph_that_disagrees(tmp_path, monkeypatch):
    """The graph measurement verifies the two graphs of a unit against each other: a prologue
    graph whose backward (conv2d_backward recomputing x) is wrong — here the reference's own x=None
    path, which the per-op verification trusts — is excluded with a warning naming it, and the
    written graph runs, for both units, though its forward is slower."""
    import sys

    from resnet_kernels import _registry, _tune
    from resnet_kernels._registry import Backend, Impl
    from resnet_kernels.backends import torch_conv_backward

    sys.modules.setdefault(__name__, sys.modules[__name__])
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)
    real = torch_conv_backward.conv2d_backward

    def wrong(g, mask, y, mean, coef, x, weight, grad_x, *rest, **kw):
        out = real(g, mask, y, mean, coef, x, weight, grad_x, *rest, **kw)
        if x is None and grad_x is not None:
            grad_x.mul_(1.5)
        return out

    def timer(fn, device):
        _FAKE_RAN.clear()
        fn()
        return 0.5 if _FAKE_RAN else 1.0

    fake = Backend("fakepro", "a test implementation with the operand prologue", lambda device: None)
    impl = Impl("conv2d_bn_stats", "fakepro", f"{__name__}:_fake_prologue", priority=95, auto_on=("cpu",),
                operand_prologue=True)
    torch.manual_seed(0)
    blk = torchvision.models.resnet.Bottleneck(16, 4).double()
    _randomise_bn(blk)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    monkeypatch.setattr(torch_conv_backward, "conv2d_backward", wrong)
    with _registry.registered(fake, [impl]), _tune.testing(timer=timer, devices=("cpu",)):
        ours = rk.fuse(copy.deepcopy(blk), backend="auto")
        with _tune.recording() as decisions, pytest.warns(_tune.TuningWarning, match="'prologue' option"):
            out = ours(x.clone().requires_grad_())
    graphs = [d for d in decisions if d.op == "block_unit_graph"]
    assert [d.impl for d in graphs] == ["written", "written"], graphs
    assert all("backward disagrees" in d.detail["failed"]["prologue"] for d in graphs), graphs
    assert len([t for t in out.grad_fn.saved_tensors if t is not None]) == 10  # h_1 and h_2 saved


class _UpdateCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """How many BatchNorms each bn_running_update op call updates (``sizes``), and each
    batch_norm_act_bits call (``tail``: its run_mean list)."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.tail = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "resnet_kernels" and func._schema.name.endswith("bn_running_update"):
            self.sizes.append(len(args[0]))
        if func.namespace == "resnet_kernels" and func._schema.name.endswith("batch_norm_act_bits"):
            self.tail.append(len(args[13]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_block_updates_its_running_statistics_in_one_call(backend, block_calls, monkeypatch):
    """A bottleneck with its projection: its 4 BatchNorms' running statistics go with the block's
    last op (batch_norm_act_bits' updates: in its own launch on triton, no bn_running_update call),
    which applies them once it runs, matching torchvision's over two steps (momentum 0.1 and
    None); a block whose tail fails updates none."""
    dt = torch.float64 if backend == "torch" else torch.float32
    for momentum in (0.1, None):
        torch.manual_seed(0)
        norm = functools.partial(nn.BatchNorm2d, momentum=momentum)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), norm(16))
        blk = torchvision.models.resnet.Bottleneck(8, 4, stride=2, downsample=down, norm_layer=norm).to(dt)
        ours = rk.fuse(copy.deepcopy(blk), backend=backend)
        for step in range(2):
            x = torch.randn(2, 8, 6, 6, dtype=dt, requires_grad=True)
            calls = _UpdateCalls()
            with calls:
                out = ours(x)
            assert calls.sizes == [] and calls.tail == [4], (calls.sizes, calls.tail)
            blk(x)
            out.sum().backward()
        for (n, a), (_, b) in zip(blk.named_buffers(), ours.named_buffers()):
            if a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
            else:
                assert torch.equal(a, b), n
    assert block_calls["forward"] == 4
    before = copy.deepcopy(ours.state_dict())

    def fail(*a, **k):
        raise RuntimeError("planted failure in the block's tail")

    monkeypatch.setattr(_block, "batch_norm_act_bits", fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        ours(torch.randn(2, 8, 6, 6, dtype=dt, requires_grad=True))
    for k, v in ours.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed by a failed block"


@pytest.mark.parametrize("name", ["basic-proj", "bottleneck-id"])
def test_cuda_block_matches_its_per_op_graph(name, cuda_target, monkeypatch, block_calls):
    """The cuda backend's block (csrc BatchNorm writing and reading the 1-bit mask, csrc
    dgrad/wgrad computing the BN-backward operand; the host runner without a GPU), float16
    channels_last: output, input and parameter gradients, running statistics close to the per-op
    cuda graph's and to torchvision's in float64 (the two fp16 graphs round differently)."""
    from resnet_kernels.backends import cuda_common

    launched = []
    real_module = cuda_common.C_module

    class _Spy:  # the csrc entry points called (through cuda_common.call)
        def __init__(self, mod):
            self._mod = mod

        def __getattr__(self, fn):
            launched.append(fn)
            return getattr(self._mod, fn)

    monkeypatch.setattr(cuda_common, "C_module", lambda: _Spy(real_module()))
    block, shape = _tiny_blocks()[name]
    _randomise_bn(block)
    ref = copy.deepcopy(block).double()
    nets = []
    for use_block in (True, False):
        net = rk.fuse(copy.deepcopy(block), backend="cuda").to(cuda_target, torch.float16).to(
            memory_format=torch.channels_last)
        nets.append(net)
    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64)
    g = None
    results = []
    for i, net in enumerate(nets):
        if i == 1:
            monkeypatch.setattr(_block, "backend_ok", lambda backend: False)
        xo = x.to(cuda_target, torch.float16).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = net(xo)
        if g is None:
            g = torch.randn(out.shape, dtype=torch.float64)
        out.backward(g.to(cuda_target, torch.float16).contiguous(memory_format=torch.channels_last))
        results.append([out, xo.grad] + [p.grad for p in net.parameters()] + list(net.buffers()))
    assert block_calls == {"forward": 1, "backward": 1}
    assert {"batch_norm_act_forward", "batch_norm_act_backward"} <= set(launched), set(launched)
    xr = x.clone().requires_grad_()
    out_r = ref(xr)
    out_r.backward(g)
    want = [out_r, xr.grad] + [p.grad for p in ref.parameters()] + list(ref.buffers())
    for k, (a, b, r) in enumerate(zip(*results, want)):
        if not r.is_floating_point():
            assert torch.equal(a.cpu(), r) and torch.equal(b.cpu(), r), k
            continue
        r = r.detach()
        scale = max(float(r.abs().max()), 1e-6)
        for got in (a.detach(), b.detach()):
            err = float((got.double().cpu() - r).abs().max())
            assert err <= 3e-2 * scale, (k, err, scale)
