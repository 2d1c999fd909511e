"""CUDA backend of bn_add_relu (csrc/bn_add_relu.cu, csrc/bn_add_relu_backward.cu) against the
torch backend (resnet_kernels/backends/torch_bn_add_relu.py), forward and every gradient.

Tolerances: ``rk_testing.ELEMENTWISE_TOL`` (both compute in fp32/fp64 and round once; the CUDA
kernel rounds its products separately like the reference, so at most one ulp of the stored
dtype apart) and ``rk_testing.REDUCTION_TOL`` (per-channel sums in fp32/fp64, different
summation order). Outputs the op allocates are poisoned with NaN (conftest), so an element the
kernel does not write fails.

Without a GPU the parity tests run csrc's own kernel source on CPU tensors through the host
runner (the ``cuda_target`` fixture, tests/host_runner.py), at smaller shapes (``BIG`` below: still
several partial sums per channel in both backward tilings). The argument-validation tests of the
C++ API need no GPU (validation happens before any CUDA call) and run on ``_C`` when it is built
and on the host runner's build of the same source.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import rk_testing as rt
from resnet_kernels import _alloc
from resnet_kernels._ext import get_C
from resnet_kernels.ops.bn_add_relu import bn_add_relu

from resnet_kernels.backends import cuda_common

C_ = get_C()
needs_gpu = rt.needs_gpu("the CUDA kernels")
# A real ResNet stage on a GPU; on the host runner (one CTA at a time on the CPU) a tensor that
# still gives several partial sums per channel in both backward tilings (NCHW P = 2, NHWC P = 5).
BIG = (2, 64, 56, 56) if rt.HAS_GPU else (1, 4, 96, 96)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
# N=1/C=3 (the document's odd channel count: scalar path), 7x7 (odd plane: scalar NCHW), a real
# ResNet stage (C=64, 56x56: vector paths, several partial sums per channel), odd sizes, an
# empty batch, 1x1 spatial (NCHW == NHWC), C not a multiple of the vector width, large C,
# 14x14 planes and C = 12 (16-bit types: 8-byte vectors, 196 and 12 are multiples of 4, not 8).
SHAPES = [(1, 3, 7, 7), BIG, (3, 5, 9, 11), (0, 4, 5, 5), (4, 16, 1, 1), (2, 24, 7, 7),
          (2, 12, 4, 6), (3, 520, 2, 2), (2, 8, 14, 14)]
# (scale, shift, identity, id_scale, id_shift, relu)
COMBOS = {
    "add_relu": (0, 0, 1, 0, 0, 1),
    "bn_add_relu": (1, 1, 1, 0, 0, 1),
    "bn_add_relu_proj": (1, 1, 1, 1, 1, 1),
    "proj_norelu": (1, 1, 1, 1, 1, 0),
    "bn_relu": (1, 1, 0, 0, 0, 1),
    "scale_only": (1, 0, 0, 0, 0, 0),
    "shift_id_scale": (0, 1, 1, 1, 0, 1),
    "id_shift_only": (0, 0, 1, 0, 1, 0),
}


def _name(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


def make(shape, dtype, layout, combo, requires_grad=False, seed=0, dev="cuda"):
    g = torch.Generator().manual_seed(seed)
    acc = rt.acc_of(dtype)
    C = shape[1]

    def act():
        t = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(dev)
        return t.requires_grad_(requires_grad)

    def vec():
        return (torch.rand(C, generator=g, dtype=torch.float64) * 3 - 1.5).to(acc).to(dev).requires_grad_(
            requires_grad)

    s, b, i, is_, ib, relu = combo
    x = act()
    identity = act() if i else None
    ops = dict(scale=vec() if s else None, shift=vec() if b else None, identity=identity,
               identity_scale=vec() if is_ else None, identity_shift=vec() if ib else None)
    return x, ops, bool(relu)


def close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.stride() == expected.stride() or actual.numel() == 0, f"{what}: strides differ"
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# op level: forward and autograd, cuda vs torch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_forward_backward_matches_torch(dtype, layout, shape, combo, cuda_target):
    x, ops, relu = make(shape, dtype, layout, COMBOS[combo], requires_grad=True, dev=cuda_target)
    out = bn_add_relu(x, **ops, relu=relu, backend="cuda")
    ref = bn_add_relu(x, **ops, relu=relu, backend="torch")
    close(out, ref, rt.ELEMENTWISE_TOL[dtype], "out")

    leaves = [("x", x)] + [(k, v) for k, v in ops.items() if v is not None]
    go = rt.layouts(torch.randn(shape, dtype=dtype, device=cuda_target), layout)
    g_cuda = torch.autograd.grad(out, [v for _, v in leaves], go)
    g_ref = torch.autograd.grad(ref, [v for _, v in leaves], go)
    for (name, leaf), a, e in zip(leaves, g_cuda, g_ref):
        per_channel = leaf.dim() == 1
        tol = rt.REDUCTION_TOL[dtype] if per_channel else rt.ELEMENTWISE_TOL[dtype]
        close(a, e, tol, f"grad {name}")


# --------------------------------------------------------------------------------------------
# launcher level: every subset of requested backward outputs, misaligned (scalar) paths
# --------------------------------------------------------------------------------------------
def _launch_backward(impl, grad_out, out, x, scale, identity, id_scale, want, C, inner, relu):
    acc = rt.acc_of(grad_out.dtype)
    gx = _alloc.empty_like(grad_out) if want["grad_x"] else None
    gi = _alloc.empty_like(grad_out) if want["grad_identity"] else None
    vec = {k: (_alloc.empty((C,), dtype=acc, device=grad_out.device) if want[k] else None)
           for k in ("grad_scale", "grad_shift", "grad_id_scale")}
    impl.bn_add_relu_backward(grad_out, out if relu else None, x if want["grad_scale"] else None, scale,
                              identity if want["grad_id_scale"] else None, id_scale, gx, gi, vec["grad_scale"],
                              vec["grad_shift"], vec["grad_id_scale"], relu, C, inner)
    return dict(grad_x=gx, grad_identity=gi, **vec)


def _geometry(t, layout):
    N, C, H, W = t.shape
    return C, (H * W if layout == "nchw" else 1)


# Where the activations start in their storage: 16-byte aligned (vector path), one element off
# (scalar path), 8 bytes off (16-bit types: the 8-byte vector path; others: scalar).
OFFSETS = ["aligned", "elem", "8bytes"]


def _offset_elems(offset, dtype):
    es = torch.empty((), dtype=dtype).element_size()
    return {"aligned": 0, "elem": 1, "8bytes": 8 // es}[offset]


def _offset_view(t, layout, elems=1):
    """A copy of ``t`` whose data starts ``elems`` elements into its storage."""
    if elems == 0:
        return t.clone(memory_format=torch.preserve_format)
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    if layout == "nchw":
        v = buf[elems:].view(t.shape)
    else:
        N, C, H, W = t.shape
        v = buf[elems:].view(N, H, W, C).permute(0, 3, 1, 2)
    v.copy_(t)
    return v


OUTPUTS = ("grad_x", "grad_identity", "grad_scale", "grad_shift", "grad_id_scale")
WANTS = [dict(zip(OUTPUTS, bits)) for bits in itertools.product((0, 1), repeat=5) if any(bits)]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", [BIG, (2, 3, 7, 7), (3, 16, 4, 4), (2, 12, 14, 14)], ids=_name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_backward_launcher_every_output_subset(dtype, layout, shape, offset, cuda_target):
    from resnet_kernels.backends import cuda_bn_add_relu as cuda_impl, torch_bn_add_relu as torch_impl

    C, inner = _geometry(torch.empty(shape, device="meta"), layout)
    g = torch.Generator().manual_seed(1)
    acc = rt.acc_of(dtype)

    def act():
        t = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(cuda_target)
        return _offset_view(t, layout, _offset_elems(offset, dtype))

    grad_out, out, x, identity = act(), act(), act(), act()
    scale = (torch.rand(C, generator=g, dtype=torch.float64) * 3 - 1.5).to(acc).to(cuda_target)
    id_scale = (torch.rand(C, generator=g, dtype=torch.float64) * 3 - 1.5).to(acc).to(cuda_target)
    cases = list(itertools.product(WANTS, (True, False), (True, False)))
    if not cuda_target.startswith("cuda"):  # host runner: every third case (each subset, rotating flags)
        cases = cases[::3]
    for want, relu, with_scales in cases:
        sc, isc = (scale, id_scale) if with_scales else (None, None)
        got = _launch_backward(cuda_impl, grad_out, out, x, sc, identity, isc, want, C, inner, relu)
        exp = _launch_backward(torch_impl, grad_out, out, x, sc, identity, isc, want, C, inner, relu)
        for k in OUTPUTS:
            if want[k]:
                tol = rt.REDUCTION_TOL[dtype] if got[k].dim() == 1 else rt.ELEMENTWISE_TOL[dtype]
                close(got[k], exp[k], tol, f"{k} (want={want}, relu={relu}, scales={with_scales})")


@pytest.mark.parametrize("offset", OFFSETS[1:])
@pytest.mark.parametrize("shape", [BIG, (1, 3, 7, 7), (2, 24, 7, 7), (2, 12, 14, 14)], ids=_name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_forward_misaligned(dtype, layout, shape, offset, cuda_target):
    from resnet_kernels.backends import cuda_bn_add_relu as cuda_impl, torch_bn_add_relu as torch_impl

    C, inner = _geometry(torch.empty(shape, device="meta"), layout)
    x, ops, relu = make(shape, dtype, layout, COMBOS["bn_add_relu_proj"], dev=cuda_target)
    k = _offset_elems(offset, dtype)
    xo, io = _offset_view(x, layout, k), _offset_view(ops["identity"], layout, k)
    # per-channel vectors 4 bytes off a 16-byte boundary too (channels_last vector path needs them aligned)
    pc = {k: _offset_view(ops[k].view(1, C, 1, 1), "nchw").view(C)
          for k in ("scale", "shift", "identity_scale", "identity_shift")}
    outs = []
    for impl in (cuda_impl, torch_impl):
        o = _offset_view(_alloc.empty_like(x), layout, k)
        o.fill_(float("nan"))
        impl.bn_add_relu_forward(xo, pc["scale"], pc["shift"], io, pc["identity_scale"], pc["identity_shift"], o,
                                 relu, C, inner)
        outs.append(o)
    close(outs[0], outs[1], rt.ELEMENTWISE_TOL[dtype], "out (misaligned)")


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_deterministic_and_on_stream(layout):
    x, ops, relu = make((8, 64, 28, 28), torch.float32, layout, COMBOS["bn_add_relu_proj"], requires_grad=True,
                        dev="cuda")
    go = rt.layouts(torch.randn(x.shape, device="cuda"), layout)
    stream = torch.cuda.Stream()
    results = []
    for _ in range(2):
        with torch.cuda.stream(stream):
            out = bn_add_relu(x, **ops, relu=relu, backend="cuda")
            grads = torch.autograd.grad(out, [x, ops["scale"], ops["identity_scale"], ops["shift"]], go)
        stream.synchronize()
        results.append([out] + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b), "two identical calls gave different bits (non-deterministic reduction)"
    ref = bn_add_relu(x, **ops, relu=relu, backend="torch")
    close(results[0][0], ref, rt.ELEMENTWISE_TOL[torch.float32], "out on a side stream")


@needs_gpu
def test_forward_more_than_2_31_elements():
    """64-bit indexing: 2^31 + 2^21 fp16 elements (about 4.3 GB per tensor), channels_last."""
    N, C, H, W = 1, 64, 2 ** 13, 2 ** 12 + 2 ** 2  # numel = 2^31 + 2^21
    need = 2 * N * C * H * W * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2 ** 30:.1f} GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")
    x = torch.empty((N, C, H, W), dtype=torch.float16, device="cuda", memory_format=torch.channels_last)
    x.normal_()
    scale = torch.linspace(-1, 1, C, device="cuda")
    shift = torch.linspace(-0.5, 0.5, C, device="cuda")
    out = bn_add_relu(x, scale, shift, None, backend="cuda")
    flat_x, flat_o = x.permute(0, 2, 3, 1).reshape(-1, C), out.permute(0, 2, 3, 1).reshape(-1, C)
    rows = flat_x.shape[0]
    for start in (0, rows // 2 - 7, (2 ** 31) // C - 5, rows - 64):
        sl = slice(start, start + 64)
        exp = torch.relu(flat_x[sl].float() * scale + shift).half()
        close(flat_o[sl], exp, rt.ELEMENTWISE_TOL[torch.float16], f"rows {start}..{start + 64}")
    del x, out, flat_x, flat_o


# --------------------------------------------------------------------------------------------
# C++ API validation (no GPU needed: checks run before any CUDA call), on _C when it is built
# and on the host runner's build of the same source
# --------------------------------------------------------------------------------------------
F32 = 0
P = 1 << 20  # a fake, 16-byte aligned "device pointer": never dereferenced by these calls


@pytest.fixture(params=["_C", "host"])
def api(request):
    if request.param == "_C":
        if C_ is None:
            pytest.skip("resnet_kernels._C is not built (tests/test_sass.py fails if nvcc exists and it is missing)")
        return C_
    return request.getfixturevalue("host_runner_module")


def fwd(api, **kw):
    args = dict(dtype=F32, x=P, scale=0, shift=0, identity=0, id_scale=0, id_shift=0, out=P + 4096,
                numel=2 * 3 * 4, C=3, inner=4, relu=True, stream=0)
    args.update(kw)
    return api.bn_add_relu_forward(cuda_common.fill_args(api.BnAddReluArgs, **args))


def bwd(api, **kw):
    args = dict(dtype=F32, grad_out=P, out=P + 4096, x=0, scale=0, identity=0, id_scale=0, grad_x=P + 8192,
                grad_identity=0, grad_scale=0, grad_shift=0, grad_id_scale=0, workspace=0, workspace_bytes=0,
                numel=2 * 3 * 4, C=3, inner=4, relu=True, stream=0)
    args.update(kw)
    return api.bn_add_relu_backward(cuda_common.fill_args(api.BnAddReluBackwardArgs, **args))


@pytest.mark.parametrize("kw, pattern", [
    (dict(x=0), r"x is a null device pointer"),
    (dict(out=0), r"out is a null device pointer"),
    (dict(numel=-1), r"numel must be >= 0"),
    (dict(C=0), r"C must be > 0"),
    (dict(inner=0), r"inner must be > 0"),
    (dict(numel=25), r"multiple of C\*inner"),
    (dict(C=100), r"exceeds numel"),
    (dict(id_scale=P + 64), r"without identity"),
    (dict(id_shift=P + 64), r"without identity"),
    (dict(x=P + 2), r"x .* not aligned to 4 bytes"),
    (dict(scale=P + 2), r"scale .* not aligned to 4 bytes"),
    (dict(dtype=3, identity=P + 4), r"identity .* not aligned to 8 bytes"),
    (dict(dtype=7), r"dtype"),
])
def test_forward_argument_errors(kw, pattern, api):
    with pytest.raises(ValueError, match=pattern):
        fwd(api, **kw)


def test_forward_empty_is_a_no_op(api):
    assert fwd(api, numel=0, x=0, out=0) is None  # no pointer is touched, no CUDA call is made


@pytest.mark.parametrize("kw, pattern", [
    (dict(grad_out=0), r"grad_out is a null device pointer"),
    (dict(out=0), r"out .* is required when relu=true"),
    (dict(relu=False), r"out was given but relu=false"),
    (dict(grad_scale=P + 12288), r"x is required to compute grad_scale"),
    (dict(x=P + 12288), r"x was given but grad_scale was not requested"),
    (dict(grad_id_scale=P + 12288), r"identity is required to compute grad_id_scale"),
    (dict(identity=P + 12288), r"identity was given but grad_id_scale was not requested"),
    (dict(grad_shift=P + 12288), r"workspace is a null device pointer"),
    (dict(grad_shift=P + 12288, workspace=P + 16384, workspace_bytes=8), r"workspace is too small"),
    (dict(numel=23), r"multiple of C\*inner"),
    (dict(C=-1), r"C must be > 0"),
    (dict(grad_x=P + 2), r"grad_x .* not aligned"),
    (dict(grad_shift=P + 2, workspace=P + 16384, workspace_bytes=1 << 20), r"grad_shift .* not aligned"),
])
def test_backward_argument_errors(kw, pattern, api):
    with pytest.raises(ValueError, match=pattern):
        bwd(api, **kw)


def test_backward_empty_without_sums_is_a_no_op(api):
    assert bwd(api, numel=0, grad_out=0, out=0, grad_x=0) is None


@pytest.mark.parametrize("dtype", [0, 1, 2, 3])
@pytest.mark.parametrize("shape, inner_of", [((2, 64, 56, 56), "nchw"), ((2, 64, 56, 56), "nhwc"),
                                             ((1, 3, 7, 7), "nchw"), ((1, 3, 7, 7), "nhwc"),
                                             ((256, 512, 7, 7), "nchw"), ((256, 512, 7, 7), "nhwc")])
def test_workspace_bytes(dtype, shape, inner_of, api):
    N, C, H, W = shape
    inner = H * W if inner_of == "nchw" else 1
    acc = 8 if dtype == 3 else 4
    n = api.bn_add_relu_backward_workspace_bytes(dtype=dtype, numel=N * C * H * W, C=C, inner=inner)
    # three sums x P partials x C channels, 1 <= P <= 1024
    assert n % (3 * C * acc) == 0 and 3 * C * acc <= n <= 3 * 1024 * C * acc, n
    assert api.bn_add_relu_backward_workspace_bytes(dtype=dtype, numel=0, C=C, inner=inner) == 0
    with pytest.raises(ValueError, match="multiple of C"):
        api.bn_add_relu_backward_workspace_bytes(dtype=dtype, numel=N * C * H * W + 1, C=C, inner=inner)
