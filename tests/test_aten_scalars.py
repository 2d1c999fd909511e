"""Host-time helpers on the per-call paths, which must not change a value:

* ``backends/aten_batch_norm._scalar``: an elementwise op's scalar operand as a cached 0-dim CPU
  tensor instead of a Python float (which the op wraps into a new tensor on every call). The result
  must be bitwise what the float gives, in every activation dtype, special values included.
* ``_checks.DEVICE_TYPE``: ``device.type`` through a table (the getter builds a string each read).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rk_testing import DEVICE

from resnet_kernels._checks import DEVICE_TYPE
from resnet_kernels.backends import aten_batch_norm as abn

_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}
VALUES = [1e-5, 1e-3, 0.1, 1.0 / 3.0, 1.0000123, 1.0 + 2.0 ** -40, 2.0 ** -30, 3.0e38, 1e300, -2.5,
          float("inf"), float("nan")]


def _inputs(dtype):
    torch.manual_seed(0)
    x = (torch.randn(997, dtype=torch.float64) * 4).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-310, 65504.0],
                            dtype=torch.float64).to(dtype)
    return torch.cat([x, specials]).to(DEVICE)


def _bits(t):
    return t.view(_INT[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["mul", "add"])
def test_scalar_operand_is_bitwise_the_float(dtype, op):
    fn = getattr(torch, op)
    x = _inputs(dtype)
    for v in VALUES:
        want = fn(x, v)
        s = abn._scalar(v, x)
        assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.device.type == "cpu"
        got = fn(x, s)
        assert got.dtype == want.dtype == dtype, (op, v)
        assert torch.equal(_bits(got), _bits(want)), (op, dtype, v)  # signed zeros and NaN payloads too


def test_scalar_passes_the_float_where_no_tensor_may_go():
    x = torch.randn(4)
    for z in (0.0, -0.0):  # one dict key, two values: never cached
        assert abn._scalar(z, x) is z
    with FakeTensorMode():
        f = torch.empty(8)
        assert abn._scalar(1.5, f) == 1.5 and not isinstance(abn._scalar(1.5, f), torch.Tensor)
        torch.mul(f, abn._scalar(1.5, f))  # (a real CPU tensor here would raise)


def test_scalar_table_is_bounded_and_reused():
    x = torch.randn(4)
    s = abn._scalar(1.25, x)
    assert abn._scalar(1.25, x) is s
    for i in range(600):
        abn._scalar(1.0 + i * 1e-3, x)
    assert len(abn._SCALARS) <= 256


def test_running_update_and_bn_grads_match_the_float_forms():
    """The aten launchers that take the cached scalars give exactly what the float forms give."""
    torch.manual_seed(1)
    C = 16
    mean, var = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.5
    rm, rv = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.5
    nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
    factor, unbias = 0.1, 50.0 / 49.0
    want_m, want_v = rm.clone().lerp_(mean, factor), rv.clone().lerp_(torch.mul(var, unbias), factor)
    abn.bn_running_update([(mean, var, rm, rv, nbt, factor, unbias)])
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v) and int(nbt) == 1 and nbt.dtype == torch.long
    for dt in (torch.int32, torch.float32):  # (a count converted by the user: the same as add_(1))
        c = torch.full((), 7, dtype=dt, device=DEVICE)
        abn.bn_running_update([(mean, var, rm.clone(), rv.clone(), c, factor, unbias)])
        assert c.dtype == dt and int(c) == 8
    # two BatchNorms, one without a variance (a projection block's call): the list path
    rm2, rv2 = rm.clone(), rv.clone()
    want = [rm.clone().lerp_(mean, factor), rv.clone().lerp_(torch.mul(var, unbias), factor),
            rm2.clone().lerp_(mean, 0.2), rv2.clone()]
    abn.bn_running_update([(mean, var, rm, rv, None, factor, unbias), (mean, None, rm2, None, None, 0.2, 1.0)])
    for a, b in zip((rm, rv, rm2, rv2), want):
        assert torch.equal(a, b)

    x = torch.randn(2, C, 5, 5, device=DEVICE)
    g = torch.randn_like(x)
    w = torch.rand(C, device=DEVICE) + 0.5
    eps = 1e-5
    m_, v_ = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
    got = abn._bn_grads(g, x, m_, v_, w, eps, True, True, True, None)
    want = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, m_, torch.add(v_, eps).rsqrt_(), True, eps,
                                                     [True, True, True])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_device_type_table():
    for d in (torch.device("cpu"), torch.device("meta"), torch.device("cuda"), torch.device("cuda", 1),
              torch.randn(1).device):
        assert DEVICE_TYPE[d] == d.type
        assert d in DEVICE_TYPE
    assert DEVICE_TYPE[torch.device("cuda", 1)] == "cuda"
