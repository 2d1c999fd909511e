"""bn_add_relu / add_relu: every backend against a float64 reference computed with plain torch
ops from the inputs, forward and backward, plus gradcheck, opcheck, torch.compile and input
validation.

Backends: ``rk_testing.ALL_BACKENDS`` (CPU: torch, and triton under the Triton interpreter;
with a GPU also triton and cuda on the GPU). Error bounds: ``rk_testing.elementwise_bound`` /
``reduction_bound`` (per-dtype ulp tables, see rk_testing.py). Every output the op allocates is
poisoned with NaN (conftest), so an element a kernel does not write fails.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import BackendUnavailableError, testing
from resnet_kernels.ops.bn_add_relu import add_relu, bn_add_relu

DEV = rt.DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
# N=1 with C=3 (the document's odd channel count), odd sizes, an empty batch, and two shapes
# whose contiguous extents are multiples of the vector width (2-D tilings of the Triton kernels:
# NCHW planes of 16/32 elements, channels_last with C=8), the others use the flat tiling.
# (3, 16, 7, 7) channels_last and (9, 2, 11, 12) in both layouts run the backward's per-channel
# reduction in several programs (P > 1, the partials summed by a second kernel) also with the
# default tiles (test_triton_backward_reductions_span_programs checks it).
SHAPES = [(1, 3, 7, 7), (2, 5, 3, 9), (3, 16, 7, 7), (0, 4, 5, 5), (2, 8, 4, 4), (2, 3, 4, 8), (9, 2, 11, 12)]
# operand combinations: which of scale/shift/identity/identity_scale/identity_shift are given, relu
COMBOS = {
    "add_relu": dict(scale=False, shift=False, identity=True, id_affine=False, relu=True),
    "bn_add_relu": dict(scale=True, shift=True, identity=True, id_affine=False, relu=True),
    "bn_add_relu_proj": dict(scale=True, shift=True, identity=True, id_affine=True, relu=True),
    "bn_add_proj_norelu": dict(scale=True, shift=True, identity=True, id_affine=True, relu=False),
    "bn_relu_no_identity": dict(scale=True, shift=True, identity=False, id_affine=False, relu=True),
}


def _fmt(dt):
    return str(dt).replace("torch.", "")


def make_inputs(shape, dtype, layout, combo, seed=0, device=DEV):
    """Activations in ``dtype`` and ``layout``, per-channel vectors in the accumulation dtype;
    absent operands are None."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    acc = rt.acc_of(dtype)

    def act():
        return rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(device)

    def vec(lo=-1.5, hi=1.5):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(acc).to(device)

    x = act()
    identity = act() if combo["identity"] else None
    scale = vec() if combo["scale"] else None
    shift = vec() if combo["shift"] else None
    id_scale = vec() if combo["id_affine"] else None
    id_shift = vec() if combo["id_affine"] else None
    go = act()
    return x, scale, shift, identity, id_scale, id_shift, go


def reference(x, scale, shift, identity, id_scale, id_shift, relu, go):
    """float64 forward and all gradients from the inputs, with the error magnitudes the bounds
    need. Elements whose exact pre-activation is within 1e-3 of the ReLU kink get grad_out = 0
    (returned), so rounding cannot flip the mask between implementations."""
    C = x.shape[1]

    def pc(v):
        return None if v is None else v.double().view(1, C, 1, 1)

    x64 = x.double()
    y = x64.clone()
    mag = x64.abs()
    s, b, i_s, i_b = pc(scale), pc(shift), pc(id_scale), pc(id_shift)
    if s is not None:
        y = y * s
        mag = mag * s.abs()
    if b is not None:
        y = y + b
        mag = mag + b.abs()
    if identity is not None:
        r = identity.double()
        rm = r.abs()
        if i_s is not None:
            r = r * i_s
            rm = rm * i_s.abs()
        if i_b is not None:
            r = r + i_b
            rm = rm + i_b.abs()
        y = y + r
        mag = mag + rm
    if relu:
        go = torch.where(y.abs() < 1e-3, torch.zeros_like(go), go)
        out = torch.relu(y)
        g = go.double() * (y > 0)
    else:
        out = y
        g = go.double()
    dims = (0, 2, 3)
    ref = dict(out=out, mag=mag, go=go, g=g,
               grad_x=g * s if s is not None else g,
               grad_identity=(g * i_s if i_s is not None else g) if identity is not None else None,
               grad_scale=(g * x64).sum(dims), grad_scale_abs=(g * x64).abs().sum(dims),
               grad_shift=g.sum(dims), grad_shift_abs=g.abs().sum(dims))
    if identity is not None:
        ref["grad_id_scale"] = (g * identity.double()).sum(dims)
        ref["grad_id_scale_abs"] = (g * identity.double()).abs().sum(dims)
    return ref


def run_op(x, scale, shift, identity, id_scale, id_shift, relu, backend, go, use_add_relu=False):
    """Forward + backward through autograd; returns (out, {name: grad})."""
    leaves = {"x": x, "scale": scale, "shift": shift, "identity": identity, "id_scale": id_scale,
              "id_shift": id_shift}
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in leaves.items()}
    if use_add_relu:
        out = add_relu(leaves["x"], leaves["identity"], backend=backend)
    else:
        out = bn_add_relu(leaves["x"], leaves["scale"], leaves["shift"], leaves["identity"], leaves["id_scale"],
                          leaves["id_shift"], relu=relu, backend=backend)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], go)
    return out, dict(zip(names, grads))


def check_against_reference(x, scale, shift, identity, id_scale, id_shift, relu, out, grads, ref, tag):
    dtype = x.dtype
    n_terms = x.numel() // x.shape[1] if x.shape[1] else 0
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride(), f"{tag}: output layout {out.stride()} != input layout {x.stride()}"
    rt.assert_within(out, ref["out"], rt.elementwise_bound(ref["out"], ref["mag"], dtype), f"{tag} out")
    gx = grads["x"]
    assert gx.dtype == dtype
    # grad_x = g * scale: one rounding in the accumulation dtype, one when stored
    rt.assert_within(gx, ref["grad_x"], rt.elementwise_bound(ref["grad_x"], ref["grad_x"].abs(), dtype, ops=2),
                     f"{tag} grad_x")
    if identity is not None:
        gi = grads["identity"]
        assert gi.dtype == dtype
        rt.assert_within(gi, ref["grad_identity"],
                         rt.elementwise_bound(ref["grad_identity"], ref["grad_identity"].abs(), dtype, ops=2),
                         f"{tag} grad_identity")
    for name, key in (("scale", "grad_scale"), ("shift", "grad_shift"), ("id_scale", "grad_id_scale"),
                      ("id_shift", "grad_shift")):
        param = {"scale": scale, "shift": shift, "id_scale": id_scale, "id_shift": id_shift}[name]
        if param is None:
            continue
        got = grads[name]
        assert got.dtype == param.dtype and got.shape == param.shape
        rt.assert_within(got, ref[key], rt.reduction_bound(ref[key], ref[key + "_abs"], n_terms, dtype,
                                                           stored=param.dtype), f"{tag} grad_{name}")


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_fmt)
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_parity_forward_backward(backend, dtype, layout, shape, combo):
    c = COMBOS[combo]
    x, scale, shift, identity, id_scale, id_shift, go = make_inputs(shape, dtype, layout, c)
    ref = reference(x, scale, shift, identity, id_scale, id_shift, c["relu"], go)
    out, grads = run_op(x, scale, shift, identity, id_scale, id_shift, c["relu"], backend, ref["go"],
                        use_add_relu=combo == "add_relu")
    check_against_reference(x, scale, shift, identity, id_scale, id_shift, c["relu"], out, grads, ref,
                            f"{backend}/{_fmt(dtype)}/{layout}/{shape}/{combo}")


@pytest.mark.parametrize("backend", rt.KERNEL_BACKENDS)
def test_kernel_matches_torch_backend(backend):
    """The kernels and the torch backend compute the same fp32 expression: they agree to one
    rounding of the result (float16 here, 1 ulp)."""
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, go = make_inputs((2, 6, 5, 5), torch.float16, "nchw", c, seed=3)
    o1 = bn_add_relu(x, s, b, i, i_s, i_b, backend=backend)
    o0 = bn_add_relu(x, s, b, i, i_s, i_b, backend="torch")
    torch.testing.assert_close(o1, o0, **rt.ELEMENTWISE_TOL[torch.float16])


MULTI_TILE_SHAPES = [(2, 3, 8, 8), (3, 2, 5, 7), (2, 8, 4, 4), (1, 32, 2, 3), (5, 2, 3, 3), (2, 1, 8, 8)]


def _small_tiles(monkeypatch):
    from resnet_kernels.triton_ops import bn_add_relu as K

    monkeypatch.setattr(K, "_tile_elems", lambda itemsize, interpret: 16)
    monkeypatch.setattr(K, "_target_programs", lambda device, interpret: 4)
    return K


def test_multi_tile_shapes_reach_every_loop(monkeypatch):
    """With 16-element tiles and ~4 backward programs, MULTI_TILE_SHAPES run every loop of the
    kernels more than once and split the work in every direction."""
    pytest.importorskip("triton")
    K = _small_tiles(monkeypatch)
    seen = set()
    for N, C, H, W in MULTI_TILE_SHAPES:
        for lay in ("nchw", "nhwc"):
            for dt in (torch.float32, torch.float16):
                size = torch.empty(0, dtype=dt).element_size()
                f = K._forward_config(N, C, H * W, lay, size)
                if f["MODE"] != K.MODE_FLAT:
                    seen |= {("fwd-rows", f["MODE"])} if f["grid"][0] > 1 else set()
                    seen |= {("fwd-cols", f["MODE"])} if f["grid"][1] > 1 else set()
                elif f["grid"][0] > 1:
                    seen.add(("fwd-flat-blocks", lay))
                b = K._backward_config(N, C, H * W, lay, size, torch.device(DEV))
                seen |= {("bwd-P", b["kind"])} if b["P"] > 1 else set()
                if b["kind"] == "cols":
                    seen |= {("bwd-tiles", "cols")} if b["TILES"] > 1 else set()
                    seen |= {("bwd-cblocks", "cols")} if b["grid"][1] > 1 else set()
                else:
                    seen |= {("bwd-ntiles", "planes")} if b["N_TILES"] > 1 else set()
                    seen |= {("bwd-hwtiles", "planes")} if b["HW_TILES"] > 1 else set()
                    seen |= {("bwd-hblocks", "planes")} if b["grid"][2] > 1 else set()
                    seen |= {("bwd-nblocks", "planes")} if b["grid"][1] > 1 else set()
                    seen |= {("bwd-n-and-hblocks", "planes")} if b["grid"][1] > 1 and b["grid"][2] > 1 else set()
                if b["P"] > K._sum_config(b["P"], C)["BLOCK_P"]:
                    seen.add(("sum-loop", b["kind"]))
    want = {("fwd-rows", K.MODE_PLANES), ("fwd-cols", K.MODE_PLANES), ("fwd-rows", K.MODE_COLS),
            ("fwd-cols", K.MODE_COLS), ("fwd-flat-blocks", "nchw"), ("fwd-flat-blocks", "nhwc"),
            ("bwd-P", "cols"), ("bwd-P", "planes"), ("bwd-tiles", "cols"), ("bwd-cblocks", "cols"),
            ("bwd-ntiles", "planes"), ("bwd-hwtiles", "planes"), ("bwd-hblocks", "planes"),
            ("bwd-nblocks", "planes"), ("bwd-n-and-hblocks", "planes"), ("sum-loop", "cols")}
    assert want <= seen, want - seen


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_fmt)
@pytest.mark.parametrize("shape", MULTI_TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_multi_tile_paths(monkeypatch, shape, dtype, layout):
    """The Triton kernels with 16-element tiles and ~4 backward programs (see above)."""
    pytest.importorskip("triton")
    _small_tiles(monkeypatch)
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, go = make_inputs(shape, dtype, layout, c, seed=7)
    ref = reference(x, s, b, i, i_s, i_b, True, go)
    out, grads = run_op(x, s, b, i, i_s, i_b, True, "triton", ref["go"])
    check_against_reference(x, s, b, i, i_s, i_b, True, out, grads, ref, f"tiles/{shape}/{layout}")


def test_triton_tilings_cover_all_modes():
    """The parity shapes reach each forward tiling (flat, NCHW planes, channels_last columns)."""
    pytest.importorskip("triton")
    from resnet_kernels.triton_ops import bn_add_relu as K

    modes = set()
    for N, C, H, W in SHAPES:
        if N == 0:
            continue
        for lay in ("nchw", "nhwc"):
            for dt in DTYPES:
                cfg = K._forward_config(N, C, H * W, lay, torch.empty(0, dtype=dt).element_size())
                modes.add(cfg["MODE"])
    assert modes == {K.MODE_FLAT, K.MODE_PLANES, K.MODE_COLS}


def test_triton_backward_reductions_span_programs():
    """With the default tiles (no monkeypatching) several parity shapes split each channel's
    backward reduction over P > 1 programs: in each layout and dtype at least one shape, and at
    least two (shape, layout) pairs in all (a partials-combine bug then fails the parity tests)."""
    pytest.importorskip("triton")
    from resnet_kernels.triton_ops import bn_add_relu as K

    dev = torch.device(rt.DEVICE)
    for dt in DTYPES:
        size = torch.empty(0, dtype=dt).element_size()
        multi = {(s, lay) for s in SHAPES if s[0] for lay in ("nchw", "nhwc")
                 if K._backward_config(s[0], s[1], s[2] * s[3], lay, size, dev)["P"] > 1}
        assert {lay for _, lay in multi} == {"nchw", "nhwc"} and len(multi) >= 2, (dt, multi)


@pytest.mark.parametrize("backend", rt.KERNEL_BACKENDS)
def test_backward_is_deterministic(backend):
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, go = make_inputs((3, 16, 7, 7), torch.float32, "channels_last", c, seed=11)
    _, g1 = run_op(x, s, b, i, i_s, i_b, True, backend, go)
    _, g2 = run_op(x, s, b, i, i_s, i_b, True, backend, go)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------
def _away_from_kink(x, s, b, i, i_s, i_b):
    """Moves x so every pre-activation is at least 0.3 from 0 (finite differences across the ReLU
    kink are meaningless)."""
    C = x.shape[1]
    y = x * s.view(1, C, 1, 1) + b.view(1, C, 1, 1) + i * i_s.view(1, C, 1, 1) + i_b.view(1, C, 1, 1)
    push = torch.where(y.abs() < 0.3, 0.5 * torch.where(y >= 0, 1.0, -1.0) / s.view(1, C, 1, 1),
                       torch.zeros_like(y))
    return (x + push).contiguous(memory_format=torch.channels_last if not x.is_contiguous() else
                                 torch.contiguous_format)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_gradcheck_float64(backend, layout, relu):
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, _ = make_inputs((2, 3, 2, 3), torch.float64, layout, c, seed=5)
    s = s.abs() + 0.5
    x = _away_from_kink(x, s, b, i, i_s, i_b)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, s, b, i, i_s, i_b))

    def f(x, s, b, i, i_s, i_b):
        return bn_add_relu(x, s, b, i, i_s, i_b, relu=relu, backend=backend)

    # under the interpreter every call costs milliseconds: the kernel backends use gradcheck's
    # fast mode (the Jacobian projected on random vectors, still comparing every input's gradient)
    fast = backend != "torch" and rt.interpreting()
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast)

    def g(x, i):
        return add_relu(x, i, backend=backend)

    assert torch.autograd.gradcheck(g, (inputs[0], inputs[3]), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_opcheck_forward_op(backend):
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, _ = make_inputs((2, 3, 3, 4), torch.float32, "nchw", c, seed=2)
    args = tuple(t.requires_grad_(True) for t in (x, s, b, i, i_s, i_b))
    torch.library.opcheck(torch.ops.resnet_kernels.bn_add_relu.default, args + (True, backend))
    # optional operands absent, channels_last, no grad
    x2, _, _, i2, _, _, _ = make_inputs((2, 3, 3, 4), torch.float16, "channels_last", COMBOS["add_relu"])
    torch.library.opcheck(torch.ops.resnet_kernels.bn_add_relu.default, (x2, None, None, i2, None, None, True, backend))


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_opcheck_backward_op(backend):
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, go = make_inputs((2, 3, 3, 4), torch.float32, "channels_last", c, seed=4)
    out = bn_add_relu(x, s, b, i, i_s, i_b, backend="torch")
    op = torch.ops.resnet_kernels.bn_add_relu_backward.default
    # all gradients
    torch.library.opcheck(op, (go, out, x, s, i, i_s, True, True, True, True, True, True, backend))
    # relu=False (no mask), only elementwise gradients
    torch.library.opcheck(op, (go, None, None, s, None, i_s, False, True, True, False, False, False, backend))


class _Block(nn.Module):
    """conv -> BNAddReLU(projection shortcut) -> add_relu: the residual epilogue inside a model."""

    def __init__(self, backend):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(4, 4, 1, bias=False)
        self.epi = rk.nn.BNAddReLU(4, shortcut_bn=True, backend=backend)
        self.add = rk.nn.AddReLU(backend=backend)

    def forward(self, x):
        y = self.epi(self.conv(x), self.proj(x))
        return self.add(y, x)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block(backend).to(DEV)
    compiled_mod = copy.deepcopy(eager)
    # inductor needs a GPU toolchain to be quick; on CPU aot_eager still traces the op through
    # dynamo + AOTAutograd (fake tensor kernels, autograd registration, functionalization)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="inductor" if rt.HAS_GPU else "aot_eager")
    x = torch.randn(2, 4, 5, 5, device=DEV)
    for step in range(2):
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        ye = eager(xe)
        yc = compiled(xc)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled_mod.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, be), (_, bc) in zip(eager.named_buffers(), compiled_mod.named_buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-6, atol=1e-6, msg=n)
    assert int(compiled_mod.epi.bn.num_batches_tracked) == 2


# --------------------------------------------------------------------------------------------
# strides, dtypes of the per-channel parameters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_grad_with_expanded_and_odd_strides(backend, layout):
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, _ = make_inputs((2, 3, 4, 5), torch.float32, layout, c, seed=9)
    s = s.abs() + 0.5
    x = _away_from_kink(x, s, b, i, i_s, i_b)
    names = ["x", "scale", "shift", "identity", "id_scale", "id_shift"]
    # out.sum().backward(): autograd hands the op an expanded (all-zero strides) gradient;
    # then a transposed gradient (neither NCHW nor channels_last)
    go_t = torch.randn(2, 3, 5, 4, device=DEV).transpose(2, 3)
    assert not go_t.is_contiguous() and not go_t.is_contiguous(memory_format=torch.channels_last)
    for tag, go in (("sum", None), ("transposed", go_t)):
        xs = [t.detach().clone().requires_grad_(True) for t in (x, s, b, i, i_s, i_b)]
        out = bn_add_relu(*xs, backend=backend)
        if go is None:
            out.sum().backward()
            go = torch.ones_like(x)
        else:
            out.backward(go)
        ref = reference(x, s, b, i, i_s, i_b, True, go)
        assert torch.equal(ref["go"], go)  # no element near the kink
        check_against_reference(x, s, b, i, i_s, i_b, True, out, dict(zip(names, [t.grad for t in xs])), ref,
                                f"{backend}/{layout}/{tag}")


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_half_precision_per_channel_parameters(backend):
    """fp16 scale/shift (e.g. the affine of a model.half() BN) are accepted; their gradients come
    back in fp16."""
    c = COMBOS["bn_add_relu_proj"]
    x, s, b, i, i_s, i_b, go = make_inputs((2, 4, 3, 3), torch.float16, "nchw", c, seed=13)
    s16, b16, is16, ib16 = (t.half() for t in (s, b, i_s, i_b))
    ref = reference(x, s16, b16, i, is16, ib16, True, go)
    out, grads = run_op(x, s16, b16, i, is16, ib16, True, backend, ref["go"])
    check_against_reference(x, s16, b16, i, is16, ib16, True, out, grads, ref, f"{backend}/fp16-params")
    for k in ("scale", "shift", "id_scale", "id_shift"):
        assert grads[k].dtype == torch.float16


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_half_module(backend):
    """BNAddReLU(...).half() with fp16 activations matches the same module in fp32 to fp16 accuracy."""
    torch.manual_seed(0)
    m32 = rk.nn.BNAddReLU(5, shortcut_bn=True, backend=backend).to(DEV)
    with torch.no_grad():
        for bn in (m32.bn, m32.shortcut_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    m16 = copy.deepcopy(m32).half()
    x = torch.randn(2, 5, 4, 4, device=DEV)
    i = torch.randn(2, 5, 4, 4, device=DEV)
    # fp16 vs fp32, each within the policy's fp16 floor over the M = 32 rows of the statistics:
    # 2x that (~2e-3, was 2e-2; measured max error 1.7e-3 at |y| ~ 3, i.e. 6e-4 relative)
    tol = 2 * testing.floor(torch.float16, 2 * 4 * 4)
    for mode in ("train", "eval"):
        getattr(m32, mode)()
        getattr(m16, mode)()
        y32 = m32(x, i)
        y16 = m16(x.half(), i.half())
        assert y16.dtype == torch.float16
        torch.testing.assert_close(y16.float(), y32, atol=tol, rtol=tol)
        y16.float().sum().backward()
        assert m16.bn.weight.grad.dtype == torch.float16 and torch.isfinite(m16.bn.weight.grad).all()
    torch.testing.assert_close(m16.bn.running_mean.float(), m32.bn.running_mean, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------
def _good(dtype=torch.float32, shape=(2, 3, 4, 4)):
    x = torch.randn(shape, dtype=dtype, device=DEV)
    i = torch.randn(shape, dtype=dtype, device=DEV)
    s = torch.rand(shape[1], device=DEV)
    return x, s, s.clone(), i


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_bad_inputs(backend):
    x, s, b, i = _good()

    def call(*a, **k):
        k.setdefault("backend", backend)
        return bn_add_relu(*a, **k)

    with pytest.raises(TypeError, match=r"x must be float32, float16, bfloat16 or float64, got torch.int32"):
        call(x.int(), s, b, i.int())
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        call(x.tolist(), s, b, i)
    with pytest.raises(ValueError, match=r"x must be a 4-D \(N, C, H, W\) tensor, got shape \(3, 4, 4\)"):
        call(x[0], s, b, i[0])
    with pytest.raises(ValueError, match=r"identity must have the shape of x \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        call(x, s, b, torch.randn(2, 3, 4, 5, device=DEV))
    with pytest.raises(TypeError, match=r"identity must have the dtype of x \(torch.float32\), got torch.float16"):
        call(x, s, b, i.half())
    with pytest.raises(ValueError, match=r"identity must be on x's device"):
        call(x, s, b, i.to("meta"))
    with pytest.raises(ValueError, match=r"identity must have the same memory layout as x \(NCHW-contiguous\)"):
        call(x, s, b, i.contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"identity must have the same memory layout as x \(channels_last\)"):
        call(x.contiguous(memory_format=torch.channels_last), s, b, i)
    with pytest.raises(ValueError, match=r"scale must be a 1-D tensor of C=3 per-channel values, got shape \(4,\)"):
        call(x, torch.rand(4, device=DEV), b, i)
    with pytest.raises(ValueError, match=r"identity_shift must be a 1-D tensor of C=3"):
        call(x, s, b, i, s, torch.rand(3, 1, device=DEV))
    with pytest.raises(TypeError, match=r"shift must be float32"):
        call(x, s, torch.ones(3, dtype=torch.int64, device=DEV), i)
    with pytest.raises(TypeError, match=r"shift must be a torch.Tensor or None"):
        call(x, s, [0.0, 0.0, 0.0], i)
    with pytest.raises(ValueError, match=r"scale must be on the activations' device"):
        call(x, s.to("meta"), b, i)
    with pytest.raises(ValueError, match=r"x must be contiguous in NCHW or channels_last memory format"):
        call(x[:, :, :, ::2], s, b, i[:, :, :, ::2])
    with pytest.raises(ValueError, match=r"x must be contiguous in NCHW or channels_last"):
        call(x[:, :2], s[:2], b[:2], i[:, :2])
    with pytest.raises(ValueError, match=r"identity_scale/identity_shift were given without identity"):
        call(x, s, b, None, s)
    with pytest.raises(TypeError, match=r"add_relu: identity must be a tensor, got None"):
        add_relu(x, None, backend=backend)


def test_unknown_backend():
    x, s, b, i = _good()
    names = ", ".join(repr(n) for n in ("auto",) + rk.BACKENDS)
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of ({names}), got 'cudnn'")):
        bn_add_relu(x, s, b, i, backend="cudnn")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        add_relu(x, i, backend=3)


@pytest.mark.skipif(rt.HAS_GPU and rk.backend_status("cuda")[0], reason="the cuda backend is usable here")
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (0, 3, 4, 4)], ids=["nonempty", "empty"])
def test_cuda_backend_unavailable_says_why(shape):
    x, s, b, i = _good(shape=shape)
    ok, why = rk.backend_status("cuda", x.device)
    assert not ok and why
    with pytest.raises(BackendUnavailableError, match=r"bn_add_relu: backend 'cuda' is unavailable: " + re.escape(why)):
        bn_add_relu(x, s, b, i, backend="cuda")
    with rk.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match=re.escape(why)):
            add_relu(x, i)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    if rt.HAS_GPU:
        pytest.skip("CPU tensors with a GPU present: covered by the message check below only without one")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, s, b, i = _good()
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' is unavailable: the triton backend runs on "
                                                      r"CUDA tensors \(or CPU tensors under TRITON_INTERPRET=1"):
        bn_add_relu(x, s, b, i, backend="triton")


def test_backward_op_validation():
    x, s, b, i = _good()
    go = torch.randn_like(x)
    op = torch.ops.resnet_kernels.bn_add_relu_backward.default
    with pytest.raises(ValueError, match=r"out \(the saved forward output, the ReLU mask\) is required"):
        op(go, None, x, s, i, s, True, True, True, True, True, True, "torch")
    with pytest.raises(ValueError, match=r"x is required to compute the gradient of scale"):
        op(go, x, None, s, i, s, True, True, True, True, True, True, "torch")
    with pytest.raises(ValueError, match=r"identity is required to compute the gradient of identity_scale"):
        op(go, x, x, s, None, s, True, True, True, True, True, True, "torch")
    with pytest.raises(ValueError, match=r"out must have the shape of grad_out"):
        op(go, x[:1], x, s, i, s, True, True, True, True, True, True, "torch")


def test_auto_backend_and_scopes_dispatch():
    """Explicit 'auto' means auto even inside a use_backend scope; CPU tensors resolve to aten."""
    x, s, b, i = _good()
    with rk.use_backend("cuda"):
        y = bn_add_relu(x, s, b, i, backend="auto")  # would raise if the scope's 'cuda' were used
    torch.testing.assert_close(y, bn_add_relu(x, s, b, i, backend="torch"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_nan_propagates_like_torch_relu(backend, layout):
    """relu(NaN) is NaN in PyTorch (nn.ReLU, torch.relu): a NaN activation must not be hidden."""
    x, s, b, i = _good()
    x = rt.layouts(x, layout)
    i = rt.layouts(i, layout)
    x[0, 1, 2, 3] = float("nan")
    i[1, 2, 0, 0] = float("nan")
    y = bn_add_relu(x, s, b, i, backend=backend)
    nan = torch.isnan(y)
    assert nan[0, 1, 2, 3] and nan[1, 2, 0, 0] and int(nan.sum()) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_bf16_stores_round_to_nearest_even(layout):
    """Every bf16 value the Triton kernels store (forward output, grad_x, grad_identity) is the
    fp32 result rounded to nearest even, as the GPU's conversion does, also under the Triton
    interpreter, whose own fp32 -> bf16 cast truncates. Truncation biased stored values towards
    zero by half an ulp on average: in ``resnet-kernels check --dtypes bf16`` that moved
    BN-normalised values within an ulp of zero across the ReLU, and the flipped ReLU-mask elements
    gave gradient errors 10-30x PyTorch's own. The per-channel scales have 7 significant bits, so
    every product below is exact in fp32 (no FMA-contraction ambiguity on the GPU) and the only
    rounding is the fp32 sums, done in the same order as torch: the results must be bitwise equal
    to torch's round-to-nearest-even conversion of the same fp32 computation."""
    g = torch.Generator().manual_seed(23)
    shape = (2, 8, 4, 4)  # 2-D tilings: C = 8 (channels_last columns), H*W = 16 (NCHW planes)

    def act():
        return rt.layouts(torch.randn(shape, generator=g).to(torch.bfloat16), layout).to(DEV)

    def vec7():  # 1 + k/64: 7 significant bits
        return (1 + torch.randint(1, 64, (shape[1],), generator=g) / 64).float().to(DEV)

    x, i, go = act(), act(), act()
    s, i_s = vec7(), vec7()
    b, i_b = torch.randn(shape[1], generator=g).to(DEV), torch.randn(shape[1], generator=g).to(DEV)
    out, grads = run_op(x, s, b, i, i_s, i_b, False, "triton", go)

    def per_c(v):
        return v.view(1, -1, 1, 1)

    pre = (x.float() * per_c(s) + per_c(b)) + (i.float() * per_c(i_s) + per_c(i_b))  # the kernel's fp32 order
    want = pre.to(torch.bfloat16)
    assert (want.float() != pre).sum().item() > out.numel() // 2, "the fp32 results must not be bf16 values"
    for what, got, exp in (("out", out, want),
                           ("grad_x", grads["x"], (go.float() * per_c(s)).to(torch.bfloat16)),
                           ("grad_identity", grads["identity"], (go.float() * per_c(i_s)).to(torch.bfloat16))):
        bad = int((got != exp).sum())
        assert bad == 0, f"{what}: {bad} of {got.numel()} bf16 elements not rounded to nearest even"


# The bandwidth floor (>= 85% of a device copy) is a benchmark: benchmarks/test_bandwidth_floor.py.
