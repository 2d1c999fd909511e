"""The Triton implicit-GEMM conv launcher (``triton_ops/conv2d.py: conv2d_forward``), tested
directly against ``torch.nn.functional.conv2d`` in float64 plus the epilogue computed in float64.

Without a GPU this runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before the
kernels are imported); shapes are tiny so each launch is a few dozen programs at most. Every output
is allocated NaN-poisoned (``resnet_kernels._alloc`` in poison mode), so an element the kernel
does not write fails the comparison.

Tolerances (``_bound``), per element, derived from how the kernel computes rather than tuned:
  y = act(acc * scale + bias + residual), acc = sum_k x_k w_k over K = Cin*KH*KW terms in fp32.
  * accumulation: |acc - acc64| <= gamma * A with A = conv(|x|, |w|) (float64) and
      gamma = (K + 1) * 2**-24                           (fp32 adds; 16-bit products are exact in fp32,
                                                         fp32 products round once)
            + 2**-9   for fp32 with allow_tf32: the tensor cores read fp32 operands as tf32 by
                      dropping the low 13 mantissa bits (no cvt.rna in the PTX): < 2**-10 per operand
            + 2**-18  for fp32 without tf32 (3xTF32 on the GPU: the dropped lo*lo product and the
                      truncated lo parts are each < 2**-20 of |x w|)
    (the interpreter computes the dot in plain fp32, the GPU terms just make the bound cover both);
  * epilogue in fp32: 4 roundings of 2**-24 relative to |acc*scale| + |bias| + |residual|;
  * output rounding: U_OUT[dtype] * |y| (half an ulp: fp32 2**-24, fp16 2**-11, bf16 2**-8; the
    kernel rounds to nearest even also under the interpreter, whose own fp32->bf16 cast truncates,
    see ``triton_ops/_common.py: cast_for_store``); ReLU is 1-Lipschitz;
  * a floor of one subnormal spacing of the output dtype;
  and the sum is doubled as a safety margin. A missing or wrong tap is an error of order |x w| =
  A/K: for the shapes here that is > 30x the bound for fp32 (tf32 or not) and fp16, and ~2-4x for
  bf16, where the output rounding dominates (an indexing bug shows up in every dtype's cases).
Where PyTorch itself runs the conv in the same dtype on this device, the kernel's max error must
also stay within the project's policy (``resnet_kernels.testing.bound``: max(2x PyTorch's own max
error, the floor for K-term sums at the scale of max|y|)), with cuDNN's TF32 set like the kernel's.
Statistics: mean/var vs ``torch.var_mean`` (biased) of the float64 conv, with the accumulator
bound propagated (see ``_stats_tol``) plus M * 2**-24 relative for fp32 summation over M rows.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import rk_testing
from rk_testing import DEVICE, HAS_GPU, cudnn_tf32, interpreting

from resnet_kernels import testing

conv = importlib.import_module("resnet_kernels.triton_ops.conv2d")

# dtype ids: (torch dtype, allow_tf32)
DTYPES = {
    "fp32-tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
U_OUT = {dt: testing.UNIT_ROUNDOFF[dt] for dt in (torch.float32, torch.float16, torch.bfloat16)}
U32 = 2.0 ** -24

# every ResNet conv type, with odd sizes: (id, N, Cin, H, W, Cout, k, stride, pad)
CONV_TYPES = [
    ("stem7x7s2p3", 2, 3, 9, 11, 64, 7, 2, 3),
    ("3x3s1p1", 2, 16, 7, 7, 24, 3, 1, 1),
    ("3x3s2p1", 1, 5, 9, 9, 64, 3, 2, 1),
    ("1x1s1p0", 2, 16, 7, 5, 24, 1, 1, 0),
    ("1x1s2p0", 2, 5, 9, 9, 8, 1, 2, 0),
    ("3x3s1p1_cin40", 1, 40, 5, 5, 8, 3, 1, 1),  # chunked K loop with a partial channel chunk
    ("3x3s21p10", 2, 6, 9, 8, 16, 3, (2, 1), (1, 0)),  # unequal strides and paddings (H vs W mix-ups)
]
LAYOUTS = ["nchw", "channels_last"]


_fmt = rk_testing.memory_format


def _make(shape_id, dtype, layout, *, res=False, seed=0):
    _, n, cin, h, w, cout, k, s, p = next(c for c in CONV_TYPES if c[0] == shape_id)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    wt = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    (sh, sw), (ph, pw) = (s if isinstance(s, tuple) else (s, s)), (p if isinstance(p, tuple) else (p, p))
    oh, ow = (h + 2 * ph - k) // sh + 1, (w + 2 * pw - k) // sw + 1
    r = torch.randn(n, cout, oh, ow, generator=g).to(dtype) if res else None
    x = x.to(DEVICE).contiguous(memory_format=_fmt(layout))
    wt = wt.to(DEVICE)
    if r is not None:
        r = r.to(DEVICE).contiguous(memory_format=_fmt(layout))
    return x, wt, r, (sh, sw), (ph, pw)


def _poisoned_out(x, cout, oh, ow, layout):
    return rk_testing.poisoned((x.shape[0], cout, oh, ow), x.dtype, x.device, layout)


def _ref64(x, w, stride, padding):
    """float64 conv of the (already rounded) inputs, and A = conv(|x|, |w|) for the error bound."""
    xd, wd = x.detach().cpu().double(), w.detach().cpu().double()
    y = F.conv2d(xd, wd, stride=stride, padding=padding)
    a = F.conv2d(xd.abs(), wd.abs(), stride=stride, padding=padding)
    return y, a


def _gamma(dtype, allow_tf32, K):
    g = (K + 1) * U32
    if dtype == torch.float32:
        g += 2.0 ** -9 if allow_tf32 else 2.0 ** -18
    return g


def _epilogue64(y, scale, bias, res, relu):
    """(the float64 epilogue, and its per-channel scale, bias and residual for the bound)."""
    C = y.shape[1]
    s = scale.cpu().double().view(1, C, 1, 1) if scale is not None else torch.ones(1, C, 1, 1, dtype=torch.float64)
    b = bias.cpu().double().view(1, C, 1, 1) if bias is not None else torch.zeros(1, C, 1, 1, dtype=torch.float64)
    r = res.cpu().double() if res is not None else torch.zeros((), dtype=torch.float64)
    return rk_testing.epilogue64(y, scale, bias, res, relu), s, b, r


def _bound(dtype, allow_tf32, K, y, a, scale, bias, res, relu):
    out, s, b, r = _epilogue64(y, scale, bias, res, relu)
    acc_err = _gamma(dtype, allow_tf32, K) * a
    epi = 4 * U32 * ((y * s).abs() + b.abs() + r.abs())
    fi = torch.finfo(dtype)
    return out, 2 * (s.abs() * acc_err + epi + U_OUT[dtype] * out.abs()) + fi.tiny * fi.eps


def _check_close(got, want, bound, what=""):
    g = got.detach().cpu().double()
    assert not torch.isnan(g).any(), f"{what}: NaN in the output (unwritten elements?)"
    err = (g - want).abs()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; first at {i}: "
                             f"got {g[tuple(i)].item()}, want {want[tuple(i)].item()}, bound {bound[tuple(i)].item()}; "
                             f"max err {err.max().item()}")
    return err.max().item()


def _run(x, w, scale, bias, res, stride, padding, relu, stats, allow_tf32, layout, config=None):
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
    out = _poisoned_out(x, cout, oh, ow, layout)
    if config is None:
        ret = conv.conv2d_forward(x, w, scale, bias, res, out, stride, padding, relu, stats, allow_tf32)
    else:
        ret = conv._launch(x, w, scale, bias, res, out, stride, padding, relu, stats, allow_tf32, config=config)
    # layout preserved: the kernel wrote through out's strides
    assert out.is_contiguous(memory_format=_fmt(layout))
    return out, ret


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape_id", [c[0] for c in CONV_TYPES])
def test_conv_fused_epilogue(shape_id, dt, layout):
    """Every ResNet conv type x dtype x layout with the full epilogue: scale, bias, residual, ReLU."""
    dtype, tf32 = DTYPES[dt]
    x, w, r, stride, padding = _make(shape_id, dtype, layout, res=True)
    cout = w.shape[0]
    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(cout, generator=g) * 1.5 + 0.25).to(DEVICE)
    bias = torch.randn(cout, generator=g).to(DEVICE)
    out, ret = _run(x, w, scale, bias, r, stride, padding, True, False, tf32, layout)
    assert ret is None
    y, a = _ref64(x, w, stride, padding)
    want, bound = _bound(dtype, tf32, w[0].numel(), y, a, scale, bias, r, True)
    _check_close(out, want, bound, f"{shape_id} {dt} {layout}")
    assert (out.cpu() == 0).any() and (out.cpu() > 0).any(), "ReLU case should have both signs before the clamp"


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)),
                         ids=lambda f: "".join(n if on else "-" for n, on in zip(("S", "B", "R", "A"), f)))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_conv_epilogue_combinations(flags, dt):
    """All 16 combinations of scale / bias / residual / ReLU (3x3 s1, layouts alternating)."""
    has_scale, has_bias, has_res, relu = flags
    dtype, tf32 = DTYPES[dt]
    layout = LAYOUTS[sum(flags) % 2]
    x, w, r, stride, padding = _make("3x3s1p1", dtype, layout, res=has_res, seed=3)
    cout = w.shape[0]
    scale = (torch.rand(cout) * 2 - 0.5).to(DEVICE) if has_scale else None  # includes negative scales
    bias = torch.randn(cout).to(DEVICE) if has_bias else None
    out, ret = _run(x, w, scale, bias, r, stride, padding, relu, False, tf32, layout)
    assert ret is None
    y, a = _ref64(x, w, stride, padding)
    want, bound = _bound(dtype, tf32, w[0].numel(), y, a, scale, bias, r, relu)
    _check_close(out, want, bound, f"flags={flags} {dt}")


def _stats_tol(dtype, allow_tf32, K, y, a):
    """Per-channel tolerances for (mean, var) of y over M = N*OH*OW rows, from the elementwise
    accumulator bound e_i = gamma*A_i: |d mean| <= mean(e); |d var| <= 2 sqrt(var) rms(e) + mean(e^2)
    (var(y + e) - var(y) = 2 cov(y, e) + var(e)); plus fp32 summation over M terms (M * 2**-24 of
    the summed magnitudes: mean|y|, and var + mean(|y - mu| |y|) for the centred squares). x2 margin."""
    dims = (0, 2, 3)
    M = y.numel() // y.shape[1]
    e = _gamma(dtype, allow_tf32, K) * a
    var, mean = torch.var_mean(y, dim=dims, unbiased=False)
    mu = mean.view(1, -1, 1, 1)
    tol_mean = 2 * (e.mean(dims) + M * U32 * y.abs().mean(dims)) + 1e-30
    tol_var = 2 * (2 * var.sqrt() * e.pow(2).mean(dims).sqrt() + e.pow(2).mean(dims)
                   + M * U32 * (var + ((y - mu).abs() * y.abs()).mean(dims))) + 1e-30
    return mean, var, tol_mean, tol_var


def _torch_err(x, w, stride, padding, want, allow_tf32):
    """PyTorch's own max error in x's dtype on this device (None where it does not run), with
    cuDNN's TF32 as the kernel's (PyTorch's default on a GPU is TF32: an fp32 case would otherwise
    be held to a TF32-level error)."""
    try:
        with cudnn_tf32(allow_tf32):
            yt = F.conv2d(x, w, stride=stride, padding=padding)
    except RuntimeError:
        return None
    return (yt.cpu().double() - want).abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape_id", [c[0] for c in CONV_TYPES])
def test_conv_batch_stats(shape_id, dt, layout):
    """compute_stats: out == y = conv(x, w) and (mean, biased var) of y per channel."""
    dtype, tf32 = DTYPES[dt]
    x, w, _, stride, padding = _make(shape_id, dtype, layout, seed=5)
    out, ret = _run(x, w, None, None, None, stride, padding, False, True, tf32, layout)
    y, a = _ref64(x, w, stride, padding)
    K = w[0].numel()
    want, bound = _bound(dtype, tf32, K, y, a, None, None, None, False)
    err = _check_close(out, want, bound, f"{shape_id} {dt} {layout} y")
    if not (dtype == torch.float32 and tf32 and HAS_GPU):  # torch's CPU fp32 conv is not tf32: not comparable
        terr = _torch_err(x, w, stride, padding, want, tf32)
        if terr is not None:  # and the project's policy (resnet_kernels.testing) on top
            b = testing.bound(terr, want.abs().max().item(), dtype, K)
            assert err <= b, f"kernel max err {err} > {b} = max(2 x torch's own {terr}, floor)"

    mean, var = ret
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (w.shape[0],)
    rm, rv, tm, tv = _stats_tol(dtype, tf32, K, y, a)
    assert ((mean.cpu().double() - rm).abs() <= tm).all(), f"mean: max err {(mean.cpu().double() - rm).abs().max()}"
    assert ((var.cpu().double() - rv).abs() <= tv).all(), f"var: max err {(var.cpu().double() - rv).abs().max()}"


def test_conv_batch_stats_many_tiles_large_mean():
    """Many M tiles (more than one merge step of the statistics merge, a partial last tile: both
    asserted on every device) and a channel mean far from 0 relative to its spread: the per-tile
    two-step M2 + Chan merge must keep the small variance (a one-pass E[y^2] - E[y]^2 in fp32 would
    lose it)."""
    g = torch.Generator().manual_seed(7)
    # the interpreter: 32-row tiles, 4-tile merge steps; a GPU: 64- or 128-row tiles, 32-tile steps
    n, cin, h, cout = (2, 16, 19, 40) if interpreting() else (4, 16, 35, 40)
    x = (50.0 + 0.05 * torch.randn(n, cin, h, h, generator=g)).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.rand(cout, cin, 3, 3, generator=g) / 12).to(DEVICE)
    plan = conv._prepare(x, w, None, None, None, _poisoned_out(x, cout, h - 2, h - 2, "channels_last"), (1, 1),
                         (0, 0), False, True, False)
    assert plan.num_m_tiles > plan.constexprs["MERGE_T"] and plan.M % plan.config.BLOCK_M != 0, (
        f"not the regime of this test: {plan.num_m_tiles} tiles of {plan.config.BLOCK_M} rows for M = {plan.M}, "
        f"merge step {plan.constexprs['MERGE_T']}")
    out, (mean, var) = _run(x, w, None, None, None, (1, 1), (0, 0), False, True, False, "channels_last")
    y, a = _ref64(x, w, (1, 1), (0, 0))
    rm, rv, tm, tv = _stats_tol(torch.float32, False, w[0].numel(), y, a)
    assert (rm.abs() > 100 * rv.sqrt()).all()  # the regime this test is about
    assert ((mean.cpu().double() - rm).abs() <= tm).all()
    rel = ((var.cpu().double() - rv).abs() / rv).max().item()
    assert ((var.cpu().double() - rv).abs() <= tv).all(), f"var rel err {rel}"
    assert rel < 1e-2, f"var rel err {rel}"


def test_conv_bf16_output_rounds_to_nearest():
    """The bf16 output is the fp32 accumulator rounded to nearest even, as the GPU converts, also
    under the Triton interpreter, whose own fp32 -> bf16 cast truncates. Truncation pulled every
    output towards zero by half an ulp on average while the batch mean/var come from the fp32
    accumulator: BN-normalised values within an ulp of zero crossed the ReLU, and the flipped mask
    elements failed ``resnet-kernels check --dtypes bf16`` (conv_bn_act train, conv_bn_add_act).
    The fp32 accumulator differs from the float64 conv by < K * 2**-24 relative (K = 144 here),
    which changes the rounding only for values within that distance of a rounding midpoint: a
    handful of elements, against about half of them when truncating."""
    x, w, _, stride, padding = _make("3x3s1p1", torch.bfloat16, "channels_last", seed=19)
    out, _ = _run(x, w, None, None, None, stride, padding, False, True, False, "channels_last")
    y, _ = _ref64(x, w, stride, padding)
    want = y.to(torch.bfloat16)  # round to nearest even
    got = out.detach().cpu()
    assert (want != y).float().mean() > 0.9, "the conv outputs must not be exactly representable in bf16"
    bad = (got != want).float().mean().item()
    assert bad <= 0.02, f"{bad:.1%} of the bf16 outputs are not the accumulator rounded to nearest"
    # no systematic bias: the mean signed error, relative to |y|, is ~0 (truncation: about -2**-9)
    bias = ((got.double() - y) * y.sign() / y.abs().clamp_min(1e-30)).mean().item()
    assert abs(bias) < 2.0 ** -12, f"bf16 outputs biased by {bias:.2e} relative (towards zero when < 0)"


def test_conv_stats_deterministic():
    x, w, _, stride, padding = _make("3x3s1p1", torch.float32, "channels_last", seed=11)
    _, (m1, v1) = _run(x, w, None, None, None, stride, padding, False, True, True, "channels_last")
    _, (m2, v2) = _run(x, w, None, None, None, stride, padding, False, True, True, "channels_last")
    assert torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.parametrize("packed", [False, True], ids=["chunked", "packed"])
@pytest.mark.parametrize("shape_id", ["stem7x7s2p3", "3x3s2p1", "3x3s1p1", "1x1s2p0"])
def test_conv_k_loop_modes(shape_id, packed):
    """Both K-loop shapes on the same problem (forcing the one the heuristic would not pick)."""
    dtype = torch.float16
    layout = "channels_last" if packed else "nchw"
    x, w, r, stride, padding = _make(shape_id, dtype, layout, res=True, seed=13)
    base = conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(1, 1, 1, 1, 1, dtype)
    cfg = conv.ConvConfig(base.BLOCK_M, base.BLOCK_N, base.BLOCK_K, base.GROUP_M, base.num_warps,
                          base.num_stages, packed_k=packed)
    bias = torch.randn(w.shape[0]).to(DEVICE)
    out, _ = _run(x, w, None, bias, r, stride, padding, False, False, False, layout, config=cfg)
    y, a = _ref64(x, w, stride, padding)
    want, bound = _bound(dtype, False, w[0].numel(), y, a, None, bias, r, False)
    _check_close(out, want, bound, f"{shape_id} packed={packed}")


def test_conv_weight_layout_and_odd_strides():
    """A channels_last weight with an NCHW input (the launcher re-lays the weight out), a
    rectangular 3x1 kernel, unequal strides/paddings given as lists."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(1, 6, 8, 7, generator=g).to(DEVICE)
    w = torch.randn(10, 6, 3, 1, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    out, _ = _run(x, w, None, None, None, [2, 1], [1, 0], False, False, False, "nchw")
    y, a = _ref64(x, w, (2, 1), (1, 0))
    want, bound = _bound(torch.float32, False, w[0].numel(), y, a, None, None, None, False)
    _check_close(out, want, bound, "rect kernel")


def test_conv_interpreter_config():
    if interpreting():
        assert conv.select_config(10 ** 6, 512, 512, 3, 3, torch.bfloat16) == conv.INTERPRETER_CONFIG
    for arch in (80, 90):  # GPU heuristics: sane tiles for every dtype
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            cfg = _gpu_config(3211264, 64, 3, 7, 7, dt, arch)
            assert cfg.BLOCK_M >= 64 and cfg.BLOCK_K >= 16 and cfg.num_stages >= 2


def _gpu_config(*args):
    old = conv.INTERPRET
    conv.INTERPRET = False
    try:
        return conv.select_config(*args)
    finally:
        conv.INTERPRET = old




# ------------------------------------------------------------------------------------------------
# the statistics merge, in the conv's launch: two levels of fixed order, arrival counters

def _cdiv(a, b):
    return -(-a // b)


def test_conv_stats_many_tiles_takes_two_levels():
    """The regime of test_conv_batch_stats_many_tiles_large_mean (the interpreter's shape, and a
    GPU's 128-row tiles at 4x16x35x35) merges its statistics in both levels."""
    n, cin, h, cout = (2, 16, 19, 40) if interpreting() else (4, 16, 35, 40)
    x = torch.empty(n, cin, h, h, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.empty(cout, cin, 3, 3, device=DEVICE)
    out = _poisoned_out(x, cout, h - 2, h - 2, "channels_last")
    plan = conv._prepare(x, w, None, None, None, out, (1, 1), (0, 0), False, True, False)
    assert plan.num_groups == _cdiv(plan.num_m_tiles, plan.tiles_per_group) > 1, (
        plan.num_m_tiles, plan.tiles_per_group)


def test_stats_group_tiles():
    """Groups of 16..64 m-tiles (a multiple of 16), about sqrt(tiles): the two serial merges (a
    group's tiles, then the groups) stay short for ResNet-50 at batch 256 (128-row tiles: 25088
    tiles for the stem, 6272 at 56x56, ...); a function of the tile count only."""
    assert conv.stats_group_tiles(1) == conv.STATS_GROUP_MIN == 16
    for nt in (1, 2, 15, 16, 17, 98, 392, 1568, 6272, 25088, 10 ** 6):
        g = conv.stats_group_tiles(nt)
        assert conv.STATS_GROUP_MIN <= g <= conv.STATS_GROUP_MAX and g % conv.STATS_GROUP_STEP == 0, (nt, g)
        if conv.STATS_GROUP_MIN ** 2 <= nt <= conv.STATS_GROUP_MAX ** 2:
            assert g * g >= nt and (g - conv.STATS_GROUP_STEP) ** 2 < nt, (nt, g)  # ceil(sqrt) rounded up
    assert [conv.stats_group_tiles(nt) for nt in (98, 392, 1568, 6272, 25088)] == [16, 32, 48, 64, 64]
    assert _cdiv(25088, conv.stats_group_tiles(25088)) == 392
    for bn in (32, 64, 128, 256):
        t = conv.stats_merge_rows(bn)
        assert t >= 1 and t & (t - 1) == 0 and t * bn <= max(bn, conv.STATS_MERGE_ELEMS)


def _large_mean_case(seed=7):
    """A channels_last fp32 3x3 conv whose output channels have |mean| = 100..300 x std (x = 30 +
    randn, positive weights): 1 x 13 x 13 = 169 output rows, 6 tiles of the interpreter's 32 rows
    (the last one partial: 9 rows), and Cout = 40: two column tiles of 32, the second partial.
    Cin = 4 (the packed K loop, 3 steps: the interpreter stays fast)."""
    g = torch.Generator().manual_seed(seed)
    x = (30.0 + torch.randn(1, 4, 15, 15, generator=g)).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.rand(40, 4, 3, 3, generator=g) / 12).to(DEVICE)
    return x, w


def _counters_all_zero():
    from resnet_kernels import _counters
    return all(not b.any() for b in _counters.ARRIVAL_COUNTERS.values())


@pytest.mark.parametrize("tpg", [1, 4, None], ids=["group1", "group4", "default"])
def test_conv_stats_one_launch_fixed_order(tpg):
    """The statistics merged in the conv's own launch, with forced group sizes: 1 tile per group
    (6 groups: level 2 does all the work), 4 (2 groups, the last one of 2 tiles) and the default
    (16 under the interpreter: one group, no level 2); the last tile partial (9 of 32 rows) and a
    partial column tile. Against float64:
    * var_mean of the kernel's own fp32 output (= the fp32 accumulator: what the partials were
      computed from), with |mean| >= 100 x std: the merge keeps the variance to < 1e-4 relative
      (measured ~1e-5: the tile means' fp32 rounding, a few 2**-24 of |mean|, against their
      spread, about std / sqrt(32));
    * the float64 conv, within the accumulator-derived tolerance (``_stats_tol``).
    Bitwise identical across GROUP_M = 1, 4, 8 (other program orders: other programs arrive last
    and merge) and on a repeat; the arrival counters are all zero after every launch; the scratch
    is NaN-poisoned, so a merge that read an unwritten partial fails."""
    x, w = _large_mean_case()
    base = conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(1, 1, 1, 1, 1, torch.float32)
    results = []
    for group_m in (4, 1, 8, 4):
        cfg = conv.ConvConfig(base.BLOCK_M, base.BLOCK_N, base.BLOCK_K, group_m, base.num_warps, base.num_stages,
                              stats_group=tpg)
        out, (mean, var) = _run(x, w, None, None, None, (1, 1), (0, 0), False, True, False, "channels_last",
                                config=cfg)
        assert _counters_all_zero(), f"GROUP_M={group_m}: arrival counters not reset"
        results.append((out, mean, var))
    probe = _poisoned_out(x, 40, 13, 13, "channels_last")
    plan = conv._prepare(x, w, None, None, None, probe, (1, 1), (0, 0), False, True, False, config=cfg)
    if interpreting():
        assert plan.num_m_tiles == 6 and plan.M % plan.config.BLOCK_M == 9 and plan.cout % plan.config.BLOCK_N
        assert plan.num_groups == {1: 6, 4: 2, None: 1}[tpg], plan.num_groups
    out, mean, var = results[0]
    for o2, m2, v2 in results[1:]:
        assert torch.equal(mean, m2) and torch.equal(var, v2) and torch.equal(out, o2)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (40,)
    # the merge alone: against the float64 statistics of the fp32 values the partials came from
    v_own, m_own = torch.var_mean(out.detach().cpu().double(), dim=(0, 2, 3), unbiased=False)
    assert (m_own.abs() >= 100 * v_own.sqrt()).all()  # the regime this test is about
    md, vd = mean.cpu().double(), var.cpu().double()
    assert ((md - m_own).abs() <= 8 * U32 * m_own.abs()).all(), f"mean err {((md - m_own).abs() / m_own.abs()).max()}"
    rel = ((vd - v_own).abs() / v_own).max().item()
    assert rel < 1e-4, f"var rel err {rel}"
    # and the whole: against the float64 conv
    y, a = _ref64(x, w, (1, 1), (0, 0))
    rm, rv, tm, tv = _stats_tol(torch.float32, False, w[0].numel(), y, a)
    assert ((md - rm).abs() <= tm).all() and ((vd - rv).abs() <= tv).all()


def test_conv_stats_counters_dropped_after_a_failed_launch(monkeypatch):
    """A launch that raises (here after dirtying its arrival counters, as a kernel interrupted
    midway would) drops its cached counter buffer; the next call gets a zeroed one and the right
    statistics. An empty batch (M == 0) launches nothing and returns NaN statistics."""
    from resnet_kernels import _counters

    x, w = _large_mean_case(seed=9)
    cfg = dataclasses.replace(conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(
        1, 1, 1, 1, 1, torch.float32), stats_group=2)
    probe = _poisoned_out(x, 40, 13, 13, "channels_last")
    plan = conv._prepare(x, w, None, None, None, probe, (1, 1), (0, 0), False, True, False, config=cfg)
    assert plan.num_groups > 1
    key = plan.counter_key
    assert key in _counters.ARRIVAL_COUNTERS and plan.args[10] is plan.counters  # cnt_ptr

    class _Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[10][:3] = 1  # cnt_ptr: a partly-run launch leaves counters behind
                raise RuntimeError("injected launch failure")
            return launch

    with monkeypatch.context() as mp:
        mp.setattr(conv, "_conv2d_fwd_kernel", _Failing())
        with pytest.raises(RuntimeError, match="injected"):
            _run(x, w, None, None, None, (1, 1), (0, 0), False, True, False, "channels_last", config=cfg)
    assert key not in _counters.ARRIVAL_COUNTERS, "the dirty counter buffer is still cached"
    out, (mean, var) = _run(x, w, None, None, None, (1, 1), (0, 0), False, True, False, "channels_last", config=cfg)
    assert _counters_all_zero()
    v_own, m_own = torch.var_mean(out.detach().cpu().double(), dim=(0, 2, 3), unbiased=False)
    assert ((var.cpu().double() - v_own).abs() / v_own).max() < 1e-4
    assert ((mean.cpu().double() - m_own).abs() <= 8 * U32 * m_own.abs()).all()

    x0 = x[:0]
    out0, (mean0, var0) = _run(x0, w, None, None, None, (1, 1), (0, 0), False, True, False, "channels_last")
    assert out0.shape == (0, 40, 13, 13) and torch.isnan(mean0).all() and torch.isnan(var0).all()


# ------------------------------------------------------------------------------------------------
# the packed weight: layouts and the cache across calls

@pytest.mark.parametrize("kmajor", [False, True], ids=["n-major", "k-major"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape_id", ["stem7x7s2p3", "3x3s1p1_cin40", "1x1s2p0"])
def test_conv_weight_packing(shape_id, dt, kmajor):
    """Both packings of the weight operand (K- and N-contiguous) for both K loops, with stats."""
    dtype, tf32 = DTYPES[dt]
    layout = "channels_last" if kmajor else "nchw"
    x, w, _, stride, padding = _make(shape_id, dtype, layout, seed=23)
    base = conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(1, 1, 1, 1, 1, dtype)
    cfg = conv.ConvConfig(base.BLOCK_M, base.BLOCK_N, base.BLOCK_K, base.GROUP_M, base.num_warps,
                          base.num_stages, w_kmajor=kmajor)
    w2 = conv.pack_weight(w, kmajor)
    assert w2.shape == (w[0].numel(), w.shape[0]) and w2.stride()[0 if kmajor else 1] == 1
    out, (mean, var) = _run(x, w, None, None, None, stride, padding, False, True, tf32, layout, config=cfg)
    y, a = _ref64(x, w, stride, padding)
    K = w[0].numel()
    want, bound = _bound(dtype, tf32, K, y, a, None, None, None, False)
    _check_close(out, want, bound, f"{shape_id} {dt} kmajor={kmajor}")
    rm, rv, tm, tv = _stats_tol(dtype, tf32, K, y, a)
    assert ((mean.cpu().double() - rm).abs() <= tm).all() and ((var.cpu().double() - rv).abs() <= tv).all()


def test_conv_kmajor_pack_is_a_view_for_channels_last_weights():
    w = torch.randn(8, 5, 3, 3).to(DEVICE).contiguous(memory_format=torch.channels_last)
    assert conv.pack_weight(w, True).data_ptr() == w.data_ptr()
    assert conv._weight_kmajor(torch.float32) and not conv._weight_kmajor(torch.bfloat16)


WEIGHT_LAYOUTS = ["w_contiguous", "w_channels_last"]


def _expect_inplace(w, dtype):
    """Whether the launcher reads ``w`` in place (no pack), from the shapes: K-linear memory
    ((Cout, KH, KW, Cin) order: channels_last, or any 1x1) and, for 16-bit, a 16-byte row pitch."""
    cout, cin, kh, kw = w.shape
    klinear = w.is_contiguous(memory_format=torch.channels_last) or kh * kw == 1
    return klinear and (dtype == torch.float32 or (cin * kh * kw * w.element_size()) % 16 == 0)


@pytest.mark.parametrize("wlayout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape_id", [c[0] for c in CONV_TYPES])
def test_conv_weight_read_in_place(shape_id, dt, wlayout):
    """A weight whose memory already is the K-major operand (channels_last, or 1x1 with a unit Cin
    stride; 16-bit also needs a 16-byte-aligned row pitch) is read in place: the operand is a view
    of the weight (same address), no pack and no cache entry (the cache counters do not move);
    any other weight is packed as before. Parity (fused epilogue, then statistics) either way,
    outputs NaN-poisoned, channels_last activations."""
    from resnet_kernels import _weight_cache as wc

    dtype, tf32 = DTYPES[dt]
    x, w, r, stride, padding = _make(shape_id, dtype, "channels_last", res=True, seed=31)
    if wlayout == "w_channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    cout = w.shape[0]
    oh = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    probe = _poisoned_out(x, cout, oh, ow, "channels_last")
    wc.reset_stats()
    plan = conv._prepare(x, w, None, None, None, probe, stride, padding, False, True, tf32)
    inplace = _expect_inplace(w, dtype)
    assert (plan.args[1].data_ptr() == w.data_ptr()) == inplace, (shape_id, dt, wlayout)
    st = wc.stats()
    assert st["packs"] + st["uncached"] == (0 if inplace else 1) and st["hits"] == 0, st
    if inplace:
        K = w[0].numel()
        assert plan.args[1].shape == (K, cout) and plan.args[1].stride() == (1, w.stride(0))
    g = torch.Generator().manual_seed(3)
    scale = (torch.rand(cout, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(cout, generator=g).to(DEVICE)
    y, a = _ref64(x, w, stride, padding)
    K = w[0].numel()
    out, _ = _run(x, w, scale, bias, r, stride, padding, True, False, tf32, "channels_last")
    want, bound = _bound(dtype, tf32, K, y, a, scale, bias, r, True)
    _check_close(out, want, bound, f"{shape_id} {dt} {wlayout} fused")
    out, (mean, var) = _run(x, w, None, None, None, stride, padding, False, True, tf32, "channels_last")
    want, bound = _bound(dtype, tf32, K, y, a, None, None, None, False)
    _check_close(out, want, bound, f"{shape_id} {dt} {wlayout} stats")
    rm, rv, tm, tv = _stats_tol(dtype, tf32, K, y, a)
    assert ((mean.cpu().double() - rm).abs() <= tm).all() and ((var.cpu().double() - rv).abs() <= tv).all()


def test_conv_weight_in_place_cases():
    """Which weights the predicate accepts (ResNet-50 shapes, meta tensors)."""
    from resnet_kernels._weight_cache import conv_fwd_inplace_strides as f

    cl = torch.channels_last
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        w3 = torch.empty(64, 64, 3, 3, dtype=dt, device="meta")
        w1 = torch.empty(256, 64, 1, 1, dtype=dt, device="meta")
        assert f(w3, dt) is None                                   # (Cout, Cin, KH, KW): packed
        assert f(w3.contiguous(memory_format=cl), dt) == (1, 576)  # channels_last: in place
        assert f(w1, dt) == (1, 64) and f(w1.contiguous(memory_format=cl), dt) == (1, 64)
        stem = torch.empty(64, 3, 7, 7, dtype=dt, device="meta").contiguous(memory_format=cl)
        assert (f(stem, dt) is not None) == (dt == torch.float32)  # 16-bit: 147-element rows, packed
        assert f(w1, torch.float32 if dt != torch.float32 else torch.bfloat16) is None  # dtype mismatch


def _conv_check(x, w, what, stride=(1, 1), padding=(1, 1)):
    out, _ = _run(x, w, None, None, None, stride, padding, False, False, False, "channels_last")
    y, a = _ref64(x, w, stride, padding)
    want, bound = _bound(x.dtype, False, w[0].numel(), y, a, None, None, None, False)
    _check_close(out, want, bound, what)


def test_conv_weight_cache_reuse_and_invalidation():
    """The packed weight is cached across calls (counted) and repacked whenever the weight may
    have changed: an in-place edit, an SGD step, load_state_dict, .half(), a memory-format change;
    parity with the reference of the current weight after each."""
    from resnet_kernels import _weight_cache as wc

    m = torch.nn.Conv2d(6, 10, 3, padding=1, bias=False).to(DEVICE)
    x = torch.randn(2, 6, 5, 7).to(DEVICE).contiguous(memory_format=torch.channels_last)
    wc.reset_stats()

    def counts():
        s = wc.stats()
        return s["packs"], s["hits"]

    _conv_check(x, m.weight, "first")
    assert counts() == (1, 0)
    _conv_check(x, m.weight, "cached")
    assert counts() == (1, 1), "the second call must reuse the pack"
    with torch.no_grad():
        m.weight.mul_(-1.5)  # in-place edit
    _conv_check(x, m.weight, "after in-place edit")
    assert counts() == (2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.weight.grad = torch.randn_like(m.weight)
    opt.step()
    _conv_check(x, m.weight, "after an SGD step")
    assert counts() == (3, 1)
    _conv_check(x, m.weight, "cached again")
    assert counts() == (3, 2)
    m.load_state_dict({"weight": torch.randn(10, 6, 3, 3)})
    _conv_check(x, m.weight, "after load_state_dict")
    assert counts() == (4, 2)
    m.to(memory_format=torch.channels_last)  # new storage and strides: read in place, no pack
    _conv_check(x, m.weight, "after a memory-format change")
    assert counts() == (4, 2)
    m.half()  # channels_last fp16 with 54-element (108-byte) rows: not 16-byte aligned, packed
    _conv_check(x.half(), m.weight, "after .half()")
    assert counts() == (5, 2)


def test_conv_weight_cache_fresh_tensor_same_address():
    """A weight freed and a new one allocated (possibly at the same address, with version 0):
    the entry died with the old tensor, the new one is packed afresh."""
    from resnet_kernels import _weight_cache as wc

    x = torch.randn(1, 4, 6, 6).to(DEVICE).contiguous(memory_format=torch.channels_last)
    wc.reset_stats()
    entries = wc.stats()["entries"]
    for i in range(3):
        w = torch.randn(8, 4, 3, 3).to(DEVICE)
        _conv_check(x, w, f"fresh weight {i}")
        del w
    s = wc.stats()
    assert s["packs"] == 3 and s["hits"] == 0 and s["entries"] == entries


def test_conv_weight_cache_bypassed(monkeypatch):
    """No caching where the version counter cannot be trusted: inference tensors, a window into a
    larger storage, FSDP2 in use, or RESNET_KERNELS_WEIGHT_CACHE=0."""
    from torch.distributed import _composable_state as cs

    from resnet_kernels import _weight_cache as wc

    x = torch.randn(1, 4, 6, 6).to(DEVICE).contiguous(memory_format=torch.channels_last)
    big = torch.randn(2 * 8 * 4 * 9).to(DEVICE)
    with torch.inference_mode():
        w_inf = torch.randn(8, 4, 3, 3).to(DEVICE)
    w_win = big[8 * 4 * 9:].view(8, 4, 3, 3)
    w = torch.randn(8, 4, 3, 3).to(DEVICE)
    wc.reset_stats()
    for t in (w_inf, w_win, w_win):
        _conv_check(x, t, "uncached")
    assert wc.stats()["uncached"] == 3 and wc.stats()["hits"] == 0
    with torch.no_grad():
        big.mul_(2)  # also changes w_win's values
    _conv_check(x, w_win, "window after its base changed")
    monkeypatch.setattr(cs, "_module_state_mapping", {object(): None})
    _conv_check(x, w, "fsdp2")
    _conv_check(x, w, "fsdp2")
    monkeypatch.undo()
    monkeypatch.setenv("RESNET_KERNELS_WEIGHT_CACHE", "0")
    _conv_check(x, w, "disabled")
    s = wc.stats()
    assert s["uncached"] == 7 and s["hits"] == 0 and s["packs"] == 0


@pytest.mark.parametrize("kmajor", [False, True], ids=["n-major", "k-major"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape_id", ["3x3s1p1", "1x1s1p0", "3x3s1p1_cin40", "stem7x7s2p3"])
def test_conv_weight_tma_descriptor(shape_id, dt, kmajor):
    """The opt-in TMA weight path (ConvConfig.w_tma): the chunked K loop with Cin % BLOCK_K == 0
    reads the weight tiles through a tensor descriptor (Cout = 24: a partial channel tile, whose
    columns past Cout come back as zeros); a channel tail (Cin = 40) or the packed stem loop keeps
    the pointer loads. Parity with stats and the full epilogue either way."""
    dtype, tf32 = DTYPES[dt]
    x, w, r, stride, padding = _make(shape_id, dtype, "channels_last", res=True, seed=29)
    base = conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(1, 1, 1, 1, 1, dtype)
    cfg = conv.ConvConfig(base.BLOCK_M, base.BLOCK_N, base.BLOCK_K, base.GROUP_M, base.num_warps,
                          base.num_stages, w_kmajor=kmajor, w_tma=True)
    cout, cin = w.shape[0], w.shape[1]
    oh = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    probe = _poisoned_out(x, cout, oh, ow, "channels_last")
    plan = conv._prepare(x, w, None, None, None, probe, stride, padding, False, True, tf32, config=cfg)
    eligible = cin % cfg.BLOCK_K == 0 and not plan.constexprs["PACKED_K"]
    assert plan.constexprs["W_DESC"] == ((1 if kmajor else 2) if eligible else 0)
    g = torch.Generator().manual_seed(2)
    scale = (torch.rand(cout, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(cout, generator=g).to(DEVICE)
    out, _ = _run(x, w, scale, bias, r, stride, padding, True, False, tf32, "channels_last", config=cfg)
    y, a = _ref64(x, w, stride, padding)
    K = w[0].numel()
    want, bound = _bound(dtype, tf32, K, y, a, scale, bias, r, True)
    _check_close(out, want, bound, f"{shape_id} {dt} tma kmajor={kmajor}")
    out, (mean, var) = _run(x, w, None, None, None, stride, padding, False, True, tf32, "channels_last", config=cfg)
    want, bound = _bound(dtype, tf32, K, y, a, None, None, None, False)
    _check_close(out, want, bound, f"{shape_id} {dt} tma stats")
    rm, rv, tm, tv = _stats_tol(dtype, tf32, K, y, a)
    assert ((mean.cpu().double() - rm).abs() <= tm).all() and ((var.cpu().double() - rv).abs() <= tv).all()


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn-prologue"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape_id", ["3x3s1p1", "3x3s2p1", "stem7x7s2p3", "1x1s2p0"])
def test_conv_persistent_schedule(shape_id, dt, prologue):
    """The opt-in persistent schedule (ConvConfig.persistent): a grid of a few programs (off a GPU
    ``_NO_GPU_SMS`` per "SM"), each walking several output tiles, computes bitwise what one program
    per tile does: the output with the whole epilogue, and the statistics (the fixed-order merge,
    groups forced to 2 tiles so that a program's tiles span several groups) with the counters back
    at zero; the conv2d_bn_stats operand prologue too. The output is poisoned, so a tile that no
    program visits fails; and it matches the float64 reference."""
    dtype, tf32 = DTYPES[dt]
    x, w, r, stride, padding = _make(shape_id, dtype, "channels_last", res=True, seed=31)
    cout, cin = w.shape[0], w.shape[1]
    base = conv.INTERPRETER_CONFIG if interpreting() else conv.select_config(1, 1, 1, 1, 1, dtype)
    one = dataclasses.replace(base, stats_group=2)
    pers = dataclasses.replace(one, persistent=1)
    oh = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    plan = conv._prepare(x, w, None, None, None, _poisoned_out(x, cout, oh, ow, "channels_last"), stride, padding,
                         False, True, tf32, config=pers)
    tiles = plan.num_m_tiles * _cdiv(cout, pers.BLOCK_N)
    assert plan.constexprs["PERSISTENT"] and plan.grid[0] == min(tiles, conv._num_sms(x.device)), (plan.grid, tiles)
    if interpreting() and shape_id in ("3x3s1p1", "stem7x7s2p3"):
        assert tiles == 4 and plan.grid[0] == 2, "each of the 2 programs should walk 2 tiles here"
    g = torch.Generator().manual_seed(3)
    scale = (torch.rand(cout, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(cout, generator=g).to(DEVICE)
    if prologue:
        bn = (torch.randn(cin, generator=g).to(DEVICE), (torch.rand(cin, generator=g) + 0.5).to(DEVICE),
              torch.randn(cin, generator=g).to(DEVICE), torch.randn(cin, generator=g).to(DEVICE), 1e-5)
        got = []
        for cfg in (one, pers):
            out = _poisoned_out(x, cout, oh, ow, "channels_last")
            mean, var = conv._launch(x, w, None, None, None, out, stride, padding, False, True, tf32, config=cfg,
                                     bn=bn)
            assert _counters_all_zero()
            got.append((out, mean, var))
        assert not torch.isnan(got[1][0]).any(), "unwritten output elements"
        for a, b in zip(*got):
            assert torch.equal(a, b)
        return
    results = []
    for cfg in (one, pers):
        epi = _run(x, w, scale, bias, r, stride, padding, True, False, tf32, "channels_last", config=cfg)[0]
        out, (mean, var) = _run(x, w, None, None, None, stride, padding, False, True, tf32, "channels_last",
                                config=cfg)
        assert _counters_all_zero()
        results.append((epi, out, mean, var))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    y, a = _ref64(x, w, stride, padding)
    K = w[0].numel()
    want, bound = _bound(dtype, tf32, K, y, a, scale, bias, r, True)
    _check_close(results[1][0], want, bound, f"{shape_id} {dt} persistent epilogue")
    rm, rv, tm, tv = _stats_tol(dtype, tf32, K, y, a)
    mean, var = results[1][2], results[1][3]
    assert ((mean.cpu().double() - rm).abs() <= tm).all() and ((var.cpu().double() - rv).abs() <= tv).all()
