"""The three implementations behind every op. Each backend module exposes the same launcher
functions (same names, same arguments); they write into preallocated outputs and assume the
op layer already validated everything (shapes, dtypes, layouts, devices, non-empty)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Dict, Mapping

_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cuda": "cuda_backend"}

# Fully imported modules by name: the op hot path looks its backend and launcher modules up here
# instead of going through importlib on every call. Modules, not functions, are cached, so a
# launcher replaced on its module (tests monkeypatch them) is still the one called.
_loaded: Dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(name)
    return mod


def get_impl(name: str) -> ModuleType:
    try:
        mod = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(_MODULES)}") from None
    return _module(f"{__name__}.{mod}")


def lazy_launchers(backend: str, package: str, launchers: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for a backend module: launcher name -> the function of that name
    in module ``package.launchers[name]``, imported on first use."""

    def __getattr__(name: str):
        try:
            mod = launchers[name]
        except KeyError:
            raise AttributeError(f"the {backend} backend has no launcher {name!r}") from None
        return getattr(_module(f"{package}.{mod}"), name)

    return __getattr__
