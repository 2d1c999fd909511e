"""The CUDA backend's Python wrappers (resnet_kernels/backends/cuda_*.py) and the C++ argument
structs they fill (csrc/*.h, bound once in csrc/module.cpp with py::class_), without a GPU.

* Every member of each C++ args struct is bound (the header's member list == the class's
  ``fields``), and ``cuda_common.fill_args`` refuses a call that leaves a field unset or names one
  the struct does not have; pybind11 refuses unknown attributes and wrong types.
* The public ops with ``backend="cuda"`` on CPU tensors, through the host runner (csrc compiled for
  the CPU, tests/host_runner.py) wrapped in a recorder: each entry point gets one fully filled
  struct with the values the wrapper should derive (strides, workspace, absent operands = 0,
  stream, dtype code). The kernels really run, so the outputs are checked too.
* When ``_C`` itself is built, each recorded struct is replayed on it: it must get past the host
  validation (no ValueError, no TypeError) and fail only at the first CUDA runtime call.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rk_testing as rt
import resnet_kernels as rk
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cuda_common
from resnet_kernels.ops import conv2d_epilogue, conv2d_stats

C_ = get_C()
CSRC = Path(__file__).resolve().parents[2] / "csrc"
STRUCTS = {"Conv2dArgs": "conv2d.h", "BnAddReluArgs": "bn_add_relu.h", "BnAddReluBackwardArgs": "bn_add_relu.h",
           "MaxPool2dArgs": "maxpool.h", "MaxPool2dBackwardArgs": "maxpool.h", "NhwcStatsArgs": "nhwc_stats.h",
           "BatchNormActArgs": "batch_norm.h", "BatchNormActBackwardArgs": "batch_norm.h",
           "BnRunningUpdateArgs": "batch_norm.h", "Conv2dDgradArgs": "conv2d_dgrad.h",
           "Conv2dWgradArgs": "conv2d_wgrad.h"}


def header_members(header: str, struct: str) -> list[str]:
    """Member names of ``struct`` in csrc/<header> (declarations like ``T a, b;`` / ``T a[4];``)."""
    text = (CSRC / header).read_text()
    body = re.search(r"struct\s+" + struct + r"\s*\{(.*?)\n\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        m = re.match(r"^(?:[\w:]+\s+)+(.+)$", decl, re.S)
        assert m, f"{header}: cannot parse member declaration {decl!r}"
        names += [re.sub(r"\[.*\]", "", d).strip() for d in m.group(1).split(",")]
    return names


@pytest.mark.parametrize("struct", list(STRUCTS))
@pytest.mark.parametrize("which", ["_C", "host"])
def test_every_struct_member_is_bound(struct, which, request):
    if which == "_C" and C_ is None:
        pytest.skip("resnet_kernels._C is not built")
    mod = C_ if which == "_C" else request.getfixturevalue("host_runner_module")
    members = header_members(STRUCTS[struct], struct)
    assert len(members) >= 10  # the parser found them all (NhwcStatsArgs, the smallest, has 10)
    assert sorted(getattr(mod, struct).fields) == sorted(members)


@pytest.mark.parametrize("which", ["_C", "host"])
def test_stride_and_dtype_code_errors_name_their_struct(which, request):
    """module.cpp's checked setters (def_strides: 4 entries; def_dtype_field: a dtype code) name the
    struct the field belongs to, e.g. "Conv2dDgradArgs.w_stride", not another struct's."""
    if which == "_C" and C_ is None:
        pytest.skip("resnet_kernels._C is not built")
    mod = C_ if which == "_C" else request.getfixturevalue("host_runner_module")
    seen = set()
    for struct in STRUCTS:
        for field in getattr(mod, struct).fields:
            a = getattr(mod, struct)()
            if field.endswith("_stride"):
                with pytest.raises(ValueError, match=rf"^{struct}\.{field} must have 4 entries, got 3$"):
                    setattr(a, field, [1, 2, 3])
                setattr(a, field, [4, 3, 2, 1])
                assert getattr(a, field) == [4, 3, 2, 1]
            elif field.endswith("_dtype"):
                with pytest.raises(ValueError, match=rf"^{struct}: {field} has unsupported dtype code 9 "):
                    setattr(a, field, 9)
                setattr(a, field, 2)
                assert getattr(a, field) == 2
            else:
                continue
            seen.add(f"{struct}.{field}")
    assert {"Conv2dArgs.x_stride", "Conv2dDgradArgs.w_stride", "Conv2dWgradArgs.gw_stride",
            "Conv2dArgs.bn_weight_dtype", "Conv2dDgradArgs.up_gw_dtype", "Conv2dWgradArgs.up_w_dtype",
            "BatchNormActArgs.id_bias_dtype"} <= seen, sorted(seen)


def test_fill_args_rejects_missing_unknown_and_mistyped_fields(host_runner_module):
    cls = host_runner_module.BnAddReluArgs
    full = dict(dtype=0, x=16, scale=0, shift=0, identity=0, id_scale=0, id_shift=0, out=32, numel=4, C=1,
                inner=4, relu=True, stream=0)
    a = cuda_common.fill_args(cls, **full)
    assert (a.dtype, a.x, a.out, a.numel, a.relu) == (0, 16, 32, 4, True)
    with pytest.raises(TypeError, match=r"not set: \['stream'\]"):
        cuda_common.fill_args(cls, **{k: v for k, v in full.items() if k != "stream"})
    with pytest.raises(TypeError, match=r"unknown fields: \['nmuel'\]"):
        cuda_common.fill_args(cls, **{**{k: v for k, v in full.items() if k != "numel"}, "nmuel": 4})
    with pytest.raises(AttributeError):
        a.nmuel = 3
    with pytest.raises(TypeError):
        a.numel = 2.5
    with pytest.raises(ValueError, match="dtype"):
        a.dtype = 9
    conv = host_runner_module.Conv2dArgs()
    with pytest.raises(ValueError, match="x_stride must have 4 entries"):
        conv.x_stride = [1, 2, 3]
    conv.x_stride = [4, 3, 2, 1]
    assert conv.x_stride == [4, 3, 2, 1] and "x_stride=[4, 3, 2, 1]" in repr(conv)


class _Recorder:
    """The host runner, recording every entry-point call (name, {field: value})."""

    def __init__(self, runner):
        self.runner = runner
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self.runner, name)
        if name in ("conv2d_forward", "bn_add_relu_forward", "bn_add_relu_backward"):
            def call(args):
                self.calls.append((name, {f: getattr(args, f) for f in type(args).fields}))
                return attr(args)
            return call
        return attr


@pytest.fixture
def recorder(cuda_target, host_runner_module):
    if cuda_target != "cpu":
        pytest.skip("with a GPU the real cuda backend runs (tests/ops/test_*_cuda.py)")
    rec = _Recorder(host_runner_module)
    with cuda_common.host_runner(rec):
        yield rec


def _replay_on_real_C(name, fields):
    """The real entry point validates on the host, then fails at its first CUDA call (no GPU)."""
    if C_ is None:
        return
    struct = {"conv2d_forward": "Conv2dArgs", "bn_add_relu_forward": "BnAddReluArgs",
              "bn_add_relu_backward": "BnAddReluBackwardArgs"}[name]
    args = cuda_common.fill_args(getattr(C_, struct), **fields)
    with pytest.raises(RuntimeError) as info:
        getattr(C_, name)(args)
    assert not isinstance(info.value, (TypeError, ValueError)), info.value
    assert "cuda" in str(info.value).lower(), info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_ops_fill_the_struct(recorder, dtype, layout):
    # Cin = 3, padded to Cp = 8 channels (16-bit) / 4 (fp32): K = 72 / 36, ldw = 72 / 40 (zero padded)
    x = rt.layouts(torch.randn(2, 3, 9, 9).to(dtype), layout)
    w = torch.randn(8, 3, 3, 3).to(dtype)
    scale, bias = torch.rand(8) + 0.5, torch.randn(8)
    res = rt.layouts(torch.randn(2, 8, 5, 5).to(dtype), layout)
    out = conv2d_epilogue(x, w, scale, bias, res, stride=2, padding=1, relu=True, backend="cuda")
    assert out.shape == (2, 8, 5, 5)
    ref = torch.relu(F.conv2d(x.double(), w.double(), None, 2, 1) * scale.double().view(1, 8, 1, 1)
                     + bias.double().view(1, 8, 1, 1) + res.double())
    assert (out.double() - ref).abs().max().item() <= 2 ** -6 * ref.abs().max().item()
    y, mean, var = conv2d_stats(x, w, stride=1, padding=1, backend="cuda")
    assert mean.shape == var.shape == (8,) and mean.dtype == var.dtype == torch.float32
    assert not (mean.isnan().any() or var.isnan().any() or y.isnan().any())
    convs = [kw for n, kw in recorder.calls if n == "conv2d_forward"]
    assert len(convs) == 2
    epi, st = convs
    assert epi["mean"] == epi["var"] == epi["workspace"] == 0 and epi["workspace_bytes"] == 0
    assert epi["scale"] != 0 and epi["bias"] != 0 and epi["residual"] != 0 and epi["relu"] is True
    assert epi["x_stride"] == list(x.stride()) and epi["res_stride"] == list(res.stride())
    assert epi["out_stride"] == list(out.stride())
    assert (epi["N"], epi["Cin"], epi["H"], epi["W"], epi["Cout"], epi["KH"], epi["KW"]) == (2, 3, 9, 9, 8, 3, 3)
    assert (epi["stride_h"], epi["stride_w"], epi["pad_h"], epi["pad_w"], epi["OH"], epi["OW"]) == (2, 2, 1, 1, 5, 5)
    assert st["mean"] != 0 and st["var"] != 0 and st["workspace"] != 0 and st["workspace_bytes"] > 0
    assert st["scale"] == st["bias"] == st["residual"] == 0 and st["res_stride"] == [0, 0, 0, 0]
    assert isinstance(epi["allow_tf32"], bool)
    for kw in convs:
        assert kw["stream"] == 0 and kw["ldw"] == (40 if dtype == torch.float32 else 72)
        assert kw["dtype"] == cuda_common.DTYPE_CODES[dtype]
        _replay_on_real_C("conv2d_forward", kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_add_relu_fills_the_structs(recorder, dtype, layout):
    acc = rt.acc_of(dtype)
    x = rt.layouts(torch.randn(2, 4, 3, 5, dtype=dtype), layout).requires_grad_()
    i = rt.layouts(torch.randn(2, 4, 3, 5, dtype=dtype), layout).requires_grad_()
    s, b, i_s, i_b = (torch.rand(4, dtype=acc).requires_grad_() for _ in range(4))
    y = rk.bn_add_relu(x, s, b, i, i_s, i_b, backend="cuda")
    y.backward(torch.ones_like(y))
    ref = rk.bn_add_relu(x, s, b, i, i_s, i_b, backend="torch")
    torch.testing.assert_close(y, ref, **rt.ELEMENTWISE_TOL[dtype])
    assert [n for n, _ in recorder.calls] == ["bn_add_relu_forward", "bn_add_relu_backward"]
    fwd, bwd = (kw for _, kw in recorder.calls)
    C, inner = 4, (15 if layout == "nchw" else 1)
    assert (fwd["C"], fwd["inner"], fwd["numel"]) == (C, inner, x.numel())
    assert (bwd["C"], bwd["inner"], bwd["numel"]) == (C, inner, x.numel())
    assert fwd["dtype"] == bwd["dtype"] == cuda_common.DTYPE_CODES[dtype]
    assert bwd["workspace_bytes"] > 0 and bwd["workspace"] != 0
    for k in ("grad_x", "grad_identity", "grad_scale", "grad_shift", "grad_id_scale", "out", "x", "identity"):
        assert bwd[k] != 0, k
    assert fwd["stream"] == bwd["stream"] == 0
    _replay_on_real_C("bn_add_relu_forward", fwd)
    _replay_on_real_C("bn_add_relu_backward", bwd)


def test_dtype_codes_match_the_C_enum(host_runner_module):
    """cuda_common.DTYPE_CODES against the codes the C++ API documents in its error message
    ("expected 0=float32, 1=float16, 2=bfloat16, 3=float64")."""
    with pytest.raises(ValueError) as info:
        host_runner_module.bn_add_relu_backward_workspace_bytes(dtype=99, numel=1, C=1, inner=1)
    pairs = dict((name, int(code)) for code, name in re.findall(r"(\d+)=(\w+)", str(info.value)))
    assert pairs == {str(d).replace("torch.", ""): c for d, c in cuda_common.DTYPE_CODES.items()}, str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Cin, k", [(3, 7), (5, 3), (12, 3), (64, 1)])
def test_pack_weight_pads_channels_and_the_cost_agrees(dtype, Cin, k):
    """pack_weight pads each tap's channels with zeros to Cp (a multiple of 16 bytes' worth of
    elements, csrc/conv2d.h) and the columns to ldw (a multiple of 8); the accountant's declared
    cost of the cuda conv (backends/__init__.py) uses the same ldw."""
    from types import SimpleNamespace

    from resnet_kernels.backends import _cuda_conv_cost, cuda_conv2d, nbytes

    Cout = 10
    w = torch.randn(Cout, Cin, k, k).to(dtype)
    packed, ldw = cuda_conv2d._pack_weight(w)
    vec = 16 // w.element_size()
    Cp = cuda_conv2d.padded_channels(Cin, w.element_size())
    assert Cp % vec == 0 and Cin <= Cp < Cin + vec
    K = k * k * Cp
    assert packed.shape == (Cout, ldw) and ldw % 8 == 0 and K <= ldw < K + 8
    taps = packed[:, :K].view(Cout, k, k, Cp)
    assert torch.equal(taps[..., :Cin], w.permute(0, 2, 3, 1))
    assert not taps[..., Cin:].any() and not packed[:, K:].any()
    # the declared cost: pack (read w, write its K*Cin part, zero the whole matrix first when padded),
    # the conv (x, packed weight, out); a 1x1 weight with a unit Cin stride and no padding (Cin = 64)
    # is read in place instead: no pack, the conv reads w itself (ldw = K)
    x = torch.empty(2, Cin, 9, 9, dtype=dtype)
    call = SimpleNamespace(weight=w, x=x, shape=(2, Cout, 9, 9), residual=None, scale=None, bias=None,
                           compute_stats=False)
    wsz = w.element_size()
    conv_b = nbytes(x) + 2 * Cout * 81 * wsz
    if cuda_conv2d.in_place_ldw(w, dtype):
        assert (Cin, k) == (64, 1) and ldw == Cin
        assert _cuda_conv_cost(call) == (1, conv_b + nbytes(w))
        return
    padded = ldw > Cin * k * k
    want_b = 2 * nbytes(w) + (Cout * ldw * wsz if padded else 0) + conv_b + Cout * ldw * wsz
    assert _cuda_conv_cost(call) == (2 + padded, want_b)
