"""CUDA launchers of the training-mode BatchNorm ops (resnet_kernels/backends/cuda_batch_norm.py,
csrc/batch_norm.cu) against the reference launchers (torch_batch_norm.py, the contract) run in
float64 on the same inputs.

Bounds: rk_testing's worst-case error bounds (elementwise: a few float32 roundings relative to the
magnitude of the terms plus half an ulp of the stored dtype; per-channel sums: (n + 2) float32
roundings relative to the sum of |terms|, plus one ulp of the gradient's dtype). An unwritten
element fails: every output starts as NaN. A channel mix-up, a dropped term or a wrong
coefficient is of the order of the values, far above the bounds.

Without a GPU the kernels' own source runs on CPU tensors through the host runner (the
``cuda_target`` fixture, tests/host_runner.py), on small shapes; ``BIG`` gives several partial
sums per channel in both tilings. float64 activations are not supported by the kernels (the
torch implementation serves them): a test checks that they are refused.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import rk_testing as rt
from resnet_kernels.backends import cuda_batch_norm as cuda_impl
from resnet_kernels.backends import torch_batch_norm as torch_impl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# C=3/N=1/7x7: scalar paths; (2, 8, 4, 4): full-width vectors in both layouts; (2, 12, 14, 14):
# 16-bit NCHW 8-byte vectors (196 % 8 != 0), channels_last C % 8 != 0; (3, 20, 3, 3): odd planes,
# channels_last 4-wide; (2, 520, 1, 1): several channels_last column tiles.
SHAPES = [(1, 3, 7, 7), (2, 8, 4, 4), (2, 12, 14, 14), (3, 20, 3, 3), (2, 520, 1, 1)]
# several partial sums per channel in both backward tilings (NCHW P = 2, channels_last P = 5)
BIG = (2, 64, 28, 28) if rt.HAS_GPU else (1, 4, 96, 96)
ID_MODES = ["none", "raw", "bn"]
EPS, ID_EPS = 1e-5, 1e-3


def _name(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


def _geometry(shape, layout):
    N, C, H, W = shape
    return C, (H * W if layout == "nchw" else 1)


def _nan(shape, dtype, dev, layout=None):
    t = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    return rt.layouts(t, layout) if layout else t


class Case:
    """Inputs of one call: activations in ``dtype``/``layout``, batch statistics of y (and of the
    identity) in float32, parameters in ``pdtype``. ``offset``: |mean| / std of the activations."""

    def __init__(self, shape, dtype, layout, dev, seed=0, pdtype=torch.float32, affine=True, offset=1.0):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.dtype, self.layout, self.dev = shape, dtype, layout, dev
        self.C, self.inner = _geometry(shape, layout)
        C = self.C

        def act(center):
            std = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
            sign = torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0).double()
            mu = sign * center * std
            x = torch.randn(shape, generator=g, dtype=torch.float64) * std.view(1, C, 1, 1) + mu.view(1, C, 1, 1)
            x = rt.layouts(x.to(dtype), layout).to(dev)
            xd = x.double()
            mean = xd.mean((0, 2, 3)).float()
            var = xd.var((0, 2, 3), unbiased=False).float()
            return x, mean, var

        def param(lo, hi):
            return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(pdtype).to(dev)

        self.y, self.mean, self.var = act(offset * torch.rand((), generator=g).item())
        self.identity, self.id_mean, self.id_var = act(offset * torch.rand((), generator=g).item())
        self.weight, self.bias = (param(-1.5, 1.5), param(-1, 1)) if affine else (None, None)
        self.id_weight, self.id_bias = (param(-1.5, 1.5), param(-1, 1)) if affine else (None, None)
        self.grad_out = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(dev)
        self.out = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(dev)  # the ReLU mask source


def _d(t):
    return None if t is None else t.double()


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def _forward(case, id_mode, relu, impl, f64=False):
    k = case
    cv = _d if f64 else (lambda t: t)
    identity = None if id_mode == "none" else cv(k.identity)
    id_stats = id_mode == "bn"
    out = _nan(k.shape, torch.float64 if f64 else k.dtype, k.dev, k.layout)
    impl.batch_norm_act_forward(
        cv(k.y), cv(k.mean), cv(k.var), cv(k.weight), cv(k.bias), identity,
        cv(k.id_mean) if id_stats else None, cv(k.id_var) if id_stats else None,
        cv(k.id_weight) if id_stats else None, cv(k.id_bias) if id_stats else None, out, EPS, ID_EPS, relu,
        k.C, k.inner)
    return out


def _affine64(x, mean, var, weight, bias, eps):
    c = (1, -1, 1, 1)
    invstd = torch.rsqrt(var.double() + eps).view(c)
    scale = invstd if weight is None else weight.double().view(c) * invstd
    shift_terms = (mean.double().view(c) * scale).abs() + (0 if bias is None else bias.double().view(c).abs())
    return (x.double() * scale).abs() + shift_terms


def _forward_magnitude(case, id_mode):
    k = case
    m = _affine64(k.y, k.mean, k.var, k.weight, k.bias, EPS)
    if id_mode == "raw":
        m = m + k.identity.double().abs()
    elif id_mode == "bn":
        m = m + _affine64(k.identity, k.id_mean, k.id_var, k.id_weight, k.id_bias, ID_EPS)
    return m


def _check_forward(case, id_mode, relu, what):
    got = _forward(case, id_mode, relu, cuda_impl)
    exp = _forward(case, id_mode, relu, torch_impl, f64=True)
    assert got.stride() == rt.layouts(torch.empty(case.shape), case.layout).stride()
    bound = rt.elementwise_bound(exp, _forward_magnitude(case, id_mode), case.dtype)
    rt.assert_within(got, exp, bound, what)
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_forward_matches_reference(dtype, layout, shape, cuda_target):
    for pdtype, affine in [(torch.float32, True), (dtype, True), (torch.float32, False)]:
        case = Case(shape, dtype, layout, cuda_target, seed=1, pdtype=pdtype, affine=affine)
        for id_mode, relu in itertools.product(ID_MODES, (True, False)):
            _check_forward(case, id_mode, relu, f"out (id={id_mode}, relu={relu}, params={pdtype}, affine={affine})")


def test_forward_weight_without_bias_and_mixed_param_dtypes(cuda_target):
    case = Case((2, 8, 4, 4), torch.bfloat16, "channels_last", cuda_target, seed=2, pdtype=torch.bfloat16)
    case.bias = None
    case.id_weight = case.id_weight.float()  # the identity's parameters in another dtype than y's
    for id_mode in ID_MODES:
        _check_forward(case, id_mode, True, f"out (id={id_mode}, no bias)")


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
GRADS = ("grad_y", "grad_identity", "grad_weight", "grad_bias", "grad_id_weight", "grad_id_bias")


def _wants(id_mode):
    """Every non-empty subset of the gradients the identity mode allows."""
    allowed = {"none": GRADS[0:1] + GRADS[2:4], "raw": GRADS[:4], "bn": GRADS}[id_mode]
    out = []
    for bits in itertools.product((0, 1), repeat=len(allowed)):
        if any(bits):
            out.append({name: bool(b) for name, b in zip(allowed, bits)})
    return out


def _backward(case, id_mode, relu, want, impl, f64=False):
    k = case
    cv = _d if f64 else (lambda t: t)
    adt = torch.float64 if f64 else k.dtype
    ident = id_mode != "none"
    id_stats = id_mode == "bn"

    def act_out(name):
        return _nan(k.shape, adt, k.dev, k.layout) if want.get(name) else None

    def vec_out(name, like):
        if not want.get(name):
            return None
        dt = torch.float64 if f64 else (torch.float32 if like is None else like.dtype)
        return _nan((k.C,), dt, k.dev)

    outs = dict(grad_y=act_out("grad_y"), grad_identity=act_out("grad_identity"),
                grad_weight=vec_out("grad_weight", k.weight), grad_bias=vec_out("grad_bias", k.bias),
                grad_id_weight=vec_out("grad_id_weight", k.id_weight), grad_id_bias=vec_out("grad_id_bias", k.id_bias))
    impl.batch_norm_act_backward(
        cv(k.grad_out), cv(k.out) if relu else None, cv(k.y), cv(k.mean), cv(k.var), cv(k.weight),
        cv(k.identity) if ident else None, cv(k.id_mean) if id_stats else None, cv(k.id_var) if id_stats else None,
        cv(k.id_weight) if id_stats else None, outs["grad_y"], outs["grad_identity"], outs["grad_weight"],
        outs["grad_bias"], outs["grad_id_weight"], outs["grad_id_bias"], EPS, ID_EPS, relu, k.C, k.inner)
    return outs


def _bounds(case, id_mode, relu, exp):
    """Worst-case error bounds of every gradient (float32 arithmetic, fixed-order sums)."""
    k = case
    c = (1, -1, 1, 1)
    dims = (0, 2, 3)
    m = k.y.numel() // k.C
    eps32 = rt.acc_eps(k.dtype)
    g = k.grad_out.double()
    if relu:
        g = torch.where(k.out.double() > 0, g, torch.zeros((), dtype=torch.float64, device=g.device))
    ag = g.abs()
    sum_ag = ag.sum(dims).view(c)

    def side(x, mean, var, weight, eps, gname, wname, bname, wdt, bdt):
        res = {}
        invstd = torch.rsqrt(var.double() + eps).view(c)
        A = (invstd if weight is None else weight.double().view(c) * invstd).abs()
        ad = (x.double() - mean.double().view(c)).abs()
        sum_agd = (ag * ad).sum(dims).view(c)
        if exp.get(gname) is not None:
            sum_g = g.sum(dims).view(c)
            sum_gd = (g * (x.double() - mean.double().view(c))).sum(dims).view(c)
            kk = invstd * invstd * sum_gd.abs() / m
            mag = A * (ag + sum_g.abs() / m + (x.double().abs() + mean.double().abs().view(c)) * kk)
            # the sums' own errors, carried by sum/m into every element
            carried = eps32 * (m + 2) * A * (sum_ag + ad * invstd * invstd * sum_agd) / m
            res[gname] = rt.elementwise_bound(exp[gname], mag, k.dtype) + carried
        if exp.get(bname) is not None:
            res[bname] = rt.reduction_bound(exp[bname], sum_ag.view(-1), m, k.dtype, stored=bdt)
        if exp.get(wname) is not None:
            res[wname] = rt.reduction_bound(exp[wname], (sum_agd * invstd).view(-1), m + 4, k.dtype, stored=wdt)
        return res

    pdt = k.weight.dtype if k.weight is not None else torch.float32
    b = side(k.y, k.mean, k.var, k.weight, EPS, "grad_y", "grad_weight", "grad_bias", pdt, pdt)
    if id_mode == "bn":
        b.update(side(k.identity, k.id_mean, k.id_var, k.id_weight, ID_EPS, "grad_identity", "grad_id_weight",
                      "grad_id_bias", pdt, pdt))
    elif id_mode == "raw" and exp.get("grad_identity") is not None:
        b["grad_identity"] = rt.elementwise_bound(exp["grad_identity"], ag, k.dtype, ops=0)
    return b


def _check_backward(case, id_mode, relu, want, tag):
    got = _backward(case, id_mode, relu, want, cuda_impl)
    exp = _backward(case, id_mode, relu, want, torch_impl, f64=True)
    bounds = _bounds(case, id_mode, relu, exp)
    for name in GRADS:
        if got[name] is None:
            continue
        if got[name].dim() == 4:
            assert got[name].stride() == case.grad_out.stride(), f"{name}: strides"
        rt.assert_within(got[name], exp[name], bounds[name], f"{name} ({tag}, want={sorted(k for k in want if want[k])})")
    return got


def _cases(id_modes=ID_MODES):
    return [(idm, relu, want) for idm in id_modes for relu in (True, False) for want in _wants(idm)]


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_backward_every_gradient_subset(dtype, layout, shape, cuda_target):
    """Every identity mode x ReLU x non-empty subset of needed gradients (None outputs), with and
    without weight, parameters in float32 and in the activation dtype. On the host runner every
    fourth case, the offset rotating with the parameters, so the test ids together cover all."""
    cases = _cases()
    if not cuda_target.startswith("cuda"):
        start = zlib.crc32(f"{dtype}{layout}{shape}".encode()) % 4
        cases = cases[start::4]
    variants = [Case(shape, dtype, layout, cuda_target, seed=3, pdtype=torch.float32),
                Case(shape, dtype, layout, cuda_target, seed=4, pdtype=dtype),
                Case(shape, dtype, layout, cuda_target, seed=5, affine=False)]
    for i, (id_mode, relu, want) in enumerate(cases):
        v = variants[i % len(variants)]
        _check_backward(v, id_mode, relu, want, f"id={id_mode}, relu={relu}, params={v.weight is not None and v.weight.dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_several_partials_per_channel(dtype, layout, cuda_target):
    case = Case(BIG, dtype, layout, cuda_target, seed=6, pdtype=dtype)
    _check_forward(case, "bn", True, "out (big)")
    _check_backward(case, "bn", True, dict.fromkeys(GRADS, True), "big, everything")
    _check_backward(case, "raw", False, dict(grad_y=True, grad_identity=True, grad_weight=True, grad_bias=True),
                    "big, raw identity")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_large_mean(dtype, layout, cuda_target):
    """|mean| = 100 x std: the backward's sums are centred on the batch mean (a sum of g*y minus
    mean * sum g would cancel away most of float32's digits here)."""
    case = Case((2, 8, 12, 12), dtype, layout, cuda_target, seed=7, offset=100.0)
    assert (case.mean.abs() > 40 * case.var.sqrt()).all()
    _check_forward(case, "bn", True, "out (large mean)")
    _check_backward(case, "bn", False, dict.fromkeys(GRADS, True), "large mean")
    _check_backward(case, "bn", True, dict.fromkeys(GRADS, True), "large mean, relu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_deterministic(layout, cuda_target):
    case = Case(BIG, torch.float32, layout, cuda_target, seed=8)
    want = dict.fromkeys(GRADS, True)
    a = _backward(case, "bn", True, want, cuda_impl)
    b = _backward(case, "bn", True, want, cuda_impl)
    for name in GRADS:
        assert torch.equal(a[name], b[name]), f"{name}: two identical calls gave different bits"


# --------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bdtype", [torch.float32, torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("C", [3, 300])
def test_running_update(C, bdtype, cuda_target):
    g = torch.Generator().manual_seed(9)
    dev = cuda_target
    mean = (torch.randn(C, generator=g) * 3).to(dev)
    var = (torch.rand(C, generator=g) * 2).to(dev)
    for with_mean, with_var, with_nbt in itertools.product((True, False), repeat=3):
        rm0 = torch.randn(C, generator=g).to(bdtype).to(dev)
        rv0 = torch.rand(C, generator=g).to(bdtype).to(dev)
        nbt0 = torch.tensor(41, dtype=torch.int64, device=dev)
        rm, rv, nbt = rm0.clone(), rv0.clone(), nbt0.clone()
        rm64, rv64, nbt64 = rm0.double(), rv0.double(), nbt0.clone()
        factor, unbias = 0.1, 50 / 49
        cuda_impl.bn_running_update([(mean, var, rm if with_mean else None, rv if with_var else None,
                                      nbt if with_nbt else None, factor, unbias)])
        torch_impl.bn_running_update([(mean.double(), var.double(), rm64 if with_mean else None,
                                       rv64 if with_var else None, nbt64 if with_nbt else None, factor, unbias)])
        tag = f"mean={with_mean} var={with_var} nbt={with_nbt}"
        if with_mean:
            mag = (rm0.double() * (1 - factor)).abs() + (mean.double() * factor).abs()
            rt.assert_within(rm, rm64, rt.elementwise_bound(rm64, mag, torch.float32, ops=4, stored=bdtype),
                             f"running_mean ({tag})")
        else:
            assert torch.equal(rm, rm0), f"running_mean changed although not given ({tag})"
        if with_var:
            mag = (rv0.double() * (1 - factor)).abs() + (var.double() * factor * unbias).abs()
            rt.assert_within(rv, rv64, rt.elementwise_bound(rv64, mag, torch.float32, ops=4, stored=bdtype),
                             f"running_var ({tag})")
        else:
            assert torch.equal(rv, rv0), f"running_var changed although not given ({tag})"
        assert nbt.item() == (42 if with_nbt else 41), tag
        assert nbt.dtype == torch.int64


def test_running_update_many_one_launch(cuda_target):
    """csrc's bn_running_update_many: 4 BatchNorms (C = 3, 300, 1, 37; float32, bfloat16 and
    float16 buffers; some absent) in one call, each against the float64 reference; the launcher
    splits 5 into two launches."""
    g = torch.Generator().manual_seed(11)
    dev = cuda_target
    Cs, dts = (3, 300, 1, 37, 5), (torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)
    given = ((True, True, True), (True, False, True), (False, True, False), (True, True, False), (True, True, True))
    ups, refs, olds = [], [], []
    for C, dt, (wm, wv, wn) in zip(Cs, dts, given):
        mean, var = (torch.randn(C, generator=g) * 3).to(dev), (torch.rand(C, generator=g) * 2).to(dev)
        rm0, rv0 = torch.randn(C, generator=g).to(dt).to(dev), torch.rand(C, generator=g).to(dt).to(dev)
        nbt0 = torch.tensor(C, dtype=torch.int64, device=dev)
        factor, unbias = 1.0 / (C + 1), 10 / 9
        ups.append((mean, var, rm0.clone() if wm else None, rv0.clone() if wv else None, nbt0.clone() if wn else None,
                    factor, unbias))
        refs.append((mean.double(), var.double(), rm0.double() if wm else None, rv0.double() if wv else None,
                     nbt0.clone() if wn else None, factor, unbias))
        olds.append((rm0, rv0))
    cuda_impl.bn_running_update(ups)
    torch_impl.bn_running_update(refs)
    for i, (u, r, (rm0, rv0)) in enumerate(zip(ups, refs, olds)):
        for k, (name, t0) in enumerate((("running_mean", rm0), ("running_var", rv0))):
            got, exp = u[2 + k], r[2 + k]
            if got is None:
                continue
            stat = u[k].double() * (u[6] if k else 1.0)
            mag = (t0.double() * (1 - u[5])).abs() + (stat * u[5]).abs()
            rt.assert_within(got, exp, rt.elementwise_bound(exp, mag, torch.float32, ops=4, stored=got.dtype),
                             f"{name}[{i}]")
        if u[4] is not None:
            assert int(u[4]) == Cs[i] + 1, f"num_batches_tracked[{i}]"


def test_running_update_many_refuses(cuda_target):
    """The C++ API's checks: 1 to 4 updates per launch, one stream, each buffer once."""
    from resnet_kernels.backends.cuda_common import C_module, call, ptr

    C_ = C_module()
    dev = cuda_target
    m, rm, rm2 = torch.zeros(4, device=dev), torch.zeros(4, device=dev), torch.zeros(4, device=dev)

    def args(running_mean, stream=0):
        a = C_.BnRunningUpdateArgs()
        a.mean, a.var, a.running_mean, a.C, a.factor, a.unbias, a.stream = ptr(m), ptr(m), ptr(running_mean), 4, 0.5, 1.0, stream
        a.running_mean_dtype = cuda_impl.DTYPE_CODES[torch.float32]
        return a

    assert C_.bn_running_update_slots == 4
    with pytest.raises(ValueError, match=r"bn_running_update: args must hold 1 to 4 updates per launch, got 5"):
        call("bn_running_update_many", [args(torch.zeros(4, device=dev)) for _ in range(5)])
    with pytest.raises(ValueError, match=r"args\[1\] updates a buffer of args\[0\]"):
        call("bn_running_update_many", [args(rm), args(rm)])
    with pytest.raises(ValueError, match=r"args\[1\].stream differs from args\[0\].stream"):
        call("bn_running_update_many", [args(rm), args(rm2, stream=1)])
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rm2, torch.zeros(4))


# --------------------------------------------------------------------------------------------
# refused inputs (the C++ API validates before any CUDA call)
# --------------------------------------------------------------------------------------------
def test_float64_is_refused(cuda_target):
    case = Case((1, 3, 7, 7), torch.float32, "nchw", cuda_target)
    y = case.y.double()
    out = _nan(y.shape, torch.float64, cuda_target)
    with pytest.raises(ValueError, match=r"batch_norm_act_forward: dtype float64 is not supported"):
        cuda_impl.batch_norm_act_forward(y, case.mean, case.var, None, None, None, None, None, None, None, out, EPS,
                                         ID_EPS, False, 3, 49)
    with pytest.raises(ValueError, match=r"batch_norm_act_backward\w*: dtype float64 is not supported"):
        cuda_impl.batch_norm_act_backward(y, None, y, case.mean, case.var, None, None, None, None, None,
                                          torch.empty_like(y), None, None, None, None, None, EPS, ID_EPS, False, 3,
                                          49)


@pytest.mark.parametrize("kw, pattern", [
    (dict(relu=True, out=None), r"out \(the saved forward output, the ReLU mask\) is required"),
    (dict(id_mean=None, want_id_bias=True), r"grad_id_weight/grad_id_bias need the identity's own BatchNorm"),
    (dict(identity=None, id_mean=None, id_var=None, want_identity=True), r"identity is required"),
    (dict(y=None), r"y, mean and var are required"),
])
def test_backward_argument_errors(kw, pattern, cuda_target):
    case = Case((1, 3, 7, 7), torch.float32, "nchw", cuda_target)
    a = dict(grad_out=case.grad_out, out=case.out, y=case.y, mean=case.mean, var=case.var, weight=case.weight,
             identity=case.identity, id_mean=case.id_mean, id_var=case.id_var, id_weight=None, relu=False)
    want_id_bias = kw.pop("want_id_bias", False)
    want_identity = kw.pop("want_identity", False)
    a.update(kw)
    grad_y = _nan(case.shape, torch.float32, cuda_target)
    gi = _nan(case.shape, torch.float32, cuda_target) if want_identity else None
    gib = _nan((3,), torch.float32, cuda_target) if want_id_bias else None
    with pytest.raises(ValueError, match=pattern):
        cuda_impl.batch_norm_act_backward(a["grad_out"], a["out"], a["y"], a["mean"], a["var"], a["weight"],
                                          a["identity"], a["id_mean"], a["id_var"], a["id_weight"], grad_y, gi, None,
                                          None, None, gib, EPS, ID_EPS, a["relu"], 3, 49)
    assert torch.isnan(grad_y).all(), "a refused call wrote an output"


def test_backward_refuses_bits_for_the_apply_pass(cuda_target):
    """A 1-bit ReLU mask (out_bits) is read by the reduce pass only (batch_norm_act_coef): asking
    for grad_y with it is refused, naming out_bits, before anything is written."""
    from resnet_kernels import _bits

    case = Case((1, 3, 7, 7), torch.float32, "nchw", cuda_target)
    grad_y = _nan(case.shape, torch.float32, cuda_target)
    with pytest.raises(ValueError, match=r"out_bits is read by the reduce pass only"):
        cuda_impl.batch_norm_act_backward(case.grad_out, _bits.pack(case.out), case.y, case.mean, case.var,
                                          case.weight, None, None, None, None, grad_y, None, None, None, None, None,
                                          EPS, ID_EPS, True, 3, 49)
    assert torch.isnan(grad_y).all(), "a refused call wrote an output"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout, cuda_target):
    """N = 0 (the op layer returns early; the launchers still behave): the forward writes nothing,
    the per-channel gradients of an empty batch are 0, in their own dtypes."""
    dev = cuda_target
    C = 5
    x = rt.layouts(torch.empty((0, C, 3, 3), dtype=torch.bfloat16, device=dev), layout)
    inner = 9 if layout == "nchw" else 1
    mean, var = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    w = torch.ones(C, dtype=torch.bfloat16, device=dev)
    cuda_impl.batch_norm_act_forward(x, mean, var, w, None, x, mean, var, None, None, torch.empty_like(x), EPS,
                                     ID_EPS, True, C, inner)
    gw, gb = _nan((C,), torch.bfloat16, dev), _nan((C,), torch.float32, dev)
    giw, gib = _nan((C,), torch.float32, dev), _nan((C,), torch.float32, dev)
    cuda_impl.batch_norm_act_backward(x, x, x, mean, var, w, x, mean, var, None, torch.empty_like(x),
                                      torch.empty_like(x), gw, gb, giw, gib, EPS, ID_EPS, True, C, inner)
    for name, t in [("grad_weight", gw), ("grad_bias", gb), ("grad_id_weight", giw), ("grad_id_bias", gib)]:
        assert torch.equal(t, torch.zeros_like(t)), f"{name} of an empty batch: {t}"


# --------------------------------------------------------------------------------------------
# the coefficients alone (batch_norm_act_coef: the same entry point with coef/id_coef set and no
# grad_y/grad_identity; op-level parity on every shape: tests/ops/test_batch_norm_coef.py)
# --------------------------------------------------------------------------------------------
def _coef(case, impl, f64=False):
    k = case
    cv = _d if f64 else (lambda t: t)
    dt = torch.float64 if f64 else torch.float32
    coef, icoef = _nan((3, k.C), dt, k.dev), _nan((3, k.C), dt, k.dev)
    gw, gb = _nan((k.C,), dt, k.dev), _nan((k.C,), dt, k.dev)
    impl.batch_norm_act_coef(cv(k.grad_out), cv(k.out), cv(k.y), cv(k.mean), cv(k.var), cv(k.weight), cv(k.identity),
                             cv(k.id_mean), cv(k.id_var), cv(k.id_weight), coef, icoef, gw, gb, None, None, EPS, ID_EPS,
                             True, k.C, k.inner)
    return coef, icoef, gw, gb


@pytest.mark.parametrize("layout", LAYOUTS)
def test_coef_several_partials_per_channel(layout, cuda_target):
    """coef / id_coef rows (A, B, K) from the finalize pass (several partial sums per channel)
    against the float64 reference, and A * g' - (B + K * (y - mean)) against the apply pass's grad_y
    of the same inputs (same reduce, same finalize)."""
    case = Case(BIG, torch.float32, layout, cuda_target, seed=6)
    got = _coef(case, cuda_impl)
    exp = _coef(case, torch_impl, f64=True)
    for name, a, e in zip(("coef", "id_coef", "grad_weight", "grad_bias"), got, exp):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=name)
    want = dict(grad_y=True, grad_identity=True)
    bwd = _backward(case, "bn", True, want, cuda_impl)
    g = torch.where(case.out.double() > 0, case.grad_out.double(), torch.zeros((), dtype=torch.float64))
    c = (1, -1, 1, 1)
    for x, mean, coef, name in ((case.y, case.mean, got[0], "grad_y"), (case.identity, case.id_mean, got[1],
                                                                        "grad_identity")):
        A, B, K = (coef[r].double().view(c) for r in range(3))
        d = x.double() - mean.double().view(c)
        e = A * g - (B + K * d)
        mag = (A * g).abs() + B.abs() + K.abs() * (d.abs() + x.double().abs() + mean.double().abs().view(c))
        rt.assert_within(bwd[name], e, rt.elementwise_bound(e, mag, torch.float32), f"{name} from coef")


def test_coef_argument_errors(cuda_target):
    case = Case((1, 3, 7, 7), torch.float32, "nchw", cuda_target)
    coef, icoef = _nan((3, 3), torch.float32, cuda_target), _nan((3, 3), torch.float32, cuda_target)
    with pytest.raises(ValueError, match=r"id_coef needs the identity's own BatchNorm"):
        cuda_impl._backward(case.grad_out, None, case.y, case.mean, case.var, None, case.identity, None, None, None,
                            None, None, None, None, None, None, coef, icoef, EPS, ID_EPS, False, 3, 49)
    with pytest.raises(ValueError, match=r"y, mean and var are required to compute grad_y, grad_weight or coef"):
        cuda_impl._backward(case.grad_out, None, None, case.mean, case.var, None, None, None, None, None,
                            None, None, None, None, None, None, coef, None, EPS, ID_EPS, False, 3, 49)
    assert torch.isnan(coef).all() and torch.isnan(icoef).all(), "a refused call wrote an output"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [BIG, (2, 264, 8, 8)], ids=_name)
def test_backward_finalize_runs_in_the_reduce_launch_in_any_order(shape, layout, cuda_target, monkeypatch):
    """The finalize runs in the reduce's launch, by the last block to arrive on each column tile's
    (channels_last; (2, 264, 8, 8) float32: 3 column tiles) or channel's (NCHW) counter: two launches
    (reduce, apply), no finalize kernel; on the host runner the grid runs in blockIdx order and in 3
    permutations with bit-identical gradients; the counters are all zero afterwards (a fresh buffer
    first). Parity: the other backward tests (the same sums, now finalized in the reduce's launch)."""
    from resnet_kernels import _counters

    monkeypatch.setattr(_counters, "ARRIVAL_COUNTERS", {})
    case = Case(shape, torch.float32, layout, cuda_target, seed=9)
    want = dict.fromkeys(GRADS, True)

    def run(runner):
        got = _backward(case, "bn", True, want, cuda_impl)
        if runner is not None:
            launched = runner.take_launches()
            assert len(launched) == 2 and "reduce" in launched[0] and "apply" in launched[1], launched
        return got

    outs = rt.in_cta_orders(run)
    for o in outs[1:]:
        for name in GRADS:
            assert torch.equal(o[name], outs[0][name]), f"{name} depends on the block order"
    _check_backward(case, "bn", True, want, "finalized in the reduce's launch")
    assert _counters.ARRIVAL_COUNTERS and all(int(b.count_nonzero()) == 0 for b in _counters.ARRIVAL_COUNTERS.values())


def test_backward_drops_its_counters_when_the_launch_raises(cuda_target, monkeypatch):
    """A backward launch that raises (it may have arrived partly) drops the cached counter buffer."""
    from resnet_kernels import _counters

    case = Case((2, 8, 4, 4), torch.float32, "channels_last", cuda_target, seed=10)
    want = dict.fromkeys(GRADS, True)
    _backward(case, "bn", True, want, cuda_impl)
    key = _counters._counter_key(torch.device(cuda_target))
    assert key in _counters.ARRIVAL_COUNTERS

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cuda_impl, "call", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _backward(case, "bn", True, want, cuda_impl)
    assert key not in _counters.ARRIVAL_COUNTERS
