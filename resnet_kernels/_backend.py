"""Backend selection: which implementations the ops run (see ``resnet_kernels/_registry.py``).

Per call (``backend=`` argument), per scope (``use_backend``) or globally (``set_backend``).
The names are the registry's backends (``cuda``, ``triton``, ``aten``, ``torch``) and ``auto``:
on CUDA tensors ``auto`` measures and verifies the implementations per layer shape and uses the
fastest correct one (``resnet_kernels/_tune.py``); on CPU tensors it uses ``aten`` (PyTorch's own
kernels). An explicitly requested backend that cannot run raises ``BackendUnavailableError``
saying why; it never silently falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator

import torch

from . import _ext, _registry
from ._registry import BackendUnavailableError

_global_backend = "auto"
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("resnet_kernels_backend", default=None)


def __getattr__(name: str):
    if name == "BACKENDS":  # read from the registry, never written by hand
        return _registry.backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_name(name: str) -> str:
    if not _registry.is_choice(name):
        raise ValueError(f"backend must be one of {('auto',) + _registry.backend_names()}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ('auto' or a registered backend name)."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force here: the innermost ``use_backend`` scope, else the global one."""
    scoped = _scoped_backend.get()
    return scoped if scoped is not None else _global_backend


def op_arg(backend: str | None) -> str:
    """The ``backend`` argument an op receives: the one in force for None, else a checked name
    ('auto' stays 'auto': the op resolves it for its tensors' device)."""
    if backend is None:
        scoped = _scoped_backend.get()
        return scoped if scoped is not None else _global_backend
    if type(backend) is str and (backend == "auto" or backend in _registry._backends):
        return backend  # (every call of every op: _check_name's test, without its two calls)
    return _check_name(backend)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting the backend for the calls inside it."""
    token = _scoped_backend.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    # cached: before triton is imported, find_spec searches sys.path (~0.1 ms)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("resnet_kernels.triton_ops") is None:  # a source checkout shadows the install
        return _ext.source_tree_message("resnet_kernels.triton_ops") or "resnet_kernels.triton_ops is not installed"
    return None


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for running backend ``name`` on tensors of ``device`` (None: any CUDA
    device that is visible). Never raises for a known name; does not initialise CUDA unless
    ``device`` is CUDA."""
    _check_name(name)
    if name == "auto":
        return True, ""
    dev = torch.device(device) if device is not None else None
    why = _registry.get_backend_decl(name).available(dev)
    return why is None, why or ""


__all__ = ["BackendUnavailableError", "set_backend", "get_backend", "use_backend", "op_arg", "backend_status",
           "triton_interpreting", "triton_import_error"]
