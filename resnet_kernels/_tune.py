"""``auto``: the measured and verified choice among an op's implementations.

For CUDA tensors, per key (op, shapes, layout, dtype, flags, deterministic mode) and per machine
fingerprint (GPU name, SM, driver, CUDA, torch/triton/package versions), every candidate that the
registry allows (``_registry.candidates``) is run on the call's own inputs with fresh outputs,
checked against the op's reference implementation on the same inputs (``call.compare``: the
dtype's tolerance rule), and timed with CUDA events (the verification run is the warm-up, then a
few repetitions, median). The fastest that passed is used, remembered in memory and in a file
cache; one that raised or disagreed is excluded for that key and reported once as a warning
naming it, the op, the shape and the error.

It never measures during CUDA-graph capture, while ``torch.compile`` traces, or with
``RESNET_KERNELS_TUNE=0``: then the cached choice, else the documented static order (the
registry's ``priority``). CPU tensors use the static order (nothing to time: there are no CPU
kernels of ours; ``aten`` is first there). In a distributed job (``torch.distributed``
initialised, world size > 1) rank 0 measures and broadcasts its choice, so every rank runs the
same implementations (every rank must reach the same new key together, as with equal batch
shapes; ``RESNET_KERNELS_TUNE_SYNC=0`` lets each rank decide alone).

The cache: ``$RESNET_KERNELS_CACHE_DIR/tuning.json`` (default ``$XDG_CACHE_HOME/resnet_kernels``
or ``~/.cache/resnet_kernels``), a versioned JSON document written atomically (temporary file +
rename, under an advisory lock so ranks writing together merge, not clobber). A corrupt or foreign
file is ignored with a warning; an unwritable directory gives a warning and a memory-only cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import _registry
from ._checks import DEVICE_TYPE
from ._registry import BackendUnavailableError, Decision, Impl

log = logging.getLogger("resnet_kernels")

SCHEMA = "resnet-kernels-tune/1"
CACHE_FILE = "tuning.json"
REPS = 3


class TuningWarning(UserWarning):
    """An implementation excluded by the measured 'auto', or a cache problem."""


class TuningNotice(UserWarning):
    """Said once per process: 'auto' is measuring implementations for new shapes."""


# --------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------
_memory: Dict[str, Dict[str, str]] = {}  # fingerprint -> key -> backend name
_file_loaded: Dict[str, bool] = {}  # cache path -> loaded
_file_entries: Dict[str, Dict[str, Dict[str, Any]]] = {}  # fingerprint -> key -> entry (from the file)
_results: Dict[str, Dict[str, Any]] = {}  # key -> last measurement here {impl: ms | 'error: ...'} (tune table)
_warned: set = set()
_cache_disabled_reason: Optional[str] = None
_noticed = False

_timer_override: Optional[Callable[[Callable[[], Any], torch.device], float]] = None
_tunable_devices = {"cuda"}
_recorder: contextvars.ContextVar[Optional[List[Decision]]] = contextvars.ContextVar("rk_recorder", default=None)
# the Calls dispatched while a fused unit's whole path runs (resnet_kernels/_unitplan.py makes its plan of them)
_capture: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("rk_capture", default=None)
# the module path the recorded calls are attributed to (explain's forward hooks push and pop it)
_where: contextvars.ContextVar[Optional[List[str]]] = contextvars.ContextVar("rk_where", default=None)


def _warn_once(token: str, msg: str, category=TuningWarning) -> None:
    if token in _warned:
        return
    _warned.add(token)
    warnings.warn(msg, category, stacklevel=4)


def reset(memory: bool = True) -> None:
    """Forget the in-memory choices and reload the file cache on next use (tests, after
    changing RESNET_KERNELS_CACHE_DIR)."""
    global _cache_disabled_reason, _noticed
    if memory:
        _memory.clear()
        _results.clear()
    _file_loaded.clear()
    _file_entries.clear()
    _warned.clear()
    _cache_disabled_reason = None
    _noticed = False


@contextlib.contextmanager
def testing(timer: Optional[Callable[[Callable[[], Any], torch.device], float]] = None,
            devices: Tuple[str, ...] = ("cuda", "cpu")) -> Iterator[None]:
    """Tests: measure on the given device types (CPU included) with an injected ``timer(fn,
    device) -> ms``; state is reset before and after."""
    global _timer_override, _tunable_devices
    old = (_timer_override, _tunable_devices)
    _timer_override, _tunable_devices = timer, set(devices)
    reset()
    try:
        yield
    finally:
        _timer_override, _tunable_devices = old
        reset()


# --------------------------------------------------------------------------------------------
# when not to measure
# --------------------------------------------------------------------------------------------
def _env_off() -> bool:
    return os.environ.get("RESNET_KERNELS_TUNE", "1").strip().lower() in ("0", "false", "off", "no")


def why_not_measuring(device: torch.device) -> Optional[str]:
    if device.type not in _tunable_devices:
        return f"{device.type} tensors are not timed"
    if _env_off():
        return "RESNET_KERNELS_TUNE=0"
    try:
        if torch.compiler.is_compiling():
            return "torch.compile is tracing"
    except AttributeError:  # pragma: no cover - old torch
        pass
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    d = os.environ.get("RESNET_KERNELS_CACHE_DIR")
    if d:
        return Path(d).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet_kernels"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


@functools.lru_cache(maxsize=None)
def _versions() -> str:
    from . import __version__
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        tv = "none"
    return f"torch{torch.__version__}|triton{tv}|rk{__version__}|cuda{torch.version.cuda}"


@functools.lru_cache(maxsize=None)
def _device_fingerprint(device_type: str, index: Optional[int]) -> str:
    if device_type != "cuda":
        return device_type
    from . import _ext
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    drv = "?"
    C = _ext.get_C()
    if C is not None:
        try:
            drv = str(C.runtime_info().get("driver_version", "?"))
        except Exception:  # noqa: BLE001
            pass
    return f"{props.name}|sm{props.major}{props.minor}|driver{drv}"


def fingerprint(device: torch.device) -> str:
    return _device_fingerprint(device.type, device.index) + "|" + _versions()


def _parse_file(path: Path) -> Tuple[Dict[str, Dict[str, Dict[str, Any]]], Optional[Tuple[str, str]]]:
    """(entries, None) or ({}, (kind, why the file is ignored))."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, ("read", f"resnet_kernels: cannot read the tuning cache {path} ({exc}); ignoring it")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return {}, ("corrupt", f"resnet_kernels: the tuning cache {path} is corrupt ({exc}); ignoring it "
                               f"(it is rewritten on the next tuning)")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), dict):
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        return {}, ("foreign", f"resnet_kernels: {path} is not a tuning cache of schema {SCHEMA!r} "
                               f"(found {found!r}); ignoring it")
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for fp, entries in doc["entries"].items():
        if isinstance(entries, dict):
            out[fp] = {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("choice"), str)}
    return out, None


def _read_file(path: Path) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """The file's entries; a file that cannot be used is ignored with one warning."""
    out, problem = _parse_file(path)
    if problem is not None:
        _warn_once(f"{problem[0]}:{path}", problem[1])
    return out


def _load_file() -> None:
    path = cache_path()
    key = str(path)
    if _file_loaded.get(key):
        return
    _file_loaded[key] = True
    for fp, entries in _read_file(path).items():
        _file_entries.setdefault(fp, {}).update(entries)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: atomic rename alone
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_entry(fp: str, key: str, entry: Dict[str, Any]) -> None:
    global _cache_disabled_reason
    _file_entries.setdefault(fp, {})[key] = entry
    if _cache_disabled_reason is not None:
        return
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):
            merged = _read_file(path)  # what other processes wrote meanwhile
            merged.setdefault(fp, {})[key] = entry
            doc = {"schema": SCHEMA, "entries": merged}
            fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=str(path.parent))
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(doc, fh, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as exc:
        _cache_disabled_reason = str(exc)
        _warn_once(f"write:{path}", f"resnet_kernels: cannot write the tuning cache under {path.parent} ({exc}); "
                                    f"choices are kept in memory only (set RESNET_KERNELS_CACHE_DIR to a writable "
                                    f"directory)")


def cache_summary() -> Dict[str, Any]:
    """{'path', 'entries', 'machines', 'error'} for ``info``."""
    path = cache_path()
    entries = 0
    machines = 0
    error = None
    if path.exists():
        data, problem = _parse_file(path)
        error = problem[1] if problem is not None else None
        machines = len(data)
        entries = sum(len(v) for v in data.values())
    return {"path": str(path), "exists": path.exists(), "entries": entries, "machines": machines, "error": error}


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def _cuda_time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        times = []
        for _ in range(REPS):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record(stream)
            fn()
            b.record(stream)
            times.append((a, b))
        torch.cuda.synchronize(device)
        return statistics.median(a.elapsed_time(b) for a, b in times)


def _time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if _timer_override is not None:
        return float(_timer_override(fn, device))
    if device.type == "cuda":
        return _cuda_time_ms(fn, device)
    import time
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _reference(op: str, call: Any, device: torch.device) -> Optional[Impl]:
    for impl in _registry.implementations(op, include_hidden=False):
        if not impl.reference:
            continue
        if _registry.get_backend_decl(impl.backend).available(device) is None and impl.why_not(call) is None:
            return impl
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _measure(op: str, call: Any, device: torch.device, cands: List[Impl], key: str):
    """(chosen impl, its outputs, entry for the cache)."""
    global _noticed
    if not _noticed:
        _noticed = True
        warnings.warn(f"resnet_kernels: 'auto' is measuring and verifying implementations for new layer shapes on "
                      f"this GPU (about a second per layer shape, once; cached in {cache_path()}). "
                      f"`resnet-kernels tune` does it ahead of time; RESNET_KERNELS_TUNE=0 skips it.",
                      TuningNotice, stacklevel=5)
    ref = _reference(op, call, device)
    ref_out = None
    times: Dict[str, float] = {}
    failed: Dict[str, str] = {}
    best_out: Any = None  # only the fastest so far is kept (outputs of big layers are big)
    best_key: Optional[Tuple[float, str]] = None
    if ref is not None:
        try:
            ref_out = call.run(ref, fresh=True)
        except Exception as exc:  # noqa: BLE001 - the reference itself failed: verify nothing, warn
            failed[ref.backend] = _first_line(exc)
            ref = None
    for impl in cands:
        try:
            out = ref_out if (ref is not None and impl is ref) else call.run(impl, fresh=True)
            if ref_out is not None and impl is not ref:
                err = call.compare(out, ref_out)
                if err is not None:
                    raise AssertionError(f"disagrees with the {ref.backend} reference: {err}")
            t = _time_ms(lambda impl=impl: call.run(impl, fresh=True), device)
            if not (isinstance(t, float) and math.isfinite(t) and t >= 0):
                raise RuntimeError(f"the timer returned {t!r}")
            times[impl.backend] = t
            if best_key is None or (t, impl.backend) < best_key:
                best_key, best_out = (t, impl.backend), out
            del out
        except Exception as exc:  # noqa: BLE001 - excluded, reported once
            failed[impl.backend] = _first_line(exc)
    for name, err in failed.items():
        _warn_once(f"fail:{op}:{name}:{key}",
                   f"resnet_kernels: excluded the {name!r} implementation of {op} for {call.describe()}: {err}")
    if ref is None and ref_out is None and cands:
        _warn_once(f"noref:{op}:{key}", f"resnet_kernels: {op}: no reference implementation ran for {call.describe()}; "
                                        f"the choice is by time only")
    _results[key] = {**{k: v for k, v in times.items()}, **{k: "error: " + v for k, v in failed.items()}}
    if not times:
        raise BackendUnavailableError(f"{op}: every implementation failed for {call.describe()}: "
                                      + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    best = best_key[1]
    chosen = next(i for i in cands if i.backend == best)
    entry = {"choice": best, "times_ms": times, "failed": failed}
    return chosen, best_out, entry


def _dist_sync():
    if os.environ.get("RESNET_KERNELS_TUNE_SYNC", "1").strip() in ("0", "false", "off", "no"):
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def choose(op: str, call: Any, device: torch.device) -> Tuple[Impl, Any, Decision]:
    """(implementation, its outputs if they were computed while measuring else None, decision)."""
    if DEVICE_TYPE[device] not in _tunable_devices:  # the hot path on CPU tensors: the static order
        impl = _registry.first_candidate(op, call, device)
        if impl is not None:
            return impl, None, Decision(op, impl.backend, "static")
    cands, why = _registry.candidates(op, call, device)
    if not cands:
        detail = "; ".join(f"{k}: {v}" for k, v in why.items())
        raise BackendUnavailableError(f"{op}: no implementation can run this call on {device.type} tensors ({detail})")
    if len(cands) == 1:
        return cands[0], None, Decision(op, cands[0].backend, "only candidate")
    if DEVICE_TYPE[device] not in _tunable_devices:
        return cands[0], None, Decision(op, cands[0].backend, "static")
    key = f"{op}|{call.key()}|det={int(_registry.deterministic_required())}"
    by_name = {c.backend: c for c in cands}
    fp = fingerprint(device)
    name = _memory.get(fp, {}).get(key)
    if name in by_name:
        return by_name[name], None, Decision(op, name, "cached", key)
    _load_file()
    entry = _file_entries.get(fp, {}).get(key)
    if entry is not None and entry.get("choice") in by_name:
        _memory.setdefault(fp, {})[key] = entry["choice"]
        return by_name[entry["choice"]], None, Decision(op, entry["choice"], "cached", key)
    reason = why_not_measuring(device)
    if reason is not None:
        return cands[0], None, Decision(op, cands[0].backend, f"static (not timed: {reason})", key)
    dist = _dist_sync()
    outs = None
    chosen = entry = None
    error: Optional[BaseException] = None
    if dist is None or dist.get_rank() == 0:
        try:
            chosen, outs, entry = _measure(op, call, device, cands, key)
        except BackendUnavailableError as exc:
            if dist is None:
                raise
            error = exc  # told to the other ranks first, so none of them waits forever
    if dist is not None:
        box = [(chosen.backend if chosen is not None else None) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        if box[0] is None:
            raise error or BackendUnavailableError(f"{op}: rank 0 found no working implementation for "
                                                   f"{call.describe()}")
        if box[0] not in by_name:  # rank 0 chose something this rank cannot run: the static order
            return cands[0], None, Decision(op, cands[0].backend, f"static (rank 0 chose {box[0]!r})", key)
        if dist.get_rank() != 0:
            chosen = by_name[box[0]]
            entry = {"choice": box[0], "times_ms": {}, "failed": {}, "from_rank": 0}
    _memory.setdefault(fp, {})[key] = chosen.backend
    _write_entry(fp, key, entry)
    return chosen, outs, Decision(op, chosen.backend, "tuned", key, {"times_ms": entry.get("times_ms", {}),
                                                                      "failed": entry.get("failed", {})})


def choose_graph(kind: str, call_key: str, device: torch.device, options: Tuple[str, ...],
                 measure: Callable[[], Tuple[Dict[str, float], Dict[str, str]]]) -> Tuple[str, Decision]:
    """A measured choice among ``options``, ways of computing the same thing that are not one op's
    implementations (the training block's graph of a unit, ``resnet_kernels/_block.py``), cached
    and synchronised across ranks exactly like ``choose``'s: per key ``kind|call_key|det=..`` and
    machine fingerprint, in memory and in the file cache. ``options[0]`` is the static choice (not
    measuring: CPU tensors, ``RESNET_KERNELS_TUNE=0``, torch.compile tracing, CUDA-graph capture).
    ``measure()`` runs and verifies every option (on scratch tensors: it changes no user state) and
    returns ({option: ms}, {option: why excluded}); it is called once per key (on every rank of a
    distributed job: its op calls synchronise their own choices), with the recording of ``explain``
    paused (the op calls it makes are not the model's). The fastest wins, ties to the
    first name in sorted order; an excluded option is reported once as a warning, like an
    implementation."""
    key = f"{kind}|{call_key}|det={int(_registry.deterministic_required())}"
    fp = fingerprint(device)
    name = _memory.get(fp, {}).get(key)
    if name in options:
        return name, Decision(kind, name, "cached", key)
    _load_file()
    entry = _file_entries.get(fp, {}).get(key)
    if entry is not None and entry.get("choice") in options:
        _memory.setdefault(fp, {})[key] = entry["choice"]
        return entry["choice"], Decision(kind, entry["choice"], "cached", key)
    reason = why_not_measuring(device)
    if reason is not None:
        return options[0], Decision(kind, options[0], f"static (not timed: {reason})", key)
    dist = _dist_sync()
    chosen: Optional[str] = None
    entry = None
    error: Optional[BaseException] = None
    # every rank measures (the op calls inside make their own choices, which synchronise across the
    # ranks: all of them must make those calls together); rank 0's times decide
    token = _recorder.set(None)
    try:
        times, failed = measure()
    finally:
        _recorder.reset(token)
    if dist is None or dist.get_rank() == 0:
        times = {k: float(v) for k, v in times.items() if k in options}
        for k, err in failed.items():
            _warn_once(f"fail:{kind}:{k}:{key}",
                       f"resnet_kernels: excluded the {k!r} option of {kind} for {call_key}: {err}")
        _results[key] = {**times, **{k: "error: " + v for k, v in failed.items()}}
        if times:
            chosen = min(times, key=lambda k: (times[k], k))
            entry = {"choice": chosen, "times_ms": times, "failed": dict(failed)}
        else:
            error = BackendUnavailableError(f"{kind}: every option failed for {call_key}: "
                                            + "; ".join(f"{k}: {v}" for k, v in failed.items()))
            if dist is None:
                raise error
    if dist is not None:
        box = [chosen if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        if box[0] is None:
            raise error or BackendUnavailableError(f"{kind}: rank 0 found no working option for {call_key}")
        if dist.get_rank() != 0:
            chosen = box[0]
            entry = {"choice": chosen, "times_ms": {}, "failed": {}, "from_rank": 0}
    _memory.setdefault(fp, {})[key] = chosen
    _write_entry(fp, key, entry)
    return chosen, Decision(kind, chosen, "tuned", key, {"times_ms": entry.get("times_ms", {}),
                                                         "failed": entry.get("failed", {})})


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """``fn``'s time in ms as 'auto' measures it (the injected timer of ``testing``, CUDA events on
    CUDA): for callers measuring something other than one op call (``choose_graph``)."""
    t = _time_ms(fn, device)
    if not (isinstance(t, float) and math.isfinite(t) and t >= 0):
        raise RuntimeError(f"the timer returned {t!r}")
    return t


def results() -> Dict[str, Dict[str, Any]]:
    """The measurements of this process, key -> {backend: ms or 'error: ...'}."""
    return dict(_results)


# --------------------------------------------------------------------------------------------
# the op layer's entry point
# --------------------------------------------------------------------------------------------
UNIT = "conv_bn_unit"


def plain_layers(x: Any, requested: str, unit: str = UNIT, record: bool = True) -> bool:
    """Whether a fused unit (conv -> BN [-> add] [-> ReLU], ``resnet_kernels.functional``) runs as
    the user's own PyTorch layers: 'auto' on tensors of a device that 'auto' does not measure on
    (CPU, meta). There no kernel of ours runs natively, and 'aten' is what 'auto' picks per op;
    for a whole unit that is exactly the plain layers, as fast as plain PyTorch, with its numbers.
    Not while torch.compile traces (the graph keeps the fused ops) nor for tensor subclasses
    (fake tensors) or an explicit backend (the reference 'torch' stays the oracle). ``unit``: what
    ``explain`` lists it as (the stem's max pool: 'maxpool2d'); ``record=False``: a question only
    (not listed by ``explain``: the caller asks again where it runs the unit)."""
    if requested != "auto" or type(x) is not torch.Tensor or DEVICE_TYPE[x.device] in _tunable_devices:
        return False
    if torch.compiler.is_compiling():
        return False
    rec = _recorder.get() if record else None
    if rec is not None:
        where = _where.get()
        rec.append(Decision(unit, "aten", f"static ({x.device.type}: the unit's own PyTorch layers)", "",
                            {"call": f"x {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}",
                             "module": where[-1] if where else ""}))
    return True


def check_requested(op: str, requested: str, call: Any) -> None:
    """Raise if an explicit backend cannot run this call (for calls that then run nothing, e.g. an
    empty batch)."""
    if requested != "auto":
        _registry.resolve_explicit(op, requested, call, call.device)


def quiet() -> bool:
    """Nothing captures, records or logs op decisions now (``dispatch``'s hot path: no Decision built)."""
    return _capture.get() is None and _recorder.get() is None and not log.isEnabledFor(logging.DEBUG)


def dispatch(op: str, requested: str, call: Any) -> Any:
    """Resolve ``requested`` ('auto' or a backend name) for this call and run it; returns the
    implementation's outputs (``call.run``'s value)."""
    device = call.device
    cap = _capture.get()
    if cap is not None:
        cap.append((op, requested, call))
    if _recorder.get() is None and not log.isEnabledFor(logging.DEBUG):
        # the hot path: nothing records or logs the decision, so none is built (same resolution)
        if requested != "auto":
            impl = _registry.resolve_explicit(op, requested, call, device)
            if impl is not None:
                return call.run(impl)
        elif DEVICE_TYPE[device] not in _tunable_devices:
            impl = _registry.first_candidate(op, call, device)
            if impl is not None:
                return call.run(impl)
    impl = None
    decision = None
    if requested != "auto":
        impl = _registry.resolve_explicit(op, requested, call, device)
        if impl is not None:
            decision = Decision(op, impl.backend, "explicit")
    outs = None
    if impl is None:
        impl, outs, decision = choose(op, call, device)
    rec = _recorder.get()
    if rec is not None:
        decision.detail.setdefault("call", call.describe())
        where = _where.get()
        decision.detail.setdefault("module", where[-1] if where else "")
        rec.append(decision)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s -> %s (%s) for %s", op, decision.impl, decision.how, call.describe())
    if outs is not None and not getattr(call, "mutates", False):
        return outs  # computed while measuring (an op that mutates its inputs measured on copies: run it)
    return call.run(impl)


@contextlib.contextmanager
def recording() -> Iterator[List[Decision]]:
    """Collect the decisions of the op calls made inside (``explain``)."""
    rec: List[Decision] = []
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)


__all__ = ["choose", "choose_graph", "time_ms", "dispatch", "recording", "reset", "testing", "cache_path", "cache_dir",
           "cache_summary",
           "fingerprint", "results", "TuningWarning", "TuningNotice", "SCHEMA"]
