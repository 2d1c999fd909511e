"""Backend selection: set_backend / get_backend / use_backend semantics, ``auto`` resolution,
backend_status, and that the ops really dispatch to the backend in force."""

from __future__ import annotations

import threading

import pytest
import torch

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import BackendUnavailableError, _backend, _ext, _registry, _tune

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_global_backend():
    old = rk.get_backend()
    yield
    rk.set_backend(old)


@pytest.fixture
def dispatched():
    """Records the implementation each op call dispatches to."""
    with _tune.recording() as rec:
        yield Names(rec)


class Names:
    def __init__(self, rec):
        self.rec = rec

    def __getitem__(self, i):
        return [d.impl for d in self.rec][i]

    def __eq__(self, other):
        return [d.impl for d in self.rec] == other


def _resolve(requested, device, op="bn_add_relu", call=None):
    """The implementation name a call of ``op`` on ``device`` resolves to (nothing runs)."""
    call = call or _FakeCall(device)
    requested = _backend.op_arg(requested)
    if requested != "auto":
        impl = _registry.resolve_explicit(op, requested, call, device)
        if impl is not None:
            return impl.backend
    return _registry.static_choice(op, call, device).backend


class _FakeCall:
    def __init__(self, device, dtype=torch.float32, groups=1, dilation=(1, 1)):
        self.device = device
        self.x = torch.empty(0, dtype=dtype)
        self.groups, self.dilation = groups, dilation


def _args():
    x = torch.randn(2, 3, 4, 4)
    return x, torch.rand(3), torch.rand(3), torch.randn_like(x)


def test_default_is_auto():
    assert rk.get_backend() == "auto"
    assert rk.BACKENDS == _registry.backend_names()
    assert set(rk.BACKENDS) >= {"cuda", "triton", "aten", "torch"}


def test_set_get_backend():
    for name in ("torch", "triton", "cuda", "auto"):
        rk.set_backend(name)
        assert rk.get_backend() == name
    rk.set_backend("torch")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'aten', 'torch', 'cutlass'\), got 'gpu'"):
        rk.set_backend("gpu")
    with pytest.raises(ValueError, match=r"got None"):
        rk.set_backend(None)
    assert rk.get_backend() == "torch"  # a rejected name leaves the setting alone


def test_use_backend_scopes_nest_and_restore():
    rk.set_backend("cuda")
    with rk.use_backend("torch"):
        assert rk.get_backend() == "torch"
        with rk.use_backend("triton"):
            assert rk.get_backend() == "triton"
            rk.set_backend("auto")  # the global default changes, the scope still wins
            assert rk.get_backend() == "triton"
        assert rk.get_backend() == "torch"
    assert rk.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with rk.use_backend("torch"):
            raise RuntimeError("boom")
    assert rk.get_backend() == "auto"  # restored after an exception
    with pytest.raises(ValueError, match=r"backend must be one of"):
        with rk.use_backend("tpu"):
            pass


def test_use_backend_is_per_thread():
    """Scopes live in a contextvar: another thread sees the global default, not this scope."""
    rk.set_backend("auto")
    seen = []
    with rk.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(rk.get_backend()))
        t.start()
        t.join()
        assert rk.get_backend() == "torch"
    assert seen == ["auto"]


def test_auto_resolution_cpu():
    # CPU tensors: PyTorch's own kernels (aten), never the Triton interpreter
    for op in _registry.OPS:
        assert _resolve("auto", CPU, op) == "aten"
    assert _resolve(None, CPU) == "aten"  # the default is auto
    with rk.use_backend("torch"):
        assert _resolve(None, CPU) == "torch"


def test_auto_static_order_on_cuda_devices():
    """Where auto does not measure (capture, tracing, RESNET_KERNELS_TUNE=0): the registry's
    static order; a call an implementation does not support skips it."""
    dev = torch.device("cuda", 0)  # only the device type matters; nothing touches a GPU
    cuda_ok = _backend.backend_status("cuda", dev)[0]
    assert _resolve("auto", dev, "bn_add_relu") == ("cuda" if cuda_ok else "triton")
    assert _resolve("auto", dev, "conv2d_epilogue") == "aten"  # cuDNN is the floor until measured
    grouped = _FakeCall(dev, groups=2)
    with pytest.raises(BackendUnavailableError,
                       match=r"conv2d_epilogue: backend 'triton' does not support this call: groups=2"):
        _resolve("triton", dev, "conv2d_epilogue", grouped)
    cands, why = _registry.candidates("conv2d_stats", _FakeCall(dev, dtype=torch.float64), dev)
    assert {c.backend for c in cands} == {"aten", "torch"}
    assert "float64" in why["triton"]


def test_explicit_backends_on_cpu():
    assert _resolve("torch", CPU) == "torch"
    assert _resolve("aten", CPU) == "aten"
    ok, why = _backend.backend_status("cuda", CPU)
    assert not ok
    expected = _ext.C_error() if _ext.get_C() is None else "the cuda backend runs on CUDA tensors, got cpu tensors"
    assert why == expected
    with pytest.raises(BackendUnavailableError, match=r"conv2d_stats: backend 'cuda' is unavailable: "):
        _resolve("cuda", CPU, "conv2d_stats")
    if rt.interpreting():
        assert _resolve("triton", CPU) == "triton"


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backend.backend_status("triton", CPU)
    assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' is unavailable: the triton backend runs on"):
        _resolve("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.backend_status("triton", CPU) == (True, "")


def test_backend_status_any_device_tells_the_truth():
    assert _backend.backend_status("torch") == (True, "")
    assert _backend.backend_status("auto") == (True, "")
    ok, why = _backend.backend_status("cuda")
    assert ok == (_ext.get_C() is not None and torch.cuda.is_available())
    assert ok or why  # unusable always says why
    ok, why = _backend.backend_status("triton")
    assert ok == (torch.cuda.is_available() or rt.interpreting())
    with pytest.raises(ValueError, match=r"backend must be one of"):
        _backend.backend_status("bogus")


def test_ops_dispatch_to_the_backend_in_force(dispatched):
    x, s, b, i = _args()
    rk.bn_add_relu(x, s, b, i)
    assert dispatched[-1] == "aten"  # auto on CPU
    if rt.interpreting():
        rk.set_backend("triton")
        rk.bn_add_relu(x, s, b, i)
        assert dispatched[-1] == "triton"
        with rk.use_backend("torch"):
            rk.add_relu(x, i)
            assert dispatched[-1] == "torch"
            rk.bn_add_relu(x, s, b, i, backend="triton")  # the argument beats the scope
            assert dispatched[-1] == "triton"
        rk.bn_add_relu(x, s, b, i, backend="auto")  # explicit auto means auto, not the global triton
        assert dispatched[-1] == "aten"


def test_backward_uses_the_forward_backend(dispatched):
    """The backward runs on the backend the forward resolved from its scope, even when the
    scope has ended by the time backward() runs."""
    if not rt.interpreting():
        pytest.skip("needs the triton backend on CPU tensors")
    x, s, b, i = _args()
    x.requires_grad_(True)
    with rk.use_backend("triton"):
        y = rk.bn_add_relu(x, s, b, i)
    assert dispatched == ["triton"]
    y.sum().backward()
    assert dispatched == ["triton", "triton"]


def test_unavailable_backend_error_is_raised_not_fallen_back(dispatched):
    x, s, b, i = _args()
    with pytest.raises(BackendUnavailableError):
        rk.bn_add_relu(x, s, b, i, backend="cuda")
    assert dispatched == []  # nothing ran
