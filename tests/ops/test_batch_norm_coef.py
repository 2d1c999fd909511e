"""batch_norm_act_coef (resnet_kernels/ops/batch_norm.py): the reduce + finalize half of
batch_norm_act_backward, returning the per-channel coefficients (A, B, K) of the input gradients
(grad_y = A * g - (B + K * (y - mean))) and the parameter gradients.

Every backend through the op (torch, aten, triton under the interpreter without a GPU; cuda on the
host runner without a GPU: csrc/batch_norm.cu compiled for the CPU, the ``cuda_target`` fixture):

* coef / id_coef / the parameter gradients against the torch reference launcher run in float64 on
  the same inputs, within worst-case bounds (float32 arithmetic, sums in any order):
  A: 4 roundings of |A|; B = A * sum_g / m: 4 roundings of |B| plus (m + 2) u |A| sum|g| / m (the
  sum's own error); K = A * invstd^2 * sum_gd / m: 8 roundings of |K| plus (m + 4) u |A| invstd^2
  sum|g (y - mean)| / m; the parameter gradients as batch_norm_act_backward's
  (rk_testing.reduction_bound). An unwritten element fails: outputs are NaN-poisoned (conftest).
* A * g' - (B + K * (y - mean)), computed in float64 from the op's coefficients, equals the same
  backend's batch_norm_act_backward grad_y (and grad_identity with id_coef) within the rounding of
  that apply pass, and the parameter gradients of both ops agree.
* empty batches, validation, the not-differentiable autograd, opcheck, the accountant's costs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import rk_testing as rt
from resnet_kernels import BackendUnavailableError, _registry
from resnet_kernels.backends import torch_batch_norm as REF
from resnet_kernels.ops.batch_norm import CoefCall, _batch_norm_act_backward, batch_norm_act_coef, coef_call

DEV = rt.DEVICE
F64 = torch.float64
EPS, ID_EPS = 1e-5, 1e-3  # different on purpose: a mix-up of the two shows
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
# C=3 7x7 N=1 (scalar paths), vector widths, odd planes/channels, H=W=1, several programs per channel
SHAPES = [(1, 3, 7, 7), (2, 8, 4, 4), (3, 5, 3, 3), (2, 6, 1, 1), (4, 2, 9, 10)]
# identity: none / raw / bn; weight: with or without; params: acc or the activation dtype
COMBOS = [
    dict(relu=True, identity="none", weight=True, params="acc"),
    dict(relu=False, identity="none", weight=False, params="acc"),
    dict(relu=True, identity="raw", weight=True, params="act"),
    dict(relu=True, identity="bn", weight=True, id_weight=True, params="acc"),
    dict(relu=False, identity="bn", weight=False, id_weight=False, params="act"),
    dict(relu=True, identity="bn", weight=True, id_weight=False, params="act"),
]
# without a GPU 'cuda' runs on the host runner (csrc compiled for the CPU) through cuda_target
BACKENDS = rt.ALL_BACKENDS + ([] if "cuda" in rt.ALL_BACKENDS else ["cuda"])


@pytest.fixture(params=BACKENDS)
def target(request):
    """(backend, device) of the implementation under test."""
    b = request.param
    if b == "cuda":
        return b, request.getfixturevalue("cuda_target")
    return b, DEV


def _acc(dtype):
    return F64 if dtype == F64 else torch.float32


def _name(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


class Case:
    def __init__(self, shape, dtype, layout, combo, dev, seed=0, mean_scale=1.0):
        g = torch.Generator().manual_seed(seed)
        C = shape[1]
        acc = _acc(dtype)
        pdt = dtype if combo["params"] == "act" else acc
        self.shape, self.dtype, self.layout, self.C, self.relu = shape, dtype, layout, C, combo["relu"]
        self.inner = 1 if layout == "channels_last" else shape[2] * shape[3]

        def act(center):
            std = torch.rand(C, generator=g, dtype=F64) * 1.5 + 0.5
            sign = torch.randint(0, 2, (C,), generator=g).double() * 2 - 1
            x = torch.randn(shape, generator=g, dtype=F64) * std.view(1, C, 1, 1) + (sign * std * center).view(
                1, C, 1, 1)
            return rt.layouts(x.to(dtype), layout).to(dev)

        def stats(x):
            var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
            return mean.to(acc), var.to(acc)

        def vec(lo, hi):
            v = (torch.rand(C, generator=g, dtype=F64) * (hi - lo) + lo)
            v = v * (torch.randint(0, 2, (C,), generator=g).double() * 2 - 1)
            return v.to(pdt).to(dev)

        self.y = act(mean_scale)
        self.mean, self.var = stats(self.y)
        self.weight = vec(0.5, 1.5) if combo["weight"] else None
        self.identity = self.id_mean = self.id_var = self.id_weight = None
        if combo["identity"] != "none":
            self.identity = act(mean_scale)
        if combo["identity"] == "bn":
            self.id_mean, self.id_var = stats(self.identity)
            self.id_weight = vec(0.5, 1.5) if combo["id_weight"] else None
        self.grad_out = rt.layouts(torch.randn(shape, generator=g, dtype=F64).to(dtype), layout).to(dev)
        self.out = rt.layouts(torch.randn(shape, generator=g, dtype=F64).to(dtype), layout).to(dev)
        self.pdt = pdt

    def args(self):
        return (self.grad_out, self.out if self.relu else None, self.y, self.mean, self.var, self.weight,
                self.identity, self.id_mean, self.id_var, self.id_weight)

    def coef(self, backend, needs=(True, True, True, True)):
        bn = self.id_mean is not None
        return batch_norm_act_coef(*self.args(), eps=EPS, id_eps=ID_EPS, relu=self.relu, need_weight=needs[0],
                                   need_bias=needs[1], need_id_weight=needs[2] and bn, need_id_bias=needs[3] and bn,
                                   weight_dtype=self.pdt, id_weight_dtype=self.pdt, backend=backend)

    def reference(self):
        """The torch reference launcher on the same inputs in float64."""
        d = [None if t is None else t.double() for t in self.args()]
        C = self.C
        bn = self.id_mean is not None
        coef, id_coef = torch.empty(3, C, dtype=F64), (torch.empty(3, C, dtype=F64) if bn else None)
        vecs = [torch.empty(C, dtype=F64) for _ in range(2)] + [torch.empty(C, dtype=F64) if bn else None
                                                              for _ in range(2)]
        d = [t.cpu() if t is not None else None for t in d]
        REF.batch_norm_act_coef(*d, coef, id_coef, *vecs, EPS, ID_EPS, self.relu, C, self.inner)
        return [coef, id_coef] + vecs

    def masked64(self):
        g = self.grad_out.double().cpu()
        if self.relu:
            g = torch.where(self.out.double().cpu() > 0, g, torch.zeros((), dtype=F64))
        return g


def _bounds(case: Case, ref):
    """Worst-case bounds of coef, id_coef and the parameter gradients (see the module docstring)."""
    dims = (0, 2, 3)
    u = rt.acc_eps(case.dtype) / 2
    m = case.grad_out.numel() // case.C
    ag = case.masked64().abs()
    sum_ag = ag.sum(dims)
    out = []

    def side(x, mean, var, eps, coef):
        invstd = torch.rsqrt(var.double().cpu() + eps)
        ad = (x.double().cpu() - mean.double().cpu().view(1, -1, 1, 1)).abs()
        sum_agd = (ag * ad).sum(dims)
        A = coef[0].abs()
        b = torch.stack((8 * u * A,
                         8 * u * coef[1].abs() + (m + 2) * 2 * u * A * sum_ag / m,
                         16 * u * coef[2].abs() + (m + 4) * 2 * u * A * invstd ** 2 * sum_agd / m))
        return b + rt.TINY[_acc(case.dtype)], sum_agd * invstd

    bc, swd = side(case.y, case.mean, case.var, EPS, ref[0])
    out += [bc, None]
    gw = rt.reduction_bound(ref[2], swd, m + 4, case.dtype, stored=case.pdt)
    gb = rt.reduction_bound(ref[3], sum_ag, m, case.dtype, stored=case.pdt)
    giw = gib = None
    if case.id_mean is not None:
        out[1], iswd = side(case.identity, case.id_mean, case.id_var, ID_EPS, ref[1])
        giw = rt.reduction_bound(ref[4], iswd, m + 4, case.dtype, stored=case.pdt)
        gib = gb
    return out + [gw, gb, giw, gib]


NAMES = ("coef", "id_coef", "grad_weight", "grad_bias", "grad_id_weight", "grad_id_bias")


def _check(case: Case, backend: str, tag: str):
    got = case.coef(backend)
    ref = case.reference()
    bounds = _bounds(case, ref)
    acc = _acc(case.dtype)
    assert got[0].shape == (3, case.C) and got[0].dtype == acc and got[0].is_contiguous(), tag
    if case.id_mean is None:
        assert got[1].numel() == 0 and got[1].dtype == acc, f"id_coef without id_mean: {got[1].shape} ({tag})"
        assert got[4].numel() == 0 and got[5].numel() == 0, tag
    else:
        assert got[1].shape == (3, case.C) and got[1].dtype == acc, tag
    for i, name in enumerate(NAMES):
        if ref[i] is None:
            continue
        if i >= 2:
            assert got[i].dtype == case.pdt, f"{name}: dtype {got[i].dtype} ({tag})"
        rt.assert_within(got[i], ref[i], bounds[i], f"{name} ({tag})")
    return got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_coef_matches_float64_reference(dtype, layout, target):
    backend, dev = target
    if dtype == F64 and backend == "cuda":
        pytest.skip("the cuda kernels refuse float64 (test_cuda_refuses_float64)")
    for i, (shape, combo) in enumerate(itertools.product(SHAPES, COMBOS)):
        case = Case(shape, dtype, layout, combo, dev, seed=i)
        _check(case, backend, f"{backend} {_name(shape)} {combo}")


def test_coef_large_mean(target):
    """|mean| = 100 std: the sums are centred on the batch mean in every implementation."""
    backend, dev = target
    for layout in LAYOUTS:
        case = Case((2, 4, 6, 6), torch.float32, layout, COMBOS[3], dev, seed=3, mean_scale=100.0)
        assert (case.mean.abs() > 40 * case.var.sqrt()).all()
        _check(case, backend, f"{backend} large mean {layout}")


@pytest.mark.parametrize("needs", [(False, False, False, False), (True, False, False, True),
                                   (False, True, True, False)])
def test_parameter_gradients_only_when_needed(needs, target):
    backend, dev = target
    case = Case((2, 4, 3, 3), torch.float32, "channels_last", COMBOS[3], dev, seed=5)
    full = case.coef(backend)
    got = case.coef(backend, needs)
    torch.testing.assert_close(got[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], full[1], rtol=0, atol=0)
    for need, g, f, name in zip(needs, got[2:], full[2:], NAMES[2:]):
        if need:
            torch.testing.assert_close(g, f, rtol=0, atol=0, msg=name)
        else:
            assert g.numel() == 0, f"{name} not requested but returned {g.shape}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
def test_coefficients_give_the_backward_grad_y(dtype, layout, target):
    """A * g' - (B + K * (y - mean)) from the op's coefficients (in float64) is the same backend's
    batch_norm_act_backward grad_y within that pass's rounding (its sums are the same), and the
    identity's likewise; the parameter gradients of both ops agree."""
    backend, dev = target
    for i, combo in enumerate((COMBOS[0], COMBOS[1], COMBOS[3], COMBOS[4])):
        case = Case((2, 6, 5, 3), dtype, layout, combo, dev, seed=10 + i)
        bn = case.id_mean is not None
        got = case.coef(backend)
        gy, gi, gw, gb, giw, gib = _batch_norm_act_backward(
            *case.args(), EPS, ID_EPS, case.relu, True, bn, True, True, bn, bn, case.pdt, case.pdt, backend)
        g = case.masked64()
        c = (1, -1, 1, 1)
        for x, mean, coef, grad, what in ((case.y, case.mean, got[0], gy, "grad_y"),
                                          (case.identity, case.id_mean, got[1], gi, "grad_identity")):
            if mean is None:
                continue
            A, B, K = (coef[r].double().cpu().view(c) for r in range(3))
            d = x.double().cpu() - mean.double().cpu().view(c)
            exp = A * g - (B + K * d)
            xa, ma = x.double().cpu().abs(), mean.double().cpu().abs().view(c)
            mag = (A * g).abs() + B.abs() + K.abs() * (d.abs() + xa + ma)
            rt.assert_within(grad, exp, rt.elementwise_bound(exp, mag, dtype), f"{what} ({backend}, {combo})")
        exact = backend != "aten"  # the same reduce and finalize code (aten: PyTorch's, called differently)
        for name, a, b in zip(NAMES[2:], got[2:], (gw, gb, giw, gib)):
            if b.numel() == 0:
                continue
            if exact:
                assert torch.equal(a, b), f"{name}: batch_norm_act_coef and batch_norm_act_backward differ ({backend})"
            else:
                torch.testing.assert_close(a, b, **rt.REDUCTION_TOL[dtype], msg=name)


def test_empty_batch(target):
    """N = 0: the sums are 0, so B = K = 0 and the parameter gradients are 0; A = weight * invstd."""
    backend, dev = target
    C = 5
    for layout in LAYOUTS:
        x = rt.layouts(torch.empty((0, C, 3, 3), dtype=torch.bfloat16, device=dev), layout)
        mean, var = torch.zeros(C, device=dev), torch.rand(C, device=dev) + 0.5
        w = torch.rand(C, device=dev).to(torch.bfloat16)
        res = batch_norm_act_coef(x, x, x, mean, var, w, x, mean, var + 1, None, eps=EPS, id_eps=ID_EPS,
                                  need_weight=True, need_bias=True, need_id_weight=True, need_id_bias=True,
                                  weight_dtype=torch.bfloat16, id_weight_dtype=torch.float32, backend=backend)
        coef, icoef, gw, gb, giw, gib = res
        torch.testing.assert_close(coef[0], w.float() * torch.rsqrt(var + EPS))
        torch.testing.assert_close(icoef[0], torch.rsqrt(var + 1 + ID_EPS))
        for t in (coef[1:], icoef[1:], gw, gb, giw, gib):
            assert torch.equal(t, torch.zeros_like(t))
        assert gw.dtype == gb.dtype == torch.bfloat16 and giw.dtype == gib.dtype == torch.float32


def test_deterministic(target):
    backend, dev = target
    case = Case((4, 2, 9, 10), torch.float32, "nchw", COMBOS[3], dev, seed=7)
    a, b = case.coef(backend), case.coef(backend)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), f"{name}: two identical calls gave different bits ({backend})"


# --------------------------------------------------------------------------------------------
# validation, autograd, opcheck, the registry and the accountant
# --------------------------------------------------------------------------------------------
def _small(dev=DEV):
    case = Case((2, 4, 3, 3), torch.float32, "nchw", COMBOS[3], dev, seed=1)
    return case


def test_errors_name_the_argument():
    k = _small()
    g, o, y, m, v, w, r, im, iv = k.grad_out, k.out, k.y, k.mean, k.var, k.weight, k.identity, k.id_mean, k.id_var
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: out \(the saved forward output"):
        batch_norm_act_coef(g, None, y, m, v, relu=True)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: identity is required with id_mean"):
        batch_norm_act_coef(g, o, y, m, v, w, None, im, iv)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: give both id_mean and id_var"):
        batch_norm_act_coef(g, o, y, m, v, w, r, im, None)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: id_mean/id_var are required"):
        batch_norm_act_coef(g, o, y, m, v, w, r, need_id_bias=True)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: id_weight was given without id_mean"):
        batch_norm_act_coef(g, o, y, m, v, w, r, id_weight=w)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: mean"):
        batch_norm_act_coef(g, o, y, torch.zeros(5), v)
    with pytest.raises(ValueError, match=r"batch_norm_act_coef: y"):
        batch_norm_act_coef(g, o, y[:, :, :2], m, v)
    with pytest.raises(TypeError, match=r"batch_norm_act_coef: need_weight must be a bool"):
        batch_norm_act_coef(g, o, y, m, v, need_weight=1)
    with pytest.raises(TypeError, match=r"batch_norm_act_coef: eps must be a float"):
        batch_norm_act_coef(g, o, y, m, v, eps="1")
    with pytest.raises(TypeError, match=r"batch_norm_act_coef: grad_out must be a torch.Tensor"):
        batch_norm_act_coef(None, o, y, m, v)
    if not rt.HAS_GPU:
        with pytest.raises(BackendUnavailableError, match="batch_norm_act_coef: backend 'cuda'"):
            batch_norm_act_coef(g, o, y, m, v, backend="cuda")


def test_raw_identity_has_no_coefficients():
    """A raw identity (no id_mean): its gradient is g', it has no coefficients: ignored."""
    k = Case((2, 4, 3, 3), torch.float32, "nchw", COMBOS[2], DEV, seed=2)
    with_r = batch_norm_act_coef(*k.args(), relu=True, backend="torch")
    args = list(k.args())
    args[6] = None
    without = batch_norm_act_coef(*args, relu=True, backend="torch")
    assert with_r[1].numel() == 0
    assert torch.equal(with_r[0], without[0])


def test_cuda_refuses_float64():
    k = Case((2, 4, 3, 3), F64, "nchw", COMBOS[0], DEV, seed=2)
    call = coef_call(*k.args(), EPS, ID_EPS, True, False, False, False, False, None, None)
    why = _registry.get_impl("batch_norm_act_coef", "cuda").why_not(call)
    assert why is not None and "float64" in why


def test_not_differentiable():
    k = _small()
    g = k.grad_out.clone().requires_grad_()
    res = batch_norm_act_coef(g, k.out, k.y, k.mean, k.var, backend="torch")
    with pytest.raises(RuntimeError, match="batch_norm_act_coef is not differentiable"):
        res[0].sum().backward()


@pytest.mark.parametrize("backend", ["torch", "aten"])
def test_opcheck(backend):
    k = _small()
    for relu, ident in ((True, True), (False, False)):
        args = (k.grad_out, k.out if relu else None, k.y, k.mean, k.var, k.weight, k.identity if ident else None,
                k.id_mean if ident else None, k.id_var if ident else None, k.id_weight if ident else None, EPS, ID_EPS,
                relu, True, True, ident, ident, None, None, backend)
        torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act_coef.default, args)


def test_registry_and_costs():
    """Every backend implements it; cuda and triton declare 1 launch (the finalize in the reduce's
    launch, no apply pass), fewer bytes than the backward with grad_y (2 launches); aten declares its
    PyTorch composition."""
    impls = {i.backend: i for i in _registry.implementations("batch_norm_act_coef")}
    assert {"torch", "aten", "triton", "cuda"} <= set(impls)
    assert impls["torch"].reference
    meta = torch.device("meta")
    shape = (256, 64, 56, 56)
    g = torch.empty(shape, dtype=torch.bfloat16, device=meta).to(memory_format=torch.channels_last)
    vec = torch.empty(64, device=meta)
    call = coef_call(g, g, g, vec, vec, vec, g, vec, vec, vec, EPS, ID_EPS, True, True, True, True, True, None, None)
    assert isinstance(call, CoefCall)
    from resnet_kernels.ops.batch_norm import backward_call

    bwd = backward_call(g, g, g, vec, vec, vec, g, vec, vec, vec, EPS, ID_EPS, True, True, True, True, True, True,
                        True, None, None)
    a = g.numel() * 2
    for b, n in (("cuda", 1), ("triton", 1)):
        launches, nbytes = impls[b].cost(call)
        assert launches == n
        assert 4 * a <= nbytes < 4 * a + a // 10  # grad_out, out, y, identity once each (+ small vectors)
        bl, bb = _registry.get_impl("batch_norm_act_backward", b).cost(bwd)
        assert bl == n + 1 and bb > nbytes
    launches, nbytes = impls["aten"].cost(call)
    assert launches > 2 and nbytes > 4 * a
