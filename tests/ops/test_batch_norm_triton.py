"""The Triton launchers of the training-mode BatchNorm ops (``triton_ops/batch_norm.py``:
``batch_norm_act_forward``, ``batch_norm_act_backward``, ``bn_running_update``), called directly
and compared with the torch reference launchers (``resnet_kernels.backends.torch_batch_norm``, the
contract) run on the same inputs in float64.

Without a GPU this runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before the
kernels are imported): shapes are tiny. Every output is allocated NaN-poisoned, so an element a
kernel does not write fails (and so are the kernels' internal partial-sum and coefficient buffers,
through ``_alloc`` in poison mode).

Bounds, per element, from how the kernels compute (all arithmetic in acc = float32, float64 for
float64 data, u = its unit roundoff; each stored result rounded once to nearest):
``atol + rtol * |expected|`` is the final rounding to the stored dtype (``DTYPES``: half an ulp,
plus the subnormal spacing), and on top of it
  * forward: 8 u * (|y - mean| * |scale| + |bias| + |identity term|) (the kernels normalise
    ``y - mean``; rsqrt within 2 u, a handful of roundings), plus the float64 reference's own
    error, 8 * 2**-53 relative to its uncentred terms |y * scale| + |mean * scale| + ... (it
    computes y * scale + shift: visible in the float64 cases only);
  * per-channel sums over m = N*H*W terms: R u * sum |terms| with R = 2 ceil(log2 m) + 10 (the
    kernels sum per program in tiles, tree-reduce each tile, then add the partials in a fixed
    order: a few sequential additions plus tree depths, not m of them);
  * grad_y: u * |A| * (8 |g| + R sum|g| / m + (R + 8) invstd^2 |y - mean| sum|g (y - mean)| / m),
    A = weight * invstd: the rounding of each term and the propagated error of the two sums.
The |mean| = 100 std cases check that these bounds (relative to the centred values) hold; the
algebraically equal uncentred forms y * scale + shift (|mean| = 100 std) and
sum(g y) - mean sum(g) (|mean| = 1000 std) fail them in float32 (asserted: the bounds can fail).
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

import rk_testing as rt
from resnet_kernels import _alloc
from resnet_kernels.backends import torch_batch_norm as REF

TK = importlib.import_module("resnet_kernels.triton_ops.batch_norm")

DEV = rt.DEVICE
F64 = torch.float64
EPS, ID_EPS = 1e-5, 1e-3  # different on purpose: a mix-up of the two shows

# (dtype, atol, rtol): the final rounding to the stored dtype (half an ulp, round to nearest; on the
# interpreter too, see triton_ops/_common.py cast_for_store) and the subnormal spacing
DTYPES = [
    pytest.param(torch.float32, 2.0 ** -149, 2.0 ** -24, id="fp32"),
    pytest.param(torch.float16, 2.0 ** -24, 2.0 ** -11, id="fp16"),
    pytest.param(torch.bfloat16, 2.0 ** -133, 2.0 ** -8, id="bf16"),
    pytest.param(torch.float64, 2.0 ** -1074, 2.0 ** -53, id="fp64"),
]
TOL = {p.values[0]: p.values[1:] for p in DTYPES}
LAYOUTS = ["nchw", "channels_last"]
# C=3 with 7x7 planes and N=1 (no vector width), 16-element planes / 8 channels (vector width),
# H=W=1 (both layouts are one [N, C] matrix), and shapes whose backward reduction spans several
# programs under the interpreter's configuration (test_reduction_spans_programs).
SHAPES = [(1, 3, 7, 7), (2, 8, 4, 4), (3, 16, 7, 7), (2, 6, 1, 1), (9, 2, 11, 12)]
# identity: None / "raw" / "bn"; params: "acc" (float32 / float64) or "act" (the activation dtype)
COMBOS = {
    "bn_relu": dict(weight=True, bias=True, identity=None, relu=True),
    "bn_plain": dict(weight=False, bias=False, identity=None, relu=False),
    "bn_add_relu": dict(weight=True, bias=True, identity="raw", relu=True),
    "bn_add_proj_relu": dict(weight=True, bias=True, identity="bn", id_weight=True, id_bias=True, relu=True),
    "bn_add_proj_plain": dict(weight=True, bias=False, identity="bn", id_weight=False, id_bias=False, relu=False),
    "bn_add_proj_act_params": dict(weight=True, bias=True, identity="bn", id_weight=True, id_bias=True, relu=True,
                                   params="act"),
}


def _u(dtype):
    return 2.0 ** -53 if dtype == F64 else 2.0 ** -24


def _acc(dtype):
    return F64 if dtype == F64 else torch.float32


def _inner(shape, layout):
    return 1 if layout == "channels_last" else shape[2] * shape[3]


def _stats(x):
    x = x.double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def make_case(shape, dtype, layout, combo, seed=0, mean_scale=1.0):
    """Inputs as the op layer passes them: activations in ``dtype`` and ``layout``, mean/var the
    batch statistics (float64, rounded to acc), parameters in acc or the activation dtype."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    acc = _acc(dtype)
    pdt = dtype if combo.get("params") == "act" else acc

    def act(center):
        std = torch.rand(C, generator=g, dtype=F64) * 1.5 + 0.5
        sign = torch.randint(0, 2, (C,), generator=g).double() * 2 - 1
        mu = sign * std * center * mean_scale
        x = torch.randn(shape, generator=g, dtype=F64) * std.view(1, C, 1, 1) + mu.view(1, C, 1, 1)
        return rt.layouts(x.to(dtype), layout).to(DEV)

    def vec(lo, hi, signed=False):
        v = torch.rand(C, generator=g, dtype=F64) * (hi - lo) + lo
        if signed:
            v = v * (torch.randint(0, 2, (C,), generator=g).double() * 2 - 1)
        return v.to(pdt).to(DEV)

    case = dict(C=C, inner=_inner(shape, layout), relu=combo["relu"], dtype=dtype, layout=layout, shape=shape)
    case["y"] = act(1.0)
    mean, var = _stats(case["y"])
    case["mean"], case["var"] = mean.to(acc), var.to(acc)
    case["weight"] = vec(0.5, 1.5, signed=True) if combo["weight"] else None
    case["bias"] = vec(-1.0, 1.0) if combo["bias"] else None
    case["identity"] = case["id_mean"] = case["id_var"] = case["id_weight"] = case["id_bias"] = None
    if combo["identity"] is not None:
        case["identity"] = act(1.0 if combo["identity"] == "bn" else 0.0)
    if combo["identity"] == "bn":
        im, iv = _stats(case["identity"])
        case["id_mean"], case["id_var"] = im.to(acc), iv.to(acc)
        case["id_weight"] = vec(0.5, 1.5, signed=True) if combo["id_weight"] else None
        case["id_bias"] = vec(-1.0, 1.0) if combo["id_bias"] else None
    case["grad_out"] = rt.layouts(torch.randn(shape, generator=g, dtype=F64).to(dtype), layout).to(DEV)
    return case


def _d(t):
    return None if t is None else t.detach().double()


def _pc(v, C):
    return v.view(1, C, 1, 1)


def _affine64(mean, var, weight, eps, C):
    invstd = torch.rsqrt(_d(var) + eps)
    scale = invstd if weight is None else _d(weight) * invstd
    return _pc(invstd, C), _pc(scale, C)


def run_forward(impl, case, out):
    impl.batch_norm_act_forward(case["y"], case["mean"], case["var"], case["weight"], case["bias"], case["identity"],
                                case["id_mean"], case["id_var"], case["id_weight"], case["id_bias"], out, EPS, ID_EPS,
                                case["relu"], case["C"], case["inner"])


def forward64(case):
    """(out, magnitude, reference magnitude) in float64: the reference launcher on the inputs
    upcast; the magnitude of the centred terms the kernel's error is relative to; and that of the
    uncentred terms y * scale + shift the float64 reference computes (its own rounding error)."""
    c64 = {k: (_d(v) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = torch.empty_like(c64["y"])
    run_forward(REF, c64, out)
    C = case["C"]
    _, scale = _affine64(case["mean"], case["var"], case["weight"], EPS, C)
    mag = (c64["y"] - _pc(c64["mean"], C)).abs() * scale.abs()
    ref_mag = (c64["y"].abs() + _pc(c64["mean"], C).abs()) * scale.abs()
    if case["bias"] is not None:
        mag = mag + _pc(c64["bias"], C).abs()
        ref_mag = ref_mag + _pc(c64["bias"], C).abs()
    if case["identity"] is not None:
        if case["id_mean"] is not None:
            _, iscale = _affine64(case["id_mean"], case["id_var"], case["id_weight"], ID_EPS, C)
            mag = mag + (c64["identity"] - _pc(c64["id_mean"], C)).abs() * iscale.abs()
            ref_mag = ref_mag + (c64["identity"].abs() + _pc(c64["id_mean"], C).abs()) * iscale.abs()
            if case["id_bias"] is not None:
                mag = mag + _pc(c64["id_bias"], C).abs()
                ref_mag = ref_mag + _pc(c64["id_bias"], C).abs()
        else:
            mag = mag + c64["identity"].abs()
            ref_mag = ref_mag + c64["identity"].abs()
    return out, mag, ref_mag


def _fwd_bound(case, expected, mag, ref_mag):
    """Final rounding + 8 roundings in acc relative to the centred terms + the float64 reference's
    own error (8 roundings of 2**-53 relative to its uncentred terms)."""
    atol, rtol = TOL[case["dtype"]]
    return atol + rtol * expected.abs() + 8 * _u(case["dtype"]) * mag + 8 * 2.0 ** -53 * ref_mag


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_forward(dtype, atol, rtol, layout, shape, combo):
    case = make_case(shape, dtype, layout, COMBOS[combo])
    out = rt.poisoned(shape, dtype, DEV, layout)
    run_forward(TK, case, out)
    expected, mag, ref_mag = forward64(case)
    rt.assert_within(out, expected, _fwd_bound(case, expected, mag, ref_mag), f"{combo} out")


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
GRADS = ("grad_y", "grad_identity", "grad_weight", "grad_bias", "grad_id_weight", "grad_id_bias")


def _possible_grads(case):
    names = ["grad_y", "grad_weight", "grad_bias"]
    if case["identity"] is not None:
        names.append("grad_identity")
    if case["id_mean"] is not None:
        names += ["grad_id_weight", "grad_id_bias"]
    return names


def _alloc_grads(case, wanted):
    """Poisoned output buffers for the wanted gradients (None for the others): activations in the
    case's layout, parameter gradients in the parameter's dtype (acc when the parameter is None)."""
    dtype, shape, C = case["dtype"], case["shape"], case["C"]
    out = {}
    for n in GRADS:
        if n not in wanted:
            out[n] = None
        elif n in ("grad_y", "grad_identity"):
            out[n] = rt.poisoned(shape, dtype, DEV, case["layout"])
        else:
            p = case[{"grad_weight": "weight", "grad_bias": "bias", "grad_id_weight": "id_weight",
                      "grad_id_bias": "id_bias"}[n]]
            out[n] = _alloc.empty((C,), dtype=p.dtype if p is not None else _acc(dtype), device=DEV)
            assert torch.isnan(out[n]).all()
    return out


def _out_for_mask(case):
    """The forward output the backward reads its ReLU mask from (the float64 reference rounded to
    the dtype: both implementations get the same tensor, so the mask is the same)."""
    expected = forward64(case)[0]
    return rt.layouts(expected.to(case["dtype"]), case["layout"])


def run_backward(impl, case, out, grads, eps=EPS, id_eps=ID_EPS):
    impl.batch_norm_act_backward(case["grad_out"], out, case["y"], case["mean"], case["var"], case["weight"],
                                 case["identity"], case["id_mean"], case["id_var"], case["id_weight"],
                                 grads["grad_y"], grads["grad_identity"], grads["grad_weight"], grads["grad_bias"],
                                 grads["grad_id_weight"], grads["grad_id_bias"], eps, id_eps, case["relu"], case["C"],
                                 case["inner"])


def backward64(case, out):
    """Every gradient in float64 from the reference launcher, plus the terms the bounds need."""
    c64 = {k: (_d(v) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    C = case["C"]
    grads = {n: None for n in GRADS}
    for n in _possible_grads(case):
        grads[n] = torch.empty_like(c64["y"]) if n in ("grad_y", "grad_identity") else torch.empty(
            C, dtype=F64, device=c64["y"].device)
    run_backward(REF, c64, _d(out), grads)
    g = c64["grad_out"] * (_d(out) > 0) if case["relu"] else c64["grad_out"]
    m = g.numel() // C
    info = dict(g=g, m=m, R=2 * math.ceil(math.log2(max(m, 2))) + 10, S1=g.abs().sum((0, 2, 3)))
    for side, x, mean, var, w, eps in (("", "y", "mean", "var", "weight", EPS),
                                       ("id_", "identity", "id_mean", "id_var", "id_weight", ID_EPS)):
        if case[mean] is None:
            continue
        invstd, scale = _affine64(case[mean], case[var], case[w], eps, C)
        dx = c64[x] - _pc(c64[mean], C)
        info[side + "invstd"], info[side + "A"], info[side + "d"] = invstd, scale.abs(), dx
        info[side + "S2"] = (g * dx).abs().sum((0, 2, 3))
    return grads, info


def check_backward(case, grads, expected, info, what):
    dtype, C = case["dtype"], case["C"]
    u, R, m = _u(dtype), info["R"], info["m"]
    atol, rtol = TOL[dtype]
    for n, got in grads.items():
        if got is None:
            continue
        e = expected[n]
        if n == "grad_identity" and case["id_mean"] is None:  # = g, a copy
            bound = atol + rtol * e.abs()
        elif n in ("grad_y", "grad_identity"):
            s = "" if n == "grad_y" else "id_"
            A, invstd, d = info[s + "A"], info[s + "invstd"], info[s + "d"]
            bound = atol + rtol * e.abs() + u * A * (
                8 * info["g"].abs() + R * _pc(info["S1"], C) / m + (R + 8) * invstd ** 2 * d.abs()
                * _pc(info[s + "S2"], C) / m)
        else:
            p_atol, p_rtol = TOL[got.dtype]
            if n in ("grad_bias", "grad_id_bias"):
                acc_err = R * u * info["S1"]
            else:
                s = "" if n == "grad_weight" else "id_"
                acc_err = (R + 4) * u * info[s + "S2"] * info[s + "invstd"].view(-1)
            bound = p_atol + p_rtol * e.abs() + acc_err
        rt.assert_within(got, e, bound, f"{what} {n}")


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_backward_all_grads(dtype, atol, rtol, layout, shape, combo):
    case = make_case(shape, dtype, layout, COMBOS[combo], seed=1)
    out = _out_for_mask(case)
    grads = _alloc_grads(case, _possible_grads(case))
    run_backward(TK, case, out, grads)
    expected, info = backward64(case, out)
    check_backward(case, grads, expected, info, combo)


def _subsets(names):
    return [s for r in range(len(names) + 1) for s in itertools.combinations(names, r)]


# every combination of requested gradients (the others None) for each identity mode
_SUBSET_CASES = []
for _combo in ("bn_relu", "bn_add_relu", "bn_add_proj_relu"):
    _names = ["grad_y", "grad_weight", "grad_bias"] + {"bn_relu": [], "bn_add_relu": ["grad_identity"],
                                                       "bn_add_proj_relu": ["grad_identity", "grad_id_weight",
                                                                            "grad_id_bias"]}[_combo]
    for _i, _s in enumerate(_subsets(_names)):
        _SUBSET_CASES.append(pytest.param(_combo, _s, LAYOUTS[_i % 2], id=f"{_combo}-{'+'.join(_s) or 'none'}"))


@pytest.mark.parametrize("combo,wanted,layout", _SUBSET_CASES)
def test_backward_needed_subsets(combo, wanted, layout):
    dtype = torch.float32
    case = make_case((2, 5, 3, 9), dtype, layout, COMBOS[combo], seed=2)
    out = _out_for_mask(case)
    grads = _alloc_grads(case, wanted)
    run_backward(TK, case, out, grads)
    expected, info = backward64(case, out)
    check_backward(case, grads, expected, info, f"{combo} {wanted}")


def test_reduction_spans_programs():
    """The shapes meant to split the per-channel reduction over several programs (partials summed
    by the finalize kernel) do so in the configuration used here (interpreter or GPU)."""
    dev = torch.device(DEV)
    for shape, layout in (((3, 16, 7, 7), "nhwc"), ((9, 2, 11, 12), "nhwc"), ((9, 2, 11, 12), "nchw")):
        N, C, H, W = shape
        cfg = TK._reduce_config(N, C, H * W, layout, 4, dev)
        assert cfg["P"] > 1, (shape, layout, cfg)


def test_many_partials_finalize_loop(monkeypatch):
    """Many partial rows (more programs than the interpreter's default) and a finalize step of 2
    rows: the in-launch finalize (the last-arriving program of each channel block) loops over P,
    and leaves the shared arrival counters all zero."""
    import resnet_kernels.triton_ops.bn_add_relu as BAR  # the shared tiling (_reduce_config uses it)
    from resnet_kernels import _counters

    monkeypatch.setattr(BAR, "_target_programs", lambda device, interpret: 64)
    monkeypatch.setattr(TK, "_finalize_rows", lambda P, block_c, interpret=None: 2)
    for layout, shape in (("channels_last", (8, 2, 32, 32)), ("nchw", (8, 2, 32, 32))):
        case = make_case(shape, torch.float32, layout, COMBOS["bn_add_proj_relu"], seed=3)
        N, C, H, W = shape
        cfg = TK._reduce_config(N, C, H * W, "nhwc" if layout == "channels_last" else "nchw", 4, torch.device(DEV))
        assert cfg["P"] > 4, cfg
        out = _out_for_mask(case)
        grads = _alloc_grads(case, _possible_grads(case))
        run_backward(TK, case, out, grads)
        expected, info = backward64(case, out)
        check_backward(case, grads, expected, info, f"many partials {layout}")
        assert all(int(b.count_nonzero()) == 0 for b in _counters.ARRIVAL_COUNTERS.values())


# --------------------------------------------------------------------------------------------
# accuracy with |mean| = 100 std, determinism
# --------------------------------------------------------------------------------------------
def _large_mean_case(dtype, layout, mean_scale):
    shape = (4, 3, 16, 16)
    case = make_case(shape, dtype, layout, COMBOS["bn_add_proj_relu"], seed=4, mean_scale=mean_scale)
    assert (case["mean"].abs() > mean_scale / 2 * case["var"].sqrt()).all()
    out = rt.poisoned(shape, dtype, DEV, layout)
    run_forward(TK, case, out)
    expected, mag, ref_mag = forward64(case)
    bound = _fwd_bound(case, expected, mag, ref_mag)
    rt.assert_within(out, expected, bound, f"forward |mean| = {mean_scale} std")
    grads = _alloc_grads(case, _possible_grads(case))
    mask_out = _out_for_mask(case)
    run_backward(TK, case, mask_out, grads)
    exp_g, info = backward64(case, mask_out)
    check_backward(case, grads, exp_g, info, f"|mean| = {mean_scale} std")
    return case, expected, bound, exp_g, info


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:3])
def test_large_mean_accuracy(dtype, atol, rtol, layout):
    """|mean| = 100 std: forward and backward within the bounds relative to the centred values."""
    case, expected, bound, _, _ = _large_mean_case(dtype, layout, 100.0)
    if dtype == torch.float32:
        # the forward bound can fail: the uncentred form y * scale + shift (same algebra) violates it
        C = case["C"]
        y = case["y"].cpu().float()
        _, scale = _affine64(case["mean"], case["var"], case["weight"], EPS, C)
        sc = scale.float().cpu()
        naive = y * sc + (_pc(case["bias"].cpu(), C).float() - _pc(case["mean"].cpu(), C) * sc)
        _, isc = _affine64(case["id_mean"], case["id_var"], case["id_weight"], ID_EPS, C)
        isc = isc.float().cpu()
        naive = naive + case["identity"].cpu().float() * isc + (
            _pc(case["id_bias"].cpu(), C).float() - _pc(case["id_mean"].cpu(), C) * isc)
        naive = torch.relu(naive)
        assert not ((naive.double() - expected.cpu()).abs() <= bound.cpu()).all(), "uncentred forward passes"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_sum_bound_can_fail(layout):
    """|mean| = 1000 std, float32: the kernel's grad_weight is within its bound, while the uncentred
    sum(g * y) - mean * sum(g) (torch's float32 sums, same algebra) is not, for some channel."""
    case, _, _, exp_g, info = _large_mean_case(torch.float32, layout, 1000.0)
    g, y = info["g"].float().cpu(), case["y"].float().cpu()
    naive = (g * y).sum((0, 2, 3)) - case["mean"].cpu() * g.sum((0, 2, 3))
    invstd = info["invstd"].view(-1).cpu()
    bound = (info["R"] + 4) * 2.0 ** -24 * info["S2"].cpu() * invstd + 2.0 ** -24 * exp_g["grad_weight"].abs().cpu()
    assert not ((naive.double() * invstd - exp_g["grad_weight"].cpu()).abs() <= bound).all(), "uncentred sum passes"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_deterministic(layout):
    """Two runs on the same inputs: bitwise identical outputs (fixed-order reductions, no atomics)."""
    case = make_case((9, 2, 11, 12), torch.float32, layout, COMBOS["bn_add_proj_relu"], seed=5)
    out = _out_for_mask(case)
    runs = []
    for _ in range(2):
        grads = _alloc_grads(case, _possible_grads(case))
        run_backward(TK, case, out, grads)
        runs.append(grads)
    for n in GRADS:
        if runs[0][n] is not None:
            assert torch.equal(runs[0][n], runs[1][n]), n
            assert not torch.isnan(runs[0][n]).any(), n


def test_forward_eps_in_float64():
    """eps reaches the float64 kernels exactly (a Python float would arrive as float32): with a
    tiny variance the float64 result depends on eps to the last bits."""
    case = make_case((2, 3, 4, 4), F64, "nchw", COMBOS["bn_relu"], seed=6)
    case["var"] = torch.full_like(case["var"], 1e-6)
    out = rt.poisoned(case["shape"], F64, DEV, "nchw")
    eps = 1.1e-5  # not a float32 value
    TK.batch_norm_act_forward(case["y"], case["mean"], case["var"], case["weight"], case["bias"], None, None, None,
                              None, None, out, eps, None, True, case["C"], case["inner"])
    ref = torch.empty_like(out)
    REF.batch_norm_act_forward(case["y"], case["mean"], case["var"], case["weight"], case["bias"], None, None, None,
                               None, None, ref, eps, None, True, case["C"], case["inner"])
    torch.testing.assert_close(out, ref, atol=0, rtol=1e-13)


# --------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------
# (buffer dtype, statistics dtype)
RUN_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
              (F64, F64)]


@pytest.mark.parametrize("which", _subsets(("running_mean", "running_var", "num_batches_tracked")),
                         ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("buf_dtype,stat_dtype", RUN_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("C", [3, 1500])
def test_running_update(C, buf_dtype, stat_dtype, which):
    g = torch.Generator().manual_seed(7)
    mean = (torch.randn(C, generator=g, dtype=F64) * 3).to(stat_dtype).to(DEV)
    var = (torch.rand(C, generator=g, dtype=F64) * 2 + 0.1).to(stat_dtype).to(DEV)
    rm0 = (torch.randn(C, generator=g, dtype=F64)).to(buf_dtype).to(DEV)
    rv0 = (torch.rand(C, generator=g, dtype=F64) + 0.5).to(buf_dtype).to(DEV)
    nbt0 = torch.tensor(41, dtype=torch.int64, device=DEV)
    factor, unbias = 0.1, 96 / 95
    rm = rm0.clone() if "running_mean" in which else None
    rv = rv0.clone() if "running_var" in which else None
    nbt = nbt0.clone() if "num_batches_tracked" in which else None
    TK.bn_running_update([(mean, var, rm, rv, nbt, factor, unbias)])
    atol, rtol = TOL[buf_dtype]
    u = _u(buf_dtype)
    if rm is not None:
        exp = (1 - factor) * rm0.double() + factor * mean.double()
        mag = (1 - factor) * rm0.double().abs() + factor * mean.double().abs()
        assert rm.dtype == buf_dtype
        rt.assert_within(rm, exp, atol + rtol * exp.abs() + 4 * u * mag, "running_mean")
    if rv is not None:
        exp = (1 - factor) * rv0.double() + factor * unbias * var.double()
        mag = (1 - factor) * rv0.double().abs() + factor * unbias * var.double().abs()
        rt.assert_within(rv, exp, atol + rtol * exp.abs() + 4 * u * mag, "running_var")
    if nbt is not None:
        assert nbt.dtype == torch.int64 and nbt.item() == 42  # once, whatever the number of programs


def test_running_update_matches_reference_repeatedly():
    """Ten updates, as in training: the buffers track the reference launcher's (float32)."""
    g = torch.Generator().manual_seed(8)
    C = 37
    bufs = [torch.zeros(C, device=DEV), torch.ones(C, device=DEV), torch.tensor(0, device=DEV)]
    ref = [b.clone() for b in bufs]
    for step in range(10):
        mean = torch.randn(C, generator=g).to(DEV)
        var = (torch.rand(C, generator=g) + 0.5).to(DEV)
        factor = 1.0 / (step + 1)  # momentum=None: cumulative average
        TK.bn_running_update([(mean, var, *bufs, factor, 8 / 7)])
        REF.bn_running_update([(mean, var, *ref, factor, 8 / 7)])
    torch.testing.assert_close(bufs[0], ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bufs[1], ref[1], atol=1e-6, rtol=1e-6)
    assert bufs[2].item() == ref[2].item() == 10


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout):
    """N = 0 (the op layer returns before calling the launchers; they still behave): nothing to
    write in the forward, the per-channel gradients are zero sums."""
    shape = (0, 3, 5, 5)
    C = 3
    y = rt.layouts(torch.empty(shape), layout).to(DEV)
    mean, var = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    out = rt.poisoned(shape, torch.float32, DEV, layout)
    TK.batch_norm_act_forward(y, mean, var, None, None, None, None, None, None, None, out, EPS, None, True, C,
                              _inner(shape, layout))
    gw, gb = _alloc.empty((C,), dtype=torch.float32, device=DEV), _alloc.empty((C,), dtype=torch.float32, device=DEV)
    gy = rt.poisoned(shape, torch.float32, DEV, layout)
    TK.batch_norm_act_backward(y, out, y, mean, var, None, None, None, None, None, gy, None, gw, gb, None, None, EPS,
                               None, True, C, _inner(shape, layout))
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_grad_y_may_alias_grad_out(layout):
    """grad_y written into grad_out's own buffer (the op layer may reuse it): the reduce pass reads
    grad_out before the apply pass, which reads each element before writing it; the result is
    bitwise the one with separate buffers."""
    case = make_case((3, 16, 7, 7), torch.float32, layout, COMBOS["bn_add_proj_relu"], seed=9)
    out = _out_for_mask(case)
    grads = _alloc_grads(case, _possible_grads(case))
    run_backward(TK, case, out, grads)
    aliased = dict(case, grad_out=case["grad_out"].clone())
    grads2 = _alloc_grads(case, _possible_grads(case))
    grads2["grad_y"] = aliased["grad_out"]
    run_backward(TK, aliased, out, grads2)
    for n in GRADS:
        if grads[n] is not None:
            assert torch.equal(grads[n], grads2[n]), n
