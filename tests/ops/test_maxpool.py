"""maxpool2d with a one-byte argmax (resnet_kernels/ops/maxpool.py), every implementation against
``torch.nn.MaxPool2d``: outputs equal (values are copies of inputs), the argmax equal to PyTorch's
own int64 indices (ties and NaNs included, so the gradients route exactly as PyTorch's), the
gradient within one rounding of the float64 gradient (sums of up to ceil(k/s)^2 terms in the
accumulation dtype, rounded once). The triton implementation runs under the interpreter and the
cuda one on the host runner (csrc/maxpool.cu compiled for the CPU, the ``cuda_target`` fixture)
without a GPU. Every output the op allocates is poisoned (NaN, argmax 255: conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rk_testing as rt
from resnet_kernels import _registry
from resnet_kernels.ops.maxpool import argmax_to_indices, max_pool2d, maxpool2d_backward_op, maxpool2d_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
BACKENDS = ["torch", "aten", "triton", "cuda"]
# (shape, kernel, stride, padding): the stem's 3/2/1 on odd sizes (7x7, C = 3, N = 1), a 56x56-like
# plane, asymmetric windows and strides, overlapping windows (stride 1), no padding, 1x1, windows
# wider or taller than the input
CASES = [
    ((1, 3, 7, 7), 3, 2, 1),
    ((2, 5, 9, 11), 3, 2, 1),
    ((2, 4, 16, 16), 3, 2, 1),
    ((1, 3, 7, 7), (2, 3), (1, 2), (1, 1)),
    ((2, 3, 6, 5), 3, 1, 1),
    ((1, 2, 8, 8), 2, 2, 0),
    ((2, 3, 5, 7), (5, 3), (2, 3), (2, 0)),
    ((1, 4, 1, 1), 1, 1, 0),
    ((1, 2, 2, 3), (3, 5), 1, (1, 2)),  # a window wider than the input (aten: the division formula)
    ((1, 2, 1, 6), 3, 1, 1),  # taller than the input
]


def _name(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


def _case_id(c):
    shape, k, s, p = c
    return f"{_name(shape)}-k{k}s{s}p{p}".replace(" ", "")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.fixture
def device(request):
    """Where a backend's tensors live: the cuda backend on the host runner without a GPU."""
    backend = request.node.callspec.params["backend"]
    if backend == "cuda":
        return request.getfixturevalue("cuda_target")
    if backend == "triton":
        return rt.DEVICE
    return "cpu"


def _input(shape, dtype, layout, device, seed=0):
    """Values with many ties (small integers), a NaN, a row of -inf and a plane of -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 4, shape, generator=g).to(torch.float64) + torch.randint(0, 2, shape, generator=g) * 0.5
    if x.numel():
        N, C, H, W = shape
        x[0, 0, H // 2, W // 2] = float("nan")
        x[N - 1, C - 1, H - 1, :] = float("-inf")
        if C > 1:
            x[0, 1] = float("-inf")  # every window -inf: the argmax is the first real element
        if C > 2 and H * W > 2:
            x[N - 1, 2, 0, 1] = float("nan")
            x[N - 1, 2, 1, 0] = float("nan")  # two NaNs: PyTorch picks the last in scan order
    return rt.layouts(x.to(dtype), layout).to(device)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_nn_maxpool2d(backend, dtype, layout, case, device):
    shape, k, s, p = case
    k, s, p = _pair(k), _pair(s), _pair(p)
    x = _input(shape, dtype, layout, device).requires_grad_(True)
    out = max_pool2d(x, k, s, p, backend=backend)
    xr = x.detach().clone().requires_grad_(True)
    ref, idx = F.max_pool2d(xr, k, s, p, return_indices=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.stride() == rt.layouts(torch.empty(ref.shape, device="meta"), layout).stride() or out.numel() == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    _, arg = maxpool2d_op(x.detach(), list(k), list(s), list(p), True, backend)
    assert arg.dtype == torch.uint8 and arg.shape == out.shape
    assert torch.equal(argmax_to_indices(arg, shape[2:], k, s, p), idx), "argmax differs from PyTorch's indices"

    go = rt.layouts(torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype), layout).to(device)
    (gx,) = torch.autograd.grad(out, x, go)
    x64 = x.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(F.max_pool2d(x64, k, s, p), x64, go.double())
    assert gx.dtype == dtype and gx.stride() == x.stride()
    torch.testing.assert_close(gx, g64.to(dtype), **rt.ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_the_argmax_and_empty_batches(backend, layout, device):
    x = _input((2, 3, 9, 9), torch.float32, layout, device)
    with torch.no_grad():
        out = max_pool2d(x.requires_grad_(True), 3, 2, 1, backend=backend)
    torch.testing.assert_close(out, F.max_pool2d(x.detach(), 3, 2, 1), rtol=0, atol=0, equal_nan=True)
    out, arg = maxpool2d_op(x.detach(), [3, 3], [2, 2], [1, 1], False, backend)
    assert arg.numel() == 0
    e = rt.layouts(torch.empty((0, 3, 7, 7), device=device), layout).requires_grad_(True)
    y = max_pool2d(e, 3, 2, 1, backend=backend)
    assert y.shape == (0, 3, 4, 4)
    (g,) = torch.autograd.grad(y.sum(), e)
    assert g.shape == e.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic_and_autograd_gives_any_strides(backend, device):
    x = _input((2, 8, 12, 12), torch.float32, "channels_last", device).requires_grad_(True)
    out = max_pool2d(x, 3, 2, 1, backend=backend)
    g = torch.randn(out.shape[::-1], device=device).permute(3, 2, 1, 0)  # neither NCHW nor channels_last
    a = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    b = torch.autograd.grad(out, x, g)[0]
    assert torch.equal(a, b)
    xr = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(a, torch.autograd.grad(F.max_pool2d(xr, 3, 2, 1), xr, g)[0], rtol=1e-6, atol=1e-6)


def test_every_backend_is_registered_with_a_cost():
    impls = {i.backend: i for i in _registry.implementations("maxpool2d", include_hidden=True)}
    assert set(impls) >= {"torch", "aten", "triton", "cuda"}
    for op in ("maxpool2d", "maxpool2d_backward"):
        for i in _registry.implementations(op):
            assert (i.cost is None) == (i.backend == "torch"), i


# --------------------------------------------------------------------------------------------
# bad input: an exception naming the argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(x="no"), TypeError, r"maxpool2d: x must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 3, 8)), ValueError, r"x must be a 4-D"),
    (dict(x=torch.zeros(1, 3, 8, 8, dtype=torch.int32)), TypeError, r"x must be float32"),
    (dict(x=torch.zeros(1, 3, 8, 16)[..., ::2]), ValueError, r"x must be contiguous"),
    (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
    (dict(kernel_size=3.0), TypeError, r"kernel_size must be an int or a pair"),
    (dict(stride=True), TypeError, r"stride must be an int or a pair"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(padding=2), ValueError, r"padding \(2, 2\) must be at most half of kernel_size"),
    (dict(kernel_size=17, padding=0), ValueError, r"at most 256"),
    (dict(x=torch.zeros(1, 3, 1, 1), padding=0), ValueError, r"x of spatial size 1x1 is too small"),
])
def test_bad_arguments_are_named(kwargs, exc, pattern):
    args = dict(x=torch.zeros(1, 3, 8, 8), kernel_size=3, stride=2, padding=1)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        max_pool2d(args.pop("x"), **args, backend="torch")


def test_bad_backend_and_backward_arguments():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        max_pool2d(x, 3, 2, 1, backend="nope")
    g = torch.zeros(1, 3, 4, 4)
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="argmax must be uint8"):
        maxpool2d_backward_op(g, a.long(), [8, 8], [3, 3], [2, 2], [1, 1], "torch")
    with pytest.raises(ValueError, match="argmax must have the shape of grad_out"):
        maxpool2d_backward_op(g, a[:, :, :2], [8, 8], [3, 3], [2, 2], [1, 1], "torch")
    with pytest.raises(ValueError, match="argmax must have grad_out's memory layout"):
        maxpool2d_backward_op(g, a.contiguous(memory_format=torch.channels_last), [8, 8], [3, 3], [2, 2], [1, 1],
                              "torch")
    with pytest.raises(ValueError, match=r"input_size \(9, 9\) gives a \(5, 5\) output"):
        maxpool2d_backward_op(g, a, [9, 9], [3, 3], [2, 2], [1, 1], "torch")


# --------------------------------------------------------------------------------------------
# torch.library
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    x = _input((2, 3, 9, 7), torch.float32, layout, "cpu")
    x = torch.where(x.isnan() | x.isinf(), 0.0, x)  # opcheck's gradient comparison needs finite values
    x = rt.layouts(x, layout)
    for need in (True, False):
        torch.library.opcheck(maxpool2d_op, (x.clone().requires_grad_(need), [3, 3], [2, 2], [1, 1], need, "torch"))
    _, arg = maxpool2d_op(x, [3, 3], [2, 2], [1, 1], True, "torch")
    g = rt.layouts(torch.randn(arg.shape), layout)
    torch.library.opcheck(maxpool2d_backward_op, (g, arg, [9, 7], [3, 3], [2, 2], [1, 1], "torch"))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    f = torch.compile(lambda t: max_pool2d(t, 3, 2, 1, backend="torch").square().sum(), fullgraph=True,
                      backend="aot_eager")
    (g,) = torch.autograd.grad(f(x), x)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.max_pool2d(xr, 3, 2, 1).square().sum(), xr)
    torch.testing.assert_close(g, gr)


# --------------------------------------------------------------------------------------------
# the cuda kernels' C++ API (host runner build of csrc/maxpool.cu; _C when it is built)
# --------------------------------------------------------------------------------------------
P = 1 << 20  # a fake, aligned "device pointer": never dereferenced by these calls


@pytest.fixture(params=["_C", "host"])
def api(request):
    if request.param == "_C":
        from resnet_kernels._ext import get_C

        C_ = get_C()
        if C_ is None:
            pytest.skip("resnet_kernels._C is not built (tests/test_sass.py fails if nvcc exists and it is missing)")
        return C_
    return request.getfixturevalue("host_runner_module")


def _fwd(api, **kw):
    from resnet_kernels.backends import cuda_common

    args = dict(dtype=0, x=P, out=P + 4096, argmax=0, N=1, C=3, H=8, W=8, OH=4, OW=4, kh=3, kw=3, sh=2, sw=2,
                ph=1, pw=1, nhwc=False, stream=0)
    args.update(kw)
    return api.maxpool2d_forward(cuda_common.fill_args(api.MaxPool2dArgs, **args))


def _bwd(api, **kw):
    from resnet_kernels.backends import cuda_common

    args = dict(dtype=0, grad_out=P, argmax=P + 4096, grad_x=P + 8192, N=1, C=3, H=8, W=8, OH=4, OW=4, kh=3, kw=3,
                sh=2, sw=2, ph=1, pw=1, nhwc=False, stream=0)
    args.update(kw)
    return api.maxpool2d_backward(cuda_common.fill_args(api.MaxPool2dBackwardArgs, **args))


@pytest.mark.parametrize("kw, pattern", [
    (dict(x=0), r"x is a null device pointer"),
    (dict(out=0), r"out is a null device pointer"),
    (dict(x=P + 2), r"x .* not aligned to 4 bytes"),
    (dict(N=-1), r"N must be >= 0"),
    (dict(kh=0), r"kh must be > 0"),
    (dict(kh=17, kw=17, ph=0, pw=0), r"exceeds 256"),
    (dict(ph=2), r"padding .* at most half"),
    (dict(OH=5), r"OH x OW must be"),
    (dict(dtype=9), r"dtype"),
])
def test_cuda_api_forward_errors(kw, pattern, api):
    with pytest.raises(ValueError, match=pattern):
        _fwd(api, **kw)


@pytest.mark.parametrize("kw, pattern", [
    (dict(argmax=0), r"argmax is a null device pointer"),
    (dict(grad_x=P + 1), r"grad_x .* not aligned"),
    (dict(OW=3), r"OH x OW must be"),
    (dict(sw=0), r"sw must be > 0"),
])
def test_cuda_api_backward_errors(kw, pattern, api):
    with pytest.raises(ValueError, match=pattern):
        _bwd(api, **kw)


def test_cuda_api_empty_is_a_no_op(api):
    assert _fwd(api, N=0, x=0, out=0) is None
    assert _bwd(api, C=0, grad_out=0, argmax=0, grad_x=0) is None


def test_cuda_api_valid_arguments_pass_validation_on_the_real_module():
    """The real _C validates a correct struct on the host, then fails at its first CUDA call
    (no GPU here); the host runner's build runs the same call to completion elsewhere."""
    from resnet_kernels._ext import get_C

    C_ = get_C()
    if C_ is None or rt.HAS_GPU:
        pytest.skip("needs resnet_kernels._C built and no GPU (with one, the fake pointers would be dereferenced)")
    for fn in (_fwd, _bwd):
        with pytest.raises(RuntimeError):
            fn(C_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_configurations(backend, device):
    """Random shapes, windows, strides, paddings, layouts and dtypes (seeded): outputs equal, the
    argmax equal to PyTorch's indices, gradients within one rounding of float64."""
    rng = torch.Generator().manual_seed(1234)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=rng))

    for trial in range(6 if backend == "cuda" and device == "cpu" else 12):
        k = (r(1, 5), r(1, 5))
        s = (r(1, 3), r(1, 3))
        p = (r(0, k[0] // 2), r(0, k[1] // 2))
        H, W = r(max(1, k[0] - 2 * p[0]), 13), r(max(1, k[1] - 2 * p[1]), 13)
        shape = (r(1, 2), r(1, 5), H, W)
        dtype = DTYPES[r(0, 3)]
        layout = LAYOUTS[r(0, 1)]
        x = _input(shape, dtype, layout, device, seed=trial).requires_grad_(True)
        what = f"trial {trial}: {shape} {dtype} {layout} k{k} s{s} p{p}"
        out = max_pool2d(x, k, s, p, backend=backend)
        ref, idx = F.max_pool2d(x.detach(), k, s, p, return_indices=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
        _, arg = maxpool2d_op(x.detach(), list(k), list(s), list(p), True, backend)
        assert torch.equal(argmax_to_indices(arg, shape[2:], k, s, p), idx), what
        go = torch.randn(ref.shape, generator=rng).to(dtype).to(device)
        (gx,) = torch.autograd.grad(out, x, go)
        x64 = x.detach().double().requires_grad_(True)
        (g64,) = torch.autograd.grad(F.max_pool2d(x64, k, s, p), x64, go.double())
        torch.testing.assert_close(gx, g64.to(dtype), **rt.ELEMENTWISE_TOL[dtype], msg=lambda m: f"{what}: {m}")
