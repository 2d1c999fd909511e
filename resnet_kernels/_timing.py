"""The one timing core shared by ``resnet-kernels bench`` and the pytest-benchmark suites in
``benchmarks/``.

* :func:`measure` runs ``warmup`` untimed iterations, then ``iters`` timed ones, and returns a
  :class:`Measurement` whose headline number is the **median** per-iteration time.
* Timers: :class:`CudaEventTimer` (a CUDA event recorded before and after each iteration on the
  current stream, read once at the end: GPU time, no host synchronisation inside the loop) and
  :class:`WallClockTimer` (``time.perf_counter``, for CPU runs; labelled ``wall_clock_cpu``).
  Any object with ``name``, ``mark()``, ``elapsed_ms(a, b)`` and ``synchronize()`` works, which
  is how the tests drive :func:`measure` with a fake clock.
* Rotating inputs: ``inputs`` is a list of argument tuples; iteration ``i`` uses
  ``inputs[i % len(inputs)]``. :func:`rotation_count` says how many copies are needed so that
  the working set of one iteration was evicted from L2 by the time it is reused, so a
  memory-bound kernel is timed against DRAM, not against a warm cache.
* :func:`copy_bandwidth` times a device-to-device copy moving the same number of bytes in the
  same process, so a kernel's achieved bandwidth can be reported as a percentage of what a
  plain copy reaches on this GPU right now.
* :func:`env_info` is the metadata every benchmark record carries (GPU, versions, git commit).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------------


class CudaEventTimer:
    """GPU time between CUDA events recorded on the current stream."""

    name = "cuda_events"

    def __init__(self, device: Optional[torch.device | str | int] = None):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaEventTimer needs a CUDA GPU (none is visible to torch)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def mark(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def elapsed_ms(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class WallClockTimer:
    """Host wall-clock time (``time.perf_counter``). On CPU tensors PyTorch runs synchronously,
    so this is the compute time; it is labelled ``wall_clock_cpu`` in every report."""

    name = "wall_clock_cpu"

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, a: float, b: float) -> float:
        return (b - a) * 1e3

    def synchronize(self) -> None:
        pass


def default_timer(device: torch.device | str) -> Any:
    dev = torch.device(device)
    return CudaEventTimer(dev) if dev.type == "cuda" else WallClockTimer()


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    if not sorted_vals:
        raise ValueError("no samples")
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass
class Measurement:
    """Per-iteration times (milliseconds) of the timed iterations, in order."""

    samples_ms: List[float]
    timer: str
    warmup: int
    rotation: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.samples_ms:
            raise ValueError("a Measurement needs at least one timed iteration")

    @property
    def iters(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def mean_ms(self) -> float:
        return float(statistics.fmean(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def max_ms(self) -> float:
        return float(max(self.samples_ms))

    @property
    def iqr_ms(self) -> float:
        s = sorted(self.samples_ms)
        return float(_quantile(s, 0.75) - _quantile(s, 0.25))

    def per_second(self, units: float) -> float:
        """``units`` processed per iteration -> units per second at the median time."""
        return units / (self.median_ms * 1e-3)

    def to_dict(self, samples: bool = False) -> Dict[str, Any]:
        d = {"timer": self.timer, "median_ms": self.median_ms, "mean_ms": self.mean_ms, "min_ms": self.min_ms,
             "max_ms": self.max_ms, "iqr_ms": self.iqr_ms, "iters": self.iters, "warmup": self.warmup,
             "rotation": self.rotation}
        if samples:
            d["samples_ms"] = list(self.samples_ms)
        d.update(self.extra)
        return d


def measure(fn: Callable[..., Any], inputs: Optional[Sequence[Tuple[Any, ...]]] = None, *, iters: int,
            warmup: int, timer: Any, setup: Optional[Callable[..., Any]] = None,
            on_iter: Optional[Callable[[int, int], None]] = None) -> Measurement:
    """Time ``fn``: ``warmup`` untimed calls, then ``iters`` timed calls; returns the samples.

    ``inputs``: argument tuples cycled over the iterations (warm-up included), so consecutive
    iterations touch different buffers (see :func:`rotation_count`); None = call ``fn()``.
    ``setup``: optional untimed per-iteration preparation: it gets the iteration's arguments and
    its return value (a tuple, or a single value) becomes ``fn``'s arguments; e.g. the forward
    pass when only the backward is timed. Its GPU work is queued before the start mark, so it
    is not counted.
    ``on_iter(done, total)`` is called after every iteration (progress display; keep it cheap).
    With the CUDA-event timer there is no host synchronisation between iterations: the samples
    are read after one synchronize at the end.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sets = list(inputs) if inputs is not None else [()]
    if not sets:
        raise ValueError("inputs must hold at least one argument tuple")
    total = warmup + iters

    def args_for(i: int) -> Tuple[Any, ...]:
        a = sets[i % len(sets)]
        if setup is not None:
            a = setup(*a)
            if not isinstance(a, tuple):
                a = (a,)
        return a

    for i in range(warmup):
        fn(*args_for(i))
        if on_iter is not None:
            on_iter(i + 1, total)
    timer.synchronize()
    marks = []
    for i in range(warmup, total):
        a = args_for(i)
        start = timer.mark()
        fn(*a)
        end = timer.mark()
        marks.append((start, end))
        if on_iter is not None:
            on_iter(i + 1, total)
    timer.synchronize()
    samples = [timer.elapsed_ms(s, e) for s, e in marks]
    return Measurement(samples_ms=samples, timer=timer.name, warmup=warmup, rotation=len(sets))


# --------------------------------------------------------------------------------------------
# rotating inputs and copy bandwidth
# --------------------------------------------------------------------------------------------

DEFAULT_L2_BYTES = 50 * 2 ** 20  # H100 / H200


def l2_cache_bytes(device: torch.device | str | None = None) -> int:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def rotation_count(bytes_per_set: int, l2_bytes: int, *, min_sets: int = 2, max_sets: int = 64,
                   max_total_bytes: Optional[int] = None) -> int:
    """How many copies of an iteration's working set (``bytes_per_set``) to cycle through.

    Enough that the other copies touched between two uses of one copy exceed twice the L2 size
    (so it was evicted), at least ``min_sets``, at most ``max_sets``, and no more than
    ``max_total_bytes`` in all (but never fewer than ``min_sets``)."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be > 0, got {bytes_per_set}")
    if min_sets < 1 or max_sets < min_sets:
        raise ValueError(f"need 1 <= min_sets <= max_sets, got {min_sets}, {max_sets}")
    n = 1 + math.ceil(2 * l2_bytes / bytes_per_set)
    n = max(min_sets, min(max_sets, n))
    if max_total_bytes is not None:
        n = max(min_sets, min(n, max_total_bytes // bytes_per_set))
    return n


def memory_budget_bytes(device: torch.device | str, fraction: float = 0.25) -> Optional[int]:
    """A fraction of the free device memory (None on CPU: no limit applied)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free * fraction)


def make_rotation(make_set: Callable[[], Tuple[Any, ...]], bytes_per_set: int, device: torch.device | str, *,
                  min_sets: int = 2, max_sets: int = 64) -> List[Tuple[Any, ...]]:
    """Build ``rotation_count(...)`` independent argument tuples with ``make_set()``."""
    n = rotation_count(bytes_per_set, l2_cache_bytes(device), min_sets=min_sets, max_sets=max_sets,
                       max_total_bytes=memory_budget_bytes(device))
    return [make_set() for _ in range(n)]


def copy_bandwidth(nbytes: int, device: torch.device | str, *, iters: int = 20, warmup: int = 5,
                   timer: Any = None) -> Dict[str, float]:
    """Device-to-device copy of a buffer of ``nbytes`` (read ``nbytes`` + write ``nbytes``),
    with rotating sources and destinations. Returns ``{"bytes": 2*nbytes, "median_ms", "gbps"}``
    where gbps counts both the read and the write, like the kernels' achieved bandwidth."""
    dev = torch.device(device)
    timer = timer or default_timer(dev)
    n = max(1, nbytes)
    sets = make_rotation(lambda: (torch.empty(n, dtype=torch.uint8, device=dev),
                                  torch.empty(n, dtype=torch.uint8, device=dev)), 2 * n, dev)
    for src, _ in sets:
        src.fill_(1)
    m = measure(lambda dst, src: dst.copy_(src), [(d, s) for s, d in sets], iters=iters, warmup=warmup, timer=timer)
    return {"bytes": 2 * n, "median_ms": m.median_ms, "gbps": 2 * n / (m.median_ms * 1e-3) / 1e9}


def gbps(bytes_moved: int, median_ms: float) -> float:
    return bytes_moved / (median_ms * 1e-3) / 1e9


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> Optional[int]:
    """Bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it
    (CUDA only; None on CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


# --------------------------------------------------------------------------------------------
# environment metadata
# --------------------------------------------------------------------------------------------


def git_commit(start: Optional[Path] = None) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) from ``git`` run in ``start`` (default: the current directory, then this
    package's directory), else (``$RESNET_KERNELS_COMMIT``, None), else (None, None)."""
    candidates = [start] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for d in candidates:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=d,
                                    capture_output=True, text=True, timeout=10)
                dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
                return out.stdout.strip(), dirty
        except (OSError, subprocess.SubprocessError):
            continue
    env = os.environ.get("RESNET_KERNELS_COMMIT", "").strip()
    return (env or None), None


def env_info(device: torch.device | str | None = None) -> Dict[str, Any]:
    """GPU name, torch/triton/CUDA versions, the git commit: attached to every benchmark record."""
    import importlib.metadata

    from . import __version__

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        gpu = props.name
        cc = f"{props.major}.{props.minor}"
    else:
        gpu, cc = None, None
    commit, dirty = git_commit()
    return {
        "gpu": gpu,
        "compute_capability": cc,
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "resnet_kernels": __version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
