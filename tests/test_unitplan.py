"""The fused units' validated plans (resnet_kernels/_unitplan.py): a repeated call skips the
validation and reruns the captured Calls, with the same numbers, the same side effects and the same
errors as the whole path; every change that validation reads makes a new plan (never stale)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import resnet_kernels.ops.batch_norm as bn_ops
import resnet_kernels.ops.conv2d as conv_ops
from resnet_kernels import _registry, _tune, _unitplan
from resnet_kernels.functional import conv_bn_add_act

import rk_testing

# (multiples of 8: PyTorch's oneDNN CPU weight gradient of a channels_last 1x1 stride-2 convolution
# with 6 -> 10 channels is racy with 2 threads and corrupts memory with 1, upstream, whatever calls it)
C_IN, C = 8, 16
BACKENDS = ["aten", "torch"]


@pytest.fixture(autouse=True)
def _fresh_plans(request, monkeypatch):
    """Fresh plans; and, except in tests named ``*aten_unit*``, aten without its training unit
    (``Backend.train_unit``): the plan machinery's tests compare bitwise with the whole path, which the
    unit (PyTorch's own BatchNorm: tested against nn.BatchNorm2d below) matches within rounding."""
    if "aten_unit" not in request.node.name:
        aten = _registry.get_backend_decl("aten")
        monkeypatch.setitem(_registry._backends, "aten", dataclasses.replace(aten, train_unit=None))
    _unitplan.clear()
    yield
    _unitplan.ENABLED = True
    _unitplan.clear()


def _world(projection: bool, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    w = dict(conv=nn.Conv2d(C, C, 3, padding=1, bias=False), bn=nn.BatchNorm2d(C, momentum=momentum))
    if projection:
        w["sconv"] = nn.Conv2d(C_IN, C, 1, stride=2, bias=False)
        w["sbn"] = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        for m in w.values():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return w


def _inputs(projection: bool, layout: str, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, C, 4, 4, generator=g)
    s = torch.randn(2, C_IN, 8, 8, generator=g) if projection else torch.randn(2, C, 4, 4, generator=g)
    if layout == "channels_last":
        h, s = h.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return h.requires_grad_(), s.requires_grad_()


def _unit(w, h, s, backend):
    if "sconv" in w:
        return conv_bn_add_act(h, w["conv"], w["bn"], s, w["sconv"], w["sbn"], backend=backend)
    return conv_bn_add_act(h, w["conv"], w["bn"], s, backend=backend)


def _run(w, h, s, backend, plans: bool, steps: int = 4, evals: int = 5):
    """steps training steps (SGD on the modules) then eval forwards; everything observable. With
    plans, the steps take each way a unit can run: the whole path (the plan made), a hit resolving
    its ops (the plan bound; its backward's plan made), a bound forward whose backward binds, then
    bound both ways (eval: whole path, resolving hit, bound (the unit's memo made), memo hits)."""
    _unitplan.ENABLED = plans
    try:
        mods = list(w.values())
        opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=0.1, momentum=0.9)
        got = []
        for _ in range(steps):
            for m in mods:
                m.train()
            opt.zero_grad()
            h.grad = s.grad = None
            out = _unit(w, h, s, backend)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            got += [out.detach(), h.grad.clone(), s.grad.clone()]
            got += [p.grad.clone() for m in mods for p in m.parameters()]
            opt.step()
            got += [b.clone() for m in mods for b in m.buffers()]
        for m in mods:
            m.eval()
        with torch.no_grad():
            for _ in range(evals):
                got.append(_unit(w, h, s, backend))
        return got
    finally:
        _unitplan.ENABLED = True


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), i
        assert torch.equal(x, y), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bitwise_the_whole_path(backend, layout, projection, momentum):
    w = _world(projection, momentum)
    h, s = _inputs(projection, layout)
    ref = _run(copy.deepcopy(w), h, s, backend, plans=False)
    assert _unitplan.count() == 0
    got = _run(w, h, s, backend, plans=True)
    # the training unit (per BatchNorm), the eval units (per conv: the main and the projection)
    assert _unitplan.count() == (3 if projection else 2)
    _assert_same(got, ref)


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("projection", [False, True])
def test_a_hit_validates_nothing(monkeypatch, projection):
    w = _world(projection)
    h, s = _inputs(projection, "nchw")
    conv_v = _counting(monkeypatch, conv_ops, "_validate_conv")
    bn_v = _counting(monkeypatch, bn_ops, "_validate")
    upd_v = _counting(monkeypatch, bn_ops, "_validate_update")
    bwd_v = _counting(monkeypatch, bn_ops, "_validate_backward")
    _unit(w, h, s, "aten").sum().backward()  # the whole path: validated, the plan made
    first = (len(conv_v), len(bn_v), len(upd_v), len(bwd_v))
    assert first == ((2 if projection else 1), 1, 1, 1)
    _unit(w, h, s, "aten").sum().backward()  # the planned forward; its backward's plan is made
    assert (len(conv_v), len(bn_v), len(upd_v), len(bwd_v)) == first[:3] + (2,)
    for _ in range(2):
        _unit(w, h, s, "aten").sum().backward()
    assert (len(conv_v), len(bn_v), len(upd_v), len(bwd_v)) == first[:3] + (2,)
    # eval: conv2d_epilogue's validation, once
    epi_v = _counting(monkeypatch, conv_ops, "_validate_epilogue")
    for m in w.values():
        m.eval()
    with torch.no_grad():
        for _ in range(5):  # (whole, resolving, bound: the memo made, memo hits)
            _unit(w, h, s, "aten")
    assert len(epi_v) == (2 if projection else 1)


@pytest.mark.parametrize("projection", [False, True])
def test_a_bound_hit_resolves_until_what_it_rests_on_changes(monkeypatch, projection):
    """Bound plans call their launchers without resolving them again while the registry (its epoch),
    the deterministic mode and TF32 are unchanged and the backend is still registered and available;
    any change resolves again (and an unavailable backend raises what resolution raises)."""
    w = _world(projection)
    h, s = _inputs(projection, "nchw")
    resolved = _counting(monkeypatch, _unitplan, "_resolve")
    ref_w = copy.deepcopy(w)

    def step(world=w):
        out = _unit(world, h, s, "aten")
        out.sum().backward()
        return out.detach()

    for _ in range(3):  # the whole path, a resolving hit (binds the forward), a bound forward (binds the backward)
        step()
    n = len(resolved)
    per_hit = (2 if projection else 1) + 2  # the convolutions, batch_norm_act, bn_running_update
    assert n == per_hit + 1  # (+ the backward's, on the third step)
    for _ in range(2):
        step()
    assert len(resolved) == n  # bound both ways
    with _registry.registered(_registry.Backend("rk_test_epoch", "a test backend", lambda d: None, hidden=True)):
        step()
        assert len(resolved) == n + per_hit + 1  # the registry changed: forward and backward resolve again
        step()
        assert len(resolved) == n + per_hit + 1
    step()  # (and changed back)
    n = len(resolved)
    step()
    assert len(resolved) == n
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        step()
        assert len(resolved) == n + per_hit + 1
    finally:
        torch.use_deterministic_algorithms(prev)
    # the backend replaced behind the registry's back, now unavailable: the bound hit resolves, which raises
    aten = _registry._backends["aten"]
    gone = dataclasses.replace(aten, available=lambda d: "gone for this test")
    monkeypatch.setitem(_registry._backends, "aten", gone)
    before = _state(w)
    with pytest.raises(_registry.BackendUnavailableError, match="gone for this test"):
        _unit(w, h, s, "aten")
    _assert_same(_state(w), before)
    monkeypatch.setitem(_registry._backends, "aten", aten)
    # and the numbers of all those steps (eleven, the failed call changed nothing): the whole path's
    _unitplan.ENABLED = False
    try:
        for _ in range(10):
            step(ref_w)
        b = step(ref_w)
    finally:
        _unitplan.ENABLED = True
    a = step()
    _assert_same([a] + _state(w), [b] + _state(ref_w))


def _reflect_padding(world):
    """The main conv pads with 'reflect': the whole path pads x itself (a key computed from x as
    given would not change; the memos' geometry check misses)."""
    world["conv"].padding_mode = "reflect"


def _wider_padding(world):
    """Back to zero padding, wider and dilated (nn.Conv2d's own reversed padding follows)."""
    world["conv"].padding_mode = "zeros"
    world["conv"].padding = (2, 2)
    world["conv"].dilation = (2, 2)
    world["conv"]._reversed_padding_repeated_twice = [2, 2, 2, 2]


def _hits(monkeypatch, name="eval_hit"):
    """Counts a memo's hits (``_unitplan.eval_hit`` / ``train_hit`` returned the output) and misses."""
    got = {"hit": 0, "miss": 0}
    real = getattr(_unitplan, name)

    def counted(*a):
        y = real(*a)
        got["hit" if y is not None else "miss"] += 1
        return y

    monkeypatch.setattr(_unitplan, name, counted)
    return got


@pytest.mark.parametrize("projection", [False, True])
def test_the_eval_memo_hits_only_while_what_it_read_holds(monkeypatch, projection):
    """An eval unit's memo (``eval_hit``) stands for the whole path from the unit's entry: each
    change of something that path reads (values read through the BatchNorm's fold, the module
    geometry, the inputs' geometry, the flags and global modes, the registry) misses it, and every
    call's output is the whole path's, bitwise."""
    w = _world(projection)
    h, s = _inputs(projection, "nchw")
    h, s = h.detach(), s.detach()
    ref_w = copy.deepcopy(w)
    for world in (w, ref_w):
        for m in world.values():
            m.eval()
    hits = _hits(monkeypatch)
    units = 2 if projection else 1
    PADDED = units - 1  # (an input the whole path pads itself is never memoised; the projection's is)

    def both(args=None, world_fn=None, expect_hits=None, grad=False):
        hits.update(hit=0, miss=0)
        a_h, a_s = args if args is not None else (h, s)
        with torch.set_grad_enabled(grad):
            a = _unit(w, a_h, a_s, "aten")
            _unitplan.ENABLED = False
            try:
                b = _unit(ref_w, a_h, a_s, "aten")
            finally:
                _unitplan.ENABLED = True
        _assert_same([a.detach()], [b.detach()])
        if expect_hits is not None:
            assert hits["hit"] == expect_hits, hits

    for _ in range(3):  # the whole path, the resolving hit, the bound hit (the memos made)
        both(expect_hits=0)
    both(expect_hits=units)
    both(expect_hits=units)

    def change(fn, again=units):
        """fn applied to both worlds: the next call misses the main unit's memo, the one after hits."""
        for world in (w, ref_w):
            fn(world)
        both()
        assert hits["hit"] < units or units == 0, hits
        for _ in range(3):
            both()
        assert hits["hit"] == again, hits

    def stats(world):
        with torch.no_grad():
            world["bn"].running_mean.add_(0.125)  # in place: the fold's version changes

    change(stats)

    def eps(world):
        world["bn"].eps = 1e-3

    change(eps)

    def new_weight(world):
        world["bn"].weight = nn.Parameter(torch.full((C,), 1.5))

    change(new_weight)

    change(_reflect_padding, again=PADDED)
    change(_wider_padding)

    def conv_weight(world):
        with torch.no_grad():
            world["conv"].weight.mul_(0.5)  # values: read by the launcher, the memo stays

    for world in (w, ref_w):
        conv_weight(world)
    both(expect_hits=units)
    # another input layout, another batch: other keys
    hcl = h.to(memory_format=torch.channels_last)
    both((hcl, s))
    assert hits["hit"] < units
    both((torch.randn(3, C, 4, 4), torch.randn(3, C_IN, 8, 8) if projection else torch.randn(3, C, 4, 4)))
    assert hits["hit"] < units
    both(expect_hits=units)  # (back: the memo is still the last bound hit's, this key's)
    # global modes the whole path reads
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        both(expect_hits=0)
    finally:
        torch.use_deterministic_algorithms(prev)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both(expect_hits=0)
    both(grad=True, expect_hits=0)  # the BatchNorm's parameters need a gradient: no cached fold
    with _registry.registered(_registry.Backend("rk_test_memo", "a test backend", lambda d: None, hidden=True)):
        both(expect_hits=0)
    for _ in range(3):
        both()
    both(expect_hits=units)
    # the conv paired with another BatchNorm, and the memo's BatchNorm in training: no hit
    other = copy.deepcopy(w["bn"])
    other_ref = copy.deepcopy(ref_w["bn"])
    with torch.no_grad():
        other.running_var.mul_(2)
        other_ref.running_var.mul_(2)
    w["bn"], other = other, w["bn"]
    ref_w["bn"], other_ref = other_ref, ref_w["bn"]
    both()
    assert hits["hit"] < units
    w["bn"].train()
    ref_w["bn"].train()
    both(expect_hits=0)


@pytest.mark.parametrize("projection", [False, True])
def test_the_training_memo_hits_only_while_what_it_read_holds(monkeypatch, projection):
    """A training unit's memo (``train_hit``) stands for the whole path from the unit's entry to its
    plan: each change of what that path reads (the key: inputs, modules, flags; the convolutions'
    padding; autocast and the global modes) misses it; every step's outputs, gradients and buffers
    are the whole path's, bitwise."""
    w = _world(projection)
    h, s = _inputs(projection, "nchw")
    ref_w = copy.deepcopy(w)
    hits = _hits(monkeypatch, "train_hit")

    def both(args=None, expect_hits=None):
        hits.update(hit=0, miss=0)
        a_h, a_s = args if args is not None else (h, s)
        got = []
        for world, plans in ((w, True), (ref_w, False)):
            _unitplan.ENABLED = plans
            try:
                hh, ss = a_h.detach().requires_grad_(), a_s.detach().requires_grad_()
                out = _unit(world, hh, ss, "aten")
                out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
                got.append([out.detach(), hh.grad, ss.grad] + _state(world)
                           + [p.grad for m in world.values() for p in m.parameters()])
                for m in world.values():
                    m.zero_grad()
            finally:
                _unitplan.ENABLED = True
        _assert_same(got[0], got[1])
        if expect_hits is not None:
            assert hits["hit"] == expect_hits, hits

    for _ in range(2):  # the whole path (the plan made), the first hit (the memo made)
        both(expect_hits=0)
    both(expect_hits=1)
    both(expect_hits=1)

    PADDED = 0  # (an input the whole path pads itself is never memoised)

    def change(fn, again=1):
        for world in (w, ref_w):
            fn(world)
        both(expect_hits=0)
        for _ in range(2):
            both()
        both(expect_hits=again)

    def momentum(world):
        world["bn"].momentum = 0.25

    change(momentum)

    def cumulative(world):
        world["bn"].momentum = None

    change(cumulative)

    def eps(world):
        world["bn"].eps = 1e-3

    change(eps)

    def new_buffer(world):
        world["bn"].running_var = torch.ones(C)

    change(new_buffer)

    def new_weight(world):
        world["conv"].weight = nn.Parameter(world["conv"].weight.detach().clone())

    both(expect_hits=1)  # (a new Parameter of the same geometry: the same key; the new tensor is read)
    for world in (w, ref_w):
        new_weight(world)
    both(expect_hits=1)

    change(_reflect_padding, again=PADDED)
    change(_wider_padding)
    # another layout, another batch: other keys (the memo is the last hit's)
    both((h.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)), expect_hits=0)
    both((torch.randn(3, C, 4, 4), torch.randn(3, C_IN, 8, 8) if projection else torch.randn(3, C, 4, 4)),
         expect_hits=0)
    both(expect_hits=1)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        both(expect_hits=1)  # (the memo's plan resolves again: its token changed)
    finally:
        torch.use_deterministic_algorithms(prev)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hits.update(hit=0)
        with torch.no_grad():
            _unit(w, h, s, "aten")
            _unit(ref_w, h, s, "aten")  # (the running statistics move in both worlds)
        assert hits["hit"] == 0
    # the memo's BatchNorm in eval, or paired with another conv: no training hit
    other = copy.deepcopy(w["conv"])
    w["conv"], other = other, w["conv"]
    ref_w["conv"] = copy.deepcopy(ref_w["conv"])
    both(expect_hits=0)
    for world in (w, ref_w):
        world["bn"].eval()
    both(expect_hits=0)


def test_memos_keep_no_module_alive():
    """A memo is held by its key module (weakly) and holds the unit's other modules weakly: a module
    replaced in the model is freed, and so is everything once the model goes."""
    import gc
    import weakref
    w = _world(True)
    h, s = _inputs(True, "nchw")

    def both_modes(w):
        for m in w.values():
            m.train()
        for _ in range(3):
            _unit(w, h, s, "aten").sum().backward()
        for m in w.values():
            m.eval()
        with torch.no_grad():
            for _ in range(4):
                _unit(w, h, s, "aten")

    both_modes(w)
    assert len(_unitplan._tmemos) == 1 and len(_unitplan._memos) == 2
    # replaced: the training memo's conv and projection pair (kept by bn), the eval memo's BatchNorm (kept by conv)
    old = [weakref.ref(w[k]) for k in ("conv", "sconv", "sbn")]
    for k in ("conv", "sconv", "sbn"):
        w[k] = copy.deepcopy(w[k])
    gc.collect()
    assert all(r() is None for r in old)
    old_bn = weakref.ref(w["bn"])
    w["bn"] = copy.deepcopy(w["bn"])
    gc.collect()
    assert old_bn() is None
    both_modes(w)
    refs = [weakref.ref(m) for m in w.values()]
    del w
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(_unitplan._tmemos) == 0 and len(_unitplan._memos) == 0


def _error(fn):
    with pytest.raises(Exception) as e:
        fn()
    return type(e.value), str(e.value)


def _state(w):
    return [t.clone() for m in w.values() for t in list(m.parameters()) + list(m.buffers())]


@pytest.mark.parametrize("change", ["bn_weight_shape", "conv_dtype", "x_channels", "residual_shape",
                                    "aliased_buffers", "residual_dtype"])
def test_a_bad_call_after_a_plan_raises_what_the_whole_path_raises(change):
    """Each change is one validation reads: the plan misses, the whole path names the argument,
    and the failed call changes no state (and makes no plan)."""
    w = _world(False)
    h, s = _inputs(False, "nchw")
    for _ in range(2):
        _unit(w, h, s, "aten")
    assert _unitplan.count() == 1
    conv, bn = w["conv"], w["bn"]
    if change == "bn_weight_shape":
        bn.weight.data = torch.ones(C + 1)
    elif change == "conv_dtype":
        conv.weight.data = conv.weight.data.double()
    elif change == "x_channels":
        h = torch.randn(2, C + 1, 4, 4)
    elif change == "residual_shape":
        s = torch.randn(2, C, 5, 5)
    elif change == "aliased_buffers":
        bn.running_var.data = bn.running_mean.data
    elif change == "residual_dtype":
        s = s.detach().double()
    before = _state(w)
    got = _error(lambda: _unit(w, h, s, "aten"))
    assert _unitplan.count() == 1
    _unitplan.ENABLED = False
    want = _error(lambda: _unit(w, h, s, "aten"))
    assert got == want
    _assert_same(_state(w), before)


def test_each_change_validation_reads_makes_a_new_plan():
    w = _world(True)
    h, s = _inputs(True, "nchw")
    ref_w = copy.deepcopy(w)

    def both(fn):
        _unitplan.ENABLED = True
        a = fn(w)
        _unitplan.ENABLED = False
        b = fn(ref_w)
        _unitplan.ENABLED = True
        _assert_same([a], [b])

    def train(world):
        for m in world.values():
            m.train()
        return _unit(world, h, s, "aten").detach()

    def evaluate(world):
        for m in world.values():
            m.eval()
        with torch.no_grad():
            return _unit(world, h, s, "aten")

    both(train)
    both(train)
    n = _unitplan.count()
    both(evaluate)  # train/eval switch
    assert _unitplan.count() == n + 2  # the main and the shortcut conv2d_epilogue
    n = _unitplan.count()
    # a replaced buffer (another address) and a replaced parameter: new plans, and the new tensors are used
    for world in (w, ref_w):
        world["bn"].running_mean = torch.zeros(C)
        world["sbn"].weight = nn.Parameter(torch.full((C,), 2.0))
    both(train)
    assert _unitplan.count() == n + 1
    # load_state_dict and an in-place parameter change: values only, the plan stays and reads them
    state = _world(True, seed=5)
    for world in (w, ref_w):
        for k in world:
            world[k].load_state_dict(state[k].state_dict())
        with torch.no_grad():
            world["bn"].bias.add_(0.25)
    n = _unitplan.count()
    both(train)
    both(evaluate)
    assert _unitplan.count() == n
    # dtype and layout changes (.to()): new plans
    for world in (w, ref_w):
        for m in world.values():
            m.to(torch.float64)
    h64, s64 = h.detach().double(), s.detach().double()

    def train64(world):
        for m in world.values():
            m.train()
        return _unit(world, h64, s64, "aten").detach()

    both(train64)
    for world in (w, ref_w):
        for m in world.values():
            m.to(memory_format=torch.channels_last)
    hcl, scl = h64.to(memory_format=torch.channels_last), s64.to(memory_format=torch.channels_last)

    def train_cl(world):
        for m in world.values():
            m.train()
        return _unit(world, hcl, scl, "aten").detach()

    both(train_cl)
    assert _unitplan.count() > n


def test_plans_are_bounded_per_module():
    w = _world(False)
    for n in range(2, 2 + 2 * _unitplan.MAX_PLANS):
        h = torch.randn(n, C, 4, 4)
        _unit(w, h, torch.randn(n, C, 4, 4), "aten")
    assert _unitplan.count() == _unitplan.MAX_PLANS


def test_no_plan_where_each_op_must_be_seen():
    """explain's recorder, the DEBUG log, 'auto' and a function mode see every op call."""
    w = _world(False)
    h, s = _inputs(False, "nchw")
    with _tune.recording() as rec:
        _unit(w, h, s, "aten")
        _unit(w, h, s, "aten")
    assert [d.op for d in rec].count("conv2d_stats") == 2
    assert _unitplan.count() == 0
    _unit(w, h, s, "auto")
    assert _unitplan.count() == 0
    with torch.device("cpu"):  # a TorchFunctionMode
        _unit(w, h, s, "aten")
    assert _unitplan.count() == 0


@pytest.mark.parametrize("unit", [False, True], ids=["per_op", "aten_unit"])
def test_gradcheck_through_the_planned_unit(unit):
    """float64 gradcheck of a bound plan: its ops one by one, or aten's training unit (taken from the
    third call on: the whole path, the resolving hit, then bound)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(4).double()
    sconv = nn.Conv2d(2, 4, 1, stride=2, bias=False).double()
    sbn = nn.BatchNorm2d(4).double()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the whole path (the plan made), the resolving hit (bound)
        conv_bn_add_act(x, conv, bn, r, sconv, sbn, backend="aten")
    assert _unitplan.count() == 1
    assert (next(iter(_unitplan._plans[bn].values())).fast.unit is not None) == unit
    torch.autograd.gradcheck(lambda x, r: conv_bn_add_act(x, conv, bn, r, sconv, sbn, backend="aten"), (x, r))
    assert _unitplan.count() == 1


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("projection", [False, True])
def test_bitwise_the_whole_path_kernel_backends(request, backend, layout, projection):
    """The bound paths with our kernels' launchers (they write into preallocated outputs): csrc's on
    the host runner and Triton's under the interpreter without a GPU. Bitwise the whole path."""
    device = request.getfixturevalue("cuda_target") if backend == "cuda" else rk_testing.DEVICE
    w = {k: m.to(device) for k, m in _world(projection).items()}
    h, s = (t.detach().to(device).requires_grad_() for t in _inputs(projection, layout))
    ref = _run(copy.deepcopy(w), h, s, backend, plans=False)
    got = _run(w, h, s, backend, plans=True)
    assert _unitplan.count() == (3 if projection else 2)
    _assert_same(got, ref)


# --------------------------------------------------------------------------------------------
# aten's training unit (resnet_kernels/backends/aten_unit.py): PyTorch's own BatchNorm calls
# --------------------------------------------------------------------------------------------
def _plain_unit(world, h, s):
    """nn.Conv2d -> nn.BatchNorm2d (+ the shortcut: raw, or nn.Conv2d -> nn.BatchNorm2d) -> ReLU."""
    z = world["bn"](world["conv"](h))
    return torch.relu(z + (world["sbn"](world["sconv"](s)) if "sconv" in world else s))


def _unit_and_plain_step(w, h0, s0):
    """One training step from one state: ``w``'s unit through conv_bn_add_act on aten (planned), and
    ``_plain_unit`` on a copy of ``w``; everything observable of each (output, input and parameter
    gradients, parameters and buffers after it)."""
    ref_w = copy.deepcopy(w)
    got = []
    for world, fn in ((w, lambda w_, h, s: _unit(w_, h, s, "aten")), (ref_w, _plain_unit)):
        h, s = h0.clone().requires_grad_(), s0.clone().requires_grad_()
        out = fn(world, h, s)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
        got.append([out.detach(), h.grad, s.grad] + [p.grad for m in world.values() for p in m.parameters()]
                   + _state(world))
    for m in w.values():
        m.zero_grad()
    return got


_UNIT_DTYPES = {  # (the activations' and convolutions' dtype, the BatchNorms')
    "float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64),
    "bfloat16": (torch.bfloat16, torch.bfloat16), "bfloat16_bn_float32": (torch.bfloat16, torch.float32),
    "float16_bn_float32": (torch.float16, torch.float32)}


@pytest.mark.parametrize("dtypes", list(_UNIT_DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_aten_unit_is_pytorchs_own_batch_norm(monkeypatch, dtypes, layout, projection, momentum):
    """Each training step from the same state: the planned aten unit and nn.Conv2d -> nn.BatchNorm2d
    -> add -> ReLU. The whole path and the resolving hit (steps 0 and 1) agree within rounding; from
    the bound hit on (steps 2+: the unit) the output, the input and parameter gradients and every
    buffer are PyTorch's, bitwise."""
    act, bnd = _UNIT_DTYPES[dtypes]
    w = _world(projection, momentum)
    for k, m in w.items():
        m.to(act if "conv" in k else bnd)
        if layout == "channels_last":
            m.to(memory_format=torch.channels_last)
    h0, s0 = (t.detach().to(act) for t in _inputs(projection, layout))
    units = _counting(monkeypatch, __import__("resnet_kernels.backends.aten_unit").backends.aten_unit, "forward")
    for step in range(5):
        got = _unit_and_plain_step(w, h0, s0)
        assert len(units) == max(0, step - 1)
        if step >= 2:
            _assert_same(got[0], got[1])
        elif act in (torch.float32, torch.float64):  # (the ops' own parity: tests/ops, tests/nn)
            for a, b in zip(*got):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["no_affine", "no_running_stats", "running_stats_off_later"])
def test_aten_unit_without_affine_parameters_or_running_statistics(monkeypatch, kind):
    """The unit with BatchNorms without weight and bias, without running buffers, or whose
    track_running_stats was turned off after construction (buffers kept, never updated): PyTorch's
    numbers bitwise from the bound hit on, as above."""
    w = _world(True)
    for k in ("bn", "sbn"):
        if kind == "running_stats_off_later":
            w[k].track_running_stats = False
        else:
            w[k] = nn.BatchNorm2d(C, affine=kind != "no_affine", track_running_stats=kind != "no_running_stats")
    h0, s0 = (t.detach() for t in _inputs(True, "nchw"))
    units = _counting(monkeypatch, __import__("resnet_kernels.backends.aten_unit").backends.aten_unit, "forward")
    for step in range(4):
        got = _unit_and_plain_step(w, h0, s0)
        if step >= 2:
            _assert_same(got[0], got[1])
    assert len(units) == 2


def test_aten_unit_declines_what_native_batch_norm_does_not_take(monkeypatch):
    """bfloat16 activations with float32 BatchNorm parameters and bfloat16 running buffers: the ops
    take it (the update casts), native_batch_norm does not; the plan binds the ops one by one (its
    numbers the whole path's, bitwise)."""
    def world():
        w = _world(False)
        w["conv"].to(torch.bfloat16)
        w["bn"].running_mean.data = w["bn"].running_mean.data.bfloat16()
        w["bn"].running_var.data = w["bn"].running_var.data.bfloat16()
        return w

    h, s = (t.detach().bfloat16().requires_grad_() for t in _inputs(False, "nchw"))
    units = _counting(monkeypatch, __import__("resnet_kernels.backends.aten_unit").backends.aten_unit, "forward")
    w = world()
    got = _run(w, h, s, "aten", plans=True, evals=0)
    ref = _run(world(), h, s, "aten", plans=False, evals=0)
    plan = next(iter(_unitplan._plans[w["bn"]].values()))
    assert not units and plan.fast is not None and plan.fast.unit is None  # (bound, without the unit)
    _assert_same(got, ref)

