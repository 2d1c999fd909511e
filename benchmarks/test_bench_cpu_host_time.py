"""Host time of the fused path against plain PyTorch (issue 10, part 3: within 1.1x on a CPU).

The fused ResNet-18 (``resnet_kernels.fuse`` of torchvision's) with the explicit ``aten`` backend
runs the fused path (the custom ops, the per-channel BatchNorm math, validation, dispatch) with
PyTorch's own kernels; at batch 2 and 32x32 with one intra-op thread the kernels are tiny, so the
step time is mostly Python/dispatcher host time. Compared with the same model unfused, same
weights, process CPU time, interleaved step by step. ``extra_info``: the medians and their ratio
(a benchmark, not a test: nothing is asserted). 'auto' on CPU tensors runs the plain layers and
is benchmarked in test_bench_cpu_auto.py; this measures what a GPU step pays on the host.

Run: ``pytest benchmarks/test_bench_cpu_host_time.py --benchmark-only -s`` (CPU only; no GPU needed).
"""

import copy
import statistics
import time

import pytest
import torch

import resnet_kernels as rk

torchvision = pytest.importorskip("torchvision")

STEPS = 20


def _step(m, x, y, train):
    if train:
        m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    else:
        with torch.no_grad():
            m(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_path_host_time_vs_plain(benchmark, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        plain = torchvision.models.resnet18(num_classes=10)
        fused = copy.deepcopy(plain)
        rk.fuse(fused, backend="aten")
        train = mode == "train"
        for m in (plain, fused):
            m.train(train)
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
        times = {"plain": [], "fused": []}
        for m in (plain, fused):
            _step(m, x, y, train)  # warm-up
        for _ in range(STEPS):
            for name, m in (("plain", plain), ("fused", fused)):
                t = time.process_time()
                _step(m, x, y, train)
                times[name].append(time.process_time() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio = med["fused"] / med["plain"]
        benchmark.extra_info.update(plain_ms=med["plain"], fused_ms=med["fused"], ratio=ratio)
        print(f"\n{mode}: plain {med['plain']:.2f} ms, fused (aten) {med['fused']:.2f} ms, ratio {ratio:.2f}")
        benchmark.pedantic(_step, args=(fused, x, y, train), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
