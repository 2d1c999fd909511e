"""Backend selection: ``cuda`` (csrc), ``triton`` (triton_ops) and ``torch`` (reference).

Per call (``backend=`` argument), per scope (``use_backend``) or globally (``set_backend``).
``auto`` picks cuda, then triton, for CUDA tensors and torch for CPU tensors. An explicitly
requested backend that cannot run raises ``BackendUnavailableError`` saying why; it never
silently falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Mapping

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "torch")
_CHOICES = ("auto",) + BACKENDS

_global_backend = "auto"
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("resnet_kernels_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ('auto', 'cuda', 'triton' or 'torch')."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force here: the innermost ``use_backend`` scope, else the global one."""
    scoped = _scoped_backend.get()
    return scoped if scoped is not None else _global_backend


def op_arg(backend: str | None) -> str:
    """The ``backend`` argument an op receives: the one in force for None, else a checked name
    ('auto' stays 'auto': the op resolves it for its tensors' device)."""
    return get_backend() if backend is None else _check_name(backend)


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
    # cached: before triton is imported, find_spec searches sys.path (~0.1 ms), and backend_status
    # runs on every auto-resolved call on a GPU without _C
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("resnet_kernels.triton_ops") is None:  # a source checkout shadows the install
        return _ext.source_tree_message("resnet_kernels.triton_ops") or "resnet_kernels.triton_ops is not installed"
    return None


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for running backend ``name`` on tensors of ``device`` (None: any CUDA
    device that is visible). Never raises; does not initialise CUDA unless ``device`` is CUDA."""
    _check_name(name)
    if name == "auto":
        return True, ""
    dev = torch.device(device) if device is not None else None
    if name == "torch":
        return True, ""
    if name == "cuda":
        if _ext.get_C() is None:
            return False, _ext.C_error() or "resnet_kernels._C unavailable"
        if dev is None:
            if not torch.cuda.is_available():
                return False, "no CUDA GPU is visible to torch"
            return True, ""
        if dev.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {dev.type} tensors"
        return True, ""
    # triton
    err = triton_import_error()
    if err:
        return False, err
    if dev is None:
        if torch.cuda.is_available() or triton_interpreting():
            return True, ""
        return False, "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the Triton interpreter on the CPU)"
    if dev.type == "cuda":
        return True, ""
    if dev.type == "cpu" and triton_interpreting():
        return True, ""
    return False, (f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, "
                   f"set before import), got {dev.type} tensors")


def resolve(requested: str | None, device: torch.device, op: str,
            unsupported: Mapping[str, str] | None = None) -> str:
    """Turn the requested backend (None = the one in force) into a concrete one for ``device``.

    ``unsupported`` maps a backend to the reason this particular call cannot run on it
    (e.g. a convolution configuration a kernel does not implement): ``auto`` skips it, an
    explicit request raises with that reason.
    """
    name = _check_name(get_backend() if requested is None else requested)
    unsupported = unsupported or {}
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for cand in ("cuda", "triton"):
            if cand in unsupported:
                continue
            ok, _ = backend_status(cand, device)
            if ok:
                return cand
        return "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {why}")
    if name in unsupported:
        raise BackendUnavailableError(f"{op}: backend {name!r} does not support this call: {unsupported[name]}")
    return name
