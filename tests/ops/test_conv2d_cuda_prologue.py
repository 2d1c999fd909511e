"""The CUDA convolution's BN + ReLU operand prologue (csrc/conv2d.cu, PRO; launcher
resnet_kernels/backends/cuda_conv2d.py ``conv2d_forward(..., prologue=...)``, used by the cuda
``conv2d_bn_stats``): bitwise equal to the materialised path, csrc's batch_norm_act forward writing
h = relu(bn(y_prev)) and the same convolution (no prologue) reading it: out, mean and var.

Both A paths of the kernel (channels_last with Cin a multiple of 16 bytes: 16-byte loads; NCHW or
odd Cin: the element gather), 1x1 and 3x3, stride 1 and 2, N = 1, H = W = 7, bf16 / fp16 / fp32
(3xTF32 and TF32), with and without BN weight/bias, parameters in the activation dtype. bn_bias > 0
and means near the data: relu(shift) > 0, so a prologue that normalised the zero padding (instead of
padding h) fails every padded case; y centred on the mean: about half the h are clamped by the ReLU.
Outputs poisoned with NaN (an unwritten element fails). Without a GPU: the host runner
(``cuda_target``), which runs csrc's own kernel source; there two planted bugs (the BN applied to
the padding taps, the table's barrier removed) must fail, and the channel limit is exercised.
"""

from __future__ import annotations

import pytest
import torch

import rk_testing
from resnet_kernels import _alloc
from resnet_kernels.backends import cuda_common

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}
# (N, Cin, H, W, Cout, k, stride, pad)
SHAPES = {
    "3x3s1_c16": (1, 16, 7, 7, 12, 3, 1, 1),
    "3x3s2_c16": (1, 16, 7, 7, 8, 3, 2, 1),
    "3x3s1_c5": (1, 5, 7, 7, 6, 3, 1, 1),     # odd Cin: gather path, channel padding to Cp
    "1x1s1_c24": (1, 24, 7, 7, 10, 1, 1, 0),
    "1x1s2_c3": (1, 3, 7, 7, 7, 1, 2, 0),
}
EPS = 1e-5


def _case(shape, dtype, layout, dev, affine=True, pdtype=torch.float32, seed=0):
    N, Cin, H, W, Cout, k, s, p = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(N, Cin, H, W, generator=g) * 2 + 0.5).to(dtype)
    y = y.contiguous(memory_format=rk_testing.memory_format(layout)).to(dev)
    yf = y.float()
    mean = (yf.mean((0, 2, 3)) + 0.1 * torch.randn(Cin, generator=g).to(dev)).contiguous()
    var = (yf.var((0, 2, 3), correction=0) * (0.5 + torch.rand(Cin, generator=g).to(dev))).contiguous()
    if affine:
        bw = (torch.rand(Cin, generator=g) + 0.5).to(pdtype).to(dev)
        bb = (torch.rand(Cin, generator=g) + 0.5).to(pdtype).to(dev)
    else:
        bw = bb = None
        mean = mean - 3 * var.sqrt()  # shift > 0 without a bias
    w = (torch.randn(Cout, Cin, k, k, generator=g) / (Cin * k * k) ** 0.5).to(dtype).to(dev)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    return y, mean, var, bw, bb, w, (s, s), (p, p), (N, Cout, OH, OW)


def _poisoned(shape, dtype, layout, dev):
    return _alloc._fill(torch.empty(shape, dtype=dtype, device=dev,
                                    memory_format=rk_testing.memory_format(layout)))


def _both(case, layout, dev, tf32):
    """(in-kernel (out, mean, var), materialised (out, mean, var), h)."""
    from resnet_kernels.backends.cuda_batch_norm import batch_norm_act_forward
    from resnet_kernels.backends.cuda_conv2d import conv2d_forward
    from resnet_kernels.backends.torch_conv2d import _bn_geometry

    y, mean, var, bw, bb, w, stride, pad, oshape = case
    out = _poisoned(oshape, y.dtype, layout, dev)
    m, v = conv2d_forward(y, w, None, None, None, out, stride, pad, False, True, tf32,
                          prologue=(mean, var, bw, bb, EPS))
    h = _poisoned(tuple(y.shape), y.dtype, layout, dev)
    C, inner = _bn_geometry(y)
    batch_norm_act_forward(y, mean, var, bw, bb, None, None, None, None, None, h, EPS, 0.0, True, C, inner)
    out2 = _poisoned(oshape, y.dtype, layout, dev)
    m2, v2 = conv2d_forward(h, w, None, None, None, out2, stride, pad, False, True, tf32)
    if dev == "cuda":
        torch.cuda.synchronize()
    return (out, m, v), (out2, m2, v2), h


def _assert_bitwise(got, ref):
    assert not got[0].isnan().any(), "unwritten (NaN-poisoned) output elements"
    for what, a, b in zip(("out", "mean", "var"), got, ref):
        assert torch.equal(a, b), f"{what}: the in-kernel prologue differs from batch_norm_act + conv"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prologue_bitwise_equals_materialised(shape, mode, layout, cuda_target):
    case = _case(shape, DTYPE[mode], layout, cuda_target)
    got, ref, h = _both(case, layout, cuda_target, mode == "tf32")
    _assert_bitwise(got, ref)
    # the case exercises the ReLU and the padding: some h clamped, relu(shift) > 0 at the padding
    assert (h == 0).any() and (h > 0).any()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_prologue_without_bn_weight_and_bias(mode, layout, cuda_target):
    for shape in ("3x3s1_c16", "3x3s1_c5"):
        case = _case(shape, DTYPE[mode], layout, cuda_target, affine=False)
        got, ref, _ = _both(case, layout, cuda_target, False)
        _assert_bitwise(got, ref)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_prologue_parameters_in_the_activation_dtype(mode, cuda_target):
    dtype = DTYPE[mode]
    case = _case("3x3s2_c16", dtype, "channels_last", cuda_target, pdtype=dtype)
    got, ref, _ = _both(case, "channels_last", cuda_target, False)
    _assert_bitwise(got, ref)


def test_prologue_at_the_channel_limit(cuda_target):
    """Cp = 1536 = PROLOGUE_MAX_CHANNELS (the whole shared-memory table), bf16 channels_last."""
    from resnet_kernels.backends import cuda_conv2d

    SHAPES["1x1_c1536"] = (1, cuda_conv2d.PROLOGUE_MAX_CHANNELS, 3, 3, 8, 1, 1, 0)
    try:
        case = _case("1x1_c1536", torch.bfloat16, "channels_last", cuda_target)
    finally:
        del SHAPES["1x1_c1536"]
    got, ref, _ = _both(case, "channels_last", cuda_target, False)
    _assert_bitwise(got, ref)


def test_prologue_is_not_the_plain_conv(cuda_target):
    """Negative control: the in-kernel result is not the convolution of y_prev itself (the prologue ran)."""
    from resnet_kernels.backends.cuda_conv2d import conv2d_forward

    case = _case("3x3s1_c16", torch.bfloat16, "channels_last", cuda_target)
    got, _, _ = _both(case, "channels_last", cuda_target, False)
    y, _, _, _, _, w, stride, pad, oshape = case
    out = _poisoned(oshape, y.dtype, "channels_last", cuda_target)
    conv2d_forward(y, w, None, None, None, out, stride, pad, False, True, False)
    assert not torch.equal(out, got[0])


def test_op_runs_in_kernel_and_costs_no_h(cuda_target, monkeypatch):
    """conv2d_bn_stats(backend='cuda') takes the in-kernel path (batch_norm_act's launcher not called)
    for Cp <= PROLOGUE_MAX_CHANNELS, the materialised one beyond (forced here by lowering the limit),
    the same result both ways; the declared cost follows the path."""
    from resnet_kernels import _registry
    from resnet_kernels.backends import cuda_batch_norm, cuda_conv2d, nbytes
    from resnet_kernels.ops.conv2d_bn import bn_conv_call, conv2d_bn_stats

    y, mean, var, bw, bb, w, stride, pad, _ = _case("3x3s1_c5", torch.bfloat16, "nchw", cuda_target)
    calls = []
    real = cuda_batch_norm.batch_norm_act_forward
    monkeypatch.setattr(cuda_batch_norm, "batch_norm_act_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = conv2d_bn_stats(y, mean, var, bw, bb, w, eps=EPS, stride=stride, padding=pad, backend="cuda")
    assert calls == []
    call = bn_conv_call(y, mean, var, bw, bb, EPS, w, stride, pad)
    impl = _registry.get_impl("conv2d_bn_stats", "cuda")
    assert impl.operand_prologue
    cost_in = impl.cost(call)
    monkeypatch.setattr(cuda_conv2d, "PROLOGUE_MAX_CHANNELS", 0)
    ref = conv2d_bn_stats(y, mean, var, bw, bb, w, eps=EPS, stride=stride, padding=pad, backend="cuda")
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    cost_mat = impl.cost(call)
    assert cost_mat == (cost_in[0] + 1, cost_in[1] + 2 * nbytes(y))


# ---- the C++ API's checks of the prologue's arguments (on the host runner's build of csrc)
def _args(**over):
    a = dict(dtype=2, x=4096, w=4096, scale=0, bias=0, residual=0, out=8192, mean=4096, var=4096, workspace=4096,
             workspace_bytes=1 << 20, counters=4096, counters_count=1 << 20, N=1, Cin=16, H=7, W=7, Cout=8, KH=3,
             KW=3, stride_h=1, stride_w=1, pad_h=1,
             pad_w=1, OH=7, OW=7, ldw=144, x_stride=[784, 1, 112, 16], out_stride=[392, 1, 56, 8],
             res_stride=[0, 0, 0, 0], relu=False, allow_tf32=False, stream=0, bn_mean=4096, bn_var=4096, bn_weight=0,
             bn_bias=0, bn_weight_dtype=0, bn_bias_dtype=0, bn_eps=1e-5)
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(bn_var=0), "bn_var"),
    (dict(bn_mean=0), "without bn_mean"),
    (dict(bn_mean=4098), "bn_mean and bn_var must be 4-byte aligned"),
    (dict(bn_weight=4096, bn_weight_dtype=3), "bn_weight_dtype is float64"),
    (dict(bn_bias=4097, bn_bias_dtype=2), "bn_bias is not aligned"),
    (dict(bn_eps=-1.0), "bn_eps"),
    (dict(Cin=1544, ldw=9 * 1544, x_stride=[1544 * 49, 1, 1544 * 7, 1544]), "1536"),
    (dict(relu=True), "no scale, bias, residual or relu"),
    (dict(scale=4096), "no scale, bias, residual or relu"),
])
def test_prologue_rejects_bad_arguments(over, match, host_runner_module):
    mod = host_runner_module
    with pytest.raises(ValueError, match=match):
        mod.conv2d_forward(cuda_common.fill_args(mod.Conv2dArgs, **_args(**over)))


# ---- planted bugs (tests/host_runner.py ``build(patches=...)``): the checks above catch them
_BUGS = {
    # the BN applied to the padding taps (relu(shift) > 0 there instead of h's zero padding)
    "pads_bn": [("      for (int j = 0; j < 4; ++j) g[i][j] = ok ? o[j] : 0u;\n",
                 "      for (int j = 0; j < 4; ++j) g[i][j] = o[j];\n")],
    # the barrier between the table's writes and the first tiles' transforms removed: a read before the
    # write (the runner runs thread 0 first: "uninitialised") or in the same barrier interval (race)
    "table_barrier": [("      tab[kConvPrologueMaxChannels + c] = sh;\n    }\n    __syncthreads();\n",
                       "      tab[kConvPrologueMaxChannels + c] = sh;\n    }\n")],
}


def _planted(bug):
    import host_runner

    if host_runner.compiler() is None or rk_testing.HAS_GPU:
        pytest.skip("the planted-bug builds run on the host runner (no GPU, a C++ compiler)")
    return host_runner.HostRunner(host_runner.build(patches={"conv2d.cu": _BUGS[bug]}))


def test_planted_padding_bug_fails_parity(host_runner_module):
    case = _case("3x3s1_c16", torch.bfloat16, "channels_last", "cpu")
    with cuda_common.host_runner(_planted("pads_bn")):
        got, ref, _ = _both(case, "channels_last", "cpu", False)
    assert not torch.equal(got[0], ref[0])


def test_planted_table_race_is_reported(host_runner_module):
    case = _case("3x3s1_c5", torch.float32, "nchw", "cpu")
    with cuda_common.host_runner(_planted("table_barrier")):
        with pytest.raises(RuntimeError, match=r"shared-memory race|uninitialised shared memory") as info:
            _both(case, "nchw", "cpu", False)
    assert "conv2d_igemm_kernel" in str(info.value)
