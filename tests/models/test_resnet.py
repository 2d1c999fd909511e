"""Drop-in ResNets vs torchvision: construction, init, state_dict, eval/train numerics, SGD steps.

Tolerances: see rk_models_testing.py (fused model vs a float64 oracle: strict in float64; in fp32
at most 3x torchvision's own fp32 error + a floor)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_kernels as rk
from resnet_kernels.models import resnet as rk_resnet
from rk_models_testing import GRAD_FLOOR, check, check_state, count_calls, fwd_bwd, make_models

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@pytest.mark.parametrize("arch", ARCHS)
def test_same_keys_and_init_as_torchvision(arch):
    # Same constructor, same module order, same init calls => same RNG draws => identical tensors.
    kw = dict(num_classes=7, zero_init_residual=True)
    torch.manual_seed(1)
    tv = getattr(torchvision.models, arch)(**kw)
    torch.manual_seed(1)
    ours = getattr(rk.models, arch)(**kw)
    _same_state(tv, ours)
    last_bn = "bn2" if arch in ("resnet18", "resnet34") else "bn3"
    assert torch.count_nonzero(ours.state_dict()[f"layer1.0.{last_bn}.weight"]) == 0  # zero_init_residual
    assert str(tv).count("Conv2d(") == str(ours).count("Conv2d(")


@pytest.mark.parametrize("kw", [dict(groups=32, width_per_group=4), dict(width_per_group=128),
                                dict(replace_stride_with_dilation=[False, True, True])],
                         ids=["resnext", "wide", "dilation"])
def test_constructor_options_match_torchvision(kw):
    torch.manual_seed(2)
    tv = torchvision.models.resnet50(num_classes=5, **kw)
    torch.manual_seed(2)
    ours = rk.models.resnet50(num_classes=5, **kw)
    _same_state(tv, ours)


def test_constructor_errors_match_torchvision():
    for kw in (dict(groups=2), dict(width_per_group=32)):
        with pytest.raises(ValueError, match="BasicBlock only supports"):
            rk.models.resnet18(**kw)
    with pytest.raises(NotImplementedError, match="Dilation"):
        rk.models.resnet18(replace_stride_with_dilation=[False, False, True])
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        rk.models.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="backend"):
        rk.models.resnet18(backend="nope")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_strict_state_dict_both_ways_and_eval_equal(arch):
    torch.manual_seed(3)
    tv = getattr(torchvision.models, arch)(num_classes=10)
    ours = getattr(rk.models, arch)(num_classes=10, backend="torch")  # different random init
    ours.load_state_dict(tv.state_dict(), strict=True)
    _same_state(tv, ours)
    # and the other way, after changing every tensor of ours (running stats included). Each is
    # scaled by a factor in [0.5, 1.5) and shifted by 0.05 * N(0, 1) (running_var stays > 0.4 from
    # its init 1): the network keeps its scale, so the eval outputs stay finite and the check below
    # can fail (the former rand_like + 0.5 drove the float32 outputs to inf).
    with torch.no_grad():
        for t in ours.state_dict().values():
            if t.is_floating_point():
                t.mul_(torch.rand_like(t) + 0.5).add_(0.05 * torch.randn_like(t))
    torch.manual_seed(4)
    tv2 = getattr(torchvision.models, arch)(num_classes=10)
    tv2.load_state_dict(ours.state_dict(), strict=True)
    _same_state(tv2, ours)

    ref = copy.deepcopy(tv2).double()
    for m in (tv2, ours, ref):
        m.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        check("eval output", ours(x), tv2(x), ref(x.double()))
    _same_state(tv2, ours)  # eval() must not touch the running statistics


def test_check_itself_rejects_zero_nonfinite_and_vacuous():
    """The checker of every model test: an all-zero result, a non-finite result or reference, and a
    bound so loose that zero would pass (torchvision itself 1.0 off) all fail."""
    g = torch.Generator().manual_seed(0)
    oracle = torch.randn(4, 10, generator=g, dtype=torch.float64)
    tv = (oracle * (1 + 1e-6 * torch.randn(4, 10, generator=g, dtype=torch.float64))).float()
    check("good", tv.clone(), tv, oracle)
    for dtype, floor in ((torch.float32, None), (torch.float32, GRAD_FLOOR), (torch.bfloat16, None),
                         (torch.bfloat16, GRAD_FLOOR)):
        with pytest.raises(AssertionError, match="relative L2"):
            check("zero", torch.zeros_like(tv), tv, oracle, dtype, floor)
    with pytest.raises(AssertionError, match="non-finite"):
        check("inf", torch.full_like(tv, float("inf")), tv, oracle)
    with pytest.raises(AssertionError, match="reference is not finite"):
        check("inf ref", tv, tv, oracle * float("inf"))
    with pytest.raises(AssertionError, match="vacuous"):
        check("loose", tv, torch.zeros_like(tv), oracle, torch.bfloat16, GRAD_FLOOR)


def test_train_step_matches_torchvision_resnet50_fp64():
    _, ours, ref = make_models("resnet50", num_classes=10)
    ours.double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out_o, dx_o = fwd_bwd(ours, x)
    out_r, dx_r = fwd_bwd(ref, x)
    check("train output", out_o, None, out_r, torch.float64)
    check("input grad", dx_o, None, dx_r, torch.float64)
    check_state("resnet50", ours, None, ref, dtype=torch.float64)


def _sync(dst, dst_opt, src, src_opt):
    """Give ``dst`` (and its optimizer) the state of ``src``: same parameters, buffers, momentum."""
    dst.load_state_dict(src.state_dict())
    for pd, ps in zip(dst.parameters(), src.parameters()):
        if ps in src_opt.state:
            dst_opt.state[pd]["momentum_buffer"] = src_opt.state[ps]["momentum_buffer"].to(pd.dtype).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_three_sgd_momentum_steps_match_torchvision_resnet18(dtype):
    """float64: the three-step trajectories agree to FP64_RTOL. float32: each of the three steps is
    checked from the torchvision model's state (ours and the fp64 oracle are re-synchronised to it,
    momentum buffers included, before every step): fp32 trajectories are chaotic (a rounding tie
    at one ReLU moves a gradient by ~1%, and the next steps amplify it), so comparing whole fp32
    trajectories would test the conditioning of the network, not the fused kernels."""
    tv, ours, ref = make_models("resnet18", num_classes=10)
    if dtype == torch.float64:
        ours.double()
        tv = None
    models = [m for m in (tv, ours, ref) if m is not None]
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in models}
    for step in range(3):
        if tv is not None and step > 0:
            _sync(ours, opts[id(ours)], tv, opts[id(tv)])
            _sync(ref, opts[id(ref)], tv, opts[id(tv)])
        x = torch.randn(2, 3, 48, 48)
        for o in opts.values():
            o.zero_grad()
        out_t, dx_t = fwd_bwd(tv, x) if tv is not None else (None, None)
        out_o, dx_o = fwd_bwd(ours, x.to(dtype))
        out_r, dx_r = fwd_bwd(ref, x.double())
        check(f"step {step} output", out_o, out_t, out_r, dtype)
        check(f"step {step} input grad", dx_o, dx_t, dx_r, dtype, floor=GRAD_FLOOR)
        check_state(f"step {step}", ours, tv, ref, dtype=dtype)
        for o in opts.values():
            o.step()
        check_state(f"after step {step}", ours, tv, ref, grads=False, dtype=dtype, floor=GRAD_FLOOR)
        names = [n for n, _ in ours.named_parameters()]
        for i, (po, pr) in enumerate(zip(ours.parameters(), ref.parameters())):
            mt = opts[id(tv)].state[list(tv.parameters())[i]]["momentum_buffer"] if tv is not None else None
            check(f"after step {step} momentum {names[i]}", opts[id(ours)].state[po]["momentum_buffer"], mt,
                  opts[id(ref)].state[pr]["momentum_buffer"], dtype, floor=GRAD_FLOOR)
    # eval after training uses the running statistics the three steps produced
    for m in models:
        m.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        check("eval after training", ours(x.to(dtype)), tv(x) if tv is not None else None, ref(x.double()), dtype,
              GRAD_FLOOR)


def test_forward_goes_through_the_functional_api(monkeypatch):
    counts = count_calls(monkeypatch, rk_resnet)
    model = rk.models.resnet18(num_classes=10, backend="torch")
    model(torch.randn(2, 3, 32, 32))
    # stem + one conv_bn_act per block; every block ends with conv_bn_add_act
    assert counts == {"conv_bn_act": 1 + 8, "conv_bn_add_act": 8}
    counts.clear()
    rk.models.resnet50(num_classes=10, backend="torch")(torch.randn(2, 3, 32, 32))
    assert counts == {"conv_bn_act": 1 + 2 * 16, "conv_bn_add_act": 16}


def test_dilation_falls_back_per_unit(monkeypatch):
    counts = count_calls(monkeypatch, rk_resnet)
    _, ours, ref = make_models("resnet50", num_classes=10, replace_stride_with_dilation=[False, False, True])
    ours.double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out_o, dx_o = fwd_bwd(ours, x)
    out_r, dx_r = fwd_bwd(ref, x)
    check("dilated output", out_o, None, out_r, torch.float64)
    check("dilated input grad", dx_o, None, dx_r, torch.float64)
    check_state("dilated", ours, None, ref, dtype=torch.float64)
    # layer4's blocks 1 and 2 have dilated 3x3 convs (block 0 keeps dilation 1): those 2 units run unfused
    assert counts == {"conv_bn_act": 1 + 2 * 16 - 2, "conv_bn_add_act": 16}


def test_custom_norm_layer_runs_plain_modules(monkeypatch):
    # (norm_layer=nn.SyncBatchNorm runs fused: test_syncbn.py)
    counts = count_calls(monkeypatch, rk_resnet)
    layer = lambda c: nn.GroupNorm(8, c)  # noqa: E731
    torch.manual_seed(5)
    tv = torchvision.models.resnet18(num_classes=10, norm_layer=layer)
    ours = rk.models.resnet18(num_classes=10, norm_layer=layer, backend="torch")
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 48)
    for train in (True, False):
        tv.train(train)
        ours.train(train)
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)  # the very same plain ops
    _same_state(tv, ours)
    assert counts == {}


def test_module_hooks_still_fire():
    tv, ours, ref = make_models("resnet18", num_classes=10, oracle=False)
    seen = []
    ours.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-4)
    assert seen == [torch.Size([2, 128, 6, 6])]


def test_pretrained_weights_through_torchvision_without_download(monkeypatch):
    torch.manual_seed(6)
    src = torchvision.models.resnet18()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return src.state_dict()

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    W = torchvision.models.ResNet18_Weights
    for w in (W.IMAGENET1K_V1, "IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model = rk.models.resnet18(weights=w, progress=False)
        _same_state(src, model)
    assert len(calls) == 4 and all(c[0] is W.IMAGENET1K_V1 for c in calls)
    assert calls[0][1] == dict(progress=False, check_hash=True)
    with pytest.raises(ValueError, match="num_classes"):
        rk.models.resnet18(weights=W.IMAGENET1K_V1, num_classes=10)
    with pytest.raises((TypeError, ValueError)):
        rk.models.resnet18(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises((KeyError, ValueError)):
        rk.models.resnet18(weights="NO_SUCH_WEIGHTS")
    assert len(calls) == 4
