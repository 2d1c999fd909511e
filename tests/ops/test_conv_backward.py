"""conv2d_backward (resnet_kernels/ops/conv_backward.py): every implementation against the reference
(backends/torch_conv_backward.py, the contract) computed in float64 on the same inputs, under the
project's policy (``resnet_kernels.testing.assert_close_to_ref``: at most 2x PyTorch's own error in
the same dtype — PyTorch's own being the 'aten' composite, PyTorch's elementwise kernels around its
convolution backward — with a floor for sums of the reduction's length), plus the op's validation,
its fake/opcheck and empty batches.

Without a GPU: 'cuda' runs csrc's kernel source on the host (``cuda_target``), 'triton' runs under
the interpreter (tiny shapes), 'aten' and 'torch' on CPU tensors. Outputs are NaN-poisoned by the op
(``_alloc`` poison mode in the test session), so an element an implementation does not write fails.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import rk_testing as rt
from resnet_kernels import _registry, testing
from resnet_kernels.backends import torch_conv_backward as ref_impl
from resnet_kernels.ops.conv_backward import conv2d_backward

# (id, N, Cin, H, W, Cout, k, stride, pad): a 1x1, a strided 3x3, a strided 1x1 (projection), the stem
SHAPES = [("1x1", 2, 8, 5, 5, 6, 1, 1, 0), ("3x3s2", 2, 4, 9, 9, 6, 3, 2, 1), ("1x1s2", 1, 6, 7, 7, 4, 1, 2, 0),
          ("stem", 1, 3, 11, 11, 4, 7, 2, 3), ("3x3odd", 1, 3, 7, 7, 3, 3, 1, 1)]
# which optional parts are given: (mask, coef, residual, res_mask, upstream[, x recomputed from up_y])
CONFIGS = {
    "plain": (False, False, False, False, False),
    "tail": (True, True, False, False, True),  # a block tail feeding an inner unit
    "inner": (False, True, False, False, True),
    "first-id": (False, True, True, True, False),  # a block's first unit, identity shortcut
    "first-proj": (False, True, True, False, False),
    "proj": (True, True, False, False, False),  # the projection shortcut
    # x = None: the upstream unit's output relu(up_y * s + t) recomputed from up_y (+ up_bias), never written
    "tail-ypre": (True, True, False, False, True, True),
    "inner-ypre": (False, True, False, False, True, True),
}
LAYOUTS = ["nchw", "channels_last"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _impls():
    return [i.backend for i in _registry.implementations("conv2d_backward", include_hidden=True)
            if i.backend != "torch"]


class Case:
    def __init__(self, shape, config, dtype, layout, seed=0):
        _, N, Cin, H, W, Cout, k, s, p = shape
        gen = torch.Generator().manual_seed(seed)
        OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        self.stride, self.padding = (s, s), (p, p)
        has_mask, has_coef, has_res, has_res_mask, has_up, *rest = CONFIGS[config]
        self.from_up = from_up = bool(rest and rest[0])

        def act(shape, relu=False):
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            if relu:
                t = torch.relu(t)  # a ReLU output: about half zeros
            return rt.layouts(t.to(dtype), layout)

        def vec(n, lo=-1.0, hi=1.0):
            return (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo).float()

        self.g = act((N, Cout, OH, OW))
        self.x = act((N, Cin, H, W), relu=has_up) if not from_up else None
        self.weight = (torch.randn((Cout, Cin, k, k), generator=gen, dtype=torch.float64) / k).to(dtype)
        self.mask = act((N, Cout, OH, OW)) if has_mask else None
        self.y = act((N, Cout, OH, OW)) if has_coef else None
        self.mean = vec(Cout) if has_coef else None
        self.coef = torch.stack([vec(Cout, 0.5, 1.5), vec(Cout), vec(Cout)]).to(rt.acc_of(dtype)) if has_coef else None
        self.residual = act((N, Cin, H, W)) if has_res else None
        self.res_mask = act((N, Cin, H, W)) if has_res_mask else None
        self.up = has_up
        if has_up:
            self.up_y = act((N, Cin, H, W))
            self.up_mean, self.up_var, self.up_weight = vec(Cin), vec(Cin, 0.5, 2.0), vec(Cin, 0.5, 1.5)
        else:
            self.up_y = self.up_mean = self.up_var = self.up_weight = None
        self.up_bias = vec(Cin) if from_up else None
        # what batch_norm_act would have written (the x an x-given call reads)
        self.h = (ref_impl.upstream_input(self.up_y, self.up_mean, self.up_var, self.up_weight, self.up_bias, 1e-5)
                  if from_up else None)
        self.dtype = dtype
        self.terms = {"grad_x": Cout * k * k, "grad_weight": N * OH * OW, "sums": N * H * W}

    def tensors(self):
        return (self.g, self.mask, self.y, self.mean, self.coef, self.x, self.weight, self.residual, self.res_mask,
                self.up_y, self.up_mean, self.up_var, self.up_weight, self.up_bias)

    def run(self, backend, device="cpu", dtype=None, x_given=False):
        """x_given: an x = None case called with x = the materialised h instead."""
        def cv(t):
            if t is None:
                return None
            t = t.to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t

        (g, mask, y, mean, coef, x, weight, residual, res_mask, up_y, up_mean, up_var,
         up_weight, up_bias) = (cv(t) for t in self.tensors())
        if x_given:
            x = cv(self.h)
        return conv2d_backward(g, x, weight, stride=self.stride, padding=self.padding, mask=mask, y=y, mean=mean,
                               coef=coef, residual=residual, res_mask=res_mask, up_y=up_y, up_mean=up_mean,
                               up_var=up_var, up_weight=up_weight, up_bias=up_bias, need_up_weight=self.up,
                               need_up_bias=self.up, backend=backend)


NAMES = ("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias")


def _check(case: Case, got, pt, ref):
    for name, a, b, r in zip(NAMES, got, pt, ref):
        if r is None:
            assert a is None and b is None, name
            continue
        n = case.terms["grad_x" if name == "grad_x" else "grad_weight" if name == "grad_weight" else "sums"]
        # every output sums terms that carry the activation dtype's rounding (dy, the rounded grad_x)
        dt = case.dtype
        testing.assert_close_to_ref(f"{name} ({case.dtype})", a.cpu(), b.cpu(), r, dt, n_terms=n,
                                    roundings=2 * testing.ROUNDINGS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_aten_and_cuda_match_the_reference(shape, config, layout, cuda_target):
    for dtype in DTYPES:
        case = Case(shape, config, dtype, layout)
        ref = case.run("torch", dtype=torch.float64)
        pt = case.run("aten")
        _check(case, pt, pt, ref)
        got = case.run("cuda", device=cuda_target)
        _check(case, got, pt, ref)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float64_aten_matches_the_reference(config):
    case = Case(SHAPES[1], config, torch.float64, "channels_last")
    ref = case.run("torch")
    got = case.run("aten")
    for name, a, r in zip(NAMES, got, ref):
        if r is None:
            continue
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)


def _triton_cases():
    """Every (shape, config) pair; on a GPU every dtype and layout, under the interpreter (1-4 ms
    per program) two of the six (dtype, layout) combinations per pair, rotating so that each
    combination meets every shape and config across the pairs; the stem (a 7x7 wgrad over many
    tiny programs) with two configs only. The launchers' own tests (tests/ops/
    test_conv2d_dgrad_triton.py, test_conv2d_wgrad_triton.py) cover every combination."""
    combos = list(itertools.product(DTYPES, LAYOUTS))
    out = []
    for i, (shape, config) in enumerate(itertools.product(SHAPES, CONFIGS)):
        if rt.HAS_GPU:
            out.append((shape, config, combos))
        elif shape[0] != "stem" or config in ("plain", "tail", "tail-ypre"):  # (tail-ypre: packed wgrad columns)
            out.append((shape, config, [combos[i % 6], combos[(i + 3) % 6]]))
    return out


@pytest.mark.skipif("triton" not in _impls(), reason="no triton implementation registered")
@pytest.mark.parametrize("shape,config,combos", _triton_cases(), ids=lambda v: v[0] if isinstance(v, tuple) and
                         isinstance(v[0], str) else (v if isinstance(v, str) else ""))
def test_triton_matches_the_reference(shape, config, combos):
    if not (rt.HAS_GPU or rt.interpreting()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    for dtype, layout in combos:
        case = Case(shape, config, dtype, layout)
        ref = case.run("torch", dtype=torch.float64)
        pt = case.run("aten", device=rt.DEVICE)
        got = case.run("triton", device=rt.DEVICE)
        _check(case, got, pt, ref)


def test_unrequested_outputs_are_none_and_requested_ones_only_are_computed():
    case = Case(SHAPES[0], "inner", torch.float32, "nchw")
    g, y, mean, coef, x, w = case.g, case.y, case.mean, case.coef, case.x, case.weight
    out = conv2d_backward(g, x, w, y=y, mean=mean, coef=coef, need_x=False, backend="aten")
    assert out[0] is None and out[1] is not None and out[2] is None
    out = conv2d_backward(g, x, w, y=y, mean=mean, coef=coef, need_weight=False, backend="aten")
    assert out[0] is not None and out[1] is None


def _bad_calls(case: Case):
    g, x, w = case.g, case.x, case.weight
    C = w.shape[0]
    yield dict(g=g, x=x, weight=w.float() if w.dtype != torch.float32 else w.half()), "weight must have g's dtype"
    yield dict(g=g[:, :-1].contiguous(), x=x, weight=w), "g must have the convolution output's shape"
    yield dict(g=g, x=x, weight=w, coef=torch.zeros(3, C)), "coef (the unit's BN-backward coefficients) needs y and mean"
    yield dict(g=g, x=x, weight=w, y=g, mean=torch.zeros(C), coef=torch.zeros(2, C)), "coef must be a (3,"
    yield dict(g=g, x=x, weight=w, y=g), "y/mean were given without coef"
    yield dict(g=g, x=x, weight=w, res_mask=x), "res_mask was given without residual"
    yield dict(g=g, x=x, weight=w, residual=x[:, :1]), "residual must have the shape of x"
    yield dict(g=g, x=x, weight=w, up_y=x), "up_y needs up_mean"
    yield dict(g=g, x=x, weight=w, up_y=x, up_mean=torch.zeros(x.shape[1]), up_var=torch.ones(x.shape[1]),
               need_x=False), "the upstream reductions (up_y) need grad_x"
    yield dict(g=g, x=x, weight=w, need_up_bias=True), "need up_y"
    yield dict(g=g, x=x, weight=w, stride=(0, 1)), "stride must be a list of two ints >= 1"
    yield dict(g=g.transpose(2, 3), x=x, weight=w), "g must be contiguous"
    # x = None (recomputed from up_y): up_y stands for x in the checks and their messages
    cin = x.shape[1]
    up = dict(up_mean=torch.zeros(cin), up_var=torch.ones(cin))
    yield dict(g=g, x=None, weight=w), "x must be given unless up_y is given"
    yield dict(g=g, x=None, weight=w, up_y=x.half(), **up), "up_y must have the dtype of g"
    yield dict(g=g, x=None, weight=w, up_y=x[:, :1].contiguous(), **up), "weight must have up_y's"
    yield dict(g=g, x=None, weight=w, up_y=x, residual=x[:, :1].contiguous(), **up), "residual must have the shape of up_y"
    yield dict(g=g, x=None, weight=w, up_y=x, up_bias=torch.zeros(cin + 1), **up), "up_bias must be a 1-D tensor"
    yield dict(g=g, x=x, weight=w, up_bias=torch.zeros(cin)), "up_bias/need_up_weight/need_up_bias need up_y"


@pytest.mark.parametrize("backend", ["torch", "aten"])
def test_bad_arguments_are_named(backend):
    case = Case(SHAPES[0], "plain", torch.float32, "nchw")
    for kwargs, message in _bad_calls(case):
        kw = dict(kwargs)
        g, x, w = kw.pop("g"), kw.pop("x"), kw.pop("weight")
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
            conv2d_backward(g, x, w, backend=backend, **kw)


def test_float64_is_refused_by_the_kernel_backends_with_the_reason(cuda_target):
    case = Case(SHAPES[0], "plain", torch.float64, "nchw")
    g, x, w = (t.to(cuda_target) for t in (case.g, case.x, case.weight))
    with pytest.raises(_registry.BackendUnavailableError, match="float64"):
        conv2d_backward(g, x, w, backend="cuda")


def test_empty_batch_gives_zero_weight_gradient():
    case = Case(SHAPES[0], "plain", torch.float32, "nchw")
    g, x = case.g[:0], case.x[:0]
    gx, gw, *_ = conv2d_backward(g, x, case.weight, backend="aten")
    assert gx.shape == x.shape and gw.shape == case.weight.shape and not gw.any()


@pytest.mark.parametrize("config", ["plain", "tail", "first-id", "tail-ypre"])
def test_opcheck(config):
    case = Case(SHAPES[1], config, torch.float32, "channels_last")
    args = (case.g, case.mask, case.y, case.mean, case.coef, case.x, case.weight, list(case.stride), list(case.padding),
            case.residual, case.res_mask, case.up_y, case.up_mean, case.up_var, case.up_weight, case.up_bias, 1e-5,
            True, True, case.up, case.up, "aten")
    torch.library.opcheck(torch.ops.resnet_kernels.conv2d_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_the_reference_is_the_convolution_backward_of_pytorch():
    """The contract's dgrad/wgrad are autograd's for F.conv2d, with the operand's BN math (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
    g = torch.randn_like(out)
    out.backward(g)
    gx, gw, *_ = conv2d_backward(g, x.detach(), w.detach(), stride=(2, 2), padding=(1, 1), backend="torch")
    torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-12, atol=1e-12)
    assert ref_impl.bn_dy(g, None, None, None, None, torch.float64) is not None


@pytest.mark.parametrize("backend", ["torch", "aten", "triton"])
def test_grad_weight_has_the_weights_layout(backend):
    """A channels_last 3x3 weight gets a channels_last grad_weight (same values as for a contiguous
    weight): autograd's AccumulateGrad then keeps it as .grad instead of copying it into the
    parameter's strides (one copy kernel per 3x3 conv per step, counted)."""
    if backend not in _impls() + ["torch"]:
        pytest.skip(f"no {backend} implementation registered")
    case = Case(SHAPES[1], "tail", torch.float32, "channels_last")
    w_cl = case.weight.contiguous(memory_format=torch.channels_last)
    assert not w_cl.is_contiguous()
    got = conv2d_backward(case.g, case.x, w_cl, stride=case.stride, padding=case.padding, mask=case.mask, y=case.y,
                          mean=case.mean, coef=case.coef, backend=backend)[1]
    want = conv2d_backward(case.g, case.x, case.weight, stride=case.stride, padding=case.padding, mask=case.mask,
                           y=case.y, mean=case.mean, coef=case.coef, backend=backend)[1]
    assert got.stride() == w_cl.stride()
    assert want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _ypre_backends():
    return ["torch", "aten", "cuda"] + (["triton"] if "triton" in _impls() and (rt.HAS_GPU or rt.interpreting()) else [])


def _materialised_h(case, backend, device):
    """The h an x-given call gets: the reference's (torch/aten/cuda materialise that one); for
    triton the Triton batch_norm_act's, whose formula (triton_ops/_common.py bn_relu_tile: the
    forward prologue's) the Triton kernels recompute."""
    if backend != "triton":
        return case.h
    from resnet_kernels.ops.batch_norm import batch_norm_act

    cv = (lambda t: None if t is None else t.to(device))
    return batch_norm_act(cv(case.up_y), cv(case.up_mean), cv(case.up_var), cv(case.up_weight), cv(case.up_bias),
                          eps=1e-5, relu=True, backend="triton")


@pytest.mark.parametrize("backend", _ypre_backends())
@pytest.mark.parametrize("config", ["tail-ypre", "inner-ypre"])
def test_x_none_equals_x_given_the_materialised_h(backend, config, cuda_target):
    """x = None (recomputed from up_y) gives what x = h (batch_norm_act's output) gives: bitwise for
    torch/aten/cuda (they materialise the reference's h) and for triton under the interpreter (its
    in-kernel h follows the Triton batch_norm_act's fp32 operations one by one: the forward
    prologue's formula, so the backward sees the h the forward convolved). On a GPU two kernels
    may contract (v - mean) * scale + bias into an FMA differently (one rounding instead of two):
    h can then differ by one unit in the last place of the activation dtype where z lies at a
    rounding boundary, i.e. at most |g| * ulp(h) per such element in grad_weight and a flipped mask
    only where round(z) changes sign (z = 0 +- 1 fp32 ulp): bounded below by eps(dtype) relative to
    the outputs' scale."""
    if backend == "cuda" and _registry.get_impl("conv2d_backward", "cuda") is None:
        pytest.skip("no cuda implementation registered")
    device = cuda_target if backend == "cuda" else (rt.DEVICE if backend == "triton" else "cpu")
    shapes = [SHAPES[0], SHAPES[1]]
    combos = ([(torch.bfloat16, "channels_last"), (torch.float16, "nchw")] if backend == "triton" and not rt.HAS_GPU
              else list(itertools.product(DTYPES, LAYOUTS)))
    for shape, (dtype, layout) in itertools.product(shapes, combos):
        case = Case(shape, config, dtype, layout)
        assert (case.h == 0).any() and (case.h > 0).any()
        case.h = _materialised_h(case, backend, device)
        got = case.run(backend, device=device)
        want = case.run(backend, device=device, x_given=True)
        for name, a, b in zip(NAMES, got, want):
            if rt.HAS_GPU and backend == "triton":
                eps = torch.finfo(dtype).eps
                torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * float(b.abs().max()), msg=name)
            else:
                assert torch.equal(a, b), f"{backend} {config} {shape[0]} {dtype} {layout}: {name}"


@pytest.mark.parametrize("backend", ["aten", "triton"])
def test_x_none_empty_batch(backend):
    if backend == "triton" and ("triton" not in _impls() or not (rt.HAS_GPU or rt.interpreting())):
        pytest.skip("no triton")
    case = Case(SHAPES[1], "tail-ypre", torch.float32, "channels_last")
    dev = rt.DEVICE if backend == "triton" else "cpu"
    g, up_y = case.g[:0].to(dev), case.up_y[:0].to(dev)
    gx, gw, uc, ugw, ugb = conv2d_backward(
        g, None, case.weight.to(dev), stride=case.stride, padding=case.padding, y=case.y[:0].to(dev),
        mean=case.mean.to(dev), coef=case.coef.to(dev), up_y=up_y, up_mean=case.up_mean.to(dev),
        up_var=case.up_var.to(dev), up_weight=case.up_weight.to(dev), up_bias=case.up_bias.to(dev),
        need_up_weight=True, need_up_bias=True, backend=backend)
    assert gx.shape == up_y.shape and gx.stride() == up_y.stride()
    assert gw.shape == case.weight.shape and not gw.any() and not uc.any() and not ugw.any() and not ugb.any()


def test_x_none_call_key_and_description():
    """The registry's view: the key tells x = None apart (and stays as before for x given)."""
    from resnet_kernels.ops.conv_backward import backward_call
    case = Case(SHAPES[1], "tail-ypre", torch.float32, "channels_last")
    args = (case.g, case.mask, case.y, case.mean, case.coef, None, case.weight, case.stride, case.padding, None, None,
            case.up_y, case.up_mean, case.up_var, case.up_weight)
    c_none = backward_call(*args, case.up_bias, 1e-5, True, True, True, True)
    c_given = backward_call(*args[:5], case.h, *args[6:], None, 1e-5, True, True, True, True)
    assert c_none.key() != c_given.key() and "|xup1" in c_none.key() and "xup" not in c_given.key()
    assert "recomputed from up_y" in c_none.describe()
    assert c_none.x is None and c_none.xs is case.up_y


@pytest.mark.parametrize("backend", _ypre_backends())
def test_x_none_mask_is_that_of_the_rounded_h(backend, cuda_target):
    """The upstream ReLU mask with x = None is h > 0 of the ROUNDED h: z = up_y * s + t > 0 is not
    enough (a tiny z > 0 rounds to 0 in fp16/bf16: here z = 2**-26 exactly, h = 0, so grad_x = 0)."""
    if backend == "cuda" and _registry.get_impl("conv2d_backward", "cuda") is None:
        pytest.skip("no cuda implementation registered")
    device = cuda_target if backend == "cuda" else (rt.DEVICE if backend == "triton" else "cpu")
    case = Case(SHAPES[0], "inner-ypre", torch.float16, "channels_last")
    cin = case.up_y.shape[1]
    up_y = torch.full_like(case.up_y, 2.0 ** -14)
    one, zero = torch.ones(cin), torch.zeros(cin)
    bias = torch.full((cin,), -(2.0 ** -14 - 2.0 ** -26))  # exact in fp32: z = 2**-14 + bias = 2**-26 exactly
    h = ref_impl.upstream_input(up_y, zero, one, None, bias, 0.0)
    assert not h.any()
    dev = {k: v.to(device) for k, v in dict(g=case.g, y=case.y, mean=case.mean, coef=case.coef, up_y=up_y,
                                             up_mean=zero, up_var=one, up_bias=bias).items()}
    gx, gw, *_ = conv2d_backward(dev.pop("g"), None, case.weight.to(device), up_eps=0.0, backend=backend, **dev)
    assert not gx.any() and not gw.any()


@pytest.mark.parametrize("backend", _ypre_backends())
def test_x_none_without_upstream_affine_parameters(backend, cuda_target):
    """up_weight / up_bias None (1 / 0) with x = None: as the x-given call on the materialised h."""
    if backend == "cuda" and _registry.get_impl("conv2d_backward", "cuda") is None:
        pytest.skip("no cuda implementation registered")
    device = cuda_target if backend == "cuda" else (rt.DEVICE if backend == "triton" else "cpu")
    case = Case(SHAPES[1], "tail-ypre", torch.bfloat16, "channels_last")
    case.up_weight = case.up_bias = None
    case.h = ref_impl.upstream_input(case.up_y, case.up_mean, case.up_var, None, None, 1e-5)
    case.h = _materialised_h(case, backend, device)
    for a, b in zip(case.run(backend, device=device), case.run(backend, device=device, x_given=True)):
        if rt.HAS_GPU and backend == "triton":
            torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)
