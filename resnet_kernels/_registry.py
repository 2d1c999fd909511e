"""The one registry of implementations.

Every fused op (``bn_add_relu``, ``bn_add_relu_backward``, ``conv2d_epilogue``, ``conv2d_stats``)
declares its implementations here, once, in ``resnet_kernels/backends/__init__.py``: an
implementation is a (op, backend) pair with its launcher (``"module:function"``, imported on
first use), a ``supports(call)`` that returns None or the reason it cannot run that call, whether
it is deterministic, its rank in the static order ``auto`` uses when it cannot measure, and the
device types ``auto`` may pick it on. A *backend* is a family of implementations that share a
build/device requirement (``available(device)``: None or why not here), e.g. ``cuda`` needs
``resnet_kernels._C`` and a CUDA tensor; it may also declare a training unit (``train_unit``: a
module that runs a planned conv -> BN -> add -> ReLU unit and its backward in place of its own
implementations of those ops, resnet_kernels/_unitplan.py).

Everything that names implementations reads this registry: ``resolve`` (the op layer),
``resnet_kernels.info``, ``check``, ``bench``, ``tune``, the CLI choices, the benchmarks and the
tests' parametrisation. Adding an implementation is one ``register`` call plus its own files.

Resolution of the ``backend`` argument an op receives:

* an explicit name: that backend's implementation of the op, after ``available`` and
  ``supports``; it raises :class:`BackendUnavailableError` with the reason, never falls back.
  A backend that implements only some ops (``fallback_auto=True``) lets the others resolve as
  ``auto``.
* ``auto``: :mod:`resnet_kernels._tune` chooses among the candidates (available here, supporting
  the call, allowed on this device type, deterministic when
  ``torch.use_deterministic_algorithms(True)`` is in force): measured and verified on CUDA
  tensors, the static order otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._checks import DEVICE_TYPE

OPS: Tuple[str, ...] = ("bn_add_relu", "bn_add_relu_backward", "conv2d_epilogue", "conv2d_stats", "batch_norm_act",
                        "batch_norm_act_backward", "batch_norm_act_coef", "bn_running_update", "maxpool2d",
                        "maxpool2d_backward", "conv2d_backward", "batch_norm_act_bits", "conv2d_bn_stats")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # None when the backend can run on tensors of ``device`` (None: on this machine at all), else why not
    available: Callable[[Optional[torch.device]], Optional[str]]
    # ops this backend does not implement resolve as 'auto' when it is requested explicitly
    fallback_auto: bool = False
    # test-only backends: not offered to users (CLI choices, info, bench), still resolvable by name
    hidden: bool = False
    # part of `resnet-kernels bench`'s default set (the slow reference is not)
    benchmark: bool = True
    # a module running a whole planned training unit (conv [+ projection] -> BN -> add -> ReLU with the
    # running update) and its backward in place of this backend's implementations of the unit's ops,
    # where all of them resolved to this backend (resnet_kernels/_unitplan.py; e.g. backends/aten_unit.py)
    train_unit: Optional[str] = None


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    launcher: str  # "package.module:function"
    supports: Optional[Callable[[Any], Optional[str]]] = None
    deterministic: bool = True
    priority: int = 100  # the static order of 'auto' (lower first) where it does not measure
    auto_on: Tuple[str, ...] = ("cuda",)  # device types 'auto' may choose it on
    reference: bool = False  # what 'auto' verifies the others against (trusted, not itself verified)
    # the launcher allocates and returns its activation output (out=None is passed) instead of
    # writing into a preallocated one: e.g. an aten convolution, which has no out= variant worth using
    returns_output: bool = False
    # what one call launches on a GPU, for the accountant (resnet_kernels/count.py): cost(call) ->
    # (kernel launches, HBM bytes read + written), computed from the call's shapes alone (no kernel
    # runs); None: not declared (the accountant then says it cannot count this implementation)
    cost: Optional[Callable[[Any], Tuple[int, int]]] = None
    # conv2d_bn_stats: the kernel applies the previous unit's BN + ReLU to its operand as it loads it
    # (the normalised activation is never written). The training block under 'auto' takes the
    # prologue graph for a unit exactly when the chosen implementation says so (resnet_kernels/_block.py)
    operand_prologue: bool = False

    @property
    def name(self) -> str:
        return self.backend

    def load(self) -> Callable[..., Any]:
        fn = _launchers.get(self.launcher)
        if fn is None:
            mod, _, attr = self.launcher.partition(":")
            fn = _ModuleAttr(importlib.import_module(mod), attr)
            _launchers[self.launcher] = fn
        return fn

    def why_not(self, call: Any) -> Optional[str]:
        return self.supports(call) if self.supports is not None else None


class _ModuleAttr:
    """The launcher looked up on its module at call time (tests monkeypatch launchers)."""

    __slots__ = ("mod", "attr")

    def __init__(self, mod, attr: str):
        self.mod, self.attr = mod, attr

    def __call__(self, *args, **kwargs):
        return getattr(self.mod, self.attr)(*args, **kwargs)


_backends: Dict[str, Backend] = {}
_impls: Dict[str, Dict[str, Impl]] = {op: {} for op in OPS}
_launchers: Dict[str, Callable[..., Any]] = {}
_sorted: Dict[Tuple[str, bool], List[Impl]] = {}  # implementations(op, include_hidden), rebuilt on change
# bumped by every registration or removal: a resolution remembered together with it (the bound unit
# plans, resnet_kernels/_unitplan.py) is current while it is unchanged
_epoch = 0


def _changed() -> None:
    global _epoch
    _epoch += 1
    _sorted.clear()


# --------------------------------------------------------------------------------------------
# declaring
# --------------------------------------------------------------------------------------------
def register_backend(backend: Backend) -> Backend:
    if not backend.name or backend.name == "auto" or not backend.name.isidentifier():
        raise ValueError(f"backend name must be an identifier other than 'auto', got {backend.name!r}")
    if backend.name in _backends:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _backends[backend.name] = backend
    _changed()
    return backend


def register(impl: Impl) -> Impl:
    if impl.op not in _impls:
        raise ValueError(f"unknown op {impl.op!r}; ops: {OPS}")
    if impl.backend not in _backends:
        raise ValueError(f"register the backend {impl.backend!r} before its implementations")
    if impl.backend in _impls[impl.op]:
        raise ValueError(f"{impl.op} already has a {impl.backend!r} implementation")
    _impls[impl.op][impl.backend] = impl
    _changed()
    return impl


@contextlib.contextmanager
def registered(backend: Optional[Backend] = None, impls: Sequence[Impl] = ()) -> Iterator[None]:
    """Register a backend and/or implementations for the duration (tests, experiments)."""
    added_backend = False
    added: List[Impl] = []
    try:
        if backend is not None and backend.name not in _backends:
            register_backend(backend)
            added_backend = True
        for impl in impls:
            register(impl)
            added.append(impl)
        yield
    finally:
        for impl in added:
            _impls[impl.op].pop(impl.backend, None)
        if added_backend:
            _backends.pop(backend.name, None)
        _changed()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _ensure_declared() -> None:
    if not _backends:
        importlib.import_module("resnet_kernels.backends")


def backends(include_hidden: bool = False) -> List[Backend]:
    _ensure_declared()
    return [b for b in _backends.values() if include_hidden or not b.hidden]


def backend_names(include_hidden: bool = False) -> Tuple[str, ...]:
    return tuple(b.name for b in backends(include_hidden))


def get_backend_decl(name: str) -> Backend:
    _ensure_declared()
    try:
        return _backends[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {('auto',) + backend_names()}") from None


def auto_device_types(name: str) -> Tuple[str, ...]:
    """The device types 'auto' may choose any implementation of backend ``name`` on."""
    _ensure_declared()
    return tuple(sorted({d for impls in _impls.values() for i in impls.values() if i.backend == name
                         for d in i.auto_on}))


def choices() -> Tuple[str, ...]:
    """What a ``backend`` argument accepts."""
    return ("auto",) + backend_names(include_hidden=True)


def is_choice(name) -> bool:
    """``name in choices()``, without building the tuple (the ops' hot path)."""
    if not _backends:
        _ensure_declared()
    return isinstance(name, str) and (name == "auto" or name in _backends)


def implementations(op: str, include_hidden: bool = False) -> List[Impl]:
    """The op's implementations in the static order of 'auto' (a shared list: do not modify)."""
    got = _sorted.get((op, include_hidden))
    if got is None:
        _ensure_declared()
        if op not in _impls:
            raise ValueError(f"unknown op {op!r}; ops: {OPS}")
        got = _sorted[(op, include_hidden)] = sorted(
            (i for i in _impls[op].values() if include_hidden or not _backends[i.backend].hidden),
            key=lambda i: (i.priority, i.backend))
    return got


def get_impl(op: str, backend: str) -> Optional[Impl]:
    _ensure_declared()
    return _impls[op].get(backend)


def deterministic_required() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def candidates(op: str, call: Any, device: torch.device) -> Tuple[List[Impl], Dict[str, str]]:
    """(the implementations ``auto`` may choose for this call here, in static order;
    {backend: why not} for the others)."""
    ok: List[Impl] = []
    why: Dict[str, str] = {}
    det = deterministic_required()
    for impl in implementations(op, include_hidden=False):
        if device.type not in impl.auto_on:
            reason = f"'auto' does not choose it for {device.type} tensors"
        else:
            reason = _backends[impl.backend].available(device)
        if reason is None:
            reason = impl.why_not(call)
        if reason is None and det and not impl.deterministic:
            reason = "not deterministic (torch.use_deterministic_algorithms(True) is in force)"
        if reason is None:
            ok.append(impl)
        else:
            why[impl.backend] = reason
    return ok, why


# (op, device type) -> (epoch, implementation): first_candidate's answer where it cannot depend on
# the call or the deterministic mode (every implementation before it excluded by auto_on alone; it
# supports every call and is deterministic); still checked for availability on every use
_first: Dict[Tuple[str, str], Tuple[int, "Impl"]] = {}


def static_first(op: str, device: torch.device) -> Optional[Impl]:
    """``first_candidate``'s kept answer for any call of ``op`` on ``device``'s type, when it has one
    that is current (the same registry epoch) and available here; else None."""
    hit = _first.get((op, DEVICE_TYPE[device]))
    if hit is not None and hit[0] == _epoch and _backends[hit[1].backend].available(device) is None:
        return hit[1]
    return None


def first_candidate(op: str, call: Any, device: torch.device) -> Optional[Impl]:
    """The first implementation 'auto' may choose for this call here, in static order (the hot
    path of devices 'auto' does not measure on; ``candidates`` says why the others are out)."""
    impl = static_first(op, device)
    if impl is not None:
        return impl
    dtype = DEVICE_TYPE[device]
    det = None
    static = True  # every implementation passed over so far was, whatever the call
    for impl in implementations(op, include_hidden=False):
        if dtype not in impl.auto_on:
            continue
        if _backends[impl.backend].available(device) is not None:
            static = False
            continue
        if impl.supports is not None and impl.supports(call) is not None:
            static = False
            continue
        if not impl.deterministic:
            static = False
            if det is None:
                det = deterministic_required()
            if det:
                continue
        if static and impl.supports is None:
            _first[(op, dtype)] = (_epoch, impl)
        return impl
    return None


def resolve_explicit(op: str, name: str, call: Any, device: torch.device) -> Optional[Impl]:
    """The implementation an explicit ``backend=name`` selects, or None when that backend leaves
    this op to 'auto'. Raises BackendUnavailableError saying why it cannot run."""
    be = _backends.get(name)
    if be is None:
        be = get_backend_decl(name)  # declares the backends on first use, or raises for an unknown name
    reason = be.available(device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {reason}")
    impl = _impls[op].get(name)
    if impl is None:
        if be.fallback_auto:
            return None
        have = ", ".join(i.backend for i in implementations(op, include_hidden=True))
        raise BackendUnavailableError(f"{op}: backend {name!r} has no implementation of {op} (implementations: {have})")
    reason = impl.supports(call) if impl.supports is not None else None
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} does not support this call: {reason}")
    if not impl.deterministic and deterministic_required():
        raise BackendUnavailableError(f"{op}: backend {name!r} is not deterministic and "
                                      f"torch.use_deterministic_algorithms(True) is in force")
    return impl


def static_choice(op: str, call: Any, device: torch.device) -> Impl:
    """The documented default where 'auto' does not measure: the first candidate in static order."""
    cands, why = candidates(op, call, device)
    if not cands:
        detail = "; ".join(f"{k}: {v}" for k, v in why.items())
        raise BackendUnavailableError(f"{op}: no implementation can run this call on {device.type} tensors ({detail})")
    return cands[0]


@dataclass
class Decision:
    """How one op call was resolved (for ``explain`` and the debug log)."""
    op: str
    impl: str
    how: str  # 'explicit' | 'tuned' | 'cached' | 'static' | 'static (not timed: <why>)'
    key: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)


__all__ = ["OPS", "Backend", "Impl", "BackendUnavailableError", "register_backend", "register", "registered",
           "backends", "backend_names", "choices", "implementations", "get_impl", "candidates",
           "resolve_explicit", "static_choice", "Decision"]
