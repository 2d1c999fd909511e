"""The cutlass conv2d_backward (resnet_kernels/backends/cutlass_conv_backward.py): one separate operand
pass, then CUTLASS sm_90a dgrad and wgrad (csrc/sm90/conv2d_sm90_bwd.cu). The kernels are
compile-verified only (their SASS: tests/test_sm90_bwd_sass.py); no GPU has run them.

Without a GPU (CI):
* ``cutlass_conv_bwd_supports`` accepts what the kernels implement and names every reason it refuses
  the rest (dtype, layout, channel multiples of 8, stride with grad_x, TMA limits);
* the cost declaration, against the passes counted by hand;
* the Python glue with a fake ``_C`` for the two sm_90a entry points (a float64 torch model of each
  kernel's contract, which also asserts the layouts the real kernels require), around the real
  csrc operand / epilogue passes (the host runner), for every optional part of the op (mask as an
  activation or 1-bit, coef, residual + res_mask, the upstream reductions, x recomputed from up_y)
  and both weight layouts, against the float64 reference;
* the C++ API's argument validation and CUTLASS's host-side can_implement, on _C when it holds the
  kernels (they stop at the device check here).

On an sm_90 GPU (``gpu`` marker): the op with backend='cutlass' against the reference.
"""

from __future__ import annotations

import pytest
import torch

import rk_testing
from resnet_kernels import _bits, _registry
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cutlass_conv_backward as ccb
from resnet_kernels.backends import cutlass_conv_bwd_supports
from resnet_kernels.backends import torch_conv_backward as ref_impl
from resnet_kernels.ops.conv_backward import BackwardCall
from ops.test_conv_backward import CONFIGS, Case, _check  # (tests/ is on the path: pyproject)

C_ = get_C()
HAS_SM90_KERNELS = bool(getattr(C_, "sm90_kernels", False))
FIELDS = ["dtype", "dy", "w", "x", "residual", "grad_x", "grad_w", "workspace", "workspace_bytes", "N", "Cin", "H",
          "W", "Cout", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "OH", "OW", "stream"]

# (id, N, Cin, H, W, Cout, k, stride, pad): channels multiples of 8, odd sizes
SHAPES = [("1x1", 2, 8, 5, 5, 16, 1, 1, 0), ("3x3", 1, 16, 7, 7, 8, 3, 1, 1), ("3x3-pad0", 2, 8, 6, 7, 24, 3, 1, 0)]


def _call(shape=SHAPES[1], config="plain", layout="channels_last", dtype=torch.bfloat16, needs=(True, True, True, True),
          weight_layout="contiguous"):
    case = Case(shape, config, dtype, layout)
    w = case.weight if weight_layout == "contiguous" else case.weight.contiguous(memory_format=torch.channels_last)
    up = case.up_y is not None
    return BackwardCall(case.g, case.mask, case.y, case.mean, case.coef, case.x, w, case.stride, case.padding,
                        case.residual, case.res_mask, case.up_y, case.up_mean, case.up_var, case.up_weight, 1e-5,
                        needs if up else (needs[0], needs[1], False, False), up_bias=case.up_bias)


# ------------------------------------------------------------------------------------------------
# supports(), registry entry, cost
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_supports_accepts_what_the_kernels_implement(config, dtype):
    for shape in SHAPES:
        assert cutlass_conv_bwd_supports(_call(shape, config, dtype=dtype)) is None, (shape, config)


def test_supports_takes_a_strided_call_without_grad_x():
    shape = ("3x3s2", 2, 16, 9, 9, 8, 3, 2, 1)
    assert cutlass_conv_bwd_supports(_call(shape, "proj", needs=(False, True, False, False))) is None
    why = cutlass_conv_bwd_supports(_call(shape, "proj"))
    assert why is not None and "stride=(2, 2) with grad_x" in why and "unit-stride" in why, why


@pytest.mark.parametrize("kw, reason", [
    (dict(dtype=torch.float32), "dtype float32"),
    (dict(layout="nchw"), "not dense channels_last"),
    (dict(shape=("c", 1, 12, 7, 7, 8, 3, 1, 1)), "Cin=12"),
    (dict(shape=("c", 1, 8, 7, 7, 10, 3, 1, 1)), "Cout=10"),
    (dict(shape=("s", 1, 8, 19, 19, 8, 1, 9, 0), needs=(False, True, False, False)), "strides <= 8"),
    (dict(shape=("p", 1, 8, 7, 7, 8, 3, 1, 129)), "padding=(129, 129)"),
])
def test_supports_names_each_reason(kw, reason):
    why = cutlass_conv_bwd_supports(_call(**kw))
    assert why is not None and reason in why, why


def test_supports_lists_every_reason():
    why = cutlass_conv_bwd_supports(_call(("c", 1, 12, 7, 7, 10, 3, 2, 1), layout="nchw", dtype=torch.float32))
    for reason in ("float32", "Cin=12", "Cout=10", "stride=(2, 2)", "channels_last"):
        assert reason in why, why


def test_registered_deterministic_with_a_cost():
    impl = _registry.get_impl("conv2d_backward", "cutlass")
    assert impl is not None and impl.deterministic and impl.cost is not None
    assert impl.supports is cutlass_conv_bwd_supports
    # the fused kernels first in the static order ('auto' measures on CUDA anyway)
    assert impl.priority > _registry.get_impl("conv2d_backward", "triton").priority
    assert _registry.get_backend_decl("cutlass").available(torch.device("cpu")) is not None


def test_cost_counts_the_passes():
    impl = _registry.get_impl("conv2d_backward", "cutlass")
    N, Cin, H, W, Cout, k = 1, 16, 7, 7, 8, 3
    act_x, act_g, wb = N * Cin * H * W * 2, N * Cout * H * W * 2, Cout * Cin * k * k * 2
    # plain, channels_last weight: wgrad (dy, x, grad_w) + dgrad (dy, w, grad_x); no pass, no pack
    wgrad, dgrad = act_g + act_x + wb, act_g + wb + act_x
    assert impl.cost(_call(config="plain", weight_layout="channels_last")) == (2, wgrad + dgrad)
    # a contiguous 3x3 weight: + the KRSC temporary's copy (wgrad) + the pack (dgrad)
    assert impl.cost(_call(config="plain")) == (4, 2 * (act_g + act_x + wb) + 4 * wb)
    # tail (mask, coef, upstream): masking pass + coefficient pass (3 launches) + upstream epilogue (11)
    launches, nbytes = impl.cost(_call(config="tail", weight_layout="channels_last"))
    assert launches == 1 + 3 + 2 + 11
    # grad_weight only: the wgrad and the operand passes
    launches, _ = impl.cost(_call(config="proj", weight_layout="channels_last", needs=(False, True, False, False)))
    assert launches == 1 + 3 + 1


# ------------------------------------------------------------------------------------------------
# the Python glue with a fake _C (float64 models of the two kernels' contracts)
# ------------------------------------------------------------------------------------------------
class _FakeArgs:
    fields = FIELDS


class _FakeSm90:
    """conv2d_sm90_{dgrad,wgrad}[_workspace_bytes] over tensors registered by ``ptr``: what the C++
    contract (csrc/sm90/conv2d_sm90_bwd.h) says, in float64, rounded once; asserts the layouts the
    TMA kernels require (a violation would be garbage on the GPU, not an error)."""

    Conv2dSm90BwdArgs = _FakeArgs

    def __init__(self):
        self.tensors, self.calls = {}, []

    def ptr(self, t):
        if t is None:
            return 0
        key = 4096 * (len(self.tensors) + 1)
        self.tensors[key] = t
        return key

    def conv2d_sm90_dgrad_workspace_bytes(self, a):
        return 0

    def conv2d_sm90_wgrad_workspace_bytes(self, a):
        return 0

    def _dense_nhwc(self, key, shape):
        t = self.tensors[key]
        assert tuple(t.shape) == shape and t.is_contiguous(memory_format=torch.channels_last), (t.shape, t.stride())
        return t

    def conv2d_sm90_dgrad(self, a):
        self.calls.append("dgrad")
        assert a.stride_h == a.stride_w == 1
        dy = self._dense_nhwc(a.dy, (a.N, a.Cout, a.OH, a.OW))
        gx = self._dense_nhwc(a.grad_x, (a.N, a.Cin, a.H, a.W))
        w = self.tensors[a.w]
        if w.dim() == 2:  # the packed (Cout, KH*KW*Cin) KRSC matrix
            assert w.is_contiguous() and w.shape == (a.Cout, a.KH * a.KW * a.Cin)
            w = w.view(a.Cout, a.KH, a.KW, a.Cin).permute(0, 3, 1, 2)
        else:
            assert w.is_contiguous(memory_format=torch.channels_last)
        out = torch.nn.grad.conv2d_input(tuple(gx.shape), w.double(), dy.double(), padding=(a.pad_h, a.pad_w))
        if a.residual:
            out = out + self._dense_nhwc(a.residual, tuple(gx.shape)).double()
        gx.copy_(out)

    def conv2d_sm90_wgrad(self, a):
        self.calls.append("wgrad")
        dy = self._dense_nhwc(a.dy, (a.N, a.Cout, a.OH, a.OW))
        x = self._dense_nhwc(a.x, (a.N, a.Cin, a.H, a.W))
        gw = self._dense_nhwc(a.grad_w, (a.Cout, a.Cin, a.KH, a.KW))  # KRSC memory
        gw.copy_(torch.nn.grad.conv2d_weight(x.double(), tuple(gw.shape), dy.double(), stride=(a.stride_h, a.stride_w),
                                             padding=(a.pad_h, a.pad_w)))


@pytest.fixture
def fake_sm90(monkeypatch, cuda_target):
    if cuda_target != "cpu":
        pytest.skip("the fake _C stands in on the host runner (CPU) only")
    fake = _FakeSm90()
    monkeypatch.setattr(ccb, "C_module", lambda: fake)
    monkeypatch.setattr(ccb, "ptr", fake.ptr)
    monkeypatch.setattr(ccb, "call", lambda name, a: getattr(fake, name)(a))
    return fake


def _run(case: Case, weight, needs=(True, True)):
    up = case.up_y is not None
    call = BackwardCall(case.g, case.mask, case.y, case.mean, case.coef, case.x, weight, case.stride, case.padding,
                        case.residual, case.res_mask, case.up_y, case.up_mean, case.up_var, case.up_weight, 1e-5,
                        (needs[0], needs[1], up, up), up_bias=case.up_bias)
    assert cutlass_conv_bwd_supports(call) is None
    got = call.run(_registry.get_impl("conv2d_backward", "cutlass"))
    return tuple(t if t.numel() else None for t in got)


@pytest.mark.parametrize("bits", [False, True], ids=["act-mask", "bit-mask"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_glue_matches_the_reference(shape, config, weight_layout, bits, fake_sm90):
    case = Case(shape, config, torch.bfloat16, "channels_last")
    if bits:
        case.mask = None if case.mask is None else _bits.pack(case.mask)
        case.res_mask = None if case.res_mask is None else _bits.pack(case.res_mask)
    weight = case.weight if weight_layout == "contiguous" else case.weight.contiguous(memory_format=torch.channels_last)
    got = _run(case, weight)  # (outputs NaN-poisoned: tests/conftest.py)
    ref = case.run("torch", dtype=torch.float64)
    pt = case.run("aten")
    assert fake_sm90.calls == ["wgrad", "dgrad"]
    assert got[1].stride() == weight.stride(), "grad_weight in the weight's layout"
    _check(case, got, pt, ref)


def test_glue_grad_weight_only_runs_the_wgrad_alone(fake_sm90):
    shape = ("3x3s2", 2, 16, 9, 9, 8, 3, 2, 1)  # strided: no dgrad, the wgrad takes it
    case = Case(shape, "proj", torch.float16, "channels_last")
    got = _run(case, case.weight, needs=(False, True))
    assert fake_sm90.calls == ["wgrad"] and got[0] is None
    ref = ref_impl.bn_dy(case.g.double(), case.mask, case.y, case.mean, case.coef, torch.float64)
    want = torch.nn.grad.conv2d_weight(case.x.double(), tuple(case.weight.shape), ref.to(case.g.dtype).double(),
                                       stride=(2, 2), padding=(1, 1))
    torch.testing.assert_close(got[1].double(), want, rtol=2e-2, atol=2e-2)


def test_fake_args_are_the_bound_struct():
    if not HAS_SM90_KERNELS:
        pytest.skip("_C was built without the CUTLASS sm_90a kernels: " + str(getattr(C_, "sm90_note", "no _C")))
    assert list(C_.Conv2dSm90BwdArgs.fields) == FIELDS


# ------------------------------------------------------------------------------------------------
# the C++ API's validation (on _C with the kernels; without an sm_90 GPU they stop at the device)
# ------------------------------------------------------------------------------------------------
def _args(**over):
    from resnet_kernels.backends import cuda_common

    a = dict(dtype=2, dy=4096, w=8192, x=12288, residual=0, grad_x=16384, grad_w=20480, workspace=0, workspace_bytes=0,
             N=2, Cin=16, H=9, W=9, Cout=24, KH=3, KW=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, OH=9, OW=9, stream=0)
    a.update(over)
    return cuda_common.fill_args(C_.Conv2dSm90BwdArgs, **a)


needs_kernels = pytest.mark.skipif(not HAS_SM90_KERNELS, reason="_C was built without the CUTLASS sm_90a kernels: "
                                   + str(getattr(C_, "sm90_note", "no _C")))


@needs_kernels
@pytest.mark.parametrize("kind", ["dgrad", "wgrad"])
@pytest.mark.parametrize("over, match", [
    (dict(dtype=0), "float16 or bfloat16"),
    (dict(Cin=12), "Cin must be a multiple of 8"),
    (dict(Cout=20), "Cout must be a multiple of 8"),
    (dict(OH=8), "OH, OW"),
    (dict(dy=4100), "16-byte aligned"),
    (dict(dy=0), "dy is a null"),
    (dict(stride_h=9, stride_w=9, KH=1, KW=1, pad_h=0, pad_w=0, OH=1, OW=1), "stride must be"),
    (dict(pad_h=129, H=300, OH=556), "TMA im2col corner"),
])
def test_C_rejects_bad_arguments(kind, over, match):
    for fn in (getattr(C_, f"conv2d_sm90_{kind}_workspace_bytes"), getattr(C_, f"conv2d_sm90_{kind}")):
        with pytest.raises(ValueError, match=match):
            fn(_args(**over))


@needs_kernels
def test_C_dgrad_is_unit_stride_and_names_its_pointers():
    with pytest.raises(ValueError, match=r"stride must be \(1, 1\)"):
        C_.conv2d_sm90_dgrad(_args(stride_h=2, stride_w=2, OH=5, OW=5))
    with pytest.raises(ValueError, match="grad_x is a null"):
        C_.conv2d_sm90_dgrad(_args(grad_x=0))
    with pytest.raises(ValueError, match="grad_w is a null"):
        C_.conv2d_sm90_wgrad(_args(grad_w=0))
    with pytest.raises(ValueError, match="x is a null"):
        C_.conv2d_sm90_wgrad(_args(x=0))


@needs_kernels
@pytest.mark.parametrize("kind", ["dgrad", "wgrad"])
@pytest.mark.parametrize("over", [
    dict(),
    dict(residual=1 << 20, dtype=1),
    dict(KH=1, KW=1, pad_h=0, pad_w=0, Cin=64, Cout=256),
    dict(H=56, W=56, OH=56, OW=56, Cin=64, Cout=64, N=4),
])
def test_C_valid_arguments_pass_cutlass_checks_and_stop_at_the_device(kind, over):
    """Valid arguments get through our validation and CUTLASS's host-side can_implement (run before
    the device check on purpose) and, without an sm_90 GPU, stop at the device check."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this machine has an sm_90 GPU")
    need = getattr(C_, f"conv2d_sm90_{kind}_workspace_bytes")(_args(**over))
    assert need >= 0 and need % 256 == 0
    with pytest.raises((ValueError, RuntimeError), match="9.0|cudaGetDevice|no CUDA") as e:
        getattr(C_, f"conv2d_sm90_{kind}")(_args(workspace=1 << 24, workspace_bytes=need, **over))
    assert "CUTLASS cannot implement" not in str(e.value)


@needs_kernels
def test_C_wgrad_takes_strides():
    need = C_.conv2d_sm90_wgrad_workspace_bytes(_args(stride_h=2, stride_w=2, OH=5, OW=5))
    assert need >= 0


# ------------------------------------------------------------------------------------------------
# on an sm_90 GPU
# ------------------------------------------------------------------------------------------------
@rk_testing.needs_gpu("the CUTLASS sm_90a convolution backward")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the sm_90a kernels run on compute capability 9.0 GPUs only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES + [("tiles", 2, 136, 9, 9, 200, 3, 1, 1)], ids=lambda s: s[0])
def test_cutlass_matches_the_reference_on_gpu(shape, config, dtype):
    case = Case(shape, config, dtype, "channels_last")
    got = case.run("cutlass", device="cuda")
    ref = case.run("torch", dtype=torch.float64)
    pt = case.run("aten", device="cuda")
    _check(case, got, pt, ref)
    again = case.run("cutlass", device="cuda")
    for a, b in zip(got, again):
        assert (a is None and b is None) or torch.equal(a, b), "not deterministic"
