"""The CUDA backend's Python wrappers (resnet_kernels/backends/cuda_*.py) call ``_C`` with exactly
the keyword names, order and value types its pybind11 bindings declare (csrc/module.cpp), without
a GPU. A mismatch would only show on a GPU, as a TypeError from pybind11.

How: the public ops run with ``backend="cuda"`` on CPU tensors, with the backend check told that
cuda is usable, ``torch.cuda.device`` made a no-op and ``torch.cuda.current_stream`` a fake that
records the device it was asked for. ``_C`` is replaced by a proxy that checks every call against
the signature pybind11 writes into the real function's docstring (``name(arg: type, ...) -> ret``)
and records it; the kernels themselves do not run (outputs stay NaN-poisoned, which is fine: only
the calls are checked). Where the C++ entry point validates everything on the host before touching
the device (``conv2d_forward``), the recorded call is also replayed on the real ``_C``: it must get
past the validation (no ValueError, no TypeError) and fail only at the first CUDA runtime call
(RuntimeError), which checks sizes, strides, ldw, alignment and workspace size as well.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import _backend
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cuda_bn_add_relu, cuda_conv2d
from resnet_kernels.ops import conv2d_epilogue, conv2d_stats

C_ = get_C()
pytestmark = pytest.mark.skipif(C_ is None, reason="resnet_kernels._C is not built")


def _split_top(s: str):
    """Split on commas not nested in brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def pybind_signature(fn):
    """[(name, kind)] from a pybind11 docstring's first line; kind is 'bool', 'seq' or 'int'."""
    first = fn.__doc__.strip().splitlines()[0]
    m = re.match(r"^(\w+)\((.*)\)\s*->", first)
    assert m, f"unexpected pybind11 docstring: {first!r}"
    params = []
    for p in _split_top(m.group(2)):
        name, _, ty = p.partition(":")
        ty = ty.strip()
        kind = "bool" if ty == "bool" else "seq" if ("Sequence" in ty or "List" in ty or "list" in ty) else "int"
        assert kind != "int" or "int" in ty.lower() or "Index" in ty, f"{first}: unexpected type {ty!r}"
        params.append((name.strip(), kind))
    return params


def test_pybind_signature_parser():
    sig = dict(pybind_signature(C_.conv2d_forward))
    assert sig["x_stride"] == "seq" and sig["relu"] == "bool" and sig["x"] == "int" and sig["stream"] == "int"


class _CheckingC:
    """Stands in for ``_C``: every call must use keywords only, exactly the declared names in the
    declared order, with values of the declared kinds (ints that are not bools, real bools, lists
    of ints). Calls are recorded; workspace-size queries answer with a plausible size."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        real = getattr(C_, name)
        sig = pybind_signature(real)

        def call(*args, **kwargs):
            assert not args, f"_C.{name} called with positional arguments {args!r}: use the keyword names"
            names = [n for n, _ in sig]
            assert list(kwargs) == names, f"_C.{name}: keywords {list(kwargs)} != declared {names}"
            for n, kind in sig:
                v = kwargs[n]
                if kind == "bool":
                    assert isinstance(v, bool), f"_C.{name}: {n} = {v!r} is not a bool"
                elif kind == "seq":
                    assert isinstance(v, (list, tuple)) and all(
                        isinstance(e, int) and not isinstance(e, bool) for e in v), f"_C.{name}: {n} = {v!r}"
                else:
                    assert isinstance(v, int) and not isinstance(v, bool), f"_C.{name}: {n} = {v!r} is not an int"
            self.calls.append((name, dict(kwargs)))
            if name == "conv2d_workspace_bytes":
                return real(**kwargs)  # host-only arithmetic
            if name.endswith("_workspace_bytes"):
                return 4096  # the real one asks the device for its SM count
            return None

        return call

    def names(self):
        return [n for n, _ in self.calls]


class _FakeStream:
    def __init__(self, device):
        self.device = device
        self.cuda_stream = 12345


@pytest.fixture
def fake_cuda(monkeypatch):
    """cuda backend 'usable' on CPU tensors; _C checked and recorded; stream lookups recorded."""
    if rt.HAS_GPU:
        pytest.skip("with a GPU the real cuda backend runs (tests/ops/test_*_cuda.py)")
    fake = _CheckingC()
    streams = []
    real_status = _backend.backend_status

    def status(name, device=None):
        return (True, "") if name == "cuda" else real_status(name, device)

    def current_stream(device=None):
        streams.append(torch.device(device) if device is not None else None)
        return _FakeStream(device)

    monkeypatch.setattr(_backend, "backend_status", status)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(cuda_conv2d, "require_C", lambda: fake)
    monkeypatch.setattr(cuda_bn_add_relu, "require_C", lambda: fake)
    fake.streams = streams
    return fake


def _replay_on_real_C(name, kwargs):
    """The real entry point validates on the host, then fails at its first CUDA call (no GPU)."""
    with pytest.raises(RuntimeError) as info:
        getattr(C_, name)(**kwargs)
    assert not isinstance(info.value, (TypeError, ValueError)), info.value
    assert "cuda" in str(info.value).lower(), info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_ops_call_C_as_declared(fake_cuda, dtype, layout):
    x = rt.layouts(torch.randn(2, 3, 9, 9).to(dtype), layout)  # Cin = 3: K = 27, ldw = 32 (zero padded)
    w = torch.randn(8, 3, 3, 3).to(dtype)
    scale, bias = torch.rand(8) + 0.5, torch.randn(8)
    res = rt.layouts(torch.randn(2, 8, 5, 5).to(dtype), layout)
    out = conv2d_epilogue(x, w, scale, bias, res, stride=2, padding=1, relu=True, backend="cuda")
    assert out.shape == (2, 8, 5, 5)
    y, mean, var = conv2d_stats(x, w, stride=1, padding=1, backend="cuda")
    assert mean.shape == var.shape == (8,) and mean.dtype == var.dtype == torch.float32
    convs = [kw for n, kw in fake_cuda.calls if n == "conv2d_forward"]
    assert len(convs) == 2
    epi, st = convs
    assert epi["mean"] == epi["var"] == epi["workspace"] == 0 and epi["workspace_bytes"] == 0
    assert epi["scale"] != 0 and epi["bias"] != 0 and epi["residual"] != 0 and epi["relu"] is True
    assert epi["x_stride"] == list(x.stride()) and epi["res_stride"] == list(res.stride())
    assert st["mean"] != 0 and st["var"] != 0 and st["workspace"] != 0 and st["workspace_bytes"] > 0
    assert st["scale"] == st["bias"] == st["residual"] == 0 and st["res_stride"] == []
    # float32 passes PyTorch's cuDNN TF32 setting; 16-bit types pass it too (ignored by the kernel)
    assert isinstance(epi["allow_tf32"], bool)
    for kw in convs:
        assert kw["stream"] == 12345 and kw["ldw"] == 32
    assert fake_cuda.streams and all(d == x.device for d in fake_cuda.streams)
    for kw in convs:
        _replay_on_real_C("conv2d_forward", kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_add_relu_calls_C_as_declared(fake_cuda, dtype, layout):
    acc = rt.acc_of(dtype)
    x = rt.layouts(torch.randn(2, 4, 3, 5, dtype=dtype), layout).requires_grad_()
    i = rt.layouts(torch.randn(2, 4, 3, 5, dtype=dtype), layout).requires_grad_()
    s, b, i_s, i_b = (torch.rand(4, dtype=acc).requires_grad_() for _ in range(4))
    y = rk.bn_add_relu(x, s, b, i, i_s, i_b, backend="cuda")
    y.backward(torch.ones_like(y))
    assert fake_cuda.names() == ["bn_add_relu_forward", "bn_add_relu_backward_workspace_bytes",
                                 "bn_add_relu_backward"]
    fwd, ws, bwd = (kw for _, kw in fake_cuda.calls)
    C, inner = 4, (15 if layout == "nchw" else 1)
    assert (fwd["C"], fwd["inner"], fwd["numel"]) == (C, inner, x.numel())
    assert (bwd["C"], bwd["inner"], bwd["numel"]) == (C, inner, x.numel())
    assert fwd["dtype"] == bwd["dtype"] == ws["dtype"] == {torch.float32: 0, torch.float16: 1,
                                                            torch.bfloat16: 2, torch.float64: 3}[dtype]
    assert bwd["workspace_bytes"] == 4096 and bwd["workspace"] != 0
    for k in ("grad_x", "grad_identity", "grad_scale", "grad_shift", "grad_id_scale", "out", "x", "identity"):
        assert bwd[k] != 0, k
    assert fwd["stream"] == bwd["stream"] == 12345


def test_dtype_codes_match_the_C_enum():
    """cuda_common.DTYPE_CODES against the codes _C documents in its error message
    ("expected 0=float32, 1=float16, 2=bfloat16, 3=float64")."""
    from resnet_kernels.backends.cuda_common import DTYPE_CODES

    with pytest.raises(ValueError) as info:
        C_.bn_add_relu_backward_workspace_bytes(dtype=99, numel=1, C=1, inner=1)
    pairs = dict((name, int(code)) for code, name in re.findall(r"(\d+)=(\w+)", str(info.value)))
    assert pairs == {str(d).replace("torch.", ""): c for d, c in DTYPE_CODES.items()}, str(info.value)
