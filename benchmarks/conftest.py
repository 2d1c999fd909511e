"""pytest-benchmark suites: GPU only (every test is skipped with a reason without one), except the
CPU suites ``test_bench_cpu_*.py`` ('auto' and host time against plain PyTorch on a CPU).

Run from the repository root, after ``pip install .``:
    pytest benchmarks --benchmark-json=bench.json          # everything (see README.md)
    RK_BENCH_FAST=1 pytest benchmarks/test_bench_conv.py   # the reduced subset

Deliberately does NOT set TRITON_INTERPRET: the benchmarks time real kernels on a GPU.
This directory is not collected by the normal test run (pyproject's testpaths = tests).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # --import-mode=importlib: make timing.py / shapes.py importable
    sys.path.insert(0, _HERE)

import timing  # noqa: E402


def pytest_report_header(config):
    return [f"resnet-kernels benchmarks: fast={timing.FAST} iters={timing.ITERS} warmup={timing.WARMUP} "
            f"pytest-benchmark rounds={timing.PB_ROUNDS}x{timing.PB_ITERS}; GPU visible: {timing.HAS_GPU}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not timing.RECORDS:
        return
    import summarize

    terminalreporter.write_sep("=", "resnet-kernels: CUDA-event medians, ratios and bandwidth")
    terminalreporter.write_line(summarize.format_records(timing.RECORDS))
