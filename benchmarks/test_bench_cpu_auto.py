"""'auto' on CPU tensors against plain PyTorch (issue: within 10%, train and eval): a fused
ResNet-18 (``resnet_kernels.fuse`` of torchvision's) and the same model unfused, same weights,
batch 8, 64x64, float32, one intra-op thread and process CPU time (robust to other load on the
machine), interleaved step by step. ``extra_info``: the median of each and their ratio.

Run: ``pytest benchmarks/test_bench_cpu_auto.py --benchmark-only`` (CPU only; no GPU needed).
"""

import copy
import statistics
import time

import pytest
import torch

import resnet_kernels as rk

torchvision = pytest.importorskip("torchvision")

STEPS = 10


def _step(m, x, y, train):
    if train:
        m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    else:
        with torch.no_grad():
            m(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_auto_vs_plain_cpu(benchmark, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        plain = torchvision.models.resnet18(num_classes=10)
        fused = copy.deepcopy(plain)
        rk.fuse(fused)
        train = mode == "train"
        for m in (plain, fused):
            m.train(train)
        x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
        times = {"plain": [], "auto": []}
        for m in (plain, fused):
            _step(m, x, y, train)  # warm-up
        for _ in range(STEPS):
            for name, m in (("plain", plain), ("auto", fused)):
                t = time.process_time()
                _step(m, x, y, train)
                times[name].append(time.process_time() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        benchmark.extra_info.update(plain_ms=med["plain"], auto_ms=med["auto"], ratio=med["auto"] / med["plain"])
        benchmark.pedantic(_step, args=(fused, x, y, train), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
