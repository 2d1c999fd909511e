"""The three implementations behind every op. Each backend module exposes the same launcher
functions (same names, same arguments); they write into preallocated outputs and assume the
op layer already validated everything (shapes, dtypes, layouts, devices, non-empty)."""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cuda": "cuda_backend"}


def get_impl(name: str) -> ModuleType:
    try:
        mod = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(_MODULES)}") from None
    return importlib.import_module(f"{__name__}.{mod}")
