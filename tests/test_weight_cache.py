"""resnet_kernels/_weight_cache.py: packed conv weights cached across calls, never stale.

The Triton launcher's use is tested with parity in tests/ops/test_conv2d_triton.py (reuse counted;
an in-place edit, an SGD step, load_state_dict, .half(), a memory-format change each repack); here
the cache rules themselves with a counting pack function, and the CUDA launcher's use on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rk_testing import DEVICE, HAS_GPU

from resnet_kernels import _weight_cache as wc


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, w):
        self.calls += 1
        return w.permute(0, 2, 3, 1).contiguous()


def test_hit_and_each_invalidation():
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, device=DEVICE))
    pack = _Counting()
    p1 = wc.packed(w, "fmt", pack)
    assert wc.packed(w, "fmt", pack) is p1 and pack.calls == 1
    assert wc.packed(w, "other-fmt", pack) is not p1 and pack.calls == 2  # formats are separate entries
    with torch.no_grad():
        w.add_(1)  # version
    p2 = wc.packed(w, "fmt", pack)
    assert pack.calls == 3 and torch.equal(p2, w.detach().permute(0, 2, 3, 1))
    w.data = torch.randn(4, 3, 3, 3, device=DEVICE)  # new storage (what Module.to() does)
    p3 = wc.packed(w, "fmt", pack)
    assert pack.calls == 4 and torch.equal(p3, w.detach().permute(0, 2, 3, 1))
    w.data = w.data.contiguous(memory_format=torch.channels_last)  # strides
    wc.packed(w, "fmt", pack)
    assert pack.calls == 5
    sd = {"weight": torch.randn(4, 3, 3, 3)}
    m = torch.nn.Conv2d(3, 4, 3, bias=False).to(DEVICE)
    wc.packed(m.weight, "fmt", pack)
    m.load_state_dict(sd)
    p4 = wc.packed(m.weight, "fmt", pack)
    assert pack.calls == 7 and torch.equal(p4.cpu(), sd["weight"].permute(0, 2, 3, 1))
    wc.clear()
    wc.packed(m.weight, "fmt", pack)
    assert pack.calls == 8


def test_entry_dies_with_its_weight():
    wc.clear()
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    wc.packed(w, "fmt", _Counting())
    assert wc.stats()["entries"] == 1
    del w
    assert wc.stats()["entries"] == 0


def test_lru_bound(monkeypatch):
    wc.clear()
    monkeypatch.setattr(wc, "MAX_ENTRIES", 3)
    ws = [torch.randn(2, 2, 1, 1, device=DEVICE) for _ in range(5)]
    for w in ws:
        wc.packed(w, "fmt", _Counting())
    assert wc.stats()["entries"] == 3


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (CUDA launcher, streams, graph capture)")
def test_cuda_backend_pack_cached_and_fresh():
    from resnet_kernels._ext import C_error
    if C_error() is not None:
        pytest.skip("no CUDA extension")
    from resnet_kernels.backends import cuda_conv2d

    m = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda()
    x = torch.randn(2, 16, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)

    def run():
        out = torch.full((2, 32, 9, 9), float("nan"), device="cuda").contiguous(memory_format=torch.channels_last)
        cuda_conv2d.conv2d_forward(x, m.weight, None, None, None, out, (1, 1), (1, 1), False, False, False)
        ref = F.conv2d(x.double(), m.weight.detach().double(), padding=1)
        assert (out.double() - ref).abs().max().item() < 1e-4
    wc.reset_stats()
    run()
    run()
    assert wc.stats()["hits"] == 1
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m.weight.grad = torch.randn_like(m.weight)
    opt.step()
    run()
    assert wc.stats()["packs"] == 2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # another stream repacks (no cross-stream reads of a pack)
        run()
    torch.cuda.synchronize()
    assert wc.stats()["packs"] == 3


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (CUDA graph capture)")
def test_graph_capture_never_uses_a_cached_pack():
    """A CUDA graph captured where the cache would hit must pack inside the graph: after an
    in-place weight update, a replay computes with the new weight."""
    from resnet_kernels.triton_ops import conv2d as tconv

    w = torch.randn(32, 16, 3, 3, device="cuda")
    x = torch.randn(2, 16, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    out = torch.empty(2, 32, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)

    def f():
        tconv.conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, False, False)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()  # compiles and caches a pack on stream s
        f()
    torch.cuda.current_stream().wait_stream(s)
    before = wc.stats()["uncached"]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # same stream: without the capture rule this would hit
        f()
    assert wc.stats()["uncached"] == before + 1
    with torch.no_grad():
        w.mul_(-2)
    g.replay()
    torch.cuda.synchronize()
    ref = F.conv2d(x.double(), w.double(), padding=1)
    assert (out.double() - ref).abs().max().item() < 1e-3


# ------------------------------------------------------------------------------------------------
# derived values (the eval BatchNorm fold of resnet_kernels.functional, cached per BatchNorm)

def test_derived_hit_and_each_invalidation():
    wc.clear()
    owner = torch.nn.BatchNorm2d(4).to(DEVICE)
    calls = []

    def fn():
        calls.append(1)
        return owner.running_var * 2 + owner.weight.detach()

    def deps():
        return (owner.running_var, owner.weight, None)

    dev = torch.device(DEVICE)
    v1 = wc.derived(owner, "f", fn, deps(), dev)
    assert wc.derived(owner, "f", fn, deps(), dev) is v1 and len(calls) == 1
    wc.derived(owner, "g", fn, deps(), dev)  # another format: recomputed (one entry per owner)
    assert len(calls) == 2
    with torch.no_grad():
        owner.running_var.add_(1)  # version
    assert torch.equal(wc.derived(owner, "f", fn, deps(), dev), owner.running_var * 2 + owner.weight.detach())
    assert len(calls) == 3
    owner.weight = torch.nn.Parameter(torch.full((4,), 3.0, device=DEVICE))  # a replaced parameter
    assert torch.equal(wc.derived(owner, "f", fn, deps(), dev), owner.running_var * 2 + 3)
    owner.to(torch.float64)  # new storage and dtype
    got = wc.derived(owner, "f", fn, deps(), dev)
    assert got.dtype == torch.float64 and len(calls) == 5
    owner.weight.data = torch.zeros(4, dtype=torch.float64, device=DEVICE)  # .data: a new address
    assert torch.equal(wc.derived(owner, "f", fn, deps(), dev), owner.running_var * 2)
    assert len(calls) == 6


def test_derived_bypassed(monkeypatch):
    wc.clear()
    owner = torch.nn.BatchNorm2d(4)
    calls = []

    def fn():
        calls.append(1)
        return owner.running_var + 1

    dev = torch.device("cpu")
    with torch.inference_mode():
        inf = torch.ones(4)
    wc.derived(owner, "f", fn, (inf,), dev)
    wc.derived(owner, "f", fn, (inf,), dev)  # inference tensors have no version counter: never cached
    assert len(calls) == 2
    monkeypatch.setenv("RESNET_KERNELS_WEIGHT_CACHE", "0")
    wc.derived(owner, "f", fn, (owner.running_var,), dev)
    wc.derived(owner, "f", fn, (owner.running_var,), dev)
    assert len(calls) == 4
    monkeypatch.delenv("RESNET_KERNELS_WEIGHT_CACHE")
    wc.derived(owner, "f", fn, (owner.running_var,), dev)
    assert wc.derived(owner, "f", fn, (owner.running_var,), dev) is not None and len(calls) == 5
    del owner, fn  # the entry goes with its owner
    import gc
    gc.collect()
    assert not wc._derived


@pytest.mark.parametrize("backend", ["aten", "torch"])
def test_eval_fold_follows_the_module(backend):
    """The cached eval fold of conv_bn_act against the plain layers after each change of what it
    depends on: a running-statistics update (a training step), train/eval, a replaced parameter,
    .to(float64), load_state_dict, another backend."""
    from resnet_kernels.functional import conv_bn_act

    wc.clear()
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1, bias=True), torch.nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)

    def check(be=backend):
        conv.eval(), bn.eval()
        with torch.no_grad():
            got = conv_bn_act(x.to(conv.weight.dtype), conv, bn, backend=be)
            ref = torch.relu(bn(conv(x.to(conv.weight.dtype))))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        a = conv_bn_act(x, conv, bn, backend=backend)
        assert torch.equal(conv_bn_act(x, conv, bn, backend=backend), a)
    (entry,) = wc._derived.values()
    check()
    assert wc._derived[id(bn)] is entry  # a hit: nothing changed
    bn.train(), conv.train()
    conv_bn_act(x, conv, bn, backend=backend)  # a training step updates the running statistics
    check()
    bn.weight = torch.nn.Parameter(torch.randn(4))
    check()
    conv.bias = torch.nn.Parameter(torch.randn(4))
    check()
    bn.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    check()
    check("torch" if backend == "aten" else "aten")
    conv.to(torch.float64), bn.to(torch.float64)
    check()
