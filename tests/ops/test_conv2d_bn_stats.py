"""conv2d_bn_stats (resnet_kernels/ops/conv2d_bn.py): conv2d_stats of relu(batch_norm(y_prev)).

Every implementation that runs here (torch, aten, triton under the interpreter, cuda on the host
runner without a GPU) against the float64 reference (batch_norm + relu + conv2d + var_mean in
float64) under the project's policy (``resnet_kernels.testing.assert_close_to_ref``: PyTorch's own
unfused result in the same dtype, h rounded to the dtype, is the yardstick), and against the two-op
path of the same backend (batch_norm_act, then conv2d_stats): bitwise (torch, aten materialise
h with batch_norm_act's own launcher; cuda computes h in its conv kernel's operand prologue with
csrc batch_norm_act's own function, csrc/bn_affine.cuh; triton computes h in the conv kernel's prologue with the
operations of its batch_norm_act kernel in the same order: bitwise under the interpreter; on a GPU
the compiler may contract (y - mean) * scale + bias into an FMA differently in the two kernels, so
there only the policy is asserted). bn_bias > 0 and small means: relu(shift) > 0, so a prologue that
applied the BN to the zero padding (instead of padding h with zeros) fails every padded case.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import rk_testing as rt
from resnet_kernels import testing
from resnet_kernels._registry import BackendUnavailableError
from resnet_kernels.ops.batch_norm import batch_norm_act
from resnet_kernels.ops.conv2d import conv2d_stats
from resnet_kernels.ops.conv2d_bn import bn_conv_call, conv2d_bn_stats

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ["nchw", "channels_last"]
# (id, N, Cin, H, W, Cout, k, stride, pad); under the interpreter BLOCK_K = 16
SHAPES = [
    ("3x3s1p1_c16", 2, 16, 7, 7, 6, 3, 1, 1),   # chunked K loop, even channel chunks
    ("3x3s2p1_c3", 1, 3, 7, 7, 8, 3, 2, 1),     # packed K loop (Cin = 3), stride 2, N = 1
    ("1x1s1_c3", 2, 3, 7, 7, 5, 1, 1, 0),       # 1x1, chunked with a channel tail
    ("3x3s1p1_c40", 1, 40, 5, 5, 8, 3, 1, 1),   # chunked with a partial last chunk (40 = 2 x 16 + 8)
    ("3x3s1p1_c5", 1, 5, 7, 7, 6, 3, 1, 1),     # packed K loop with padding
]
EPS = 1e-5


def _backends():
    out = ["torch", "aten"]
    if rt.HAS_GPU or rt.interpreting():
        out.append("triton")
    return out


def _case(shape_id, dtype, layout, device, affine=True, seed=0):
    _, n, cin, h, w, cout, k, s, p = next(c for c in SHAPES if c[0] == shape_id)
    g = torch.Generator().manual_seed(seed)
    y = rt.layouts((torch.randn(n, cin, h, w, generator=g) * 2 + 0.5).to(dtype), layout).to(device)
    # y's batch statistics roughly (not exactly: any mean/var are valid arguments)
    yf = y.float()
    mean = (yf.mean((0, 2, 3)) + 0.1 * torch.randn(cin, generator=g).to(device)).contiguous()
    var = (yf.var((0, 2, 3), correction=0) * (0.5 + torch.rand(cin, generator=g).to(device))).contiguous()
    if affine:
        bw = (torch.rand(cin, generator=g) + 0.5).to(device)
        bb = (torch.rand(cin, generator=g) + 0.5).to(device)  # shift > 0 near mean: relu(shift) > 0
    else:
        bw = bb = None
        mean = mean - 3 * var.sqrt()  # shift = -mean * scale > 0 without a bias
    wt = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype).to(device)
    return y, mean, var, bw, bb, wt, (s, s), (p, p)


def _h64(y, mean, var, bw, bb):
    C = y.shape[1]
    v = lambda t: t.double().view(1, C, 1, 1)  # noqa: E731
    sc = torch.rsqrt(v(var) + EPS) * (v(bw) if bw is not None else 1.0)
    h = (y.double() - v(mean)) * sc + (v(bb) if bb is not None else 0.0)
    return torch.relu(h)


def _check_policy(got, case, dtype):
    y, mean, var, bw, bb, wt, stride, padding = case
    h64 = _h64(y, mean, var, bw, bb)
    y64 = F.conv2d(h64, wt.double(), None, stride, padding)
    v64, m64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    # PyTorch unfused in the dtype: h rounded to it, conv2d in it (CPU: float32 conv of the exact upcast
    # operands, rounded once, for the 16-bit types, which CPU convolutions may not implement)
    h_pt = h64.to(dtype)
    y_pt = F.conv2d(h_pt.float(), wt.float(), None, stride, padding).to(dtype) if y.device.type == "cpu" \
        else F.conv2d(h_pt, wt, None, stride, padding)
    v_pt, m_pt = torch.var_mean(y_pt.float(), dim=(0, 2, 3), correction=0)
    K = wt.shape[1] * wt.shape[2] * wt.shape[3]
    testing.assert_close_to_ref("y", got[0].cpu(), y_pt.cpu(), y64.cpu(), dtype, n_terms=K)
    scale = float(y64.abs().max())
    testing.assert_close_to_ref("mean", got[1].cpu(), m_pt.cpu(), m64.cpu(), torch.float32, n_terms=K, scale=scale)
    testing.assert_close_to_ref("var", got[2].cpu(), v_pt.cpu(), v64.cpu(), torch.float32, n_terms=K,
                                scale=scale * scale)


def _two_op(case, backend):
    y, mean, var, bw, bb, wt, stride, padding = case
    h = batch_norm_act(y, mean, var, bw, bb, eps=EPS, relu=True, backend=backend)
    return conv2d_stats(h, wt, stride=stride, padding=padding, backend=backend)


def _run(case, backend):
    y, mean, var, bw, bb, wt, stride, padding = case
    return conv2d_bn_stats(y, mean, var, bw, bb, wt, eps=EPS, stride=stride, padding=padding, backend=backend)


def _check(case, backend, dtype, layout):
    got = _run(case, backend)
    y = case[0]
    assert got[0].dtype == y.dtype and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    want_cl = layout == "channels_last"
    assert got[0].is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    _check_policy(got, case, dtype)
    ref = _two_op(case, backend)
    if backend != "triton" or rt.interpreting():
        for what, a, b in zip(("y", "mean", "var"), got, ref):
            assert torch.equal(a, b), f"{backend}: {what} differs from batch_norm_act + conv2d_stats"


@pytest.mark.parametrize("shape_id", [s[0] for s in SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", _backends())
def test_conv2d_bn_stats(backend, dt, layout, shape_id):
    dtype = DTYPES[dt]
    _check(_case(shape_id, dtype, layout, rt.DEVICE), backend, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends())
def test_without_bn_weight_and_bias(backend, layout):
    for dt in ("fp32", "bf16"):
        dtype = DTYPES[dt]
        _check(_case("3x3s1p1_c5", dtype, layout, rt.DEVICE, affine=False), backend, dtype, layout)


@pytest.mark.parametrize("shape_id", ["3x3s1p1_c16", "3x3s2p1_c3", "1x1s1_c3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_cuda(cuda_target, dt, layout, shape_id):
    """csrc's batch_norm_act and conv kernels (the host runner without a GPU). fp32 without TF32 (the
    op follows cuDNN's TF32 setting, on by default, which conftest switches off only with a GPU)."""
    dtype = DTYPES[dt]
    with _no_tf32():
        _check(_case(shape_id, dtype, layout, cuda_target), "cuda", dtype, layout)


@contextlib.contextmanager
def _no_tf32():
    try:
        old = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # conv and RNN were given different settings (new API): back to the default
        old = True
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_float64_reference_backends():
    case = _case("3x3s1p1_c5", torch.float64, "nchw", rt.DEVICE)
    y, mean, var, bw, bb, wt, stride, padding = case
    got = _run(case, "torch")
    y64 = F.conv2d(_h64(y, mean, var, bw, bb), wt, None, stride, padding)
    torch.testing.assert_close(got[0], y64, rtol=1e-12, atol=1e-12)
    assert got[1].dtype == torch.float64
    assert torch.equal(_run(case, "aten")[0], _two_op(case, "aten")[0])
    if rt.HAS_GPU or rt.interpreting():
        with pytest.raises(BackendUnavailableError, match="float64"):
            _run(case, "triton")


@pytest.mark.parametrize("backend", _backends())
def test_empty_batch(backend):
    y, mean, var, bw, bb, wt, stride, padding = _case("3x3s1p1_c5", torch.float32, "channels_last", rt.DEVICE)
    out, m, v = conv2d_bn_stats(y[:0], mean, var, bw, bb, wt, stride=stride, padding=padding, backend=backend)
    assert tuple(out.shape) == (0, 6, 7, 7) and out.dtype == y.dtype  # (an empty tensor has every layout)
    assert m.shape == (6,) and torch.isnan(m).all() and torch.isnan(v).all()


def test_validation_messages():
    y, mean, var, bw, bb, wt, stride, padding = _case("3x3s1p1_c5", torch.float32, "nchw", rt.DEVICE)
    op = "conv2d_bn_stats"
    with pytest.raises(TypeError, match=f"{op}: y_prev must be"):
        conv2d_bn_stats(y.numpy() if y.device.type == "cpu" else None, mean, var, bw, bb, wt)
    with pytest.raises(ValueError, match=rf"{op}: weight.shape\[1\] must be y_prev's channels"):
        conv2d_bn_stats(y, mean, var, bw, bb, wt[:, :4].contiguous())
    with pytest.raises(TypeError, match=f"{op}: weight must have the dtype of y_prev"):
        conv2d_bn_stats(y, mean, var, bw, bb, wt.double())
    with pytest.raises(ValueError, match=f"{op}: mean"):
        conv2d_bn_stats(y, mean[:4], var, bw, bb, wt)
    with pytest.raises(ValueError, match=f"{op}: var"):
        conv2d_bn_stats(y, mean, var[:4], bw, bb, wt)
    with pytest.raises(ValueError, match=f"{op}: bn_weight"):
        conv2d_bn_stats(y, mean, var, bw[:4], bb, wt)
    with pytest.raises(ValueError, match=f"{op}: bn_bias"):
        conv2d_bn_stats(y, mean, var, bw, bb[:3], wt)
    with pytest.raises(TypeError, match=f"{op}: eps must be a float"):
        conv2d_bn_stats(y, mean, var, bw, bb, wt, eps="1e-5")
    with pytest.raises(ValueError, match=f"{op}: stride must be >= 1"):
        conv2d_bn_stats(y, mean, var, bw, bb, wt, stride=0)
    with pytest.raises(ValueError, match=f"{op}: y_prev's spatial size"):
        conv2d_bn_stats(y[:, :, :1, :1].contiguous(), mean, var, bw, bb, wt)


def test_opcheck_and_not_differentiable():
    y, mean, var, bw, bb, wt, stride, padding = _case("3x3s1p1_c5", torch.float32, "channels_last", rt.DEVICE)
    torch.library.opcheck(torch.ops.resnet_kernels.conv2d_bn_stats.default,
                          (y, mean, var, bw, bb, EPS, wt, list(stride), list(padding), "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    out, _, _ = conv2d_bn_stats(y.requires_grad_(), mean, var, bw, bb, wt, stride=stride, padding=padding,
                                backend="torch")
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


def test_costs_and_flops():
    """Counted on meta tensors: triton and cuda (Cp <= 1536) are conv2d_stats' cost (y_prev read as its
    x) plus the (Cin,) vectors, with conv2d_stats' launches; aten (and cuda beyond 1536 channels) add
    their batch_norm_act pass(es) writing h."""
    from torch.utils.flop_counter import FlopCounterMode

    from resnet_kernels import _registry
    from resnet_kernels.backends import nbytes
    from resnet_kernels.ops.conv2d import ConvCall

    cl = torch.channels_last
    y = torch.empty((256, 64, 56, 56), dtype=torch.bfloat16, device="meta").to(memory_format=cl)
    w = torch.empty((64, 64, 3, 3), dtype=torch.bfloat16, device="meta").to(memory_format=cl)
    vec = [torch.empty((64,), dtype=torch.float32, device="meta") for _ in range(4)]
    call = bn_conv_call(y, *vec, EPS, w, (1, 1), (1, 1))
    plain = ConvCall("conv2d_stats", y, w, None, None, None, (1, 1), (1, 1), (1, 1), 1, False, True, "nhwc",
                     call.shape)
    cost = {b: _registry.get_impl("conv2d_bn_stats", b).cost(call) for b in ("triton", "cuda", "aten")}
    base = {b: _registry.get_impl("conv2d_stats", b).cost(plain) for b in ("triton", "cuda", "aten")}
    assert cost["triton"] == (base["triton"][0], base["triton"][1] + 4 * 64 * 4)
    # cuda: in the kernel's operand prologue (Cp = 64 <= 1536), as triton; materialised beyond
    assert cost["cuda"] == (base["cuda"][0], base["cuda"][1] + 4 * 64 * 4)
    y_wide = torch.empty((8, 1544, 7, 7), dtype=torch.bfloat16, device="meta").to(memory_format=cl)
    w_wide = torch.empty((64, 1544, 1, 1), dtype=torch.bfloat16, device="meta").to(memory_format=cl)
    vec_wide = [torch.empty((1544,), dtype=torch.float32, device="meta") for _ in range(4)]
    call_wide = bn_conv_call(y_wide, *vec_wide, EPS, w_wide, (1, 1), (0, 0))
    plain_wide = ConvCall("conv2d_stats", y_wide, w_wide, None, None, None, (1, 1), (0, 0), (1, 1), 1, False, True,
                          "nhwc", call_wide.shape)
    base_wide = _registry.get_impl("conv2d_stats", "cuda").cost(plain_wide)
    assert _registry.get_impl("conv2d_bn_stats", "cuda").cost(call_wide) == (
        base_wide[0] + 1, base_wide[1] + 2 * nbytes(y_wide) + 4 * 1544 * 4)
    assert cost["aten"] == (base["aten"][0] + 2, base["aten"][1] + 4 * nbytes(y) + 4 * 64 * 4)
    yc = torch.randn(2, 5, 7, 7)
    with FlopCounterMode(display=False) as fc:
        conv2d_bn_stats(yc, torch.zeros(5), torch.ones(5), None, None, torch.randn(6, 5, 3, 3), padding=1,
                        backend="torch")
    assert fc.get_total_flops() == 2 * 2 * 6 * 5 * 7 * 7 * 9


@pytest.mark.parametrize("backend", _backends())
def test_parameters_in_the_activation_dtype(backend):
    """bn_weight/bn_bias in bf16 (a model.half()/bfloat16 BN) are used as batch_norm_act uses them."""
    y, mean, var, bw, bb, wt, stride, padding = _case("3x3s1p1_c16", torch.bfloat16, "channels_last", rt.DEVICE)
    case = (y, mean, var, bw.to(torch.bfloat16), bb.to(torch.bfloat16), wt, stride, padding)
    got, ref = _run(case, backend), _two_op(case, backend)
    if backend != "triton" or rt.interpreting():
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    _check_policy(got, case, torch.bfloat16)
