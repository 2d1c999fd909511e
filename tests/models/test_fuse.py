"""fuse()/unfuse() on torchvision models and generic Sequentials; SyncBatchNorm acceptance;
bf16 autocast + channels_last; torch.compile(fullgraph=True); one tiny net on the triton backend."""

import copy
import importlib

import pytest
import torch
import torchvision
from torch import nn

import resnet_kernels as rk
from resnet_kernels.models import resnet as rk_resnet
from rk_models_testing import GRAD_FLOOR, check, check_state, classes, count_calls, fwd_bwd, make_models

TV = torchvision.models.resnet
# the submodule (resnet_kernels.models.fuse is the function of the same name)
rk_fuse = importlib.import_module("resnet_kernels.models.fuse")


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_exports():
    assert rk.fuse is rk.models.fuse and rk.unfuse is rk.models.unfuse
    with pytest.raises(TypeError, match="model"):
        rk.fuse("resnet18")
    with pytest.raises(ValueError, match="backend"):
        rk.fuse(nn.Sequential(), backend="nope")


def test_fuse_unfuse_round_trip_keeps_parameters_and_optimizer(monkeypatch):
    # float64: this checks parameters, buffers and the optimizer across fuse/unfuse; three fp32 SGD
    # steps of a batch of 2 amplify CPU-dependent rounding (seen: 4e-2 apart on one machine)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    twin = copy.deepcopy(model)  # stays plain torchvision: the reference
    opt, opt_twin = _sgd(model), _sgd(twin)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)

    def step(m, o, xx):
        o.zero_grad()
        out, _ = fwd_bwd(m, xx)
        o.step()
        return out

    step(model, opt, x)  # momentum buffers exist before fuse
    step(twin, opt_twin, x)
    ids = [id(t) for t in model.parameters()] + [id(t) for t in model.buffers()]
    sd_before = model.state_dict()
    before = classes(model)

    _, report = rk.fuse(model, backend="torch", report=True)
    # a subclass of both the drop-in class and torchvision's: isinstance keeps working
    assert isinstance(model, rk_resnet.ResNet) and isinstance(model.layer1[0], rk_resnet.BasicBlock)
    assert isinstance(model, TV.ResNet) and isinstance(model.layer1[0], TV.BasicBlock)
    assert sorted(report.fused) == sorted(["", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                           "layer3.1", "layer4.0", "layer4.1"])
    assert report.skipped == [] and "layer2.0" in str(report)
    assert [id(t) for t in model.parameters()] + [id(t) for t in model.buffers()] == ids
    sd = model.state_dict()
    assert list(sd) == list(sd_before) and all(sd[k].data_ptr() == sd_before[k].data_ptr() for k in sd)
    assert model.layer1[0].backend == "torch" and model.backend == "torch"

    counts = count_calls(monkeypatch, rk_resnet)
    for i in range(2):  # the optimizer made before fuse() keeps training the fused model
        xi = torch.randn(2, 3, 48, 48, dtype=torch.float64)
        out, out_twin = step(model, opt, xi), step(twin, opt_twin, xi)
        torch.testing.assert_close(out, out_twin, rtol=1e-4, atol=1e-4)
    assert counts["conv_bn_add_act"] == 16
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt_twin.state[q]["momentum_buffer"],
                                   rtol=1e-3, atol=1e-4, msg=n)

    _, back = rk.unfuse(model, report=True)
    assert classes(model) == before and len(back.changed) == 9
    assert not hasattr(model.layer1[0], "fused") and not hasattr(model, "backend")
    assert [id(t) for t in model.parameters()] + [id(t) for t in model.buffers()] == ids
    model.eval()
    twin.eval()
    torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-4)


def test_fuse_bottleneck_and_unfuse_native_model(monkeypatch):
    torch.manual_seed(1)
    model = torchvision.models.resnet50(num_classes=10)
    _, report = rk.fuse(model, backend="torch", report=True)
    assert isinstance(model.layer1[0], rk_resnet.Bottleneck) and isinstance(model.layer1[0], TV.Bottleneck)
    assert len(report.fused) == 17
    counts = count_calls(monkeypatch, rk_resnet)
    model(torch.randn(2, 3, 32, 32))
    assert counts == {"conv_bn_act": 33, "conv_bn_add_act": 16}

    native = rk.models.resnet18(num_classes=10, backend="torch")
    _, rep = rk.unfuse(native, report=True)
    assert len(rep.changed) == 9 and not native.fused and not native.layer1[0].fused
    counts.clear()
    native(torch.randn(2, 3, 32, 32))
    assert counts == {}  # plain PyTorch forward
    rk.fuse(native)
    native(torch.randn(2, 3, 32, 32))
    assert counts == {"conv_bn_act": 9, "conv_bn_add_act": 8}


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) * 0.5


class _MySeq(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 1


def _generic_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(inplace=True),  # fused +relu
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8),                        # dilation: skipped
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=None), nn.MaxPool2d(2),               # fused, no relu
        _Custom(),                                                                           # custom forward
        _MySeq(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),                                       # subclass
        nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_fuse_generic_sequential(monkeypatch):
    torch.manual_seed(2)
    model = _generic_model()
    twin = copy.deepcopy(model)
    ids = [id(t) for t in model.state_dict(keep_vars=True).values()]
    _, report = rk.fuse(model, backend="torch", report=True)
    assert type(model) is rk_fuse.FusedSequential and type(model[10]) is rk_fuse.FusedSequential
    assert type(model[9]) is _MySeq and type(model[8]) is _Custom
    assert dict(report.changed) == {"": "Sequential: 0+1+2(relu), 5+6", "10": "Sequential: 0+1+2(relu)"}
    skipped = dict(report.skipped)
    assert "dilation" in skipped["3+4"] and "8" in skipped and "9" in skipped, report
    assert [id(t) for t in model.state_dict(keep_vars=True).values()] == ids

    counts = count_calls(monkeypatch, rk_fuse)
    for train in (True, False):
        model.train(train)
        twin.train(train)
        for _ in range(2):
            x = torch.randn(4, 3, 8, 8)
            out, dx = fwd_bwd(model, x)
            out_t, dx_t = fwd_bwd(twin, x)
            torch.testing.assert_close(out, out_t, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dx, dx_t, rtol=1e-4, atol=1e-5)
    assert counts == {"conv_bn_act": 3 * 4}
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)

    rk.unfuse(model)
    assert classes(model) == classes(twin)


def test_fuse_leaves_unsupported_blocks_alone():
    torch.manual_seed(3)
    gn = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c))
    _, report = rk.fuse(gn, report=True)
    assert report.changed == [] and type(gn.layer1[0]) is TV.BasicBlock
    assert any("GroupNorm" in why for _, why in report.skipped)

    class MyBlock(TV.BasicBlock):
        pass

    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[0].__class__ = MyBlock
    _, report = rk.fuse(model, report=True)
    assert type(model.layer1[0]) is MyBlock and "layer1.0" in dict(report.skipped)
    assert isinstance(model.layer1[1], rk_resnet.BasicBlock) and model.layer1[1]._rk_orig_class is TV.BasicBlock


def test_syncbatchnorm_fuses():
    """fuse() accepts SyncBatchNorm (multi-process semantics: test_syncbn.py); without
    torch.distributed it is plain BatchNorm, as nn.SyncBatchNorm falls back to F.batch_norm."""
    torch.manual_seed(4)
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10)).double()
    model = copy.deepcopy(plain)
    rk.fuse(model, backend="torch")
    assert isinstance(model, rk_resnet.ResNet) and isinstance(model.layer2[0], rk_resnet.BasicBlock)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())
    rk.fuse(seq)
    assert type(seq) is rk_fuse.FusedSequential
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out_p, dx_p = fwd_bwd(plain, x)
    out_f, dx_f = fwd_bwd(model, x)
    check("SyncBatchNorm output", out_f, None, out_p, torch.float64)
    check("SyncBatchNorm input grad", dx_f, None, dx_p, torch.float64)
    check_state("SyncBatchNorm", model, None, plain, dtype=torch.float64)


def test_downsample_norm_is_checked_on_its_own():
    """The successor of the downsample-SyncBatchNorm rejection (SyncBatchNorm now fuses): the
    downsample's norm layer is checked on its own, so a GroupNorm there leaves the projection to
    the plain modules (the block still fuses its first unit) and a SyncBatchNorm there fuses; both
    models compute what their plain twins compute (mutant M16 of tools/mutate.py)."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for norm, fused_projection in ((nn.GroupNorm(4, 128), False), (nn.SyncBatchNorm(128), True)):
        model = torchvision.models.resnet18(num_classes=10)
        model.layer2[0].downsample[1] = norm
        model = model.double().eval()
        plain = copy.deepcopy(model)
        with rk.use_backend("torch"):
            model, report = rk.fuse(model, report=True)
            out = model(x)
        line = next(ln for ln in str(report).splitlines() if "layer2.0: " in ln)
        assert ("add(downsample.0+downsample.1)" in line) == fused_projection, str(report)
        torch.testing.assert_close(out, plain(x), rtol=1e-9, atol=1e-9)


def test_bf16_autocast_and_channels_last():
    tv, ours, ref = make_models("resnet18", num_classes=10)
    tv = tv.to(memory_format=torch.channels_last)
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    layouts = []
    ours.layer1[0].register_forward_hook(
        lambda m, i, o: layouts.append((o.dtype, o.is_contiguous(memory_format=torch.channels_last))))
    out_r, dx_r = fwd_bwd(ref, x.double())

    # fp32 channels_last: the fp32 rule
    out_o, dx_o = fwd_bwd(ours, x)
    out_t, dx_t = fwd_bwd(tv, x)
    check("channels_last output", out_o, out_t, out_r)
    check("channels_last input grad", dx_o, dx_t, dx_r, floor=GRAD_FLOOR)
    check_state("channels_last", ours, tv, ref)
    assert layouts[-1] == (torch.float32, True)

    for m in (tv, ours):
        m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_o, dx_o = fwd_bwd(ours, x)
        out_t, dx_t = fwd_bwd(tv, x)
    assert out_o.dtype == out_t.dtype == torch.bfloat16
    assert layouts[-1] == (torch.bfloat16, True)
    check("bf16 output", out_o, out_t, out_r, torch.bfloat16)
    check("bf16 input grad", dx_o, dx_t, dx_r, torch.bfloat16, floor=max(GRAD_FLOOR, 3e-2))
    names = [n for n, _ in ours.named_parameters()]
    for n, po, pt, pr in zip(names, ours.parameters(), tv.parameters(), ref.parameters()):
        assert po.grad.dtype == torch.float32
        check(f"bf16 grad {n}", po.grad, pt.grad, pr.grad, torch.bfloat16, floor=GRAD_FLOOR)


def test_torch_compile_fullgraph_fused_resnet18():
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10)
    rk.fuse(model, backend="torch")
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    # train: output, gradients and running statistics (compile keeps the in-place buffer updates)
    out_c, dx_c = fwd_bwd(compiled, x)
    out_e, dx_e = fwd_bwd(twin, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
    for (n, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=n)
    compiled.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("on_device")  # on the GPU when there is one (CPU tensors need the interpreter)
def test_tiny_net_on_triton_backend():
    # stem-like Sequential (fused by fuse) + one projection BasicBlock, 8x8 input: a few dozen programs
    torch.manual_seed(6)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    block_tv = TV.BasicBlock(8, 16, stride=2, downsample=nn.Sequential(TV.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    ref = nn.Sequential(stem, block_tv)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else None
    net = copy.deepcopy(ref)
    _, report = rk.fuse(net, backend="triton", report=True)
    assert sorted(report.fused) == ["0", "1"]
    for train in (True, False):
        net.train(train)
        ref.train(train)
        x = torch.randn(2, 3, 8, 8)
        out, dx = fwd_bwd(net, x)
        out_r, dx_r = fwd_bwd(ref, x)
        torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dx, dx_r, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)
    for (n, b), c in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)


def test_fuse_root_block_twice_and_back():
    torch.manual_seed(7)
    block = TV.BasicBlock(8, 16, stride=2, downsample=nn.Sequential(TV.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    twin = copy.deepcopy(block)
    for _ in range(2):  # fusing an already fused model changes nothing
        _, report = rk.fuse(block, backend="torch", report=True)
        assert report.fused == [""] and isinstance(block, rk_resnet.BasicBlock) and isinstance(block, TV.BasicBlock)
        assert type(block.downsample) is nn.Sequential  # owned by the block: used as its projection
    x = torch.randn(2, 8, 8, 8)
    out, dx = fwd_bwd(block, x)
    out_t, dx_t = fwd_bwd(twin, x)
    torch.testing.assert_close(out, out_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_t, rtol=1e-4, atol=1e-5)
    rk.unfuse(block)
    assert type(block) is TV.BasicBlock and "fused" not in block.__dict__
