"""Property-based tests (hypothesis) of the public ops and modules against the PyTorch reference.

Hypothesis draws the shapes (N, C, H, W from {0, 1, 2, 3, 7} and friends), the memory layout, the
dtype, the optional operands and flags, train/eval, and a seed for the tensor values; each case
is compared with the unfused PyTorch computation in float64. Bad inputs (wrong dtype, shape,
layout, device, rank, channel count, non-bool flags) must raise TypeError/ValueError naming the
argument, and leave every parameter, buffer and ``num_batches_tracked`` unchanged.

Backends: ``torch`` and ``triton`` (on a CPU under the Triton interpreter, which is slow: a few
examples only), ``cuda`` too with a GPU. The example counts keep the file at about a minute on a
2-core CPU; ``RK_HYPOTHESIS_EXAMPLES=N`` scales them (e.g. for a longer local fuzzing run).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import resnet_kernels as rk  # noqa: E402
import rk_testing as rt  # noqa: E402
from resnet_kernels import functional as RF  # noqa: E402
from resnet_kernels.nn import AddReLU, BNAddReLU, ConvBNReLU  # noqa: E402

DEV = rt.DEVICE
SCALE = float(os.environ.get("RK_HYPOTHESIS_EXAMPLES", "1"))
# (examples for the torch backend, for a kernel backend). Kernel backends on a CPU run the Triton
# interpreter: seconds per example.
_SLOW = DEV == "cpu"


def _n(torch_examples: int, kernel_examples: int, backend: str) -> int:
    n = torch_examples if backend == "torch" or not _SLOW else kernel_examples
    return max(1, int(n * SCALE))


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DIMS = st.sampled_from([0, 1, 2, 3, 7])
SMALL = st.sampled_from([1, 2, 3, 7])
CHANNELS = st.sampled_from([1, 3, 4, 8])
LAYOUTS = st.sampled_from(["nchw", "channels_last"])
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _dtypes(backend, fp64=True):
    d = [torch.float32, torch.float16, torch.bfloat16]
    return st.sampled_from(d + [torch.float64] if fp64 else d)


def _rand(shape, dtype, layout, gen, scale=1.0):
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return rt.layouts(t.to(DEV), layout)


def _close(actual, expected, dtype, what, scale_ref=None):
    """max|actual - expected| <= TOL[dtype] * max(1, max|expected|) (expected in float64); NaN fails."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if e.numel() == 0:
        return
    ref = e.abs().max().item() if scale_ref is None else scale_ref
    err = (a - e).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref), f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} x {max(1.0, ref):.3g}"


# --------------------------------------------------------------------------------------------
# bn_add_relu / add_relu
# --------------------------------------------------------------------------------------------
@st.composite
def bn_add_relu_cases(draw, backend):
    return dict(N=draw(DIMS), C=draw(CHANNELS), H=draw(DIMS), W=draw(SMALL), layout=draw(LAYOUTS),
                dtype=draw(_dtypes(backend)), relu=draw(st.booleans()), scale=draw(st.booleans()),
                shift=draw(st.booleans()), identity=draw(st.booleans()), id_scale=draw(st.booleans()),
                id_shift=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_bn_add_relu(backend, case):
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    shape = (c["N"], c["C"], c["H"], c["W"])
    dt = c["dtype"]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    x = _rand(shape, dt, c["layout"], gen).requires_grad_()
    ident = _rand(shape, dt, c["layout"], gen).requires_grad_() if c["identity"] else None

    def vec(flag, base):
        if not flag:
            return None
        return (base + torch.rand(c["C"], generator=gen, dtype=torch.float64)).to(acc).to(DEV).requires_grad_()

    s, b = vec(c["scale"], 0.5), vec(c["shift"], -0.5)
    i_s = vec(c["id_scale"] and c["identity"], 0.5)
    i_b = vec(c["id_shift"] and c["identity"], -0.5)
    out = rk.bn_add_relu(x, s, b, ident, i_s, i_b, relu=c["relu"], backend=backend)
    assert out.dtype == dt and out.shape == x.shape
    if c["layout"] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()

    # float64 reference from the same (rounded) inputs
    d = {k: (t.detach().double().requires_grad_() if t is not None else None)
         for k, t in dict(x=x, s=s, b=b, i=ident, i_s=i_s, i_b=i_b).items()}
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    y = d["x"] * (v(d["s"]) if d["s"] is not None else 1) + (v(d["b"]) if d["b"] is not None else 0)
    if d["i"] is not None:
        y = y + d["i"] * (v(d["i_s"]) if d["i_s"] is not None else 1) + (v(d["i_b"]) if d["i_b"] is not None else 0)
    ref = torch.relu(y) if c["relu"] else y
    _close(out, ref, dt, "out")
    if out.numel() == 0 and not any(t is not None for t in (s, b, i_s, i_b)):
        return
    g = _rand(shape, dt, c["layout"], gen)
    mine = [t for t in (x, s, b, ident, i_s, i_b) if t is not None]
    theirs = [t for t in d.values() if t is not None]
    grads = torch.autograd.grad(out, mine, g, allow_unused=True)
    # the reference's ReLU mask from the fused output (a value that rounds to 0 flips the mask)
    ref_out = torch.where(out.detach().double() > 0, y, torch.zeros_like(y)) if c["relu"] else y
    ref_grads = torch.autograd.grad(ref_out, theirs, g.double(), allow_unused=True)
    for i, (gm, gr) in enumerate(zip(grads, ref_grads)):
        gm = torch.zeros_like(mine[i]) if gm is None else gm
        gr = torch.zeros_like(theirs[i]) if gr is None else gr
        n_terms = max(1, c["N"] * c["H"] * c["W"])
        _close(gm, gr, dt if gm.dim() == 4 else acc, f"grad {i}",
               scale_ref=None if gm.dim() == 4 else gr.abs().max().item() + n_terms ** 0.5)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_bn_add_relu_matches_reference(backend):
    @_settings(_n(40, 6, backend))
    @given(bn_add_relu_cases(backend))
    def run(case):
        _check_bn_add_relu(backend, case)

    run()


# --------------------------------------------------------------------------------------------
# conv_bn_act / conv_bn_add_act / ConvBNReLU against nn.Conv2d -> nn.BatchNorm2d -> ReLU
# --------------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw, backend):
    k = draw(st.sampled_from([1, 3]))
    return dict(N=draw(st.sampled_from([0, 1, 2, 3])), Cin=draw(st.sampled_from([1, 3, 4])),
                Cout=draw(st.sampled_from([1, 3, 4])), H=draw(st.sampled_from([1, 3, 7])),
                W=draw(st.sampled_from([3, 7])), k=k, stride=draw(st.sampled_from([1, 2])),
                padding=draw(st.sampled_from([0, 1] if k == 3 else [0])), bias=draw(st.booleans()),
                layout=draw(LAYOUTS), dtype=draw(_dtypes(backend, fp64=backend == "torch")),
                train=draw(st.booleans()), relu=draw(st.booleans()), residual=draw(st.booleans()),
                projection=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, None])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _within(out, ref, eager, dt, what):
    """|out - ref| <= max(TOL[dt] * max(1, max|ref|), 3 x the eager error): the unfused layers in
    the same dtype show how much rounding the case itself amplifies (tiny-batch BatchNorm)."""
    if ref.numel() == 0:
        assert out.shape == ref.shape
        return
    ref = ref.detach().double().cpu()
    scale = max(1.0, ref.abs().max().item())
    eager_err = (eager.detach().double().cpu() - ref).abs().max().item()
    err = (out.detach().double().cpu() - ref).abs().max().item()
    assert err <= max(TOL[dt] * scale, 3 * eager_err), f"{what}: error {err:.3g}, eager error {eager_err:.3g}"


def _check_conv(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    dt = c["dtype"]
    k, p, stride = c["k"], c["padding"], c["stride"]
    if min(c["H"], c["W"]) + 2 * p < k:
        p = 1
    OH, OW = (c["H"] + 2 * p - k) // stride + 1, (c["W"] + 2 * p - k) // stride + 1
    param_dt = torch.float64 if dt == torch.float64 else torch.float32
    mods = nn.ModuleList([nn.Conv2d(c["Cin"], c["Cout"], k, stride=stride, padding=p, bias=c["bias"]),
                          nn.BatchNorm2d(c["Cout"], momentum=c["momentum"])])
    # a 1x1 projection shortcut has the main output's size when the main conv keeps it (k=1, or k=3 with padding 1)
    proj = c["projection"] and (k == 1 or p == 1)
    if proj:
        mods.extend([nn.Conv2d(c["Cin"], c["Cout"], 1, stride=stride, bias=False),
                     nn.BatchNorm2d(c["Cout"], momentum=c["momentum"])])
    with torch.no_grad():
        for bn in mods[1::2]:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0, 0.2, generator=gen)
            bn.running_mean.normal_(0, 0.2, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
    mods = mods.to(device=DEV, dtype=param_dt).train(c["train"])
    ref_mods = copy.deepcopy(mods).double()
    eager_mods = copy.deepcopy(mods)
    x = _rand((c["N"], c["Cin"], c["H"], c["W"]), dt, c["layout"], gen).requires_grad_()
    residual = None
    if c["residual"] and not proj:
        residual = _rand((c["N"], c["Cout"], OH, OW), dt, c["layout"], gen)
    autocast = dt in (torch.float16, torch.bfloat16)

    def unfused(ms, xin, res):
        y = ms[1](ms[0](xin))
        if proj:
            y = y + ms[3](ms[2](xin))
        elif res is not None:
            y = y + res
        return torch.relu(y) if c["relu"] else y

    def ours():
        with torch.autocast(DEV, dtype=dt, enabled=autocast):
            if proj:
                return RF.conv_bn_add_act(x, mods[0], mods[1], x, mods[2], mods[3], relu=c["relu"], backend=backend)
            return RF.conv_bn_act(x, mods[0], mods[1], relu=c["relu"], residual=residual, backend=backend)

    before = {key: v.detach().clone() for key, v in mods.state_dict().items()}
    if c["train"] and c["N"] * OH * OW == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours()
        for key, v in mods.state_dict().items():
            assert torch.equal(v, before[key]), f"{key} changed by a failed call"
        return
    out = ours()
    ref = unfused(ref_mods, x.detach().double(), None if residual is None else residual.double())
    with torch.no_grad(), torch.autocast(DEV, dtype=dt, enabled=autocast):
        eager = unfused(eager_mods, x.detach(), residual)
    assert out.shape == ref.shape == (c["N"], c["Cout"], OH, OW)
    _within(out, ref, eager, dt, "out")
    # side effects: running statistics and the counter, like the unfused layers
    for (key, a), (_, b), (_, e) in zip(mods.state_dict().items(), ref_mods.state_dict().items(),
                                        eager_mods.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            assert torch.equal(a.cpu(), b.cpu()), key
        elif a.is_floating_point():
            _within(a, b, e, dt, key)
    # gradients flow and are finite (their values are compared by the parity tests)
    if out.numel():
        out.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(q.grad).all() for q in mods.parameters() if q.grad is not None)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_conv_bn_act_matches_unfused(backend):
    @_settings(_n(40, 4, backend))
    @given(conv_cases(backend))
    def run(case):
        _check_conv(backend, case)

    run()


# --------------------------------------------------------------------------------------------
# modules: BNAddReLU, AddReLU, ConvBNReLU in train/eval, several steps
# --------------------------------------------------------------------------------------------
@given(N=st.sampled_from([0, 2, 3]), C=CHANNELS, H=SMALL, W=SMALL, layout=LAYOUTS, train=st.booleans(),
       shortcut=st.booleans(), momentum=st.sampled_from([0.1, None]), steps=st.integers(1, 3),
       seed=st.integers(0, 2 ** 31 - 1))
@_settings(int(30 * SCALE) or 1)
def test_bn_add_relu_module_matches_unfused(N, C, H, W, layout, train, shortcut, momentum, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    m = BNAddReLU(C, shortcut_bn=shortcut, momentum=momentum, device=DEV, dtype=torch.float64, backend="torch")
    ref_bn = copy.deepcopy(m.bn)
    ref_sbn = copy.deepcopy(m.shortcut_bn)
    m.train(train)
    ref_bn.train(train)
    if ref_sbn is not None:
        ref_sbn.train(train)
    for _ in range(steps):
        x = _rand((N, C, H, W), torch.float64, layout, gen)
        i = _rand((N, C, H, W), torch.float64, layout, gen)
        if train and N * H * W == 1:
            return
        out = m(x, i)
        ref = torch.relu(ref_bn(x) + (ref_sbn(i) if ref_sbn is not None else i))
        _close(out, ref, torch.float64, "out")
    for (k, a), (_, b) in zip(m.bn.state_dict().items(), ref_bn.state_dict().items()):
        _close(a, b, torch.float64, k)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_modules_forward_backward(backend):
    @_settings(_n(20, 3, backend))
    @given(N=st.sampled_from([0, 2, 3]), C=st.sampled_from([3, 4]), H=SMALL, layout=LAYOUTS, train=st.booleans(),
           seed=st.integers(0, 2 ** 31 - 1))
    def run(N, C, H, layout, train, seed):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        m = ConvBNReLU(C, 4, 3, padding=1, device=DEV, backend=backend).train(train)
        eager = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU()).train(train)
        ref = copy.deepcopy(eager).double()
        x = _rand((N, C, H, 5), torch.float32, layout, gen).requires_grad_()
        for _ in range(2):  # two steps: the running statistics feed the second one in eval
            out = m(x)
            _within(out, ref(x.detach().double()), eager(x.detach()), torch.float32, "ConvBNReLU out")
        for (key, a), (_, b), (_, e) in zip(m.state_dict().items(), ref[:2].state_dict().items(),
                                            eager[:2].state_dict().items()):
            _within(a, b, e, torch.float32, key)
        a = AddReLU(backend=backend)(out, out)
        _close(a, torch.relu(2 * out.double()), torch.float32, "AddReLU out")
        if out.numel():
            a.sum().backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(m.conv.weight.grad).all()

    run()


# --------------------------------------------------------------------------------------------
# bad inputs: a clear exception, nothing changed
# --------------------------------------------------------------------------------------------
BAD_KINDS = ["dtype", "int", "shape", "rank3", "strided", "layout", "device", "channels", "relu_flag", "scale_len"]


def _bad_call(kind, N, C, H, W, gen):
    x = _rand((N, C, H, W), torch.float32, "nchw", gen)
    ok_id = _rand((N, C, H, W), torch.float32, "nchw", gen)
    bad = {
        "dtype": (ok_id.double(), "identity"),
        "int": (ok_id.to(torch.int32), "identity"),
        "shape": (_rand((N, C, H, W + 1), torch.float32, "nchw", gen), "identity"),
        "rank3": (ok_id[0], "identity"),
        "strided": (_rand((N, C, H, 2 * W), torch.float32, "nchw", gen)[..., ::2], "identity"),
        "layout": (ok_id.contiguous(memory_format=torch.channels_last), "identity"),
        "device": (ok_id.to("meta"), "identity"),
    }
    return x, ok_id, bad


@given(kind=st.sampled_from(BAD_KINDS), N=st.sampled_from([1, 2, 3]), C=st.sampled_from([2, 3, 4]),
       H=st.sampled_from([2, 3, 7]), W=st.sampled_from([2, 3, 7]), train=st.booleans(), shortcut=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
@_settings(int(40 * SCALE) or 1)
def test_bad_inputs_raise_clearly_and_change_nothing(kind, N, C, H, W, train, shortcut, seed):
    gen = torch.Generator().manual_seed(seed)
    x, ok_id, bad = _bad_call(kind, N, C, H, W, gen)
    mod = BNAddReLU(C, shortcut_bn=shortcut, backend="torch").train(train)
    cbr = ConvBNReLU(C, C, 3, padding=1, backend="torch").train(train)
    before = {k: v.clone() for k, v in list(mod.state_dict().items()) + [("c." + k, v) for k, v in
                                                                         cbr.state_dict().items()]}
    if kind in bad:
        if kind == "layout" and (C == 1 or H * W == 1):
            return  # both layouts at once: not a bad input
        ident, name = bad[kind]
        calls = [lambda: mod(x, ident), lambda: rk.add_relu(x, ident, backend="torch"),
                 lambda: rk.bn_add_relu(x, None, None, ident, backend="torch")]
        if kind not in ("strided", "layout"):  # the functional API densifies residuals into the output's layout
            calls.append(lambda: cbr(x, ident))
    elif kind == "channels":
        name = "channels"
        y = _rand((N, C + 1, H, W), torch.float32, "nchw", gen)
        calls = [lambda: mod(y, y), lambda: cbr(y)]
    elif kind == "relu_flag":
        name = "relu"
        calls = [lambda: rk.bn_add_relu(x, None, None, ok_id, relu="no", backend="torch"),
                 lambda: RF.conv_bn_act(x, cbr.conv, cbr.bn, relu=1, backend="torch")]
    else:  # scale_len
        name = "scale"
        calls = [lambda: rk.bn_add_relu(x, torch.ones(C + 1), None, ok_id, backend="torch")]
    for call in calls:
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        msg = str(e.value)
        # the message names the argument (the shortcut BN's own 4-D check names the layer)
        names = {"identity": ("identity", "residual", "BatchNorm2d"), "channels": ("channels", "C_in", "Cin", "weight"),
                 "relu": ("relu",), "scale": ("scale",)}[name]
        assert any(n in msg for n in names), f"{kind}: {msg}"
    after = {k: v for k, v in list(mod.state_dict().items()) + [("c." + k, v) for k, v in cbr.state_dict().items()]}
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{kind}: {k} changed by a failed call"
