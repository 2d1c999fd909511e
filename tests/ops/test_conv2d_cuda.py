"""Parity of the CUDA implicit-GEMM convolution (csrc/conv2d.cu, launcher
resnet_kernels/backends/cuda_conv2d.py) with a float64 reference.

Reference: F.conv2d in float64 on the (exactly upcast) inputs, epilogue in float64.
Tolerance, elementwise:  |ours - ref| <= 2 * E_torch + FLOOR[mode] * max|ref|
  E_torch = the max error of PyTorch's own F.conv2d in the same dtype (same TF32 setting) with
            the epilogue applied in float64 and the result rounded to the dtype, measured here on
            the same data; our kernel should be no worse than twice that.
  FLOOR   = what one rounding costs even when E_torch happens to be tiny: half an ulp of the output
            dtype for float16/bfloat16 (kernel and reference may round to different neighbours:
            one ulp), the TF32 input rounding (2**-11) for TF32, and a few float32 ulps summed over
            K (2**-18) for exact float32 (3xTF32).
Statistics: mean/var vs the float64 statistics of the float64 convolution, tolerance 2x the error
of torch.var_mean over PyTorch's own convolution in the same dtype (upcast to float32 first)
plus FLOOR * (max|y| for the mean, max|y|**2 for the variance).

Outputs (and the launcher's mean/var and scratch) are poisoned with NaN by conftest, so an
element the kernel forgets to write fails.

Without a GPU the same tests run csrc/conv2d.cu's own source on CPU tensors through the host runner
(the ``cuda_target`` fixture, tests/host_runner.py); PyTorch's own error E_torch is then that of a
CPU convolution of the same dtype, and for TF32 that of a float64 convolution of the inputs rounded
to TF32 (what cuDNN's TF32 path computes), so the tolerance rule stays the same.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import rk_testing

from resnet_kernels import _alloc, testing
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cuda_common
from resnet_kernels.backends.cuda_conv2d import NO_PROLOGUE

C_ = get_C()

needs_gpu = rk_testing.needs_gpu("the CUDA convolution kernel")

# unit roundoffs from resnet_kernels.testing (tf32 keeps fp16's 10 mantissa bits); 3xTF32: 2**6 fp32 u
_U = testing.UNIT_ROUNDOFF
FLOOR = {"bf16": _U[torch.bfloat16], "fp16": _U[torch.float16], "tf32": _U[torch.float16],
         "fp32": 2 ** 6 * _U[torch.float32]}
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}

# (N, Cin, H, W, Cout, k, stride, pad): every ResNet conv type, odd sizes, N = 1, partial tiles
SHAPES = {
    "stem7x7s2": (2, 3, 23, 21, 64, 7, 2, 3),
    "3x3s1": (2, 16, 9, 11, 24, 3, 1, 1),
    "3x3s2": (1, 32, 11, 13, 40, 3, 2, 1),
    "1x1s1": (3, 64, 7, 7, 72, 1, 1, 0),
    "1x1s2": (2, 24, 9, 9, 130, 1, 2, 0),
    "3x3_cin12_cout3": (1, 12, 10, 9, 3, 3, 1, 1),
    "3x3_multi_mtile": (4, 8, 17, 17, 64, 3, 1, 1),
    "1x1_cin8": (1, 8, 5, 5, 16, 1, 1, 0),
    # 10 m tiles x 2 n tiles: a full band of 8 m tiles and a partial one (grouped CTA order)
    "3x3_grouped_order": (3, 8, 20, 20, 72, 3, 1, 1),
    # channel padding (Cp = 8 for 16-bit, 4 / 8 for fp32): the stem with N = 1, an odd Cin
    "stem7x7s2_n1": (1, 3, 15, 17, 16, 7, 2, 3),
    "5x5_cin5": (1, 5, 7, 7, 9, 5, 1, 2),
    # the 128 x 128 tile (16-bit channels_last, Cout >= 128): 9 m tiles (a full band and one more)
    # x 2 n tiles, the second partial
    "3x3_wide_tile": (2, 16, 23, 25, 200, 3, 1, 1),
    # ... with 128-byte K tiles (Cin % 64 == 0, K >= 256; tests/ops/test_conv2d_cuda_wide.py has
    # more): stride 2, N = 1, a partial n tile
    "3x3s2_wide_tile_k128": (1, 64, 9, 7, 136, 3, 2, 1),
}
EPILOGUES = {
    "plain": dict(scale=False, bias=False, residual=False, relu=False),
    "bn_relu": dict(scale=True, bias=True, residual=False, relu=True),
    "bn_add_relu": dict(scale=True, bias=True, residual=True, relu=True),
    "bias_add": dict(scale=False, bias=True, residual=True, relu=False),
}


_fmt = rk_testing.memory_format


def _poisoned(shape, dtype, layout, dev):
    return _alloc._fill(torch.empty(shape, dtype=dtype, device=dev, memory_format=_fmt(layout)))


def _make(shape_name, mode, layout, epi, dev):
    N, Cin, H, W, Cout, k, s, p = SHAPES[shape_name]
    dtype = DTYPE[mode]
    x = torch.randn(N, Cin, H, W, device=dev).to(dtype).contiguous(memory_format=_fmt(layout))
    w = (torch.randn(Cout, Cin, k, k, device=dev) / (Cin * k * k) ** 0.5).to(dtype)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    scale = torch.rand(Cout, device=dev) + 0.5 if epi["scale"] else None
    bias = torch.randn(Cout, device=dev) if epi["bias"] else None
    res = (torch.randn(N, Cout, OH, OW, device=dev).to(dtype).contiguous(memory_format=_fmt(layout))
           if epi["residual"] else None)
    return x, w, scale, bias, res, (s, s), (p, p), (N, Cout, OH, OW)


_epilogue64 = rk_testing.epilogue64


def _tf32(t):
    """float32 -> TF32 (round to nearest, ties away: cvt.rna.tf32.f32), as float32."""
    return ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _torch_conv(x, w, stride, pad, mode):
    """PyTorch's own convolution in the dtype (and TF32 setting) of ``mode``."""
    if not x.is_cuda:  # host runner: a CPU convolution; TF32 as cuDNN does it (rounded inputs)
        if mode == "tf32":
            return F.conv2d(_tf32(x).double(), _tf32(w).double(), None, stride, pad).float()
        return F.conv2d(x.float(), w.float(), None, stride, pad).to(x.dtype)
    with rk_testing.cudnn_tf32(mode == "tf32"):
        return F.conv2d(x, w, None, stride, pad)


def _launch(x, w, scale, bias, res, out, stride, pad, relu, stats, mode):
    from resnet_kernels.backends.cuda_conv2d import conv2d_forward

    r = conv2d_forward(x, w, scale, bias, res, out, stride, pad, relu, stats, mode == "tf32")
    if x.is_cuda:
        torch.cuda.synchronize()
    return r


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("epi", list(EPILOGUES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv2d_epilogue_matches_float64(shape, epi, mode, layout, cuda_target):
    e = EPILOGUES[epi]
    x, w, scale, bias, res, stride, pad, oshape = _make(shape, mode, layout, e, cuda_target)
    dtype = DTYPE[mode]
    out = _poisoned(oshape, dtype, layout, cuda_target)
    assert _launch(x, w, scale, bias, res, out, stride, pad, e["relu"], False, mode) is None
    ref = _epilogue64(F.conv2d(x.double(), w.double(), None, stride, pad), scale, bias, res, e["relu"])
    theirs = _epilogue64(_torch_conv(x, w, stride, pad, mode).double(), scale, bias, res, e["relu"]).to(dtype)
    e_torch = (theirs.double() - ref).abs().max().item()
    tol = 2 * e_torch + FLOOR[mode] * ref.abs().max().item()
    assert out.shape == oshape and out.dtype == dtype
    assert out.is_contiguous(memory_format=_fmt(layout))
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch's own error {e_torch:.3g})"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv2d_stats_matches_float64(shape, mode, layout, cuda_target):
    x, w, _, _, _, stride, pad, oshape = _make(shape, mode, layout, EPILOGUES["plain"], cuda_target)
    dtype = DTYPE[mode]
    out = _poisoned(oshape, dtype, layout, cuda_target)
    mean, var = _launch(x, w, None, None, None, out, stride, pad, False, True, mode)
    y64 = F.conv2d(x.double(), w.double(), None, stride, pad)
    rvar, rmean = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    tvar, tmean = torch.var_mean(_torch_conv(x, w, stride, pad, mode).float(), dim=(0, 2, 3), correction=0)
    ymax = y64.abs().max().item()
    tol_m = 2 * (tmean.double() - rmean).abs().max().item() + FLOOR[mode] * ymax
    tol_v = 2 * (tvar.double() - rvar).abs().max().item() + FLOOR[mode] * ymax ** 2
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert mean.shape == (oshape[1],) and var.shape == (oshape[1],)
    assert (mean.double() - rmean).abs().max().item() <= tol_m
    assert (var.double() - rvar).abs().max().item() <= tol_v
    # out == y (no epilogue) is written too
    ref = y64
    theirs = _torch_conv(x, w, stride, pad, mode)
    tol = 2 * (theirs.double() - ref).abs().max().item() + FLOOR[mode] * ymax
    assert (out.double() - ref).abs().max().item() <= tol
    # deterministic: a second run gives bit-identical statistics
    out2 = _poisoned(oshape, dtype, layout, cuda_target)
    mean2, var2 = _launch(x, w, None, None, None, out2, stride, pad, False, True, mode)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)
    assert torch.equal(out, out2)


# (N, Cin, H, W, Cout, k, stride, pad) -> the statistics merge's groups (csrc/conv2d.cu: groups of
# max(16, ceil(sqrt(m_tiles))) m-tiles of 128 rows): 17 tiles = 16 + 1, two 64-channel column tiles
# (the second partial); 25 tiles = 16 + 9 on the 128 x 128 tile; 44 tiles = 16 + 16 + 12, stride 2
MERGE_SHAPES = {
    "2_groups_last_1_tile": (1, 8, 17, 128, 72, 3, 1, 1),
    "2_groups_wide_tile": (2, 16, 40, 40, 136, 3, 1, 1),
    "3_groups_s2": (1, 8, 150, 150, 24, 3, 2, 1),
}


@pytest.mark.parametrize("mode, layout", [("bf16", "channels_last"), ("fp32", "nchw"), ("tf32", "channels_last")])
@pytest.mark.parametrize("shape", list(MERGE_SHAPES))
def test_conv2d_stats_merge_in_launch(shape, mode, layout, cuda_target, monkeypatch):
    """The statistics are merged in the convolution's launch by the last CTA to arrive on each
    (group, column tile) counter, then on each column tile's counter: parity with float64 across
    one and two merge levels and partial groups; the counters are all zero again afterwards (a fresh
    buffer first); on the host runner the CTAs run in blockIdx order and in 3 permutations, with
    bit-identical statistics and output (the merge order does not depend on who arrives last). The
    workspace's partials and mean/var are NaN-poisoned (tests' poison mode), so a partial read
    before it is written, or a channel never finalized, fails."""
    from resnet_kernels import _counters

    monkeypatch.setattr(_counters, "ARRIVAL_COUNTERS", {})
    N, Cin, H, W, Cout, k, s, p = MERGE_SHAPES[shape]
    dtype = DTYPE[mode]
    x = torch.randn(N, Cin, H, W, device=cuda_target).to(dtype).contiguous(memory_format=_fmt(layout))
    x = x + 3.0  # a mean well away from 0: the merge's Chan deltas matter
    w = (torch.randn(Cout, Cin, k, k, device=cuda_target) / (Cin * k * k) ** 0.5).to(dtype)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    m_tiles = -(-N * OH * OW // 128)
    group = max(16, int(math.ceil(math.sqrt(m_tiles))))
    assert -(-m_tiles // group) >= 2, "the shape must need the second merge level"

    def run(runner):
        out = _poisoned((N, Cout, OH, OW), dtype, layout, cuda_target)
        mean, var = _launch(x, w, None, None, None, out, (s, s), (p, p), False, True, mode)
        return out, mean, var

    results = rk_testing.in_cta_orders(run)
    out, mean, var = results[0]
    y64 = F.conv2d(x.double(), w.double(), None, (s, s), (p, p))
    rvar, rmean = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    tvar, tmean = torch.var_mean(_torch_conv(x, w, (s, s), (p, p), mode).float(), dim=(0, 2, 3), correction=0)
    ymax = y64.abs().max().item()
    tol_m = 2 * (tmean.double() - rmean).abs().max().item() + FLOOR[mode] * ymax
    tol_v = 2 * (tvar.double() - rvar).abs().max().item() + FLOOR[mode] * ymax ** 2
    assert not mean.isnan().any() and not var.isnan().any(), "a channel's statistics were never written"
    assert (mean.double() - rmean).abs().max().item() <= tol_m
    assert (var.double() - rvar).abs().max().item() <= tol_v
    for o, m, v in results[1:]:
        assert torch.equal(m, mean) and torch.equal(v, var) and torch.equal(o, out), "depends on the CTA order"
    assert _counters.ARRIVAL_COUNTERS and all(int(b.count_nonzero()) == 0 for b in _counters.ARRIVAL_COUNTERS.values())


def test_conv2d_stats_drops_counters_on_error(cuda_target, monkeypatch):
    """A launch that raises (it may have arrived partly) drops the cached counter buffer it used."""
    from resnet_kernels import _counters
    from resnet_kernels.backends import cuda_conv2d

    x = torch.randn(1, 8, 9, 9, device=cuda_target)
    w = torch.randn(8, 8, 3, 3, device=cuda_target)
    out = torch.empty(1, 8, 9, 9, device=cuda_target)
    cuda_conv2d.conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, True, False)
    key = _counters._counter_key(x.device)
    assert key in _counters.ARRIVAL_COUNTERS

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cuda_conv2d, "call", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cuda_conv2d.conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, True, False)
    assert key not in _counters.ARRIVAL_COUNTERS


def _conv_args(mod, **fields):
    return cuda_common.fill_args(mod.Conv2dArgs, **fields)


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_conv2d_mixed_strides_via_C(mode, cuda_target):
    """The C++ API takes any element strides: NCHW x (generic gather path even though Cin is a
    multiple of 8), channels_last out and an NCHW residual."""
    from resnet_kernels.backends.cuda_conv2d import pack_weight

    dev = cuda_target
    dtype = DTYPE[mode]
    N, Cin, H, W, Cout = 2, 16, 9, 10, 20
    x = torch.randn(N, Cin, H, W, device=dev).to(dtype)
    w = (torch.randn(Cout, Cin, 3, 3, device=dev) / 12).to(dtype)
    res = torch.randn(N, Cout, 5, 4, device=dev).to(dtype)
    out = _poisoned((N, Cout, 5, 4), dtype, "channels_last", dev)
    wm, ldw = pack_weight(w)
    ptr = cuda_common.ptr
    cuda_common.call("conv2d_forward", _conv_args(
        cuda_common.C_module(), dtype={torch.float32: 0, torch.bfloat16: 2}[dtype], x=ptr(x), w=ptr(wm), scale=0,
        bias=0, residual=ptr(res), out=ptr(out), mean=0, var=0, workspace=0, workspace_bytes=0, counters=0,
        counters_count=0, N=N, Cin=Cin, H=H, W=W, Cout=Cout, KH=3, KW=3, stride_h=2, stride_w=2, pad_h=1, pad_w=0,
        OH=5, OW=4, ldw=ldw,
        x_stride=list(x.stride()), out_stride=list(out.stride()), res_stride=list(res.stride()), relu=True,
        allow_tf32=False, stream=cuda_common.stream_of(x), **NO_PROLOGUE))
    if x.is_cuda:
        torch.cuda.synchronize()
    ref = torch.relu(F.conv2d(x.double(), w.double(), None, (2, 2), (1, 0)) + res.double())
    tol = FLOOR[mode] * 4 * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol


def _offset_view(shape, dtype, layout, dev, offset):
    """A NaN-filled (N, C, H, W) tensor of ``layout`` starting ``offset`` elements into its buffer."""
    N, C, H, W = shape
    buf = torch.full((N * C * H * W + offset,), float("nan"), dtype=dtype, device=dev)
    flat = buf[offset:]
    if layout == "channels_last":
        return flat.view(N, H, W, C).permute(0, 3, 1, 2)
    return flat.view(N, C, H, W)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_conv2d_unaligned_out_and_residual_via_C(mode, layout, cuda_target):
    """out and residual one element past a 16-byte boundary (OH*OW and Cout multiples of 8, so
    only the base breaks the alignment): the epilogue's 16-byte vectors fall back to element
    accesses, every element still written once and exact."""
    from resnet_kernels.backends.cuda_conv2d import pack_weight

    dev = cuda_target
    dtype = DTYPE[mode]
    N, Cin, H, W, Cout = 2, 16, 8, 8, 24
    x = torch.randn(N, Cin, H, W, device=dev).to(dtype).contiguous(memory_format=_fmt(layout))
    w = (torch.randn(Cout, Cin, 3, 3, device=dev) / 12).to(dtype)
    res = _offset_view((N, Cout, H, W), dtype, layout, dev, 1)
    res.copy_(torch.randn(N, Cout, H, W, device=dev))
    out = _offset_view((N, Cout, H, W), dtype, layout, dev, 1)
    wm, ldw = pack_weight(w)
    ptr = cuda_common.ptr
    cuda_common.call("conv2d_forward", _conv_args(
        cuda_common.C_module(), dtype={torch.float32: 0, torch.bfloat16: 2}[dtype], x=ptr(x), w=ptr(wm), scale=0,
        bias=0, residual=ptr(res), out=ptr(out), mean=0, var=0, workspace=0, workspace_bytes=0, counters=0,
        counters_count=0, N=N, Cin=Cin, H=H, W=W, Cout=Cout, KH=3, KW=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1,
        OH=H, OW=W, ldw=ldw,
        x_stride=list(x.stride()), out_stride=list(out.stride()), res_stride=list(res.stride()), relu=True,
        allow_tf32=False, stream=cuda_common.stream_of(x), **NO_PROLOGUE))
    if x.is_cuda:
        torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    ref = torch.relu(F.conv2d(x.double(), w.double(), None, 1, 1) + res.double())
    tol = FLOOR[mode] * 4 * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol


# ---- the weight read in place (cuda_conv2d.in_place_ldw): no pack where its memory already is the
# kernel's (Cout, ldw) matrix
@pytest.mark.parametrize("mode", list(DTYPE))
@pytest.mark.parametrize("shape", ["3x3s1", "3x3s2", "1x1s2", "3x3_wide_tile", "3x3s2_wide_tile_k128"])
def test_conv2d_in_place_weight_is_bitwise_the_packed_one(shape, mode, cuda_target, monkeypatch):
    """A channels_last weight (and a contiguous 1x1 one) is read in place, without pack_weight; the
    same weight NCHW-contiguous (3x3) or with a padded Cout stride (1x1) is packed. Outputs and
    statistics are bitwise the same either way: the kernel sees the same matrix."""
    from resnet_kernels.backends import cuda_conv2d

    packs = []
    real = cuda_conv2d.pack_weight
    monkeypatch.setattr(cuda_conv2d, "pack_weight", lambda w: packs.append(1) or real(w))
    x, w, _, _, _, stride, pad, oshape = _make(shape, mode, "channels_last", EPILOGUES["plain"], cuda_target)
    dtype = DTYPE[mode]
    k = w.shape[2]
    if k == 1:  # contiguous is in place; a Cout stride past K (rows 8 elements apart more) is packed
        w_in = w.contiguous()
        w_pk = torch.empty(w.shape[0], w.shape[1] + 8, 1, 1, dtype=dtype, device=cuda_target)[:, :w.shape[1]]
        w_pk.copy_(w)
    else:
        w_in = w.contiguous(memory_format=torch.channels_last)
        w_pk = w.contiguous()
    assert cuda_conv2d.in_place_ldw(w_in, dtype) == w.shape[1] * k * k
    assert cuda_conv2d.in_place_ldw(w_pk, dtype) == 0
    got = []
    for ww in (w_in, w_pk):
        out = _poisoned(oshape, dtype, "channels_last", cuda_target)
        n = len(packs)
        mean, var = _launch(x, ww, None, None, None, out, stride, pad, False, True, mode)
        got.append((out, mean, var, len(packs) - n))
    (o1, m1, v1, p1), (o2, m2, v2, p2) = got
    assert (p1, p2) == (0, 1)
    assert not o1.isnan().any(), "unwritten (NaN-poisoned) output elements"
    assert torch.equal(o1, o2) and torch.equal(m1, m2) and torch.equal(v1, v2)
    ref = F.conv2d(x.double(), w.double(), None, stride, pad)
    theirs = _torch_conv(x, w, stride, pad, mode)
    tol = 2 * (theirs.double() - ref).abs().max().item() + FLOOR[mode] * ref.abs().max().item()
    assert (o1.double() - ref).abs().max().item() <= tol


def _strided_weight(shape, strides, dtype, offset=0):
    n = offset + 1 + sum((d - 1) * st for d, st in zip(shape, strides))
    return torch.zeros(n, dtype=dtype).as_strided(shape, strides, offset)


_BF, _CL = torch.bfloat16, torch.channels_last
# (what, the weight, the activations' dtype, the expected ldw; 0: packed)
_IN_PLACE_CASES = [
    ("channels_last 3x3 bf16", torch.empty(8, 16, 3, 3, dtype=_BF).to(memory_format=_CL), _BF, 144),
    ("contiguous 1x1 bf16", torch.empty(8, 16, 1, 1, dtype=_BF), _BF, 16),
    ("contiguous 3x3: packed", torch.empty(8, 16, 3, 3, dtype=_BF), _BF, 0),
    ("the stem's Cin = 3: channel padding", torch.empty(8, 3, 7, 7, dtype=_BF).to(memory_format=_CL), _BF, 0),
    ("bf16 Cin = 12: channel padding to 16", torch.empty(8, 12, 3, 3, dtype=_BF).to(memory_format=_CL), _BF, 0),
    ("fp32 Cin = 4 3x3: K = 36 not a multiple of 8", torch.empty(8, 4, 3, 3).to(memory_format=_CL), torch.float32,
     0),
    ("fp32 Cin = 8 3x3", torch.empty(8, 8, 3, 3).to(memory_format=_CL), torch.float32, 72),
    ("another dtype than the activations", torch.empty(8, 16, 3, 3, dtype=_BF).to(memory_format=_CL),
     torch.float16, 0),
    ("a Cout stride past K", _strided_weight((8, 16, 1, 1), (24, 1, 1, 1), _BF), _BF, 0),
    ("a single row: any Cout stride", _strided_weight((1, 16, 1, 1), (24, 1, 1, 1), _BF), _BF, 16),
    ("2 bytes past a 16-byte boundary", _strided_weight((8, 16, 1, 1), (16, 1, 1, 1), _BF, 1), _BF, 0),
]


@pytest.mark.parametrize("case, w, dtype, want", _IN_PLACE_CASES, ids=[c[0] for c in _IN_PLACE_CASES])
def test_in_place_ldw_decides(case, w, dtype, want):
    from resnet_kernels.backends.cuda_conv2d import in_place_ldw

    assert in_place_ldw(w, dtype) == want, case


def test_conv2d_stats_empty_batch_is_nan(cuda_target):
    from resnet_kernels.backends.cuda_conv2d import conv2d_forward

    x = torch.randn(0, 8, 5, 5, device=cuda_target)
    w = torch.randn(4, 8, 3, 3, device=cuda_target)
    out = torch.empty(0, 4, 5, 5, device=cuda_target)
    mean, var = conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, True, False)
    assert mean.isnan().all() and var.isnan().all()


# ---- argument validation in the C++ API (raises before touching the device): on _C when it is
# built, and on the host runner's build of the same source
@pytest.fixture(params=["_C", "host"])
def api(request):
    if request.param == "_C":
        if C_ is None:
            pytest.skip("resnet_kernels._C is not built")
        return C_
    return request.getfixturevalue("host_runner_module")


def _valid_args(**over):
    a = dict(dtype=2, x=4096, w=4096, scale=0, bias=0, residual=0, out=8192, mean=0, var=0, workspace=0,
             workspace_bytes=0, counters=0, counters_count=0, N=2, Cin=3, H=9, W=9, Cout=8, KH=3, KW=3, stride_h=1,
             stride_w=1, pad_h=1,
             pad_w=1, OH=9, OW=9, ldw=72, x_stride=[243, 81, 9, 1], out_stride=[648, 81, 9, 1],
             res_stride=[0, 0, 0, 0], relu=False, allow_tf32=False, stream=0, **NO_PROLOGUE)
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(dtype=3), "float64"),
    (dict(dtype=7), "dtype"),
    (dict(x=0), "x is a null"),
    (dict(w=0), "w is a null"),
    (dict(out=0), "out is a null"),
    (dict(w=4100), "w must be 16-byte aligned"),
    (dict(Cin=0), "Cin"),
    (dict(KH=0), "KH"),
    (dict(stride_w=0), "stride_w"),
    (dict(pad_h=-1), "pad_h"),
    (dict(OH=8), "OH = 8"),
    (dict(OW=10), "OW = 10"),
    (dict(ldw=64), r"ldw = 64 must be >= K = KH\*KW\*Cp = 72"),
    (dict(ldw=76), "multiple of 8"),
    (dict(H=1, pad_h=0), "smaller than the kernel"),
    (dict(out_stride=[648, 81, 9, 2]), "out_stride"),
    (dict(out_stride=[648, 81, 9]), "out_stride must have 4"),
    (dict(x_stride=[243, -81, 9, 1]), "x_stride"),
    (dict(mean=4096), "var"),
    (dict(mean=4096, var=4096), "workspace"),
    (dict(mean=4096, var=4096, workspace=4096), r"counters \(statistics requested\)"),
    (dict(mean=4096, var=4096, workspace=4100, counters=4096), "workspace must be 8-byte aligned"),
    (dict(mean=4096, var=4096, workspace=4096, counters=4098), "counters must be 4-byte aligned"),
    (dict(mean=4096, var=4096, workspace=4096, counters=4096, workspace_bytes=4), "workspace_bytes"),
    (dict(mean=4096, var=4096, workspace=4096, counters=4096, workspace_bytes=256, counters_count=0),
     "counters_count = 0 < 1 required"),
    (dict(scale=4098), "scale"),
])
def test_conv2d_C_rejects_bad_arguments(over, match, api):
    with pytest.raises(ValueError, match=match):
        api.conv2d_forward(_conv_args(api, **_valid_args(**over)))


def test_conv2d_workspace_bytes(api):
    assert api.conv2d_workspace_bytes(N=2, OH=9, OW=9, Cout=8, compute_stats=False) == 0
    # 162 rows -> 2 tiles of 128 rows, one group (of up to 16 tiles): (mean, M2) float64 per group
    # and channel, then float32 per tile and channel
    assert api.conv2d_workspace_bytes(N=2, OH=9, OW=9, Cout=8, compute_stats=True) == 2 * 1 * 8 * 8 + 2 * 2 * 8 * 4
    # 40000 rows -> 313 tiles, groups of 18 (ceil(sqrt(313))) -> 18 groups
    assert api.conv2d_workspace_bytes(N=1, OH=200, OW=200, Cout=3, compute_stats=True) == \
        2 * 18 * 3 * 8 + 2 * 313 * 3 * 4
    with pytest.raises(ValueError, match="Cout"):
        api.conv2d_workspace_bytes(N=2, OH=9, OW=9, Cout=-1, compute_stats=True)
    # the declared cost's group count (resnet_kernels.backends._cuda_stat_groups) is the kernel's
    from resnet_kernels.backends import _cuda_stat_groups

    for rows in (1, 128, 129, 2048, 2049, 16 * 16 * 128, 16 * 16 * 128 + 1, 40000, 3211264):
        m_tiles = -(-rows // 128)
        groups = _cuda_stat_groups(m_tiles)
        assert api.conv2d_workspace_bytes(N=1, OH=1, OW=rows, Cout=5, compute_stats=True) == \
            2 * groups * 5 * 8 + 2 * m_tiles * 5 * 4, rows
        assert api.conv2d_stats_counters(N=1, OH=1, OW=rows, Cout=5, compute_stats=True) == \
            groups + (groups > 1), rows


def test_conv2d_stats_counters(api):
    """One counter per (group, 64-channel column tile), plus one per column tile with several groups."""
    assert api.conv2d_stats_counters(N=2, OH=9, OW=9, Cout=8, compute_stats=False) == 0
    assert api.conv2d_stats_counters(N=2, OH=9, OW=9, Cout=8, compute_stats=True) == 1
    assert api.conv2d_stats_counters(N=2, OH=9, OW=9, Cout=65, compute_stats=True) == 2
    # 16 tiles: one group; 17 tiles: groups of 16 -> 2 groups + the column counter
    assert api.conv2d_stats_counters(N=1, OH=16, OW=128, Cout=64, compute_stats=True) == 1
    assert api.conv2d_stats_counters(N=1, OH=17, OW=128, Cout=128, compute_stats=True) == (2 + 1) * 2
    assert api.conv2d_stats_counters(N=1, OH=200, OW=200, Cout=3, compute_stats=True) == 18 + 1
    with pytest.raises(ValueError, match="OH"):
        api.conv2d_stats_counters(N=2, OH=-1, OW=9, Cout=8, compute_stats=True)


# ---- planted bugs in the statistics merge's arrival (csrc/arrival.cuh; tests/host_runner.py ``build(patches=...)``)
_MERGE_BUGS = {
    # off by one: the next-to-last arrival merges, before the last CTA's partial is written (poisoned)
    "next_to_last_merges": [("    const int last = arrived == expected - 1;\n",
                             "    const int last = arrived == expected - 2;\n")],
    # the counter is not put back to 0: the next launch's counts are off
    "counter_not_reset": [("    if (last) *counter = 0;\n", "")],
}


@pytest.mark.parametrize("bug", list(_MERGE_BUGS))
def test_planted_merge_bugs_fail(bug, host_runner_module, monkeypatch):
    """What test_conv2d_stats_merge_in_launch checks catches a wrong arrival rule and a counter left
    dirty (on the host runner only: planted builds)."""
    import host_runner
    from resnet_kernels import _counters
    from resnet_kernels.backends.cuda_conv2d import conv2d_forward

    monkeypatch.setattr(_counters, "ARRIVAL_COUNTERS", {})
    # (arrival.cuh is every single-launch reduction's; only the convolution runs here)
    runner = host_runner.HostRunner(host_runner.build(patches={"arrival.cuh": _MERGE_BUGS[bug]}))
    N, Cin, H, W, Cout, k, s, p = MERGE_SHAPES["2_groups_last_1_tile"]
    x = torch.randn(N, Cin, H, W).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(Cout, Cin, k, k) / (Cin * k * k) ** 0.5).to(torch.bfloat16)
    rvar, rmean = torch.var_mean(F.conv2d(x.double(), w.double(), None, s, p), dim=(0, 2, 3), correction=0)
    with cuda_common.host_runner(runner):
        out = _poisoned((N, Cout, H, W), torch.bfloat16, "channels_last", "cpu")
        mean, var = conv2d_forward(x, w, None, None, None, out, (s, s), (p, p), False, True, False)
    wrong = mean.isnan().any() or (mean.double() - rmean).abs().max().item() > 1e-2
    dirty = any(int(b.count_nonzero()) for b in _counters.ARRIVAL_COUNTERS.values())
    if bug == "next_to_last_merges":  # the statistics are wrong (NaN: poisoned partials read)
        assert wrong, bug
    else:  # right this time, but the buffer is left dirty for the next launch
        assert dirty and not wrong, bug
