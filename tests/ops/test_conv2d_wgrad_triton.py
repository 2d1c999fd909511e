"""The Triton wgrad launcher (``triton_ops/conv2d_wgrad.py: conv2d_wgrad``), tested directly against
the contract's torch reference (``resnet_kernels.backends.torch_conv_backward.conv2d_wgrad``) run in
float64 on the same (dtype-rounded) inputs converted to float64.

Without a GPU this runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before the
kernels are imported); shapes are tiny. grad_weight and the split-K scratch are allocated
NaN-poisoned (``resnet_kernels._alloc`` in poison mode), so an element the kernel does not write
(a partial tile, or grad_weight by the last-arriving split of a tile) fails the comparison.

Tolerances (``_bound``), per element of gw, derived from how the kernel computes rather than tuned:
  the kernel computes dy in fp32, rounds it to the activation dtype, and sums K = N*OH*OW products
  dy * x in fp32 (per split, then the SPLITS partials in order), rounding the result once.
  * operand: with coef, dy = a*g' - (b + k*(y - mean)) takes 5 fp32 roundings relative to
      D = |a||g'| + |b| + |k|(|y| + |mean|), then the rounding to the activation dtype (U_ACT * |dy|):
      e_dy <= (5 * 2**-24 + U_ACT) * D; without coef dy = g' (or 0) is exact (e_dy = 0, D = |g'|);
  * accumulation: gamma * S with S = sum over the K terms of D * |x| (a float64 wgrad of D and
      |x|) and gamma = (K + SPLITS + 1) * 2**-24 (16-bit products are exact in fp32, fp32 products
      round once; SPLITS more adds in the reduce)
            + 2**-9   for fp32 with allow_tf32 (the tensor cores read tf32 by dropping 13 mantissa
                      bits: < 2**-10 per operand)
            + 2**-18  for fp32 without tf32 (3xTF32)
      (the interpreter computes the dot in plain fp32; the GPU terms just make the bound cover both);
  * output rounding: U_OUT * |gw| (half an ulp, round to nearest even also under the interpreter);
  * a floor of one subnormal spacing of the output dtype;
  the sum doubled as a safety margin. A dropped or misplaced pixel/tap changes an element by about
  S / K; ``test_wgrad_bound_catches_a_dropped_pixel`` asserts that this exceeds the bound for the
  cases here (fp32 and fp16 with coef; every dtype without coef, where dy is exact).
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import rk_testing
from rk_testing import DEVICE, interpreting

from resnet_kernels import _alloc, testing
from resnet_kernels.backends import torch_conv_backward as ref

wg = importlib.import_module("resnet_kernels.triton_ops.conv2d_wgrad")

# dtype ids: (torch dtype, allow_tf32)
DTYPES = {
    "fp32-tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
U = {dt: testing.UNIT_ROUNDOFF[dt] for dt in (torch.float32, torch.float16, torch.bfloat16)}
U32 = 2.0 ** -24

# (id, N, Cin, H, W, Cout, k, stride, pad); interpreter config: 32x32 tiles, 32-pixel chunks
SHAPES = [
    ("1x1s1", 2, 64, 5, 5, 24, 1, 1, 0),        # chunked columns, Cin a multiple of BLOCK_N (EVEN_C)
    ("1x1s2", 2, 8, 9, 9, 16, 1, 2, 0),         # chunked, partial channel chunk
    ("3x3s1p1", 2, 16, 6, 6, 24, 3, 1, 1),      # packed columns (N_gemm = 144)
    ("3x3s1p1_cin48", 1, 48, 5, 5, 8, 3, 1, 1),  # chunked, one full and one partial chunk per tap
    ("3x3s2p1", 1, 8, 9, 9, 40, 3, 2, 1),       # two row tiles (Cout = 40)
    ("stem7x7s2p3", 1, 3, 11, 11, 16, 7, 2, 3),  # packed (N_gemm = 147)
    ("odd3x3", 1, 3, 7, 7, 3, 3, 1, 1),         # C = 3, H = W = 7, N = 1: K = 49
    ("3x3s21p10", 2, 6, 9, 8, 16, 3, (2, 1), (1, 0)),       # unequal strides and paddings (H vs W mix-ups)
    ("5x3s12p21", 1, 4, 8, 9, 8, (5, 3), (1, 2), (2, 1)),   # a rectangular kernel
]
LAYOUTS = ["nchw", "channels_last"]
_fmt = rk_testing.memory_format


def _shape(shape_id):
    return next(c for c in SHAPES if c[0] == shape_id)


def _make(shape_id, dtype, g_layout, x_layout, *, mask=True, coef=True, seed=0):
    """(g, mask, y, mean, coef, x, grad_weight shape, stride, padding) on DEVICE."""
    _, n, cin, h, w, cout, k, s, p = _shape(shape_id)
    (kh, kw), (sh, sw), (ph, pw) = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    gen = torch.Generator().manual_seed(seed)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    g = torch.randn(n, cout, oh, ow, generator=gen).to(dtype)
    m = torch.randn(n, cout, oh, ow, generator=gen).to(dtype) if mask else None
    y = mean = cf = None
    if coef:
        y = (torch.randn(n, cout, oh, ow, generator=gen) + 0.5).to(dtype)
        mean = torch.randn(cout, generator=gen) * 0.5
        cf = torch.stack([torch.rand(cout, generator=gen) + 0.5, torch.randn(cout, generator=gen) * 0.1,
                          torch.randn(cout, generator=gen) * 0.2])
        mean, cf = mean.to(DEVICE), cf.to(DEVICE)
    gl = lambda t: None if t is None else t.to(DEVICE).contiguous(memory_format=_fmt(g_layout))  # noqa: E731
    x = x.to(DEVICE).contiguous(memory_format=_fmt(x_layout))
    return gl(g), gl(m), gl(y), mean, cf, x, (cout, cin, kh, kw), (sh, sw), (ph, pw)


def _poisoned_gw(shape, dtype, layout="nchw"):
    gw = _alloc.empty_like(torch.empty(shape, dtype=dtype, device=DEVICE, memory_format=_fmt(layout)))
    assert torch.isnan(gw).all(), "outputs must be poisoned (conftest poison mode)"
    return gw


def _run(case, allow_tf32, config=None, gw_layout="nchw"):
    g, m, y, mean, cf, x, wshape, stride, padding = case
    gw = _poisoned_gw(wshape, x.dtype, gw_layout)
    plan = wg._launch(g, m, y, mean, cf, x, gw, stride, padding, allow_tf32, config=config)
    assert gw.is_contiguous(memory_format=_fmt(gw_layout))
    return gw, plan


def _d64(t):
    return None if t is None else t.detach().cpu().double()


def _ref64(case):
    """(want, S): the contract's reference in float64 on the float64 inputs, and S = sum over
    the K terms of D * |x| (the magnitude the bound scales with; D see the module docstring)."""
    g, m, y, mean, cf, x, wshape, stride, padding = (_d64(t) if isinstance(t, torch.Tensor) else t for t in case)
    want = torch.empty(wshape, dtype=torch.float64)
    ref.conv2d_wgrad(g, m, y, mean, cf, x, want, stride, padding, False)
    gp = g if m is None else torch.where(m > 0, g, torch.zeros((), dtype=torch.float64))
    if cf is None:
        d = gp.abs()
    else:
        col = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        d = col(cf[0].abs()) * gp.abs() + col(cf[1].abs()) + col(cf[2].abs()) * (y.abs() + col(mean.abs()))
    s = torch.nn.grad.conv2d_weight(x.abs(), wshape, d, stride=stride, padding=padding)
    return want, s


def _bound(dtype, allow_tf32, K, splits, has_coef, want, s):
    gamma = (K + splits + 1) * U32
    if dtype == torch.float32:
        gamma += 2.0 ** -9 if allow_tf32 else 2.0 ** -18
    e_op = (5 * U32 + U[dtype]) if has_coef else 0.0
    fi = torch.finfo(dtype)
    return 2 * ((gamma + e_op) * s + U[dtype] * want.abs()) + fi.tiny * fi.eps


def _check(case, dt, config=None, what="", gw_layout="nchw"):
    dtype, tf32 = DTYPES[dt]
    gw, plan = _run(case, tf32, config, gw_layout)
    want, s = _ref64(case)
    g = case[0]
    K = g.shape[0] * g.shape[2] * g.shape[3]
    bound = _bound(dtype, tf32, K, plan.splits, case[4] is not None, want, s)
    got = gw.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{what}: NaN in grad_weight (unwritten elements?)"
    err = (got - want).abs()
    bad = err > bound
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; first at {i}: "
                             f"got {got[i].item()}, want {want[i].item()}, bound {bound[i].item()}; "
                             f"max err {err.max().item()}")
    return gw, plan


def _cfg(**kw):
    base = wg.INTERPRETER_CONFIG if interpreting() else wg.select_config(1, 1, 1, 1, 1, torch.float16)
    return wg.WgradConfig(base.BLOCK_M, base.BLOCK_N, base.BLOCK_K, base.GROUP_M, base.num_warps,
                          base.num_stages, **kw)


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape_id", [c[0] for c in SHAPES if c[0] != "3x3s1p1_cin48"])
def test_wgrad_shapes_dtypes(shape_id, dt):
    """Every ResNet conv type (and odd sizes) x dtype, with the full operand (mask and coef);
    g and x layouts vary with the case; 3 splits (the interpreter's heuristic would take 1).
    (3x3s1p1_cin48, 18 column tiles, runs in fp16 and fp32 in the layout and column-mode tests.)"""
    dtype, _ = DTYPES[dt]
    i = [c[0] for c in SHAPES].index(shape_id) + list(DTYPES).index(dt)
    g_layout, x_layout = LAYOUTS[i % 2], LAYOUTS[(i // 2) % 2]
    case = _make(shape_id, dtype, g_layout, x_layout, seed=i)
    _check(case, dt, _cfg(splits=3), f"{shape_id} {dt} g:{g_layout} x:{x_layout}")


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("operand", ["plain", "mask", "coef", "mask+coef"])
def test_wgrad_operand_variants(operand, dt):
    """dy = g, g * (mask > 0), the BN-backward operand without and with the mask (3x3 stride 2)."""
    dtype, _ = DTYPES[dt]
    case = _make("3x3s2p1", dtype, "channels_last", "nchw", mask="mask" in operand, coef="coef" in operand,
                 seed=3)
    _check(case, dt, _cfg(splits=2), f"{operand} {dt}")


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_wgrad_operand_rounded_to_activation_dtype(dt):
    """dy is rounded to the activation dtype before the dot, as cuDNN would read it: against the
    contract's reference on the 16-bit inputs with the convolution in float64 (``conv_dtype``:
    dy computed in fp32 and rounded as the kernel does, then summed exactly) the error is the
    accumulation and the output rounding only, without the operand term of ``_bound``. An
    unrounded fp32 operand misses this by ~sqrt(K) roundings of 2**-11 (fp16) per term. On a GPU
    the fp32 dy may differ by an FMA contraction (an fp32 ulp), which can flip the 16-bit rounding
    of a term: an allowance of 8 terms at the largest |dy x| there."""
    dtype, _ = DTYPES[dt]
    case = _make("3x3s1p1", dtype, "channels_last", "nchw", seed=37)
    gw, plan = _run(case, False, _cfg(splits=2))
    g, m, y, mean, cf, x, wshape, stride, padding = case
    want = torch.empty(wshape, dtype=torch.float64)
    ref.conv2d_wgrad(g.cpu(), m.cpu(), y.cpu(), mean.cpu(), cf.cpu(), x.cpu(), want, stride, padding, False,
                     conv_dtype=torch.float64)
    _, s = _ref64(case)
    K = g.shape[0] * g.shape[2] * g.shape[3]
    bound = _bound(dtype, False, K, plan.splits, False, want, s)
    if not interpreting():
        dmax = ref.bn_dy(*(_d64(t) for t in case[:5]), torch.float64).abs().max()
        bound = bound + 16 * U[dtype] * dmax * _d64(x).abs().max()
    err = (gw.cpu().double() - want).abs()
    assert (err <= bound).all(), f"max err {err.max().item()}, max excess {(err - bound).max().item()}"
    # and the float64 operand (not rounded) is measurably different: the check can fail
    want64, _ = _ref64(case)
    assert ((want64 - want).abs() > bound).any()


@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("g_layout", LAYOUTS)
@pytest.mark.parametrize("shape_id", ["3x3s1p1_cin48", "stem7x7s2p3"])
def test_wgrad_layouts(shape_id, g_layout, x_layout):
    """g (with mask and y) and x in each layout independently, both column shapes."""
    case = _make(shape_id, torch.float16, g_layout, x_layout, seed=5)
    _check(case, "fp16", None, f"{shape_id} g:{g_layout} x:{x_layout}")


@pytest.mark.parametrize("packed", [False, True], ids=["chunked", "packed"])
@pytest.mark.parametrize("shape_id", ["3x3s1p1", "3x3s1p1_cin48", "1x1s2", "5x3s12p21"])
def test_wgrad_column_modes(shape_id, packed):
    """Both column shapes on the same problem (forcing the one the heuristic would not pick)."""
    case = _make(shape_id, torch.float32, "channels_last", "channels_last", seed=7)
    _, plan = _check(case, "fp32", _cfg(packed_n=packed), f"{shape_id} packed={packed}")
    assert plan.constexprs["PACKED_N"] == packed


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 7])
def test_wgrad_splits(splits):
    """Split counts: one (grad_weight stored directly, no scratch, no counters), and several whose
    pixel ranges do not divide K = 98 or the 32-pixel chunk (split boundaries inside a chunk); the
    tile counters are back to zero after the call."""
    case = _make("3x3s1p1", torch.float32, "nchw", "channels_last", seed=11)
    _, plan = _check(case, "fp32", _cfg(splits=splits), f"splits={splits}")
    assert plan.splits == splits and (plan.part is None) == (splits == 1)
    assert (plan.counters is None) == (splits == 1) and plan.constexprs["SPLIT_K"] == (splits > 1)
    if splits > 1:
        cfg = plan.config
        assert plan.part.shape == (splits, plan.grid[0], cfg.BLOCK_M, cfg.BLOCK_N)  # whole tiles, tile-major
        assert 98 % plan.p_per_split != 0 or plan.p_per_split % plan.config.BLOCK_K != 0
        assert not plan.counters.any()


def _ordered_sum(plan, gw):
    """grad_weight from the scratch the launch left behind: the partial tiles added in split order
    (0, 1, ..., SPLITS-1) in fp32, rounded once to gw's dtype, each tile put back where the
    kernel's grouped tile order and column mode (packed or chunked) place it."""
    cout, cin, kh, kw = gw.shape
    cfg = plan.config
    bm, bn, gm = cfg.BLOCK_M, cfg.BLOCK_N, cfg.GROUP_M
    tot = plan.part[0].clone()
    for s in range(1, plan.splits):
        tot += plan.part[s]
    tot = tot.cpu()
    ncol = cin * kh * kw
    flat = torch.full((cout, ncol), float("nan"), dtype=torch.float32)  # columns in (kh, kw, ci) order
    num_pid_m = -(-cout // bm)
    num_pid_n = plan.grid[0] // num_pid_m
    for pid in range(plan.grid[0]):
        in_group = gm * num_pid_n
        first_m = (pid // in_group) * gm
        size_m = min(num_pid_m - first_m, gm)
        pid_m, pid_n = first_m + (pid % in_group) % size_m, (pid % in_group) // size_m
        rows = torch.arange(pid_m * bm, min(cout, (pid_m + 1) * bm))
        if plan.constexprs["PACKED_N"]:
            cols = torch.arange(pid_n * bn, min(ncol, (pid_n + 1) * bn))
        else:
            num_cb = -(-cin // bn)
            c0 = (pid_n % num_cb) * bn
            cols = (pid_n // num_cb) * cin + torch.arange(c0, min(cin, c0 + bn))
        flat[rows[:, None], cols[None, :]] = tot[pid, : len(rows), : len(cols)]
    assert not torch.isnan(flat).any(), "some grad_weight element is in no tile"
    return flat.view(cout, kh, kw, cin).permute(0, 3, 1, 2).to(gw.dtype).to(gw.device)


@pytest.mark.parametrize("shape_id,dt,splits", [("3x3s1p1_cin48", "fp32", 4), ("3x3s2p1", "bf16", 7),
                                                 ("stem7x7s2p3", "fp16", 3)])
def test_wgrad_split_k_fixed_order(shape_id, dt, splits):
    """Split-K over several tiles (18 chunked column tiles; two row tiles; 5 packed column tiles):
    grad_weight is bitwise the fp32 sum of the SPLITS partials in split order, rounded once,
    whichever program of a tile arrived last; repeated launches are bitwise identical; every
    tile counter is back to zero."""
    dtype, tf32 = DTYPES[dt]
    case = _make(shape_id, dtype, "channels_last", "nchw", seed=41)
    gw1, plan = _check(case, dt, _cfg(splits=splits), f"{shape_id} {dt} splits={splits}")
    assert plan.splits == splits and plan.grid[0] >= 2, plan.grid
    assert torch.equal(gw1, _ordered_sum(plan, gw1))
    assert not plan.counters[:plan.grid[0]].any() and not plan.counters.any()
    for _ in range(2):
        gw2, plan2 = _run(case, tf32, _cfg(splits=splits))
        assert torch.equal(gw1, gw2)
        assert plan2.counters is plan.counters  # one cached buffer (same stream)
        assert not plan2.counters.any()


def test_wgrad_heuristic_splits():
    """The launcher's own split choice (chunk-aligned pixel ranges) on a problem long enough for
    several splits under the interpreter's constants."""
    case = _make("odd3x3", torch.bfloat16, "channels_last", "nchw", seed=13)
    g = case[0]
    npix = g.shape[0] * g.shape[2] * g.shape[3]
    tiles = 1  # Cout = 3, N_gemm = 27: one tile
    splits, per = (wg.choose_splits(tiles, npix, wg.INTERPRETER_CONFIG.BLOCK_K, wg.TARGET_PROGRAMS, wg.MIN_SPLIT_ITERS)
                  if interpreting() else (None, None))
    _, plan = _check(case, "bf16", None, "heuristic")
    if interpreting():
        assert (plan.splits, plan.p_per_split) == (splits, per)
        assert plan.p_per_split % plan.config.BLOCK_K == 0


def test_wgrad_grad_weight_channels_last():
    """grad_weight is written through its strides (a channels_last weight's gradient), in both
    the direct store (one split) and the last-arriving split's store (split-K)."""
    for splits in (1, 3):
        case = _make("3x3s2p1", torch.bfloat16, "nchw", "channels_last", seed=17)
        _check(case, "bf16", _cfg(splits=splits), f"gw channels_last splits={splits}", gw_layout="channels_last")


def test_wgrad_deterministic():
    """Repeated runs give bitwise identical grad_weight (fixed split-K order; the only atomic is the
    tile's arrival counter, which decides who sums, not the order of the sum). On a GPU the
    programs of a tile arrive in varying orders, so the repeats test that; the interpreter runs
    them in grid order (``test_wgrad_split_k_fixed_order`` checks the order of the sum itself)."""
    repeats = 2 if interpreting() else 10
    for shape_id, splits in (("3x3s1p1", None), ("3x3s1p1", 4), ("3x3s1p1_cin48", 5)):
        case = _make(shape_id, torch.float32, "channels_last", "channels_last", seed=19)
        gw1, _ = _run(case, True, _cfg(splits=splits) if splits else None)
        for _ in range(repeats - 1):
            gw2, _ = _run(case, True, _cfg(splits=splits) if splits else None)
            assert torch.equal(gw1, gw2), shape_id


def test_wgrad_counters_reused_across_shapes():
    """One cached counter buffer serves launches of different shapes and tile counts on one
    stream (no zeroing launch per call): after every call it is all zero again, and results stay
    right when a launch with fewer tiles follows one with more, and back."""
    runs = [("3x3s1p1_cin48", "fp16", 3), ("3x3s2p1", "fp32", 5), ("1x1s1", "bf16", 2), ("3x3s1p1_cin48", "fp16", 6)]
    bufs = []
    for i, (shape_id, dt, splits) in enumerate(runs):
        case = _make(shape_id, DTYPES[dt][0], "nchw", "channels_last", seed=43 + i)
        _, plan = _check(case, dt, _cfg(splits=splits), f"run {i}: {shape_id} {dt} splits={splits}")
        assert plan.counter_key in wg._COUNTERS and wg._COUNTERS[plan.counter_key] is plan.counters
        assert not plan.counters.any(), f"run {i}: counters not reset"
        bufs.append(plan.counters)
    assert all(b is bufs[0] for b in bufs), "the counter buffer was reallocated between calls"


def test_wgrad_counters_grow_and_are_dropped_after_a_failed_launch(monkeypatch):
    """The cache grows a too-small buffer (zeroed); a launch that raises (here after dirtying its
    counters, as a kernel interrupted midway would) drops its buffer, and the next call gets a
    zeroed one and the right result."""
    dev = torch.device(DEVICE)
    small, key = wg._counters(dev, 4)
    assert small.dtype == torch.int32 and small.numel() >= 4 and not small.any()
    big, key2 = wg._counters(dev, small.numel() + 1)
    assert key2 == key and big.numel() > small.numel() and not big.any() and wg._COUNTERS[key] is big

    case = _make("3x3s2p1", torch.float32, "nchw", "nchw", seed=47)

    class _Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[8][: grid[0]] = 1  # cnt_ptr: a partly-run launch leaves counters behind
                raise RuntimeError("injected launch failure")
            return launch

    with monkeypatch.context() as mp:
        mp.setattr(wg, "_conv2d_wgrad_kernel", _Failing())
        with pytest.raises(RuntimeError, match="injected"):
            _run(case, False, _cfg(splits=3))
    assert key not in wg._COUNTERS, "the dirty counter buffer is still cached"
    _, plan = _check(case, "fp32", _cfg(splits=3), "after a failed launch")
    assert plan.counters is not big and not plan.counters.any()


def test_wgrad_conv_dtype_ignored():
    case = _make("1x1s2", torch.float16, "nchw", "nchw", seed=23)
    g, m, y, mean, cf, x, wshape, stride, padding = case
    gw1 = _poisoned_gw(wshape, x.dtype)
    gw2 = _poisoned_gw(wshape, x.dtype)
    wg.conv2d_wgrad(g, m, y, mean, cf, x, gw1, stride, padding, False)
    wg.conv2d_wgrad(g, m, y, mean, cf, x, gw2, stride, padding, False, conv_dtype=torch.float64)
    assert torch.equal(gw1, gw2)


def test_wgrad_refuses_float64_and_mixed_dtypes():
    case = _make("1x1s2", torch.float64, "nchw", "nchw", seed=29)
    g, m, y, mean, cf, x, wshape, stride, padding = case
    gw = torch.empty(wshape, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        wg.conv2d_wgrad(g, m, y, mean, cf, x, gw, stride, padding, False)
    with pytest.raises(TypeError, match="share"):
        wg.conv2d_wgrad(g.float(), None, None, None, None, x.half(), gw.float(), stride, padding, False)


@pytest.mark.parametrize("dt,coef", [("fp32", True), ("fp32-tf32", True), ("fp16", True), ("fp32", False),
                                     ("fp16", False), ("bf16", False)])
def test_wgrad_bound_catches_a_dropped_pixel(dt, coef):
    """The bound is tight enough to fail a kernel that drops one pixel (or mis-indexes one tap):
    for every shape, the reference without one output pixel's contribution violates it."""
    dtype, tf32 = DTYPES[dt]
    for shape_id in [c[0] for c in SHAPES]:
        case = _make(shape_id, dtype, "nchw", "nchw", coef=coef, seed=31)
        want, s = _ref64(case)
        g = case[0]
        K = g.shape[0] * g.shape[2] * g.shape[3]
        bound = _bound(dtype, tf32, K, 7, coef, want, s)
        # the contribution of output pixel (0, :, OH/2, OW/2) alone
        g64, m64, y64, mean64, cf64, x64 = (_d64(t) for t in case[:6])
        dy = ref.bn_dy(g64, m64, y64, mean64, cf64, torch.float64)
        only = torch.zeros_like(dy)
        oh, ow = g.shape[2] // 2, g.shape[3] // 2
        only[0, :, oh, ow] = dy[0, :, oh, ow]
        wrong = want - torch.nn.grad.conv2d_weight(x64, case[6], only, stride=case[7], padding=case[8])
        assert ((wrong - want).abs() > bound).any(), f"{shape_id} {dt}: a dropped pixel passes the bound"


# ------------------------------------------------------------------------------------------------
# configs

def _gpu(fn, *args):
    old = wg.INTERPRET
    wg.INTERPRET = False
    try:
        return fn(*args)
    finally:
        wg.INTERPRET = old


def test_wgrad_interpreter_config():
    if interpreting():
        assert wg.select_config(10 ** 6, 512, 512, 3, 3, torch.bfloat16) == wg.INTERPRETER_CONFIG
    for arch, dt, tf32 in itertools.product((80, 90), (torch.float32, torch.float16, torch.bfloat16), (True, False)):
        for cout, cin, k in ((64, 3, 7), (64, 64, 3), (128, 64, 1), (512, 512, 3)):
            cfg = _gpu(wg.select_config, 256 * 56 * 56, cout, cin, k, k, dt, arch, tf32)
            assert cfg.BLOCK_M >= 64 and cfg.BLOCK_N >= 64 and cfg.BLOCK_K >= 16 and cfg.num_stages >= 2
            assert cfg.BLOCK_M <= max(64, cout)


@pytest.mark.parametrize("num_tiles,npix", [(2, 256 * 112 * 112), (9, 256 * 56 * 56), (18, 256 * 28 * 28),
                                            (36 * 4, 256 * 7 * 7), (36 * 4, 8 * 7 * 7), (1, 5), (1000, 10 ** 6)])
def test_choose_splits(num_tiles, npix):
    """ResNet-sized problems at batch 256 fill about 264 programs (two waves of 132 SMs) unless
    the splits would get shorter than 16 chunks; every split is non-empty and chunk-aligned."""
    bk, target, min_iters = 32, 264, 16
    splits, per = wg.choose_splits(num_tiles, npix, bk, target, min_iters)
    iters = -(-npix // bk)
    assert splits >= 1 and per % bk == 0
    assert (splits - 1) * per < npix <= splits * per  # covers K, none empty
    if splits > 1:
        assert per // bk >= min_iters
    if iters >= min_iters * -(-target // num_tiles):
        assert num_tiles * splits >= target * 0.9, (num_tiles, splits)
    assert num_tiles * splits <= max(target, num_tiles) * 2
