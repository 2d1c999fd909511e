"""Helpers shared by the cuda_<op>.py wrappers: the module they call, argument structs, pointers,
streams and device guards.

The launchers fill one argument struct of ``_C`` (``Conv2dArgs``, ``BnAddReluArgs``,
``BnAddReluBackwardArgs``: the C++ structs of csrc/*.h, bound once with ``py::class_``) through
:func:`fill_args`, which insists that every field of the struct is set, and call one entry point.

Test-only seam: :func:`host_runner` swaps in another module with ``_C``'s API for the duration of a
``with`` block. The test suite uses it to run the kernels' own CUDA source on the CPU
(tests/host_runner: the csrc sources compiled for the host, one CTA after another, each CTA's
threads as fibers, PTX helpers and CUDA built-ins emulated, shared-memory races reported), so
the cuda launchers then take CPU tensors. Users never see it: nothing in the package enters it.
"""

from __future__ import annotations

import contextlib

import torch

from .._ext import require_C

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_host = None  # the module swapped in by host_runner(), else None (the real _C)


@contextlib.contextmanager
def host_runner(module):
    """Within the block, the cuda launchers call ``module`` instead of ``_C`` and take CPU tensors.

    ``module`` must provide ``_C``'s entry points and argument structs, plus ``pointer(tensor)``
    (the int address passed for a tensor; it may record the tensor's extent) and ``done()``
    (called after every entry-point call). Test-only; not thread-safe; nests.
    """
    global _host
    prev, _host = _host, module
    try:
        yield module
    finally:
        _host = prev


def host_runner_active() -> bool:
    """Whether a ``host_runner`` block is in force (then the cuda backend takes CPU tensors)."""
    return _host is not None


def C_module():
    """The module the launchers call: ``_C`` (raising why it is unavailable), or the host runner."""
    return _host if _host is not None else require_C()


def fill_args(cls, **fields):
    """An instance of the bound C++ struct ``cls`` with every field set from ``fields``; a field
    missing from ``fields`` or a name the struct does not have is a TypeError (so the wrappers and
    csrc/*.h cannot drift apart silently)."""
    expected = cls.fields
    if len(fields) != len(expected) or not fields.keys() >= set(expected):
        missing = [f for f in expected if f not in fields]
        extra = [f for f in fields if f not in expected]
        raise TypeError(f"{cls.__name__}: fields not set: {missing}; unknown fields: {extra}")
    a = cls()
    for k, v in fields.items():
        setattr(a, k, v)
    return a


def ptr(t) -> int:
    """Device pointer of a tensor, 0 for None (the C++ API's 'absent')."""
    if t is None:
        return 0
    if _host is not None:
        return _host.pointer(t)
    return t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    """Raw cudaStream_t of torch's current stream on t's device (0 under the host runner)."""
    if _host is not None:
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)``; nothing to guard under the host runner."""
    if _host is not None:
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def call(fn_name: str, *args):
    """``C_module().<fn_name>(*args)``; the host runner's ``done()`` runs after it."""
    mod = C_module()
    try:
        return getattr(mod, fn_name)(*args)
    finally:
        if _host is not None:
            _host.done()
