"""The CUTLASS sm_90a convolution (csrc/sm90/, launcher resnet_kernels/backends/cutlass_conv2d.py,
registered as the ``cutlass`` backend of conv2d_epilogue / conv2d_stats).

Without a GPU (CI): ``cutlass_supports`` names every reason it refuses a call (dtype, layout,
channel multiples of 8, groups, dilation, stride, TMA padding limits) and accepts the calls the
kernel implements; the backend's availability says why it cannot run here; the registry entry, its
cost declaration and the C++ API's argument validation (on _C when it holds the kernels).

On an sm_90 GPU (``gpu`` marker): parity with a float64 reference over bf16/fp16, every epilogue,
ResNet conv types with odd spatial sizes and partial tiles, NaN-poisoned outputs; statistics (of the
output rounded to its dtype, from the epilogue) against float64 including |mean| = 100 x std
(tolerance relative to the variance itself, which a sum/sum-of-squares reduction in float32 would
miss by orders of magnitude), bit-identical reruns;
the op layer with backend='cutlass'. Tolerances: the rule of tests/ops/test_conv2d_cuda.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import rk_testing
from resnet_kernels import _alloc, _registry, testing
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cuda_common, cutlass_supports
from resnet_kernels.backends.cuda_conv2d import NO_PROLOGUE
from resnet_kernels.ops.conv2d import ConvCall

C_ = get_C()
HAS_SM90_KERNELS = bool(getattr(C_, "sm90_kernels", False))


def _sm90_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_gpu = rk_testing.needs_gpu("the CUTLASS sm_90a convolution")
# on a GPU that is not sm_90 the sm_90a cubin cannot run at all: skip (the hardware, not the build)
needs_sm90 = pytest.mark.skipif(torch.cuda.is_available() and not _sm90_gpu(),
                                reason="the sm_90a kernels run on compute capability 9.0 GPUs only")

_U = testing.UNIT_ROUNDOFF
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}  # float32: TF32 allowed

# (N, Cin, H, W, Cout, k, stride, pad): ResNet conv types with channels multiples of 8, odd sizes,
# N = 1, partial M and N tiles (128 x 128), several K tiles (BK = 64)
SHAPES = {
    "3x3s1": (2, 16, 9, 11, 24, 3, 1, 1),
    "3x3s2": (1, 32, 11, 13, 40, 3, 2, 1),
    "1x1s1": (3, 64, 7, 7, 72, 1, 1, 0),
    "1x1s2": (2, 24, 9, 9, 136, 1, 2, 0),
    "7x7s2_cin8": (2, 8, 23, 21, 64, 7, 2, 3),
    "3x3_multi_tile": (2, 64, 15, 15, 264, 3, 1, 1),
    "1x1_cin8": (1, 8, 5, 5, 16, 1, 1, 0),
    "3x3_asym_pad0": (2, 16, 10, 9, 32, 3, 1, 0),
}
EPILOGUES = {
    "plain": dict(scale=False, bias=False, residual=False, relu=False),
    "bn_relu": dict(scale=True, bias=True, residual=False, relu=True),
    "bn_add_relu": dict(scale=True, bias=True, residual=True, relu=True),
    "bias_add": dict(scale=False, bias=True, residual=True, relu=False),
    "scale_only": dict(scale=True, bias=False, residual=False, relu=False),
}


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _poisoned(shape, dtype, dev):
    return _alloc._fill(torch.empty(shape, dtype=dtype, device=dev, memory_format=torch.channels_last))


def _make(shape_name, dtype, epi, dev, x_offset=0.0):
    N, Cin, H, W, Cout, k, s, p = SHAPES[shape_name]
    x = _nhwc((torch.randn(N, Cin, H, W, device=dev) + x_offset).to(dtype))
    w = (torch.randn(Cout, Cin, k, k, device=dev) / (Cin * k * k) ** 0.5).to(dtype)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    scale = torch.rand(Cout, device=dev) + 0.5 if epi["scale"] else None
    bias = torch.randn(Cout, device=dev) if epi["bias"] else None
    res = _nhwc(torch.randn(N, Cout, OH, OW, device=dev).to(dtype)) if epi["residual"] else None
    return x, w, scale, bias, res, (s, s), (p, p), (N, Cout, OH, OW)


def _launch(x, w, scale, bias, res, out, stride, pad, relu, stats):
    from resnet_kernels.backends.cutlass_conv2d import conv2d_forward

    r = conv2d_forward(x, w, scale, bias, res, out, stride, pad, relu, stats, x.dtype == torch.float32)
    torch.cuda.synchronize()
    return r


# ------------------------------------------------------------------------------------------------
# GPU parity (sm_90)
# ------------------------------------------------------------------------------------------------
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("epi", list(EPILOGUES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cutlass_epilogue_matches_float64(shape, epi, mode):
    e = EPILOGUES[epi]
    dtype = DTYPE[mode]
    x, w, scale, bias, res, stride, pad, oshape = _make(shape, dtype, e, "cuda")
    out = _poisoned(oshape, dtype, "cuda")
    assert _launch(x, w, scale, bias, res, out, stride, pad, e["relu"], False) is None
    ref = rk_testing.epilogue64(F.conv2d(x.double(), w.double(), None, stride, pad), scale, bias, res, e["relu"])
    theirs = rk_testing.epilogue64(F.conv2d(x, w, None, stride, pad).double(), scale, bias, res, e["relu"]).to(dtype)
    e_torch = (theirs.double() - ref).abs().max().item()
    tol = 2 * e_torch + _U[dtype] * ref.abs().max().item()
    assert out.shape == oshape and out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    if dtype == torch.float32:
        assert ((out.double() - ref).abs() <= _tf32_bound(x, w, stride, pad, ref, scale)).all()
        return
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch's own error {e_torch:.3g})"


@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", ["3x3s1", "3x3s2", "7x7s2_cin8"])
def test_cutlass_weight_in_place_is_bitwise_the_packed(shape, mode):
    """A channels_last weight read in place (no pack) gives the packed weight's outputs and
    statistics bitwise: the same KRSC matrix, the same kernel."""
    dtype = DTYPE[mode]
    x, w, scale, bias, res, stride, pad, oshape = _make(shape, dtype, EPILOGUES["bn_add_relu"], "cuda")
    for stats in (False, True):
        got = []
        for weight in (w, _nhwc(w)):
            out = _poisoned(oshape, dtype, "cuda")
            if stats:
                r = _launch(x, weight, None, None, None, out, stride, pad, False, True)
            else:
                r = _launch(x, weight, scale, bias, res, out, stride, pad, True, False)
            got.append((out, r))
        (a, ra), (b, rb) = got
        assert torch.equal(a, b) and not a.isnan().any()
        if stats:
            assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])


def _tf32_bound(x, w, stride, pad, ref, scale=None):
    """Elementwise error bound of a float32 convolution computed in TF32 by wgmma, which feeds the
    operands' top 10 mantissa bits (truncation: each operand off by < 2**-10 relative, so each
    product by < 2**-9 + 2**-20) and accumulates in float32 (K + 2 roundings of 2**-24), then rounds
    the float32 epilogue: g conv(|x|, |w|) |scale| + 2**-23 |ref| with g = 2**-9 + 2**-20 +
    (K + 2) 2**-24, doubled as the margin (the tensor cores' internal accumulation is not IEEE
    round-to-nearest). cuDNN rounds to nearest instead, so "2x PyTorch's own error" is not the
    measure for a truncating kernel (its errors are biased, not random-signed; docs/CONV.md
    "Numerics"). A missing or doubled tap is an error of order |x w| ~ A / K: far above this."""
    K = w[0].numel()
    a = F.conv2d(x.double().abs(), w.double().abs(), None, stride, pad)
    s = scale.double().abs().view(1, -1, 1, 1) if scale is not None else 1.0
    g = 2.0**-9 + 2.0**-20 + (K + 2) * 2.0**-24
    return 2 * (g * a * s + 2.0**-23 * ref.abs()) + torch.finfo(torch.float32).tiny


def _check_stats(x, w, stride, pad, oshape, dtype, mean, var, out, rel_var_tol=None):
    y64 = F.conv2d(x.double(), w.double(), None, stride, pad)
    assert not out.isnan().any()
    # the statistics are of the output as written, rounded to dtype (a BatchNorm after a bf16/fp16
    # conv sees the rounded values; at |mean| = 200 x std bf16 rounding alone moves the variance by
    # ~5%): the float64 reference is of `out` itself, whose own error is checked below
    rvar, rmean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    # PyTorch's own error on such data: torch.var_mean (Welford) in float32 of the same rounded values
    tvar, tmean = torch.var_mean(out.float(), dim=(0, 2, 3), correction=0)
    ymax = y64.abs().max().item()
    tol_m = 2 * (tmean.double() - rmean).abs().max().item() + _U[torch.float32] * 64 * ymax
    e_mean = (mean.double() - rmean).abs().max().item()
    assert e_mean <= tol_m, f"mean error {e_mean:.3g} > {tol_m:.3g}"
    if rel_var_tol is None:
        tol_v = 2 * (tvar.double() - rvar).abs().max().item() + _U[dtype] * ymax ** 2
        e_var = (var.double() - rvar).abs().max().item()
        assert e_var <= tol_v, f"var error {e_var:.3g} > {tol_v:.3g}"
    else:  # relative to each channel's variance
        e_rel = ((var.double() - rvar).abs() / rvar).max().item()
        t_rel = ((tvar.double() - rvar).abs() / rvar).max().item()
        assert e_rel <= 2 * t_rel + rel_var_tol, f"relative var error {e_rel:.3g} (PyTorch's {t_rel:.3g})"
    if dtype == torch.float32:
        assert ((out.double() - y64).abs() <= _tf32_bound(x, w, stride, pad, y64)).all()
        return
    theirs = F.conv2d(x, w, None, stride, pad)
    tol = 2 * (theirs.double() - y64).abs().max().item() + _U[dtype] * ymax
    assert not out.isnan().any()
    assert (out.double() - y64).abs().max().item() <= tol


@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cutlass_stats_match_float64(shape, mode):
    dtype = DTYPE[mode]
    x, w, _, _, _, stride, pad, oshape = _make(shape, dtype, EPILOGUES["plain"], "cuda", x_offset=0.5)
    out = _poisoned(oshape, dtype, "cuda")
    mean, var = _launch(x, w, None, None, None, out, stride, pad, False, True)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (oshape[1],)
    _check_stats(x, w, stride, pad, oshape, dtype, mean, var, out)
    out2 = _poisoned(oshape, dtype, "cuda")
    mean2, var2 = _launch(x, w, None, None, None, out2, stride, pad, False, True)
    assert torch.equal(mean, mean2) and torch.equal(var, var2) and torch.equal(out, out2), "not deterministic"


def _nhwc_stats_of(out):
    """nhwc_stats_forward (csrc/nhwc_stats.cu) on the kernel's own output: the same arithmetic, order
    and rounding as the statistics epilogue (csrc/col_stats_tile.cuh), from plain CUDA."""
    N, C, OH, OW = out.shape
    yf = out.permute(0, 2, 3, 1).reshape(-1, C).float().contiguous()  # (M, C) NHWC rows
    M = yf.shape[0]
    mean = torch.empty(C, device=out.device)
    var = torch.empty(C, device=out.device)
    nbytes = C_.nhwc_stats_workspace_bytes(M=M, C=C)
    ws = torch.empty(max(nbytes // 4, 1), device=out.device)
    p = cuda_common.ptr
    C_.nhwc_stats_forward(cuda_common.fill_args(
        C_.NhwcStatsArgs, dtype=cuda_common.DTYPE_CODES[out.dtype], yf=p(yf), y=0, mean=p(mean), var=p(var),
        workspace=p(ws), workspace_bytes=nbytes, M=M, C=C, stream=cuda_common.stream_of(yf)))
    torch.cuda.synchronize()
    return mean, var


@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cutlass_stats_equal_the_same_arithmetic_on_its_output(shape, mode):
    """The epilogue's statistics against nhwc_stats_forward run on the kernel's own output (the
    same code and order, compiled apart): equal to float32 rounding, so a wrong scratch mapping, a
    missed or doubled subtile, a wrong tile row count or an unwritten partial shows here, apart from
    the convolution's own error (partial M and N tiles, a tile whose second subtile is empty)."""
    dtype = DTYPE[mode]
    x, w, _, _, _, stride, pad, oshape = _make(shape, dtype, EPILOGUES["plain"], "cuda", x_offset=3.0)
    out = _poisoned(oshape, dtype, "cuda")
    mean, var = _launch(x, w, None, None, None, out, stride, pad, False, True)
    assert not out.isnan().any()
    rmean, rvar = _nhwc_stats_of(out)
    tol_m = 2**-20 * (rmean.abs() + rvar.sqrt())  # float32 rounding of values of that size
    assert ((mean - rmean).abs() <= tol_m).all(), (mean - rmean).abs().max().item()
    assert torch.allclose(var, rvar, rtol=2**-16, atol=0), ((var - rvar).abs() / rvar).max().item()


@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
def test_cutlass_stats_large_mean(mode):
    """|mean| ~ 100-500 x std per channel: x = 1 + small noise, so every output channel is
    sum(w) + noise. The variance must be as accurate (relative to itself) as PyTorch's Welford."""
    dtype = DTYPE[mode]
    N, Cin, H, W, Cout, k = 8, 64, 16, 16, 72, 3  # no padding: every output sees all taps
    x = _nhwc((1.0 + 0.01 * torch.randn(N, Cin, H, W, device="cuda")).to(dtype))
    # weights with a positive mean: every channel's sum(w) dominates (median |mean| / std ~ 200)
    w = ((torch.randn(Cout, Cin, k, k, device="cuda") + 0.1) / (Cin * k * k) ** 0.5).to(dtype)
    oshape = (N, Cout, H - 2, W - 2)
    out = _poisoned(oshape, dtype, "cuda")
    mean, var = _launch(x, w, None, None, None, out, (1, 1), (0, 0), False, True)
    y64 = F.conv2d(x.double(), w.double(), None, 1, 0)
    ratio = (y64.mean(dim=(0, 2, 3)).abs() / y64.std(dim=(0, 2, 3))).median().item()
    assert ratio > 100, f"the test's data should have |mean| >> std (median ratio {ratio:.1f})"
    _check_stats(x, w, (1, 1), (0, 0), oshape, dtype, mean, var, out, rel_var_tol=1e-3)


@needs_gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(DTYPE))
def test_cutlass_through_the_ops(mode):
    from resnet_kernels.ops import conv2d_epilogue, conv2d_stats

    dtype = DTYPE[mode]
    x, w, scale, bias, res, stride, pad, oshape = _make("3x3s2", dtype, EPILOGUES["bn_add_relu"], "cuda")
    out = conv2d_epilogue(x, w, scale, bias, res, stride=stride, padding=pad, relu=True, backend="cutlass")
    ref = conv2d_epilogue(x, w, scale, bias, res, stride=stride, padding=pad, relu=True, backend="torch")
    assert out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        # the torch reference runs in TF32 too (cuDNN, rounding): twice the bound
        assert ((out.double() - ref.double()).abs() <= 2 * _tf32_bound(x, w, stride, pad, ref.double(), scale)).all()
    else:
        assert (out.double() - ref.double()).abs().max().item() <= 4 * _U[dtype] * ref.double().abs().max().item() + 1e-3
    y, mean, var = conv2d_stats(x, w, stride=stride, padding=pad, backend="cutlass")
    y_ref, mean_ref, var_ref = conv2d_stats(x, w, stride=stride, padding=pad, backend="torch")
    tf = 2.0**-8 if dtype == torch.float32 else 0.0  # TF32 products: 2**-9 relative each, for both sides
    assert torch.allclose(mean.double(), mean_ref.double(), rtol=1e-4 + tf, atol=1e-4 + tf)
    assert torch.allclose(var.double(), var_ref.double(), rtol=1e-3 + tf, atol=1e-4 + tf)


@needs_gpu
@needs_sm90
def test_cutlass_refuses_what_it_does_not_implement_on_gpu():
    """backend='cutlass' never falls back silently: odd channels raise with the reason."""
    from resnet_kernels.ops import conv2d_epilogue

    x = _nhwc(torch.randn(2, 12, 9, 9, device="cuda", dtype=torch.bfloat16))
    w = torch.randn(16, 12, 3, 3, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(_registry.BackendUnavailableError, match="Cin=12"):
        conv2d_epilogue(x, w, padding=1, backend="cutlass")


# ------------------------------------------------------------------------------------------------
# without a GPU: supports(), the registry entry, the C++ API's validation
# ------------------------------------------------------------------------------------------------
def _call(N=2, Cin=16, H=9, W=9, Cout=24, k=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
          dtype=torch.bfloat16, layout="nhwc", residual=False, stats=False):
    x = torch.zeros(N, Cin, H, W, dtype=dtype)
    if layout == "nhwc":
        x = _nhwc(x)
    w = torch.zeros(Cout, Cin // groups, k, k, dtype=dtype)
    OH = (H + 2 * padding[0] - dilation[0] * (k - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (k - 1) - 1) // stride[1] + 1
    res = torch.zeros(N, Cout, OH, OW, dtype=dtype) if residual else None
    op = "conv2d_stats" if stats else "conv2d_epilogue"
    return ConvCall(op, x, w, None, None, res, stride, padding, dilation, groups, False, stats, layout,
                    (N, Cout, OH, OW))


def test_supports_accepts_what_the_kernel_implements():
    for kw in (dict(), dict(dtype=torch.float16), dict(stats=True), dict(k=1, padding=(0, 0), stride=(2, 2)),
               dict(k=7, stride=(2, 2), padding=(3, 3), Cin=8, H=23, W=21), dict(Cout=8, Cin=8),
               dict(dtype=torch.float32), dict(dtype=torch.float32, stats=True, Cout=12)):
        assert cutlass_supports(_call(**kw)) is None, kw


def test_supports_float32_only_as_tf32(monkeypatch):
    """float32 runs in TF32 on the sm_90a kernels: refused where PyTorch's conv would not use TF32
    (torch.backends.cudnn.allow_tf32 False), which then goes to the exact float32 paths."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    why = cutlass_supports(_call(dtype=torch.float32))
    assert why is not None and "TF32" in why, why
    assert cutlass_supports(_call(dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("kw, reason", [
    (dict(dtype=torch.float64), "dtype float64"),
    (dict(dtype=torch.float32, Cout=6), "Cout=6 is not a multiple of 4"),
    (dict(layout="nchw"), "channels_last"),
    (dict(Cin=12), "Cin=12"),
    (dict(Cin=3, k=7, stride=(2, 2), padding=(3, 3)), "Cin=3"),
    (dict(Cout=10), "Cout=10"),
    (dict(Cout=3), "Cout=3"),
    (dict(groups=2, Cin=16, Cout=16), "groups=2"),
    (dict(dilation=(2, 2)), "dilation"),
    (dict(stride=(9, 9), k=1, padding=(0, 0)), "stride"),
    (dict(padding=(129, 1), k=3, H=300), "padding"),
])
def test_supports_names_each_reason(kw, reason):
    why = cutlass_supports(_call(**kw))
    assert why is not None and reason in why, why


def test_supports_lists_every_reason():
    why = cutlass_supports(_call(dtype=torch.float64, Cin=12, Cout=10, layout="nchw"))
    for reason in ("float64", "Cin=12", "Cout=10", "channels_last"):
        assert reason in why, why


def test_registered_as_the_cutlass_backend():
    be = _registry.get_backend_decl("cutlass")
    assert be.fallback_auto  # bn_add_relu* resolve as 'auto' under backend='cutlass'
    for op in ("conv2d_epilogue", "conv2d_stats"):
        impl = _registry.get_impl(op, "cutlass")
        assert impl is not None and impl.deterministic and impl.cost is not None
        assert impl.supports is cutlass_supports
    for op in ("bn_add_relu", "bn_add_relu_backward"):
        assert _registry.get_impl(op, "cutlass") is None
    why = be.available(torch.device("cpu"))
    assert why is not None  # CPU tensors (or a _C without the kernels): never available here
    if not torch.cuda.is_available():
        assert be.available(None) is not None


def test_cost_declaration():
    impl = _registry.get_impl("conv2d_epilogue", "cutlass")
    c = _call(N=2, Cin=16, H=9, W=9, Cout=24)
    launches, nbytes = impl.cost(c)
    # pack + one fused kernel; bytes: weight read twice + written once, x, out
    w = 24 * 16 * 9 * 2
    assert launches == 2 and nbytes == 3 * w + 2 * 16 * 81 * 2 + 2 * 24 * 81 * 2
    launches, nbytes_s = _registry.get_impl("conv2d_stats", "cutlass").cost(
        _call(N=2, Cin=16, H=9, W=9, Cout=24, stats=True))
    # pack + the statistics-epilogue kernel (y in bf16 + per-128-row-tile (mean, M2) partials: 162 rows
    # in 2 tiles) + the combine (reads them, writes mean and var); no float32 y
    partials = 2 * 2 * 24 * 4
    assert launches == 3 and nbytes_s == nbytes + 2 * partials + 2 * 24 * 4


def test_cost_declaration_weight_in_place():
    """A channels_last (or 1x1) weight is read in place (cuda_conv2d.in_place_ldw): no pack launch,
    the weight read once by the kernel."""
    c = _call(N=2, Cin=16, H=9, W=9, Cout=24)
    c.weight = c.weight.contiguous(memory_format=torch.channels_last)
    launches, nbytes = _registry.get_impl("conv2d_epilogue", "cutlass").cost(c)
    w = 24 * 16 * 9 * 2
    assert launches == 1 and nbytes == w + 2 * 16 * 81 * 2 + 2 * 24 * 81 * 2
    one = _call(N=2, Cin=16, H=9, W=9, Cout=24, k=1, padding=(0, 0))  # a contiguous 1x1 weight: KRSC already
    assert _registry.get_impl("conv2d_stats", "cutlass").cost(one)[0] == 1


@pytest.mark.parametrize("weight_layout, in_place", [("channels_last", True), ("1x1", True), ("contiguous", False),
                                                     ("channels_last-misaligned", False)])
def test_launcher_reads_the_weight_in_place(weight_layout, in_place, monkeypatch):
    """The launcher hands the kernel the weight's own memory as its KRSC matrix where it already is
    one (no pack_weight call), else the packed copy; ldw = KH*KW*Cin either way. The _C entry
    points are stubbed (no sm_90 GPU here): what is checked is the Conv2dArgs it would launch with."""
    from resnet_kernels.backends import cutlass_conv2d as cc

    launched, packs = [], []
    real_pack = cc.pack_weight

    class _Stub:
        Conv2dArgs = C_.Conv2dArgs

        @staticmethod
        def conv2d_sm90_workspace_bytes(args):
            return 0

    def pack(w):
        packs.append(w)
        return real_pack(w)

    monkeypatch.setattr(cc, "C_module", lambda: _Stub)
    monkeypatch.setattr(cc, "device_guard", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(cc, "stream_of", lambda t: 0)
    monkeypatch.setattr(cc, "call", lambda name, args: launched.append((name, args)))
    monkeypatch.setattr(cc, "pack_weight", pack)
    k = 1 if weight_layout == "1x1" else 3
    x = _nhwc(torch.randn(2, 16, 9, 9, dtype=torch.bfloat16))
    w = torch.randn(24, 16, k, k, dtype=torch.bfloat16)
    if weight_layout.startswith("channels_last"):
        w = w.contiguous(memory_format=torch.channels_last)
    if weight_layout.endswith("misaligned"):  # the same strides 2 bytes into a buffer: not 16-byte aligned
        buf = torch.empty(w.numel() + 1, dtype=w.dtype)
        w = buf[1:].as_strided(w.shape, w.stride()).copy_(w)
    pad = (k - 1) // 2
    out = _nhwc(torch.empty(2, 24, 9, 9, dtype=torch.bfloat16))
    cc.conv2d_forward(x, w, None, None, None, out, (1, 1), (pad, pad), False, False, False)
    (name, args), = launched
    assert name == "conv2d_sm90_forward" and args.ldw == k * k * 16
    if in_place:
        assert not packs and args.w == w.data_ptr()
    else:
        assert len(packs) == 1 and args.w != w.data_ptr()


def _args(**over):
    a = dict(dtype=2, x=4096, w=4096, scale=0, bias=0, residual=0, out=8192, mean=0, var=0, workspace=0,
             workspace_bytes=0, counters=0, counters_count=0, N=2, Cin=16, H=9, W=9, Cout=24, KH=3, KW=3, stride_h=1,
             stride_w=1, pad_h=1,
             pad_w=1, OH=9, OW=9, ldw=144, x_stride=[1296, 1, 144, 16], out_stride=[1944, 1, 216, 24],
             res_stride=[0, 0, 0, 0], relu=False, allow_tf32=False, stream=0, **NO_PROLOGUE)
    a.update(over)
    return cuda_common.fill_args(C_.Conv2dArgs, **a)


needs_kernels = pytest.mark.skipif(not HAS_SM90_KERNELS, reason="_C was built without the CUTLASS sm_90a kernels: "
                                   + str(getattr(C_, "sm90_note", "no _C")))


@needs_kernels
@pytest.mark.parametrize("over, match", [
    (dict(dtype=3), "float16, bfloat16 or float32"),
    (dict(dtype=0), "allow_tf32 must be true"),
    (dict(Cin=12, ldw=108, x_stride=[972, 1, 108, 12]), "Cin must be a multiple of 8"),
    (dict(Cout=20, out_stride=[1620, 1, 180, 20]), "Cout must be a multiple of 8"),
    (dict(dtype=0, allow_tf32=True, Cout=18, out_stride=[1458, 1, 162, 18]), "Cout must be a multiple of 4"),
    (dict(x_stride=[1296, 81, 9, 1]), "x must be channels_last"),
    (dict(out_stride=[1944, 81, 9, 1]), "out must be channels_last"),
    (dict(ldw=152), "ldw"),
    (dict(OH=8), "OH, OW"),
    (dict(x=4104), "16-byte aligned"),
    (dict(scale=4100), "scale and bias"),
    (dict(stride_h=9, stride_w=9, KH=1, KW=1, pad_h=0, pad_w=0, OH=1, OW=1, ldw=16,
          out_stride=[24, 1, 24, 24]), "stride must be <= 8"),
    (dict(mean=4096), "var"),
    (dict(mean=4096, var=4096, relu=True), "statistics"),
    (dict(x=0), "x is a null"),
])
def test_C_rejects_bad_arguments(over, match):
    for fn in (C_.conv2d_sm90_workspace_bytes, C_.conv2d_sm90_forward):
        with pytest.raises(ValueError, match=match):
            fn(_args(**over))


@needs_kernels
def test_C_workspace_bytes():
    assert C_.conv2d_sm90_workspace_bytes(_args()) % 256 == 0
    # statistics: the epilogue's per-tile (mean, M2) partials (2 tiles of 128 rows) only: no float32 y
    M, Cout = 2 * 81, 24
    need = C_.conv2d_sm90_workspace_bytes(_args(mean=4096, var=8192))
    assert (2 * 2 * Cout * 4 + 255) // 256 * 256 <= need < M * Cout * 4


@needs_kernels
@pytest.mark.parametrize("over", [
    dict(),
    dict(residual=1 << 20, res_stride=[1944, 1, 216, 24], scale=2048, bias=3072, relu=True, dtype=1),
    dict(mean=2048, var=3072),
    dict(Cin=8, H=23, W=21, KH=7, KW=7, stride_h=2, stride_w=2, pad_h=3, pad_w=3, OH=12, OW=11, ldw=392,
         x_stride=[3864, 1, 168, 8], out_stride=[3168, 1, 264, 24]),
    dict(KH=1, KW=1, stride_h=2, stride_w=2, pad_h=0, pad_w=0, OH=5, OW=5, ldw=16, out_stride=[600, 1, 120, 24]),
    dict(dtype=0, allow_tf32=True),  # float32 as TF32
    dict(dtype=0, allow_tf32=True, mean=2048, var=3072, Cout=20, out_stride=[1620, 1, 180, 20]),
])
def test_C_valid_arguments_pass_cutlass_checks_and_stop_at_the_device(over):
    """Valid arguments get through our validation and CUTLASS's host-side can_implement (run before
    the device check on purpose) and, without an sm_90 GPU, stop at the device check: an error naming
    the requirement, no launch."""
    if _sm90_gpu():
        pytest.skip("this machine has an sm_90 GPU")
    need = C_.conv2d_sm90_workspace_bytes(_args(**over))
    with pytest.raises((ValueError, RuntimeError), match="9.0|cudaGetDevice|no CUDA") as e:
        C_.conv2d_sm90_forward(_args(workspace=1 << 24, workspace_bytes=need, **over))
    assert "CUTLASS cannot implement" not in str(e.value)
