"""The timing fixture layer of the pytest-benchmark suites (the core lives in the package:
``resnet_kernels._timing``, shared with ``resnet-kernels bench``).

:func:`run` times one case twice over the same rotating inputs:

1. **our number** -- ``resnet_kernels._timing.measure`` with CUDA events: ``RK_BENCH_WARMUP``
   untimed iterations, then ``RK_BENCH_ITERS`` timed ones back to back, no host sync inside the
   loop; the **median** goes to ``extra_info["median_ms"]``, with GB/s, % of copy bandwidth,
   TFLOP/s or images/s derived from it. This is the number the summaries and ratios use.
2. **pytest-benchmark's number** -- ``benchmark.pedantic``: ``RK_BENCH_PB_ROUNDS`` rounds, each of
   ``RK_BENCH_PB_ITERS`` back-to-back iterations ending in ``torch.cuda.synchronize()``
   (one iteration plus a sync when the case has an untimed per-iteration setup), host
   ``perf_counter`` time divided by the iterations: what pytest-benchmark's own table and
   ``pytest-benchmark compare`` show. It includes launch and synchronisation overhead, so it is
   an upper bound of (1).

With ``RK_BENCH_RECORDS=path``, every case's ``extra_info`` is also appended to ``path`` as one
JSON line as soon as it is measured (``summarize.py`` reads such files too), so a run that is
killed by a timeout still leaves its finished cases behind.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from resnet_kernels import _timing

FAST = os.environ.get("RK_BENCH_FAST", "0").strip() == "1"
ITERS = int(os.environ.get("RK_BENCH_ITERS", "10" if FAST else "50"))
WARMUP = int(os.environ.get("RK_BENCH_WARMUP", "3" if FAST else "10"))
PB_ROUNDS = int(os.environ.get("RK_BENCH_PB_ROUNDS", "3" if FAST else "10"))
PB_ITERS = int(os.environ.get("RK_BENCH_PB_ITERS", "5"))
HAS_GPU = torch.cuda.is_available()

requires_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="the benchmarks time CUDA kernels with CUDA events and need an NVIDIA GPU; none is visible")

# every record's extra_info, appended in order (the conftest prints a summary from them)
RECORDS: List[Dict[str, Any]] = []

_ENV: Optional[Dict[str, Any]] = None
_COPY: Dict[int, Dict[str, float]] = {}


def env() -> Dict[str, Any]:
    global _ENV
    if _ENV is None:
        _ENV = _timing.env_info()
    return _ENV


def copy_reference(bytes_moved: int) -> Dict[str, float]:
    """A device-to-device copy moving ``bytes_moved`` bytes in all (half read, half written),
    measured once per size in this process."""
    half = max(1, bytes_moved // 2)
    if half not in _COPY:
        _COPY[half] = _timing.copy_bandwidth(half, "cuda", iters=max(ITERS, 10), warmup=WARMUP)
    return _COPY[half]


def rotation(make_set: Callable[[], Tuple[Any, ...]], bytes_per_set: int) -> List[Tuple[Any, ...]]:
    return _timing.make_rotation(make_set, bytes_per_set, "cuda")


def _pedantic(benchmark, fn: Callable, inputs: Sequence[Tuple[Any, ...]], setup: Optional[Callable]) -> None:
    n = len(inputs)
    state = {"i": 0}
    if setup is None:
        def target():
            i = state["i"]
            state["i"] = i + 1
            fn(*inputs[i % n])
            if (i + 1) % PB_ITERS == 0:
                torch.cuda.synchronize()

        benchmark.pedantic(target, rounds=PB_ROUNDS, iterations=PB_ITERS, warmup_rounds=1)
    else:
        def setup_fn():
            i = state["i"]
            state["i"] = i + 1
            a = setup(*inputs[i % n])
            torch.cuda.synchronize()
            return (a if isinstance(a, tuple) else (a,)), {}

        def target(*a):
            fn(*a)
            torch.cuda.synchronize()

        benchmark.pedantic(target, setup=setup_fn, rounds=PB_ROUNDS, warmup_rounds=1)


def run(benchmark, fn: Callable, inputs: Sequence[Tuple[Any, ...]], *, info: Dict[str, Any],
        setup: Optional[Callable] = None, bytes_moved: Optional[int] = None, flops: Optional[float] = None,
        images: Optional[int] = None, peak_memory: bool = False) -> _timing.Measurement:
    """Time ``fn`` over the rotating ``inputs`` (see the module docstring) and fill
    ``benchmark.extra_info``: ``info`` (suite, case, impl, ...), the environment, the CUDA-event
    statistics and the derived rates."""
    m = _timing.measure(fn, inputs, setup=setup, iters=ITERS, warmup=WARMUP, timer=_timing.CudaEventTimer())
    ex = benchmark.extra_info
    ex.update(env())
    ex.update(info)
    ex.update(m.to_dict())
    if bytes_moved is not None:
        ref = copy_reference(bytes_moved)
        ex["bytes"] = int(bytes_moved)
        ex["gbps"] = _timing.gbps(bytes_moved, m.median_ms)
        ex["copy_gbps"] = ref["gbps"]
        ex["pct_of_copy"] = 100.0 * ex["gbps"] / ref["gbps"]
    if flops is not None:
        ex["flops"] = float(flops)
        ex["tflops"] = flops / (m.median_ms * 1e-3) / 1e12
    if images is not None:
        ex["images_per_s"] = m.per_second(images)
    if peak_memory:
        a = inputs[0]

        def one_call():
            args = setup(*a) if setup else a
            fn(*(args if isinstance(args, tuple) else (args,)))  # a single value is one argument, as in measure()

        ex["peak_mem_bytes"] = _timing.peak_memory(one_call, "cuda")
    _pedantic(benchmark, fn, inputs, setup)
    RECORDS.append(dict(ex))
    path = os.environ.get("RK_BENCH_RECORDS")
    if path:  # one JSON line per case as soon as it is measured: survives a killed run
        with open(path, "a") as f:
            f.write(json.dumps(ex, default=str) + "\n")
    return m


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with a fresh Dynamo cache, so one case's compilation never counts
    against another's recompile limit (a hit limit silently falls back to eager)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)
