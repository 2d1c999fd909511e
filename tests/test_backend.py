"""Backend selection: set_backend / get_backend / use_backend semantics, ``auto`` resolution,
backend_status, and that the ops really dispatch to the backend in force."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import BackendUnavailableError, _backend, _ext

CPU = torch.device("cpu")
opmod = importlib.import_module("resnet_kernels.ops.bn_add_relu")


@pytest.fixture(autouse=True)
def _restore_global_backend():
    old = rk.get_backend()
    yield
    rk.set_backend(old)


@pytest.fixture
def dispatched(monkeypatch):
    """Records the backend name each bn_add_relu call dispatches to."""
    calls = []
    real = opmod.get_impl

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(opmod, "get_impl", spy)
    return calls


def _args():
    x = torch.randn(2, 3, 4, 4)
    return x, torch.rand(3), torch.rand(3), torch.randn_like(x)


def test_default_is_auto():
    assert rk.get_backend() == "auto"
    assert rk.BACKENDS == ("cuda", "triton", "torch")


def test_set_get_backend():
    for name in ("torch", "triton", "cuda", "auto"):
        rk.set_backend(name)
        assert rk.get_backend() == name
    rk.set_backend("torch")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'torch'\), got 'gpu'"):
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
    assert _backend.resolve("auto", CPU, "op") == "torch"
    assert _backend.resolve(None, CPU, "op") == "torch"  # the default is auto
    with rk.use_backend("torch"):
        assert _backend.resolve(None, CPU, "op") == "torch"


def test_auto_resolution_cuda_device_prefers_cuda_then_triton():
    dev = torch.device("cuda", 0)  # only the device type matters; nothing touches a GPU
    cuda_ok = _backend.backend_status("cuda", dev)[0]
    assert _backend.resolve("auto", dev, "op") == ("cuda" if cuda_ok else "triton")
    # a backend that cannot run this particular call is skipped by auto, and named by an explicit request
    assert _backend.resolve("auto", dev, "op", unsupported={"cuda": "x", "triton": "y"}) == "torch"
    assert _backend.resolve("auto", dev, "op", unsupported={"cuda": "no"}) == "triton"
    with pytest.raises(BackendUnavailableError, match=r"op: backend 'triton' does not support this call: groups=2"):
        _backend.resolve("triton", dev, "op", unsupported={"triton": "groups=2"})


def test_explicit_backends_on_cpu():
    assert _backend.resolve("torch", CPU, "op") == "torch"
    ok, why = _backend.backend_status("cuda", CPU)
    assert not ok
    expected = _ext.C_error() if _ext.get_C() is None else "the cuda backend runs on CUDA tensors, got cpu tensors"
    assert why == expected
    with pytest.raises(BackendUnavailableError, match=r"myop: backend 'cuda' is unavailable: "):
        _backend.resolve("cuda", CPU, "myop")
    if rt.interpreting():
        assert _backend.resolve("triton", CPU, "op") == "triton"


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backend.backend_status("triton", CPU)
    assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' is unavailable: the triton backend runs on"):
        _backend.resolve("triton", CPU, "op")
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
    assert dispatched[-1] == "torch"  # auto on CPU
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
        assert dispatched[-1] == "torch"


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
