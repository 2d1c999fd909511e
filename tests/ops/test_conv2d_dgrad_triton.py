"""The Triton dgrad launcher (``triton_ops/conv2d_dgrad.py: conv2d_dgrad``), tested directly against
the contract's torch reference (``resnet_kernels.backends.torch_conv_backward.conv2d_dgrad``) run
in float64 on the same (dtype-rounded) inputs converted to float64.

Without a GPU this runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1); the shapes
are tiny (the interpreter costs ~10-20 ms per program and K step), yet cover several M tiles with a
partial last one, partial column tiles (Cin = 24 > BLOCK_N = 16), partial K chunks (Cout = 24),
rows that no tap reaches (stride 2, even H: grad_x there is the epilogue only) and odd sizes. Every
output is NaN-poisoned (``resnet_kernels._alloc`` in poison mode, ``rk_testing.poisoned``), so an
element the kernels do not write fails.

Tolerances (``_bounds``), per element, derived from how the kernel computes (not tuned):
  * the operand: dy in fp32 (bn_dy: at most 4 roundings of 2**-24 relative to
    |A g'| + |B| + |K (y - mean)|), then rounded to the activation dtype (u_dt |dy|): e_dy;
  * accumulation over K = Cout*KH*KW terms: gamma * conv_input(|W|, |dy| + e_dy) with
    gamma = (K + 1) 2**-24, + 2**-9 for fp32 with tf32 (the tensor cores truncate both operands to
    tf32), + 2**-18 for 3xTF32 (as tests/ops/test_conv2d_triton.py), plus conv_input(|W|, e_dy);
  * epilogue: 2 fp32 roundings relative to |acc| + |residual|; output rounding u_out |grad_x|;
  * a floor of one subnormal spacing; the sum doubled as a safety margin.
  The upstream reductions propagate those bounds: |d sum_g| <= sum of the element bounds + M 2**-24
  sum |grad_x| (fp32 summation), |d sum_gd| alike with weights |up_y - up_mean| (+ 4 roundings),
  then the coefficient formulas with a few fp32 roundings each (rsqrt: 8 ulps), x2.
A wrong or missing tap is an error of order |dy| |W| ~ conv_input(|W|, |dy|) / K: far above the
bound in fp32 (tf32 or not) and fp16; bf16's bound is dominated by the rounding of dy and of the
output (an indexing bug shows up in the other dtypes' cases).
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

dg = importlib.import_module("resnet_kernels.triton_ops.conv2d_dgrad")

DTYPES = {
    "fp32-tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
U = testing.UNIT_ROUNDOFF
U32 = 2.0 ** -24
F64 = torch.float64

# (id, N, Cin, H, W, Cout, k, stride, pad)
SHAPES = [
    ("1x1s1", 2, 24, 5, 5, 16, 1, 1, 0),     # 2 M tiles, 2 column tiles (the second partial)
    ("1x1s2", 2, 5, 8, 8, 16, 1, 2, 0),      # odd rows/cols of grad_x get no tap at all
    ("3x3s1p1", 2, 5, 5, 5, 24, 3, 1, 1),    # a partial K chunk (Cout = 24)
    ("3x3s2p1", 1, 6, 8, 7, 16, 3, 2, 1),    # H even (the last row: one tap), W odd
    ("7x7s2p3", 1, 3, 7, 7, 16, 7, 2, 3),    # the stem (Cin = 3)
    ("odd3x3", 1, 3, 7, 7, 3, 3, 1, 1),      # C = 3 everywhere
]
# beyond ResNet (not in the SHAPES grids): 3x1 and 1x3 kernels with unequal strides and paddings
# (H/W mix-ups), the first on a one-row input (the parity class rh = 1 is empty), and a stride-3
# 1x1 conv
EXTRA_SHAPES = [
    ("rect3x1s21", 2, 5, 1, 6, 16, (3, 1), (2, 1), (1, 0)),
    ("rect1x3s12", 2, 5, 3, 6, 16, (1, 3), (1, 2), (0, 1)),
    ("1x1s3", 1, 4, 7, 8, 16, 1, 3, 0),
]
# Cin % 8 == 0 (16-byte rows of a 16-bit channels_last weight: read in place, see
# test_dgrad_weight_read_in_place), a partial K chunk (Cout = 24) and a stride-2 3x3
INPLACE_SHAPES = [
    ("3x3s1p1_c16", 2, 16, 5, 5, 24, 3, 1, 1),
    ("3x3s2p1_c8", 1, 8, 8, 7, 16, 3, 2, 1),
]
# many row tiles per column tile (with ``_SMALL_TILES``: 16-row tiles), for the in-launch upstream
# finalize (test_dgrad_finalize_many_arrivals): P = classes x row tiles programs arrive on each
# column tile's counter; Cin = 24: a full and a partial column tile
MANY_TILE_SHAPES = [
    ("3x3s2p1_many", 1, 24, 11, 11, 16, 3, 2, 1),  # 4 classes x 3 row tiles: P = 12
    ("1x1s2_many", 1, 24, 11, 11, 16, 1, 2, 0),    # 3 of the 4 classes reached by no tap
    ("3x3s1p1_many", 2, 24, 6, 6, 16, 3, 1, 1),    # one class, 72 rows: P = 5
]
LAYOUTS = ["nchw", "channels_last"]
_fmt = rk_testing.memory_format


def _shape(shape_id):
    return next(c for c in SHAPES + EXTRA_SHAPES + INPLACE_SHAPES + MANY_TILE_SHAPES if c[0] == shape_id)[1:]


def _act(gen, shape, dtype, layout, relu=False):
    t = torch.randn(*shape, generator=gen)
    if relu:  # a saved ReLU output: about half zeros
        t = t.clamp_min(0)
    return t.to(dtype).to(DEVICE).contiguous(memory_format=_fmt(layout))


def _make(shape_id, dtype, layout, *, mask=False, coef=False, res=False, res_mask=False, up=False,
          up_weight="fp32", grads=True, x_layout=None, seed=0):
    """Inputs of one call (dict of the launcher's keyword names)."""
    n, cin, h, w, cout, k, s, p = _shape(shape_id)
    (kh, kw), (sh, sw), (ph, pw) = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    x_layout = x_layout or layout
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    gen = torch.Generator().manual_seed(seed)
    a = dict(stride=(sh, sw), padding=(ph, pw))
    a["g"] = _act(gen, (n, cout, oh, ow), dtype, layout)
    a["mask"] = _act(gen, (n, cout, oh, ow), dtype, layout, relu=True) if mask else None
    if coef:
        a["y"] = _act(gen, (n, cout, oh, ow), dtype, layout)
        a["mean"] = (0.3 * torch.randn(cout, generator=gen)).to(DEVICE)
        c = torch.randn(3, cout, generator=gen)
        c[0] = c[0].abs() + 0.5  # A = weight * invstd
        a["coef"] = c.to(DEVICE)
    else:
        a["y"] = a["mean"] = a["coef"] = None
    a["weight"] = (torch.randn(cout, cin, kh, kw, generator=gen) / (cout * kh * kw) ** 0.5).to(dtype).to(DEVICE)
    a["residual"] = _act(gen, (n, cin, h, w), dtype, x_layout) if res else None
    a["res_mask"] = _act(gen, (n, cin, h, w), dtype, x_layout, relu=True) if res and res_mask else None
    for key in ("up_out", "up_y", "up_mean", "up_var", "up_weight", "up_coef", "up_grad_weight", "up_grad_bias"):
        a[key] = None
    a["up_eps"] = 1e-5
    if up:
        a["up_out"] = _act(gen, (n, cin, h, w), dtype, x_layout, relu=True)
        a["up_y"] = (_act(gen, (n, cin, h, w), torch.float32, x_layout) + 0.5).to(dtype)
        a["up_mean"] = (0.5 + 0.1 * torch.randn(cin, generator=gen)).to(DEVICE)
        a["up_var"] = (torch.rand(cin, generator=gen) + 0.25).to(DEVICE)
        if up_weight is not None:
            wdt = torch.float32 if up_weight == "fp32" else dtype
            a["up_weight"] = torch.randn(cin, generator=gen).to(wdt).to(DEVICE)
        gdt = a["up_weight"].dtype if a["up_weight"] is not None else torch.float32
        a["up_coef"] = _alloc.empty((3, cin), dtype=torch.float32, device=DEVICE)
        if grads:
            a["up_grad_weight"] = _alloc.empty((cin,), dtype=gdt, device=DEVICE)
            a["up_grad_bias"] = _alloc.empty((cin,), dtype=gdt, device=DEVICE)
    a["grad_x"] = rk_testing.poisoned((n, cin, h, w), dtype, DEVICE, x_layout)
    return a


ARGS = ("g", "mask", "y", "mean", "coef", "weight", "grad_x", "stride", "padding", "residual", "res_mask", "up_out",
        "up_y", "up_mean", "up_var", "up_weight", "up_eps", "up_coef", "up_grad_weight", "up_grad_bias")


def _call(fn, a, allow_tf32, **kw):
    fn(*(a[k] for k in ARGS), allow_tf32, **kw)


def _to64(a):
    """The same call in float64 on the CPU, fresh float64 outputs."""
    b = {k: (v.detach().cpu().to(F64) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    for k in ("grad_x", "up_coef", "up_grad_weight", "up_grad_bias"):
        if b[k] is not None:
            b[k] = torch.full_like(b[k], float("nan"))
    return b


def _conv_in(b, w, dy):
    return torch.nn.grad.conv2d_input(tuple(b["grad_x"].shape), w, dy, stride=b["stride"], padding=b["padding"])


def _bounds(a, b, dtype, allow_tf32):
    """(reference outputs, element/vector bounds) for the call ``a`` (its float64 twin ``b``,
    already run through the reference)."""
    u = U[dtype]
    dy = ref.bn_dy(b["g"], b["mask"], b["y"], b["mean"], b["coef"], F64)
    if b["coef"] is not None:
        gp = ref.bn_dy(b["g"], b["mask"], None, None, None, F64)
        col = [b["coef"][i].view(1, -1, 1, 1) for i in range(3)]
        terms = (col[0] * gp).abs() + col[1].abs() + (col[2] * (b["y"] - b["mean"].view(1, -1, 1, 1))).abs()
    else:
        terms = dy.abs()
    e_dy = u * dy.abs() + 4 * U32 * terms
    wa = b["weight"].abs()
    A = _conv_in(b, wa, dy.abs())
    E = _conv_in(b, wa, e_dy)
    K = b["weight"][:, 0].numel()
    gamma = (K + 1) * U32 + (0.0 if dtype != torch.float32 else (2.0 ** -9 if allow_tf32 else 2.0 ** -18))
    r = b["residual"].abs() if b["residual"] is not None else torch.zeros((), dtype=F64)
    want = b["grad_x"]
    fi = torch.finfo(dtype)
    bound = 2 * (gamma * (A + E) + E + 2 * U32 * (A + r) + u * want.abs()) + fi.tiny * fi.eps
    if b["up_out"] is not None:
        bound = torch.where(b["up_out"] > 0, bound, torch.zeros((), dtype=F64))  # exactly 0 there
        bound = bound + fi.tiny * fi.eps
    out = dict(grad_x=(want, bound))
    if b["up_out"] is None:
        return out
    dims = (0, 2, 3)
    M = want.numel() // want.shape[1]
    d = (b["up_y"] - b["up_mean"].view(1, -1, 1, 1)).abs()
    ga = want.abs()
    tol_sg = bound.sum(dims) + 2 * M * U32 * ga.sum(dims)
    tol_sd = (bound * d).sum(dims) + 2 * (M + 4) * U32 * (ga * d).sum(dims)
    sg, sd = want.sum(dims), (want * (b["up_y"] - b["up_mean"].view(1, -1, 1, 1))).sum(dims)
    inv = torch.rsqrt(b["up_var"] + b["up_eps"])
    A_ = inv if b["up_weight"] is None else b["up_weight"] * inv
    tol_coef = torch.stack([
        8 * U32 * A_.abs(),
        2 * (A_.abs() * tol_sg + 16 * U32 * (A_ * sg).abs()) / M,
        2 * (A_.abs() * inv ** 2 * tol_sd + 24 * U32 * (A_ * inv ** 2 * sd).abs()) / M,
    ]) + 1e-30
    out["up_coef"] = (b["up_coef"], tol_coef)
    if b["up_grad_weight"] is not None:
        ug = U[a["up_grad_weight"].dtype]
        out["up_grad_weight"] = (b["up_grad_weight"], 2 * (inv * tol_sd + 16 * U32 * (inv * sd).abs()
                                                           + ug * (inv * sd).abs()) + 1e-30)
        out["up_grad_bias"] = (b["up_grad_bias"], 2 * (tol_sg + ug * sg.abs()) + 1e-30)
    return out


def _check_close(got, want, bound, what):
    g = got.detach().cpu().double()
    assert not torch.isnan(g).any(), f"{what}: NaN in the output (unwritten elements?)"
    assert torch.isfinite(want).all(), f"{what}: the reference is not finite"
    err = (g - want).abs()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; first at {i}: "
                             f"got {g[tuple(i)].item()}, want {want[tuple(i)].item()}, bound {bound[tuple(i)].item()}; "
                             f"max err {err.max().item()}")
    return err.max().item()


def _run_and_check(a, dtype, allow_tf32, what):
    layout_before = a["grad_x"].stride()
    _call(dg.conv2d_dgrad, a, allow_tf32)
    assert a["grad_x"].stride() == layout_before
    b = _to64(a)
    _call(ref.conv2d_dgrad, b, False)
    for name, (want, bound) in _bounds(a, b, dtype, allow_tf32).items():
        _check_close(a[name], want, bound, f"{what}: {name}")
    for name in ("up_coef", "up_grad_weight", "up_grad_bias"):  # absent ones stay absent
        if a[name] is None:
            assert b[name] is None
    if a["up_out"] is not None:
        _check_own_sums(a, b)
    return b


def _check_own_sums(a, b):
    """The upstream sums are those of the kernel's own ROUNDED grad_x (the contract), to fp32
    summation accuracy: much tighter than the comparison with the reference, so summing the fp32
    value before its rounding (a 16-bit grad_x's rounding errors do not cancel to that level) fails."""
    gx = a["grad_x"].detach().cpu().double()
    dims = (0, 2, 3)
    M = gx.numel() // gx.shape[1]
    d = b["up_y"] - b["up_mean"].view(1, -1, 1, 1)
    sg, sd = gx.sum(dims), (gx * d).sum(dims)
    tol_sg = 2 * M * U32 * gx.abs().sum(dims) + 1e-30
    tol_sd = 2 * (M + 4) * U32 * (gx * d).abs().sum(dims) + 1e-30
    inv = torch.rsqrt(b["up_var"] + b["up_eps"])
    A_ = inv if b["up_weight"] is None else b["up_weight"] * inv
    coef = a["up_coef"].detach().cpu().double()
    _check_close(coef[1], A_ * sg / M, 2 * (A_.abs() * tol_sg + 16 * U32 * (A_ * sg).abs()) / M + 1e-30,
                 "up_coef[1] vs the sum of the kernel's grad_x")
    _check_close(coef[2], A_ * inv ** 2 * sd / M,
                 2 * (A_.abs() * inv ** 2 * tol_sd + 24 * U32 * (A_ * inv ** 2 * sd).abs()) / M + 1e-30,
                 "up_coef[2] vs the sum of the kernel's grad_x * (up_y - up_mean)")


# ------------------------------------------------------------------------------------------------

_SHAPE_IDS = [c[0] for c in SHAPES]
_CASES = [(s, dt, LAYOUTS[(i + j) % 2]) for (i, s), (j, dt) in itertools.product(enumerate(_SHAPE_IDS),
                                                                                  enumerate(DTYPES))]


@pytest.mark.parametrize("shape_id,dt,layout", _CASES)
def test_dgrad_plain(shape_id, dt, layout):
    """dy = g: every shape x dtype, the layouts alternating (each shape and each dtype sees both)."""
    dtype, tf32 = DTYPES[dt]
    a = _make(shape_id, dtype, layout, seed=1)
    _run_and_check(a, dtype, tf32, f"{shape_id} {dt} {layout}")


@pytest.mark.parametrize("shape_id,dt,layout", [(s, dt, LAYOUTS[1 - LAYOUTS.index(lay)]) for s, dt, lay in _CASES])
def test_dgrad_fully_fused(shape_id, dt, layout):
    """mask + BN coefficients + residual with its mask + the upstream ReLU and BN reductions (all
    outputs), every shape x dtype, in the layout test_dgrad_plain did not use."""
    dtype, tf32 = DTYPES[dt]
    a = _make(shape_id, dtype, layout, mask=True, coef=True, res=True, res_mask=True, up=True, seed=2)
    b = _run_and_check(a, dtype, tf32, f"{shape_id} {dt} {layout}")
    gx = b["grad_x"]
    assert (gx == 0).any() and (gx != 0).any()


# (mask, coef, residual, res_mask, up, up_weight, grads)
_OPTIONS = {
    "mask": (True, False, False, False, False, None, False),
    "coef": (False, True, False, False, False, None, False),
    "mask+coef": (True, True, False, False, False, None, False),
    "res": (False, False, True, False, False, None, False),
    "res+res_mask": (False, False, True, True, False, None, False),
    "up": (False, False, False, False, True, "fp32", True),
    "up-no-weight": (False, True, False, False, True, None, True),
    "up-act-weight": (True, False, True, False, True, "act", True),
    "up-coef-only": (True, True, True, True, True, "fp32", False),
}


@pytest.mark.parametrize("opt", list(_OPTIONS))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_dgrad_options(opt, dt):
    """Each operand / epilogue option alone and in combinations (3x3 stride 2, layouts alternating);
    the upstream with up_weight None (A = invstd, grads float32), up_weight in the activation dtype
    (its grads too) and without up_grad_weight/up_grad_bias."""
    mask, coef, res, res_mask, up, upw, grads = _OPTIONS[opt]
    dtype, tf32 = DTYPES[dt]
    layout = LAYOUTS[(list(_OPTIONS).index(opt) + (dt == "bf16")) % 2]
    a = _make("3x3s2p1", dtype, layout, mask=mask, coef=coef, res=res, res_mask=res_mask, up=up, up_weight=upw,
              grads=grads, seed=3)
    _run_and_check(a, dtype, tf32, f"{opt} {dt}")


@pytest.mark.parametrize("shape_id", [c[0] for c in EXTRA_SHAPES])
def test_dgrad_other_geometries(shape_id):
    """The per-parity-class row split with unequal strides, an empty class and stride 3."""
    a = _make(shape_id, torch.float32, "channels_last", mask=True, coef=True, res=True, up=True, seed=7)
    _run_and_check(a, torch.float32, False, shape_id)


def test_dgrad_mixed_layouts():
    """g-side NCHW, x-side channels_last (and the reverse): each side read through its own strides."""
    for lay, xlay in (("nchw", "channels_last"), ("channels_last", "nchw")):
        a = _make("1x1s2", torch.float16, lay, mask=True, coef=True, res=True, up=True, x_layout=xlay, seed=4)
        _run_and_check(a, torch.float16, False, f"g {lay}, x {xlay}")


_SMALL_TILES = dg.DgradConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("shape_id,dt,layout", [("3x3s2p1_many", "fp32", "channels_last"),
                                                 ("3x3s2p1_many", "bf16", "nchw"),
                                                 ("1x1s2_many", "fp16", "channels_last"),
                                                 ("3x3s1p1_many", "fp32-tf32", "nchw")])
def test_dgrad_finalize_many_arrivals(monkeypatch, shape_id, dt, layout):
    """The upstream finalize runs in the dgrad's launch: every program of a column tile (all parity
    classes x all row tiles, those past a smaller class's rows too) arrives on the tile's counter and
    the last one sums the P partial rows (here in steps of 8 rows, the last one partial where P = 12
    or 5). 16-row tiles so that many programs arrive; parity with the reference; the counters
    (``_counters.ARRIVAL_COUNTERS``) are all 0 again afterwards; the partials are poisoned (every row
    must be written before the finalize reads it)."""
    from resnet_kernels import _counters

    monkeypatch.setattr(_counters, "ARRIVAL_COUNTERS", {})  # a fresh zeroed buffer (whatever ran before)
    monkeypatch.setattr(dg, "INTERPRETER_CONFIG", _SMALL_TILES)
    monkeypatch.setattr(dg, "_finalize_rows", lambda P, block_c, interpret=None: 8)
    dtype, tf32 = DTYPES[dt]
    a = _make(shape_id, dtype, layout, mask=True, coef=True, res=True, up=True, seed=11)
    if shape_id == "1x1s2_many":  # a non-contiguous up_coef: finalized into a buffer, then copied
        a["up_coef"] = rk_testing.poisoned((a["up_coef"].shape[1], 3), torch.float32, DEVICE, "nchw").t()
        assert not a["up_coef"].is_contiguous()
    plan = dg._prepare(*(a[k] for k in ("g", "mask", "y", "mean", "coef", "weight", "grad_x", "stride", "padding",
                                        "residual", "res_mask", "up_out", "up_y", "up_mean")), tf32,
                       up_bn=(a["up_var"], a["up_weight"], None, a["up_eps"]))
    n, cin, h, w, cout, k, s, p = _shape(shape_id)
    assert plan.P == s * s * -(-n * -(-h // s) * -(-w // s) // 16) and plan.P >= 5, plan.P
    assert plan.grid == (plan.P // (s * s) * 2, s * s) and plan.constexprs["FIN_BLOCK_P"] == 8
    assert plan.counter_key in _counters.ARRIVAL_COUNTERS
    b = _run_and_check(a, dtype, tf32, f"{shape_id} {dt} {layout}")
    assert (b["grad_x"] == 0).any() and (b["grad_x"] != 0).any()
    assert all(int(c.count_nonzero()) == 0 for c in _counters.ARRIVAL_COUNTERS.values())


def test_dgrad_finalize_drops_counters_on_error(monkeypatch):
    """A launch that raises (it may have arrived partly) drops its counter buffer: the next call
    starts from a fresh zeroed one."""
    from resnet_kernels import _counters

    a = _make("1x1s1", torch.float32, "channels_last", up=True, seed=12)
    plan = dg._prepare(*(a[k] for k in ("g", "mask", "y", "mean", "coef", "weight", "grad_x", "stride", "padding",
                                        "residual", "res_mask", "up_out", "up_y", "up_mean")), True,
                       up_bn=(a["up_var"], a["up_weight"], None, a["up_eps"]))
    key = plan.counter_key
    assert key in _counters.ARRIVAL_COUNTERS

    class Boom(Exception):
        pass

    def boom(*args, **kwargs):
        raise Boom

    monkeypatch.setattr(dg, "_conv2d_dgrad_kernel", {plan.grid: boom})  # kernel[grid](...) raises
    with pytest.raises(Boom):
        _call(dg.conv2d_dgrad, a, True)
    assert key not in _counters.ARRIVAL_COUNTERS


def test_dgrad_deterministic():
    """Two runs: bitwise identical grad_x and upstream outputs (fixed orders; the only atomic is the
    upstream finalize's arrival counter, which picks the program that sums, not the order)."""
    outs = []
    for _ in range(2):
        a = _make("1x1s1", torch.float32, "channels_last", mask=True, coef=True, up=True, seed=5)
        _call(dg.conv2d_dgrad, a, True)
        outs.append([a[k].clone() for k in ("grad_x", "up_coef", "up_grad_weight", "up_grad_bias")])
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def _expect_inplace(w, dtype):
    """Whether the launcher reads ``w`` in place (no pack): 16-bit, Cin-contiguous with linear taps
    (channels_last, or any 1x1) and 16-byte-aligned tap and Cout strides."""
    cout, cin, kh, kw = w.shape
    ok = w.is_contiguous(memory_format=torch.channels_last) or kh * kw == 1
    return dtype != torch.float32 and ok and (cin * w.element_size()) % 16 == 0


@pytest.mark.parametrize("wlayout", ["w_contiguous", "w_channels_last"])
@pytest.mark.parametrize("dt", ["fp32-tf32", "bf16", "fp16"])
@pytest.mark.parametrize("shape_id", ["1x1s1", "1x1s2", "3x3s1p1"] + [c[0] for c in INPLACE_SHAPES])
def test_dgrad_weight_read_in_place(shape_id, dt, wlayout):
    """A 16-bit weight whose memory already is the Cin-contiguous (K, Cin) operand (channels_last,
    or 1x1 with a unit Cin stride, with 16-byte rows) is read in place: the kernel gets the weight
    itself (same address), no pack and no cache entry; any other weight (fp32: the tf32 B operand
    wants K-contiguous) is packed as before. Fully fused parity either way (NaN-poisoned outputs)."""
    from resnet_kernels import _weight_cache as wc

    dtype, tf32 = DTYPES[dt]
    a = _make(shape_id, dtype, "channels_last", mask=True, coef=True, res=True, res_mask=True, up=True, seed=9)
    if wlayout == "w_channels_last":
        a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    w = a["weight"]
    wc.reset_stats()
    plan = dg._prepare(*(a[k] for k in ("g", "mask", "y", "mean", "coef", "weight", "grad_x", "stride", "padding",
                                        "residual", "res_mask", "up_out", "up_y", "up_mean")), tf32,
                       up_bn=(a["up_var"], a["up_weight"], None, a["up_eps"]))
    inplace = _expect_inplace(w, dtype)
    if inplace:  # (a 1x1 weight's N-major pack can be a view too: then it goes through the cache)
        assert plan.args[5].data_ptr() == w.data_ptr(), (shape_id, dt, wlayout)
    st = wc.stats()
    assert st["packs"] + st["uncached"] == (0 if inplace else 1) and st["hits"] == 0, st
    b = _run_and_check(a, dtype, tf32, f"{shape_id} {dt} {wlayout}")
    gx = b["grad_x"]
    assert (gx == 0).any() and (gx != 0).any()


def test_dgrad_weight_in_place_cases():
    """Which weights the predicate accepts (ResNet-50 shapes, meta tensors): (swr, swk, swn)."""
    from resnet_kernels._weight_cache import conv_dgrad_inplace_strides as f

    cl = torch.channels_last
    for dt in (torch.bfloat16, torch.float16):
        w3 = torch.empty(128, 64, 3, 3, dtype=dt, device="meta")
        w1 = torch.empty(256, 64, 1, 1, dtype=dt, device="meta")
        assert f(w3, dt) is None
        assert f(w3.contiguous(memory_format=cl), dt) == (64, 576, 1)
        assert f(w1, dt) == (0, 64, 1) and f(w1.contiguous(memory_format=cl), dt) == (0, 64, 1)
        assert f(torch.empty(64, 3, 7, 7, dtype=dt, device="meta").contiguous(memory_format=cl), dt) is None
    w = torch.empty(64, 64, 3, 3, device="meta").contiguous(memory_format=cl)
    assert f(w, torch.float32) is None and f(w, torch.bfloat16) is None  # fp32; dtype mismatch


def test_dgrad_rejects_float64_and_mismatches():
    a = _make("1x1s1", torch.float32, "nchw")
    b = _to64(a)
    with pytest.raises(TypeError, match="float64"):
        _call(dg.conv2d_dgrad, b, False)
    a["mask"] = a["g"].contiguous(memory_format=torch.channels_last)  # not g's layout
    with pytest.raises(ValueError, match="mask"):
        _call(dg.conv2d_dgrad, a, False)
    a = _make("1x1s1", torch.float32, "nchw", up=True)
    a["up_var"] = None  # the in-launch finalize needs it
    with pytest.raises(ValueError, match="up_var"):
        _call(dg.conv2d_dgrad, a, False)


def test_dgrad_conv_dtype_accepted():
    """The reference's conv_dtype keyword is accepted (and ignored)."""
    a = _make("odd3x3", torch.bfloat16, "nchw", seed=6)
    _call(dg.conv2d_dgrad, a, False, conv_dtype=torch.bfloat16)
    assert not torch.isnan(a["grad_x"].float()).any()


def test_dgrad_configs():
    if interpreting():
        assert dg.select_config(10 ** 6, 512, 512, 3, 3, torch.bfloat16) == dg.INTERPRETER_CONFIG
    old = dg.INTERPRET
    dg.INTERPRET = False
    try:
        for arch, dt, tf32 in itertools.product((80, 90), (torch.float32, torch.float16, torch.bfloat16), (True, False)):
            for M, cin, cout, k in ((256 * 224 * 224, 3, 64, 7), (256 * 56 * 56, 64, 64, 3), (8 * 7 * 7, 512, 512, 3),
                                    (256 * 28 * 28, 128, 512, 1)):
                c = dg.select_config(M, cin, cout, k, k, dt, arch, tf32)
                assert c.BLOCK_M >= 64 and c.BLOCK_K >= 16 and c.num_stages >= 2
                assert 16 <= c.BLOCK_N <= max(16, triton_next_pow2(cin))
    finally:
        dg.INTERPRET = old


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()
